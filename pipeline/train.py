"""Training loop, evaluation and checkpoints.

In-memory sources (digits, IDX, npz) live on the device as normalized tensors and batches are
index slices, so the hot loop has no per-sample Python work. Image folders stream: each batch
is read from the decoded cache (uint8) and normalized on its own (`Feed`), so memory is bounded
by the batch, not by the number of images. After every epoch the full training state (weights, optimizer,
schedule, RNG states, history) is saved atomically, which is what `--resume` continues from:
a resumed run reaches the same weights as an uninterrupted one with the same seed.
"""

from __future__ import annotations

import logging
import math
import pickle
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import __version__, augment, distributed
from pipeline.artifacts import CHECKPOINT, TRAIN_STATE, atomic_path
from pipeline.config import DataConfig, ModelConfig, TrainConfig, to_dict
from pipeline.data import Preprocess, Splits
from pipeline.errors import CheckpointError, DeviceError, TrainingDivergedError
from pipeline.model import DropoutCNN

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "pipeline-checkpoint-v1"
EVAL_BATCH = 1024


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    history: tuple[EpochResult, ...]
    best_epoch: int
    test_accuracy: float
    test_loss: float
    train_seconds: float
    stopped_early: bool
    device: str
    world_size: int = 1
    """Processes that trained the model together (torchrun); 1 for a single process."""
    replica_digests: tuple[str, ...] = ()
    """`distributed.parameter_digest` of the final weights on every rank, all equal."""
    test_predictions: np.ndarray | None = None
    """The best model's class index for every test image (rank 0 only), for the per-class results."""

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds / max(len(self.history), 1)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: this torch build or machine has no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(requested)


def model_config_for(splits: Splits, base: ModelConfig) -> ModelConfig:
    """The model config with its input shape and class count taken from the data."""
    channels, (height, width) = splits.preprocess.channels, splits.preprocess.size
    config = ModelConfig(**{**to_dict(base), "in_channels": channels, "height": height, "width": width,
                            "num_classes": len(splits.labels), "conv_channels": base.conv_channels,
                            "fc_units": base.fc_units})
    # The checkpoint records the first block as built, not "decide by size".
    return replace(config, strided_first_conv=config.first_conv_is_strided())


class Feed:
    """One split as normalized float32 input batches and labels on the device.

    Raw pixels held in memory (a numpy array) are normalized once and kept on the device; lazily
    read ones (`data.LazyImages`, an image folder's cache) are read and normalized batch by batch.
    """

    def __init__(self, x, y: np.ndarray, preprocess: Preprocess, device: torch.device) -> None:
        self.device = device
        self.y = torch.from_numpy(np.asarray(y)).to(device)
        self._lazy = None if isinstance(x, np.ndarray) else preprocess.apply(x)
        self._x = torch.from_numpy(preprocess.apply(x)).to(device) if self._lazy is None else None

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of the images at `positions` (a CPU or device index tensor)."""
        if self._x is not None:
            positions = positions.to(self.device)
            return self._x[positions], self.y[positions]
        inputs = torch.from_numpy(self._lazy[positions.cpu().numpy()]).to(self.device)
        return inputs, self.y[positions.to(self.device)]

    def batches(self, positions: torch.Tensor, size: int = EVAL_BATCH):
        for start in range(0, len(positions), size):
            yield self.batch(positions[start:start + size])


def feeds(splits: Splits, device: torch.device) -> dict[str, Feed]:
    """The train, val and test splits as `Feed`s."""
    pairs = {"train": (splits.x_train, splits.y_train), "val": (splits.x_val, splits.y_val),
             "test": (splits.x_test, splits.y_test)}
    return {name: Feed(x, y, splits.preprocess, device) for name, (x, y) in pairs.items()}


def evaluate(model: nn.Module, feed: Feed) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the model in eval mode."""
    loss, correct = _evaluate_sums(model, feed, torch.arange(len(feed)))
    return loss / len(feed), correct / len(feed)


