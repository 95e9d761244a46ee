"""The dropout CNN, and nothing else.

Conv blocks (conv 3x3, optional BatchNorm, ReLU, 2x2 max pool, optional `nn.Dropout2d`; by default the
first block of an input of 16x16 or more halves the map with a 5x5 stride-2 conv instead), then
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
        for index, out_channels in enumerate(config.conv_channels):
            # Halve the map only while it is at least 2x2, so tiny inputs still get every block.
            downsample = height >= 2 and width >= 2
            strided = downsample and index == 0 and config.first_conv_is_strided()
            if strided:  # 5x5, not 3x3: stride-2 windows then overlap by 3 pixels, not 1 (it kept MNIST accuracy)
                conv = nn.Conv2d(channels, out_channels, kernel_size=5, padding=2, stride=2, bias=not config.batch_norm)
            else:
                conv = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=not config.batch_norm)
            blocks.append(conv)
            if config.batch_norm:
                blocks.append(nn.BatchNorm2d(out_channels))
            blocks.append(nn.ReLU(inplace=True))
            if strided:  # kernel 5, padding 2, stride 2 gives ceil(H/2) x ceil(W/2)
                height, width = (height + 1) // 2, (width + 1) // 2
            elif downsample:
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
