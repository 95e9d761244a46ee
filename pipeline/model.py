"""The dropout CNN, and nothing else.

Conv blocks (conv 3x3, optional BatchNorm, ReLU, 2x2 max pool, optional `nn.Dropout2d`), then
fully connected layers with `nn.Dropout` before each one: the classic recipe, rate 0.5 by
default. Both dropout modules honour `eval()`: at inference they are the identity, which the
export's audit proves on the ONNX graph.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ModelConfig


class DropoutCNN(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        blocks: list[nn.Module] = []
        channels, height, width = config.in_channels, config.height, config.width
        for out_channels in config.conv_channels:
            blocks.append(nn.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=not config.batch_norm))
            if config.batch_norm:
                blocks.append(nn.BatchNorm2d(out_channels))
            blocks.append(nn.ReLU(inplace=True))
            # Pool only while the map is at least 2x2, so tiny inputs still get every block.
            if height >= 2 and width >= 2:
                blocks.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            if config.spatial_dropout > 0:
                blocks.append(nn.Dropout2d(config.spatial_dropout))
            channels = out_channels
        self.features = nn.Sequential(*blocks)
        head: list[nn.Module] = [nn.Flatten()]
        features = channels * height * width
        sizes = (*config.fc_units, config.num_classes)
        for i, units in enumerate(sizes):
            if config.dropout > 0:
                head.append(nn.Dropout(config.dropout))
            head.append(nn.Linear(features, units))
            if i < len(sizes) - 1:  # no ReLU on the logits
                head.append(nn.ReLU(inplace=True))
            features = units
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W), preprocessed -> class logits (N, K)."""
        return self.classifier(self.features(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