@torch.inference_mode()
def _evaluate_sums(model: nn.Module, feed: Feed, positions: torch.Tensor) -> tuple[float, int]:
    """(summed cross-entropy, correct count) of the model in eval mode over the images at `positions`."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for inputs, target in feed.batches(positions):
        logits = model(inputs)
        loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    model.train(was_training)
    return loss, correct


@torch.inference_mode()
def predict_feed(model: nn.Module, feed: Feed) -> np.ndarray:
    """Class indices of every image of the split, in eval mode."""
    was_training = model.training
    model.eval()
    out = [model(inputs).argmax(1).cpu().numpy() for inputs, _ in feed.batches(torch.arange(len(feed)))]
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def evaluate_across(model: nn.Module, feed: Feed, world: distributed.World) -> tuple[float, float]:
    """`evaluate` with each rank scoring every N-th image and the sums reduced across ranks."""
    if not world.distributed:
        return evaluate(model, feed)
    part = torch.arange(world.rank, len(feed), world.world_size)
    loss, correct, count = distributed.all_reduce_sum((*_evaluate_sums(model, feed, part), len(part)), world)
    return loss / count, correct / count


def _balancing(y: np.ndarray, num_classes: int, balance: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(cross-entropy class weights, per-image sampling weights) for `TrainConfig.balance`; None where unused."""
    if balance == "none":
        return None, None
    counts = np.bincount(np.asarray(y), minlength=num_classes).astype(np.float64)
    if balance == "weights":  # n / (K * n_k): a class's images weigh as much together as any other class's
        return torch.tensor(len(y) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32), None
    return None, torch.tensor(1.0 / counts[np.asarray(y)], dtype=torch.float64)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        # AdamW: weight decay as a true L2 shrinkage, not scaled by Adam's adaptive rates.
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                           weight_decay=config.weight_decay)


