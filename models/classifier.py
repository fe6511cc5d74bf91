"""A small ResNet image classifier: rejection-sampling scorer, CAS classifier and feature extractor."""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ClassifierConfig:
    num_classes: int = 10
    in_channels: int = 3
    width: int = 64  # channels of the first stage; doubled at every later stage
    stages: int = 3  # each stage after the first halves the resolution
    blocks_per_stage: int = 2
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def classifier_tiny(num_classes: int = 10) -> ClassifierConfig:
    return ClassifierConfig(num_classes=num_classes, width=16, stages=3, blocks_per_stage=1)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetClassifier(nn.Module):
    """ResNet-style classifier for images in [-1, 1] of any size (global average pooling)."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, cfg.width, 3, padding=1, bias=False), nn.BatchNorm2d(cfg.width), nn.ReLU()
        )
        blocks, ch = [], cfg.width
        for stage in range(cfg.stages):
            out = cfg.width * 2**stage
            for b in range(cfg.blocks_per_stage):
                blocks.append(BasicBlock(ch, out, stride=2 if stage > 0 and b == 0 else 1))
                ch = out
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = ch
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(ch, cfg.num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (B, feature_dim)."""
        return self.blocks(self.stem(images)).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.fc(self.dropout(self.features(images)))
