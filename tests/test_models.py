"""Encoders, stems, zero-init gammas and the projection head."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from simclr_core.method.models import ProjectionHead, SimCLRModel, build_encoder, uses_cifar_stem


@pytest.mark.parametrize(
    "arch,size,feature_dim",
    [("resnet18", 32, 512), ("resnet18", 96, 512), ("resnet18", 224, 512), ("resnet34", 32, 512), ("resnet50", 32, 2048)],
)
def test_encoder_output_shapes(arch, size, feature_dim):
    encoder = build_encoder(arch, cifar_stem=uses_cifar_stem(size)).eval()
    with torch.no_grad():
        h = encoder(torch.rand(2, 3, size, size))
    assert h.shape == (2, feature_dim)
    assert encoder.feature_dim == feature_dim


def test_cifar_stem_keeps_32px_resolution_and_imagenet_stem_quarters_it():
    x = torch.rand(1, 3, 32, 32)
    cifar = build_encoder("resnet18", cifar_stem=True).eval()
    imagenet = build_encoder("resnet18", cifar_stem=False).eval()
    with torch.no_grad():
        cifar_stem_out = cifar.maxpool(cifar.relu(cifar.bn1(cifar.conv1(x))))
        imagenet_stem_out = imagenet.maxpool(imagenet.relu(imagenet.bn1(imagenet.conv1(x))))
    assert cifar_stem_out.shape[-2:] == (32, 32)
    assert imagenet_stem_out.shape[-2:] == (8, 8)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert uses_cifar_stem(32) and uses_cifar_stem(28) and not uses_cifar_stem(96)


@pytest.mark.parametrize("arch,block_bn", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_last_bn_gamma_of_every_block_starts_at_zero(arch, block_bn):
    encoder = build_encoder(arch)
    blocks = [block for name in ("layer1", "layer2", "layer3", "layer4") for block in getattr(encoder, name)]
    assert len(blocks) == (8 if arch == "resnet18" else 16)
    for block in blocks:
        assert torch.count_nonzero(getattr(block, block_bn).weight) == 0
        assert torch.all(block.bn1.weight == 1)  # other BNs keep gamma = 1


def test_fresh_encoder_blocks_start_as_identity_plus_shortcut():
    """With zero gammas, a block without downsampling returns relu(input)."""
    encoder = build_encoder("resnet18").eval()
    block = encoder.layer1[1]
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(x))


def test_width_multiplier_narrows_every_stage():
    encoder = build_encoder("resnet18", cifar_stem=True, width_multiplier=0.25).eval()
    assert encoder.feature_dim == 128
    assert encoder.conv1.out_channels == 16
    with torch.no_grad():
        assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 128)
    full = sum(p.numel() for p in build_encoder("resnet18").parameters())
    narrow = sum(p.numel() for p in encoder.parameters())
    assert narrow < full / 10
    assert torch.count_nonzero(encoder.layer2[0].bn2.weight) == 0


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="resnet18"):
        build_encoder("vgg16")


@pytest.mark.parametrize("num_layers", [2, 3])
def test_projection_head_structure_and_shapes(num_layers):
    head = ProjectionHead(in_dim=512, hidden_dim=None, out_dim=128, num_layers=num_layers)
    assert len(head.layers) == num_layers
    for block in head.layers[:-1]:
        linear, bn, relu = block
        assert isinstance(linear, nn.Linear) and linear.out_features == 512 and linear.bias is None
        assert isinstance(bn, nn.BatchNorm1d) and isinstance(relu, nn.ReLU)
    assert isinstance(head.layers[-1], nn.Linear) and head.layers[-1].out_features == 128
    assert head(torch.randn(4, 512)).shape == (4, 128)


def test_head_features_give_the_output_of_the_first_k_blocks():
    torch.manual_seed(0)
    head = ProjectionHead(in_dim=8, hidden_dim=6, out_dim=4, num_layers=3).eval()
    h = torch.randn(5, 8)
    torch.testing.assert_close(head.features(h, 0), h)
    torch.testing.assert_close(head.features(h, 1), head.layers[0](h))
    torch.testing.assert_close(head.features(h, 2), head.layers[1](head.layers[0](h)))
    assert head.feature_dim(0) == 8 and head.feature_dim(2) == 6
    with pytest.raises(ValueError, match="head layer"):
        head.features(h, 3)


def test_simclr_model_returns_h_and_z():
    model = SimCLRModel.build("resnet18", image_size=32, proj_layers=3, proj_out_dim=64)
    h, z = model(torch.rand(4, 3, 32, 32))
    assert h.shape == (4, 512) and z.shape == (4, 64)
    assert isinstance(model.encoder.maxpool, nn.Identity)
    assert model.features(torch.rand(4, 3, 32, 32), head_layers=1).shape == (4, 512)


def test_encoder_is_a_torchvision_resnet():
    assert isinstance(build_encoder("resnet34"), torchvision.models.ResNet)
