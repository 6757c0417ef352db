"""ResNet encoders, the projection head, and the SimCLR model that joins them.

The encoder f maps an image to the pooled feature h (what every evaluation uses); the
projection head g maps h to z (what NT-Xent sees). Shapes:

    x: (B, 3, H, W) float in [0, 1] (normalisation is the first layer's business: BN)
    h = encoder(x): (B, feature_dim)      feature_dim = 512 (ResNet-18/34), 2048 (ResNet-50)
    z = head(h):    (B, out_dim)          out_dim = 128
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

__all__ = [
    "ENCODER_ARCHS",
    "build_encoder",
    "uses_cifar_stem",
    "ProjectionHead",
    "SimCLRModel",
]

ENCODER_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# Images this small lose most of their resolution to a 7x7/2 conv + max-pool stem.
CIFAR_STEM_MAX_SIZE = 64


def uses_cifar_stem(image_size: int) -> bool:
    """Default stem choice: the CIFAR stem for images of at most 64 pixels a side."""
    return image_size <= CIFAR_STEM_MAX_SIZE


def build_encoder(arch: str = "resnet18", cifar_stem: bool = False, width_multiplier: float = 1.0) -> nn.Module:
    """A torchvision ResNet without its classifier: (B, 3, H, W) -> h of shape (B, feature_dim).

    Args:
        arch: one of :data:`ENCODER_ARCHS`.
        cifar_stem: replace the 7x7/2 conv and max-pool by a 3x3/1 conv (no pooling), so a
            32 px image keeps 32x32 resolution after the stem (the paper's CIFAR-10 setup).
        width_multiplier: scales every layer's width (1.0 = the standard network). Values
            below 1 give a cheap encoder for laptops; must keep widths >= 1.

    The last BatchNorm of every residual block starts with gamma = 0 (each block starts as
    the identity), as in the paper. The result has an attribute ``feature_dim``.
    """
    if arch not in ENCODER_ARCHS:
        raise ValueError(f"unknown encoder arch {arch!r}; expected one of {', '.join(ENCODER_ARCHS)}")
    if width_multiplier <= 0:
        raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}")
    builder = getattr(torchvision.models, arch)
    encoder = builder(weights=None, zero_init_residual=True)
    if width_multiplier != 1.0:
        encoder = _scale_width(encoder, width_multiplier)
    stem_width = encoder.conv1.out_channels
    if cifar_stem:
        encoder.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(encoder.conv1.weight, mode="fan_out", nonlinearity="relu")
        encoder.maxpool = nn.Identity()
    encoder.feature_dim = encoder.fc.in_features
    encoder.fc = nn.Identity()
    return encoder


def _scale_width(encoder: torchvision.models.ResNet, multiplier: float) -> torchvision.models.ResNet:
    """Rebuild ``encoder``'s stem and four stages with every width scaled by ``multiplier``.

    torchvision's ``_make_layer`` reads the input width from ``self.inplanes``, so setting it
    to the narrow stem width and remaking the stages keeps every block consistent.
    """
    block = type(encoder.layer1[0])
    depths = [len(getattr(encoder, f"layer{i}")) for i in range(1, 5)]
    widths = [max(1, round(width * multiplier)) for width in (64, 128, 256, 512)]
    encoder.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
    encoder.bn1 = nn.BatchNorm2d(widths[0])
    encoder.inplanes = widths[0]
    for index, (width, depth) in enumerate(zip(widths, depths)):
        stage = encoder._make_layer(block, width, depth, stride=1 if index == 0 else 2)
        setattr(encoder, f"layer{index + 1}", stage)
    encoder.fc = nn.Linear(encoder.inplanes, 1000)
    _init_like_torchvision(encoder)
    return encoder


def _init_like_torchvision(model: nn.Module) -> None:
    """torchvision ResNet's initialisation, including the zero-init of each block's last BN."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)
    for module in model.modules():
        if isinstance(module, torchvision.models.resnet.Bottleneck):
            nn.init.constant_(module.bn3.weight, 0)
        elif isinstance(module, torchvision.models.resnet.BasicBlock):
            nn.init.constant_(module.bn2.weight, 0)


class ProjectionHead(nn.Module):
    """SimCLR's MLP projection head g: (B, in_dim) -> (B, out_dim).

    ``num_layers`` linear layers (2 in SimCLR v1, 3 in v2); every layer but the last is
    Linear (no bias) -> BatchNorm1d -> ReLU with ``hidden_dim`` outputs; the last is a Linear
    to ``out_dim``. ``layers[k]`` is the k-th block, so ``features(h, k)`` is the output of
    the first k blocks (k=0: h itself), the point SimCLRv2 fine-tunes from.
    """

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128, num_layers: int = 2) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"projection head needs num_layers >= 1, got {num_layers}")
        hidden_dim = hidden_dim or in_dim
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            blocks.append(
                nn.Sequential(nn.Linear(width, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True))
            )
            width = hidden_dim
        blocks.append(nn.Linear(width, out_dim))
        self.layers = nn.ModuleList(blocks)
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            h = block(h)
        return h

    def features(self, h: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Output of the first ``num_blocks`` blocks: (B, in_dim) if 0, else (B, hidden_dim)."""
        if not 0 <= num_blocks < len(self.layers):
            raise ValueError(f"head layer must be in [0, {len(self.layers) - 1}], got {num_blocks}")
        for block in self.layers[:num_blocks]:
            h = block(h)
        return h

    def feature_dim(self, num_blocks: int) -> int:
        """Width of :meth:`features` at ``num_blocks``."""
        return self.in_dim if num_blocks == 0 else self.hidden_dim


class SimCLRModel(nn.Module):
    """Encoder f plus projection head g: ``forward(x) -> (h, z)``."""

    def __init__(self, encoder: nn.Module, head: ProjectionHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    @classmethod
    def build(
        cls,
        arch: str = "resnet18",
        image_size: int = 32,
        cifar_stem: bool | None = None,
        width_multiplier: float = 1.0,
        proj_layers: int = 2,
        proj_hidden_dim: int | None = None,
        proj_out_dim: int = 128,
    ) -> "SimCLRModel":
        """Encoder + head from plain settings; the CIFAR stem defaults from ``image_size``."""
        stem = uses_cifar_stem(image_size) if cifar_stem is None else cifar_stem
        encoder = build_encoder(arch, cifar_stem=stem, width_multiplier=width_multiplier)
        head = ProjectionHead(encoder.feature_dim, proj_hidden_dim, proj_out_dim, proj_layers)
        return cls(encoder, head)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)  # (B, feature_dim)
        return h, self.head(h)  # (B, feature_dim), (B, out_dim)

    def features(self, x: torch.Tensor, head_layers: int = 0) -> torch.Tensor:
        """h (head_layers=0) or the output of the first ``head_layers`` head blocks."""
        return self.head.features(self.encoder(x), head_layers)