def _schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(config.epochs // 3, 1), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _l1_penalty(model: nn.Module) -> torch.Tensor:
    return sum(p.abs().sum() for name, p in model.named_parameters() if name.endswith("weight"))


def train(splits: Splits, data_config: DataConfig, model_config: ModelConfig, config: TrainConfig,
          run_dir: Path, resume: bool = False,
          on_epoch: Callable[[EpochResult], None] | None = None) -> TrainResult:
    """Train in `run_dir` (a staging folder) and write `checkpoint.pt` there.

    `model_config` must already match the data (see `model_config_for`). With `resume`, the
    training state saved after the last completed epoch is loaded and training continues.

    Under torchrun (an open `distributed.session()`), every rank calls this: the model is wrapped
    in DistributedDataParallel, each rank trains on its shard of every epoch, metrics are summed
    across ranks, and only rank 0 writes files and calls `on_epoch`.
    """
    world = distributed.current()
    distributed.check_same_data(splits.fingerprint, world)
    device = distributed.local_device(resolve_device(config.device), world)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    data = feeds(splits, device)
    class_weights, sample_weights = _balancing(splits.y_train, model_config.num_classes, config.balance)
    class_weights = None if class_weights is None else class_weights.to(device)
    model = DropoutCNN(model_config).to(device)
    net = distributed.wrap(model, device, world)  # the model itself for a single process
    batch_size = distributed.local_batch(config.batch_size, world)
    optimizer = _optimizer(model, config)
    scheduler = _schedule(optimizer, config)
    shuffle = torch.Generator().manual_seed(config.seed)
    state = {"epoch": 0, "history": [], "best_val_loss": math.inf, "best_epoch": 0,
             "best_state": None, "bad_epochs": 0, "seconds": 0.0}
    if resume:
        state = _load_train_state(run_dir / TRAIN_STATE, model, optimizer, scheduler, shuffle, device,
                                  fingerprint=splits.fingerprint, model_config=model_config, config=config)

    stopped_early = False
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        started = time.perf_counter()
        net.train()
        if world.distributed:
            torch.manual_seed(distributed.seed_for_epoch(config.seed, epoch, world))
        if sample_weights is not None:  # balanced sampling: every class equally likely, with replacement
            drawn = torch.multinomial(sample_weights, len(sample_weights), replacement=True, generator=shuffle)
        else:
            drawn = torch.randperm(len(data["train"]), generator=shuffle)
        order = distributed.shard(drawn, world)
        total_loss, correct = 0.0, 0
        for inputs, target in data["train"].batches(order, batch_size):
            if config.augment == "photo":
                inputs = augment.photo(inputs, splits.preprocess.mean, splits.preprocess.std)
            logits = net(inputs)
            loss = nn.functional.cross_entropy(logits, target, weight=class_weights)
            objective = loss + config.l1 * _l1_penalty(model) if config.l1 > 0 else loss
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(target)
            correct += int((logits.argmax(1) == target).sum())
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        distributed.broadcast_buffers(model, world)
        total_loss, correct, seen = distributed.all_reduce_sum((total_loss, correct, len(order)), world)
        val_loss, val_accuracy = evaluate_across(model, data["val"], world)
        seconds = time.perf_counter() - started
        result = EpochResult(epoch, total_loss / seen, correct / seen, val_loss, val_accuracy, lr, seconds)
        if not (math.isfinite(val_loss) and math.isfinite(result.train_loss)):
            # Before anything of this epoch is kept: a NaN never compares below the best loss, so the
            # run would go on to load no best state at all (or the last finite one, silently).
            raise TrainingDivergedError(f"training diverged at epoch {epoch}: validation loss {val_loss}, train loss "
                                        f"{result.train_loss} (lr {lr:g}); no run was accepted (try a lower --lr)")
        state["history"].append(result.to_dict())
        state["seconds"] += seconds
        state["epoch"] = epoch
        if val_loss < state["best_val_loss"]:
            state.update(best_val_loss=val_loss, best_epoch=epoch, bad_epochs=0,
                         best_state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        if config.patience and state["bad_epochs"] >= config.patience:
            stopped_early = True
        if world.is_main:
            _save_train_state(run_dir / TRAIN_STATE, state, model, optimizer, scheduler, shuffle,
                              splits.fingerprint, data_config, model_config, config, stopped_early)
        if on_epoch is not None and world.is_main:
            on_epoch(result)
        if stopped_early:
            log.info("early stop at epoch %d: no better validation loss for %d epochs", epoch, config.patience)
            break
    else:
        stopped_early = bool(state.get("stopped_early", False))

    model.load_state_dict(state["best_state"])
    digests = distributed.check_replicas(model, world)
    test_loss, test_accuracy = evaluate_across(model, data["test"], world)
    test_predictions = predict_feed(model, data["test"]) if world.is_main else None
    checkpoint = run_dir / CHECKPOINT
    if world.is_main:
        save_checkpoint(checkpoint, model, splits.preprocess, splits.labels, splits.fingerprint,
                        data_config, config, state["best_epoch"])
    return TrainResult(checkpoint, tuple(EpochResult(**h) for h in state["history"]), state["best_epoch"],
                       test_accuracy, test_loss, state["seconds"], stopped_early, str(device),
                       world.world_size, digests, test_predictions)


# --- training state, for --resume ------------------------------------------------------


def _save_train_state(path: Path, state: dict, model: nn.Module, optimizer, scheduler, shuffle: torch.Generator,
                      fingerprint: str, data_config: DataConfig, model_config: ModelConfig, config: TrainConfig,
                      stopped_early: bool) -> None:
    payload = {**state, "stopped_early": stopped_early, "model": model.state_dict(),
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "torch_rng": torch.get_rng_state(), "shuffle_rng": shuffle.get_state(),
               "fingerprint": fingerprint, "data_config": to_dict(data_config),
               "model_config": to_dict(model_config), "train_config": to_dict(config)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_train_state(path: Path, model: nn.Module, optimizer, scheduler, shuffle: torch.Generator,
                      device: torch.device, fingerprint: str, model_config: ModelConfig, config: TrainConfig) -> dict:
    payload = distributed.on_main(_torch_load, path)  # the run folder may exist on rank 0's machine only
    if payload.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{path}: the data differs from the interrupted run's (fingerprint mismatch)")
    if payload.get("model_config") != to_dict(model_config) or payload.get("train_config") != to_dict(config):
        raise CheckpointError(f"{path}: the interrupted run used another model or training configuration")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["torch_rng"])
    shuffle.set_state(payload["shuffle_rng"])
    keys = ("epoch", "history", "best_val_loss", "best_epoch", "best_state", "bad_epochs", "seconds", "stopped_early")
    return {k: payload[k] for k in keys}


def read_train_state_configs(run_dir: Path) -> tuple[dict, dict, dict]:
    """(data config, model config, train config) of an interrupted run, as plain dicts."""
    payload = _torch_load(Path(run_dir) / TRAIN_STATE)
    return payload["data_config"], payload["model_config"], payload["train_config"]


# --- checkpoints ---------------------------------------------------------------------------


def save_checkpoint(path: Path, model: DropoutCNN, preprocess: Preprocess, labels: tuple[str, ...],
                    fingerprint: str, data_config: DataConfig, train_config: TrainConfig, epoch: int) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "pipeline_version": __version__,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "model_config": to_dict(model.config), "preprocess": preprocess.to_dict(), "labels": list(labels),
               "data_fingerprint": fingerprint, "data_config": to_dict(data_config),
               "train_config": to_dict(train_config), "epoch": epoch}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _torch_load(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        # weights_only=True: a checkpoint from elsewhere must not be able to run code.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a pipeline checkpoint")
    return payload


def load_checkpoint(path: Path) -> tuple[DropoutCNN, dict]:
    """The model in eval mode and the checkpoint's record; `CheckpointError` on any mismatch."""
    payload = _torch_load(path)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a pipeline checkpoint (format {payload.get('format')!r})")
    try:
        config = ModelConfig.from_dict(payload["model_config"])
        model = DropoutCNN(config)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: weights do not match the recorded architecture: {detail}") from None
    model.eval()
    return model, payload


def predictions(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Class indices for preprocessed inputs, in eval mode on the CPU."""
    model.eval()
    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(x[i:i + EVAL_BATCH])).argmax(1).numpy()
                               for i in range(0, len(x), EVAL_BATCH)])
