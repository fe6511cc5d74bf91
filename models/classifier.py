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
    blocks_per_stage: int | tuple[int, ...] = 2  # one count for every stage, or one per stage
    bottleneck: bool = False  # 1x1-3x3-1x1 blocks with 4x wider outputs (ResNet-50) instead of two 3x3 convs
    imagenet_stem: bool = False  # a 7x7 stride-2 conv and a stride-2 max-pool first: a quarter of the resolution
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def classifier_tiny(num_classes: int = 10) -> ClassifierConfig:
    return ClassifierConfig(num_classes=num_classes, width=16, stages=3, blocks_per_stage=1)


def classifier_base(num_classes: int = 10) -> ClassifierConfig:
    return ClassifierConfig(num_classes=num_classes)


def classifier_resnet50(num_classes: int = 1000) -> ClassifierConfig:
    """ResNet-50 (He et al. 2016; stride on the 3x3 conv, as torchvision's), the CAS classifier of Ravuri and
    Vinyals for ImageNet classes: 25.6M parameters at 1000 classes, about 4.1 GMAC per 224 px image."""
    return ClassifierConfig(num_classes=num_classes, width=64, stages=4, blocks_per_stage=(3, 4, 6, 3),
                            bottleneck=True, imagenet_stem=True)


CLASSIFIER_PRESETS = {"tiny": classifier_tiny, "base": classifier_base, "resnet50": classifier_resnet50}


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


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, mid_ch: int, stride: int):
        super().__init__()
        out_ch = mid_ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, mid_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_ch)
        self.conv3 = nn.Conv2d(mid_ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNetClassifier(nn.Module):
    """ResNet-style classifier for images in [-1, 1] of any size (global average pooling)."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        kernel, stride = (7, 2) if cfg.imagenet_stem else (3, 1)
        stem = [nn.Conv2d(cfg.in_channels, cfg.width, kernel, stride=stride, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(cfg.width), nn.ReLU()]
        self.stem = nn.Sequential(*stem, *([nn.MaxPool2d(3, stride=2, padding=1)] if cfg.imagenet_stem else []))
        counts = cfg.blocks_per_stage
        counts = tuple(counts) if isinstance(counts, (tuple, list)) else (counts,) * cfg.stages
        if len(counts) != cfg.stages:
            raise ValueError(f"blocks_per_stage has {len(counts)} counts for {cfg.stages} stages")
        block = Bottleneck if cfg.bottleneck else BasicBlock
        blocks, ch = [], cfg.width
        for stage in range(cfg.stages):
            width = cfg.width * 2**stage
            for b in range(counts[stage]):
                blocks.append(block(ch, width, stride=2 if stage > 0 and b == 0 else 1))
                ch = width * (Bottleneck.expansion if cfg.bottleneck else 1)
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
