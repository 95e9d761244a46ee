"""The Monte Carlo dropout module: a trained `DropoutCNN` whose dropout stays on at inference.

Dropout's masks are drawn from random ops that no graph optimizer may remove:
`torch.rand_like(x) >= p`, a multiply, and a scale by 1/(1-p), which export to
RandomUniformLike + GreaterOrEqual + Cast + Mul. A plain `Dropout(training_mode=True)` is not
an option: ONNX Runtime's default optimizer deletes it (it assumes inference).

The N samples run in one batched pass: the layers before the first dropout are deterministic,
so they run once per image, and only their output is repeated N times. The module returns

    probs        (B, K) mean class probabilities over the N samples
    entropy      (B,)   predictive entropy H[mean probs], in nats (0 .. ln K)
    mutual_info  (B,)   H[mean probs] - mean over samples of H[probs]: the model's own
                        (epistemic) uncertainty, BALD; 0 .. entropy
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.model import DropoutCNN

# Clamp before the log: a mean probability of exactly 0 contributes 0 to the entropy.
_TINY = 1e-30


class MCDropout(nn.Module):
    """Element-wise dropout that ignores `eval()`: a fresh mask on every call."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (torch.rand_like(x) >= self.p).to(x.dtype)
        return x * keep * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MCDropout2d(MCDropout):
    """Channel-wise dropout (as `nn.Dropout2d`) that ignores `eval()`: one draw per (image, channel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (torch.rand_like(x[:, :, :1, :1]) >= self.p).to(x.dtype)
        return x * keep * (1.0 / (1.0 - self.p))


def _mc_layer(module: nn.Module) -> nn.Module | None:
    """The always-on replacement of a dropout layer, or None for any other layer."""
    if isinstance(module, nn.Dropout2d):
        return MCDropout2d(module.p) if module.p > 0 else None
    if isinstance(module, nn.Dropout):
        return MCDropout(module.p) if module.p > 0 else None
    return None


class MCDropoutModel(nn.Module):
    """(B, C, H, W) preprocessed images -> (probs, entropy, mutual_info) over `samples` dropout masks."""

    def __init__(self, model: DropoutCNN, samples: int) -> None:
        super().__init__()
        layers = [*model.features, *model.classifier]
        replaced = [_mc_layer(layer) for layer in layers]
        first = next((i for i, mc in enumerate(replaced) if mc is not None), None)
        if first is None:
            # --mc-dropout asked of a model trained with dropout 0: the user's option, not a bug.
            raise ConfigError("the model has no dropout layer with a rate > 0: MC dropout has nothing to sample "
                              "(--mc-dropout needs a run trained with --dropout above 0)")
        self.samples = int(samples)
        self.num_classes = model.config.num_classes
        self.rates = tuple(mc.p for mc in replaced if mc is not None)
        self.prefix = nn.Sequential(*layers[:first])
        pairs = zip(layers[first:], replaced[first:], strict=True)
        self.sampled = nn.Sequential(*(mc if mc is not None else layer for layer, mc in pairs))
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shared = self.prefix(x)
        # Sample-major repeat: row s * B + b is image b under mask s.
        repeated = shared.repeat(self.samples, *([1] * (shared.dim() - 1)))
        logits = self.sampled(repeated).reshape(self.samples, -1, self.num_classes)
        log_probs = torch.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        mean = probs.mean(dim=0)
        entropy = -(mean * torch.log(mean.clamp_min(_TINY))).sum(dim=-1)
        expected_entropy = -(probs * log_probs).sum(dim=-1).mean(dim=0)
        # Jensen makes it >= 0; float rounding can leave a -1e-7.
        mutual_info = (entropy - expected_entropy).clamp_min(0.0)
        return mean, entropy, mutual_info


def dropout_layers(model: DropoutCNN) -> list[dict]:
    """Where the model's dropout layers are and their rates, for the manifest."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout | nn.Dropout2d) and module.p > 0:
            found.append({"layer": name, "type": type(module).__name__, "rate": float(module.p)})
    return found
