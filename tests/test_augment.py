"""Augmentations: the policy's parameters, both implementations, and torchvision as reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from simclr_core.method.augment import (
    JITTER_OPS,
    AugmentConfig,
    BatchedAugment,
    TwoViews,
    ViewParams,
    blur_kernel_size,
    eval_train_transform,
    gaussian_blur,
    sample_transform,
    test_transform as make_test_transform,
)


def _uniform_batch(batch: int, rgb: tuple[float, float, float], size: int = 32) -> torch.Tensor:
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(batch, 3, size, size).contiguous()


def _smooth_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(3, H, W) smooth colourful image in [0, 1] (low frequencies only)."""
    generator = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height).view(1, -1, 1)
    xs = torch.linspace(0, 1, width).view(1, 1, -1)
    phase = torch.rand(3, 1, 1, generator=generator) * 6
    return 0.5 + 0.4 * torch.sin(2.5 * xs + phase) * torch.cos(1.7 * ys - phase)


def _binomial_bounds(p: float, n: int, sigmas: float = 4.0) -> tuple[float, float]:
    spread = sigmas * math.sqrt(p * (1 - p) / n)
    return p - spread, p + spread


# ---------------------------------------------------------------- the policy's parameters


def test_defaults_follow_image_size():
    small = AugmentConfig.for_image_size(32)
    assert (small.strength, small.blur, small.blur_enabled) == (0.5, False, False)
    large = AugmentConfig.for_image_size(96)
    assert (large.strength, large.blur, large.blur_enabled) == (1.0, True, True)
    assert large.blur_kernel == 9 and blur_kernel_size(224) == 23 and blur_kernel_size(32) == 3
    custom = AugmentConfig.for_image_size(32, strength=1.0, blur=True)
    assert custom.strength == 1.0 and custom.blur_enabled
    for got, expected in zip(large.jitter_ranges, ((0.2, 1.8), (0.2, 1.8), (0.2, 1.8), (-0.2, 0.2))):
        assert got == pytest.approx(expected)
    assert small.jitter_ranges[3] == pytest.approx((-0.1, 0.1))
    assert (large.crop_scale, large.crop_ratio) == ((0.08, 1.0), (3 / 4, 4 / 3))


@pytest.mark.parametrize("field,value", [("size", 0), ("strength", -1.0), ("jitter_p", 1.5), ("crop_scale", (0.5, 0.1))])
def test_bad_config_names_the_field(field, value):
    kwargs = {"size": 32, field: value}
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**kwargs)


def test_crop_area_and_aspect_within_bounds_over_many_draws():
    augment = BatchedAugment(AugmentConfig.for_image_size(224))
    params = augment.sample_params(20000, 224, 224, torch.Generator().manual_seed(0))
    top, left, height, width = params.crop.T
    area = (height * width).double() / (224 * 224)
    aspect = width.double() / height.double()
    # rounding to whole pixels moves the area and aspect slightly past the nominal bounds
    assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
    assert aspect.min() >= 0.75 * 0.97 and aspect.max() <= (4 / 3) * 1.03
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= 224).all() and (left + width <= 224).all()
    # area ~ U(0.08, 1) restricted to boxes that fit: most draws fit, so the mean is near 0.54
    assert 0.45 < area.mean().item() < 0.56
    # log-aspect is uniform: about half the crops are wider than tall
    assert 0.45 < (aspect > 1).double().mean().item() < 0.55


def test_crop_falls_back_to_centre_crop_for_extreme_images():
    augment = BatchedAugment(AugmentConfig(size=8, crop_scale=(0.99, 1.0), crop_ratio=(1.0, 1.0)))
    params = augment.sample_params(50, 10, 40, torch.Generator().manual_seed(0))
    # a 0.99-area square never fits a 10x40 image: torchvision's fallback is a centred 10x10 crop
    assert (params.crop == torch.tensor([0, 15, 10, 10])).all()


def test_parameters_are_independent_per_image():
    augment = BatchedAugment(AugmentConfig.for_image_size(96))
    n = 4000
    params = augment.sample_params(n, 96, 96, torch.Generator().manual_seed(1))
    # different images draw different crops, factors and blur sigmas (official code shares sigma)
    assert torch.unique(params.crop, dim=0).shape[0] > 0.9 * n
    assert torch.unique(params.blur_sigma).numel() > 0.99 * n  # float32 draws rarely collide
    assert torch.unique(params.jitter_factors[:, 0]).numel() > 0.99 * n
    # every order of the four jitter operations occurs, about equally often
    orders, counts = torch.unique(params.jitter_order, dim=0, return_counts=True)
    assert orders.shape[0] == 24
    assert counts.min() > n / 24 * 0.6 and counts.max() < n / 24 * 1.4
    # neighbouring images' coin flips are uncorrelated
    for flags in (params.flip, params.jitter, params.grayscale, params.blur):
        f = flags.double()
        correlation = torch.corrcoef(torch.stack([f[:-1], f[1:]]))[0, 1]
        assert abs(correlation.item()) < 0.06
    low, high = _binomial_bounds(0.5, n)
    assert low < params.flip.double().mean().item() < high
    assert low < params.blur.double().mean().item() < high
    assert 0.1 <= params.blur_sigma.min().item() and params.blur_sigma.max().item() <= 2.0


def test_blur_is_off_at_32px():
    augment = BatchedAugment(AugmentConfig.for_image_size(32))
    params = augment.sample_params(1000, 32, 32, torch.Generator().manual_seed(0))
    assert not params.blur.any()
    transform = sample_transform(AugmentConfig.for_image_size(32))
    assert not any(isinstance(step, v2.GaussianBlur) for step in _flatten(transform))
    transform96 = sample_transform(AugmentConfig.for_image_size(96))
    assert any(isinstance(step, v2.GaussianBlur) for step in _flatten(transform96))


def _flatten(transform):
    for step in getattr(transform, "transforms", []):
        yield step
        yield from _flatten(step)


# ------------------------------------------------------ behaviour, on both implementations


def _batched_views(images: torch.Tensor, config: AugmentConfig, seed: int = 0) -> torch.Tensor:
    return BatchedAugment(config)(images, torch.Generator().manual_seed(seed))


def _per_sample_views(images: torch.Tensor, config: AugmentConfig, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    transform = sample_transform(config)
    return torch.stack([transform(image) for image in images])


IMPLEMENTATIONS = {"batched": _batched_views, "per-sample": _per_sample_views}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_colour_jitter_applied_with_probability_0_8(impl, strength):
    # On a uniform grey image crop, flip, contrast, saturation, hue, grayscale and blur change
    # nothing, and a brightness factor != 1 always does: the changed fraction is the jitter rate.
    n = 1500
    config = AugmentConfig.for_image_size(32, strength=strength)
    views = IMPLEMENTATIONS[impl](_uniform_batch(n, (0.5, 0.5, 0.5)), config)
    changed = (views - 0.5).abs().amax(dim=(1, 2, 3)) > 1e-4
    low, high = _binomial_bounds(0.8, n)
    assert low < changed.double().mean().item() < high


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_grayscale_applied_with_probability_0_2(impl):
    # A saturated colour never ends with three equal channels unless grayscale was applied.
    n = 1500
    views = IMPLEMENTATIONS[impl](_uniform_batch(n, (0.8, 0.2, 0.3)), AugmentConfig.for_image_size(32))
    equal_channels = (views.amax(dim=1) - views.amin(dim=1)).amax(dim=(1, 2)) < 1e-6
    low, high = _binomial_bounds(0.2, n)
    assert low < equal_channels.double().mean().item() < high


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("size,in_size,channels", [(32, 32, 3), (24, 40, 1), (96, 120, 3)])
def test_outputs_float_in_unit_range_with_three_channels(impl, size, in_size, channels):
    images = torch.randint(0, 256, (6, channels, in_size, in_size), dtype=torch.uint8)
    views = IMPLEMENTATIONS[impl](images, AugmentConfig.for_image_size(size))
    assert views.shape == (6, 3, size, size)
    assert views.dtype == torch.float32
    assert views.min() >= 0.0 and views.max() <= 1.0


def test_batched_is_deterministic_under_a_seed_and_differs_across_seeds():
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    config = AugmentConfig.for_image_size(32, blur=True)
    first = _batched_views(images, config, seed=5)
    again = _batched_views(images, config, seed=5)
    other = _batched_views(images, config, seed=6)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_two_views_of_one_image_differ():
    view_a, view_b = TwoViews(sample_transform(AugmentConfig.for_image_size(32)))(
        torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    )
    assert view_a.shape == view_b.shape == (3, 32, 32)
    assert not torch.equal(view_a, view_b)


def test_per_sample_accepts_pil_images():
    image = TF.to_pil_image(torch.randint(0, 256, (3, 50, 60), dtype=torch.uint8))
    view = sample_transform(AugmentConfig.for_image_size(32))(image)
    assert view.shape == (3, 32, 32) and view.dtype == torch.float32


# ----------------------------------------------------- batched ops vs torchvision functional


def _identity_params(batch: int, height: int, width: int, **overrides) -> ViewParams:
    fields = dict(
        crop=torch.tensor([[0, 0, height, width]] * batch),
        flip=torch.zeros(batch, dtype=torch.bool),
        jitter=torch.zeros(batch, dtype=torch.bool),
        jitter_factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * batch),
        jitter_order=torch.arange(4).repeat(batch, 1),
        grayscale=torch.zeros(batch, dtype=torch.bool),
        blur=torch.zeros(batch, dtype=torch.bool),
        blur_sigma=torch.ones(batch),
    )
    fields.update(overrides)
    return ViewParams(**fields)


_TV_JITTER = {
    "brightness": TF.adjust_brightness,
    "contrast": TF.adjust_contrast,
    "saturation": TF.adjust_saturation,
    "hue": TF.adjust_hue,
}


def test_jitter_in_each_images_order_matches_torchvision():
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(6, 3, 16, 16, generator=generator)
    factors = torch.tensor(
        [[1.3, 0.6, 1.5, 0.15], [0.7, 1.4, 0.3, -0.2], [1.0, 1.8, 0.2, 0.05], [1.6, 0.2, 1.1, -0.1], [0.4, 1.0, 1.7, 0.2], [1.2, 1.2, 0.9, 0.0]]
    )
    orders = torch.stack([torch.randperm(4, generator=generator) for _ in range(6)])
    jitter = torch.tensor([True, True, True, True, True, False])
    params = _identity_params(6, 16, 16, jitter=jitter, jitter_factors=factors, jitter_order=orders)
    out = BatchedAugment(AugmentConfig(size=16, blur=False)).apply(images, params)
    for i in range(6):
        expected = images[i]
        if jitter[i]:
            for op_index in orders[i].tolist():
                expected = _TV_JITTER[JITTER_OPS[op_index]](expected, factors[i, op_index].item())
        torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=1e-5)


def test_grayscale_matches_torchvision():
    images = torch.rand(3, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    params = _identity_params(3, 10, 10, grayscale=torch.tensor([True, False, True]))
    out = BatchedAugment(AugmentConfig(size=10, blur=False)).apply(images, params)
    for i in range(3):
        expected = TF.rgb_to_grayscale(images[i], num_output_channels=3) if params.grayscale[i] else images[i]
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=1e-6)


def test_blur_with_per_image_sigma_matches_torchvision():
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    out = gaussian_blur(images, sigma, kernel_size=9)
    for i in range(4):
        expected = TF.gaussian_blur(images[i], [9, 9], [sigma[i].item(), sigma[i].item()])
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flip", [False, True])
def test_crop_and_resize_match_torchvision_resized_crop(flip):
    image = _smooth_image(40, 48)
    top, left, height, width = 5, 7, 20, 24
    params = _identity_params(1, 40, 48, crop=torch.tensor([[top, left, height, width]]), flip=torch.tensor([flip]))
    out = BatchedAugment(AugmentConfig(size=32, blur=False)).apply(image.unsqueeze(0), params)[0]
    expected = TF.resized_crop(image, top, left, height, width, [32, 32], v2.InterpolationMode.BICUBIC, antialias=False)
    if flip:
        expected = TF.horizontal_flip(expected)
    # torchvision replicates the crop's edge pixels where we read the real neighbours,
    # so compare away from the border (the bicubic footprint is 2 source pixels).
    margin = 2 * math.ceil(32 / min(height, width)) + 1
    inner = (slice(None), slice(margin, -margin), slice(margin, -margin))
    torch.testing.assert_close(out[inner], expected.clamp(0, 1)[inner], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("blur", [False, True])
def test_single_channel_images_give_the_views_of_their_three_channel_copies(blur):
    # the one-channel path (saturation and grayscale as scalings, hue skipped) against the
    # three-channel ops on the same gray image, every op drawn, at strength 1 so each op matters
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    augment = BatchedAugment(AugmentConfig(size=24, strength=1.0, jitter_p=1.0, grayscale_p=0.5, blur=blur))
    params = augment.sample_params(64, 28, 28, torch.Generator().manual_seed(1))
    gray = augment.apply(images, params)
    rgb = augment.apply(images.expand(-1, 3, -1, -1), params)
    assert gray.shape == rgb.shape == (64, 3, 24, 24)
    torch.testing.assert_close(gray, rgb, atol=1e-5, rtol=0)


def test_full_image_crop_at_same_size_is_exact():
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    out = BatchedAugment(AugmentConfig(size=12, blur=False)).apply(images, _identity_params(2, 12, 12))
    torch.testing.assert_close(out, images, atol=3e-6, rtol=1e-5)


# ---------------------------------------------------------------- evaluation transforms


def test_eval_train_transform_is_crop_and_flip_only():
    # crop + flip of a uniform image leave its colour untouched: no jitter, no grayscale
    image = torch.tensor([200, 50, 80], dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32).contiguous()
    transform = eval_train_transform(32)
    for seed in range(50):
        torch.manual_seed(seed)
        view = transform(image)
        torch.testing.assert_close(view, image.float().div(255).expand(3, 32, 32), atol=1e-6, rtol=0)
    assert AugmentConfig.crop_flip_only(32).jitter_p == 0 and AugmentConfig.crop_flip_only(32).grayscale_p == 0


def test_test_transform_is_identity_at_32px_and_centre_crop_above():
    image = torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8)
    out = make_test_transform(32)(image)
    torch.testing.assert_close(out, image.float().div(255).expand(3, 32, 32))
    large = torch.zeros(3, 128, 128, dtype=torch.uint8)
    large[:, 8:120, 8:120] = 255  # the centre 87.5% (112 px) is white, the rim black
    out = make_test_transform(96)(large)
    assert out.shape == (3, 96, 96)
    assert out.min().item() > 0.99  # the black rim was cropped away


def _grid_sample_crop(images: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Reference: the crop, flip and bicubic resize as one affine ``grid_sample`` (border padding)."""
    batch, channels, height, width = images.shape
    top, left, crop_h, crop_w = (crop[:, k].to(torch.float32) for k in range(4))
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -crop_w, crop_w) / width
    theta[:, 0, 2] = (2 * left + crop_w) / width - 1
    theta[:, 1, 1] = crop_h / height
    theta[:, 1, 2] = (2 * top + crop_h) / height - 1
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)


@pytest.mark.parametrize(("in_hw", "size", "channels"), [((28, 28), 32, 1), ((40, 56), 24, 3), ((9, 13), 9, 3)])
def test_separable_crop_equals_grid_sample_bicubic(in_hw, size, channels):
    # every drawn box (edges included, so border padding is exercised), flipped or not,
    # up- and downscaled, against torch's own bicubic sampler on the same boxes (the two
    # differ by float32 rounding of the sample positions: a wrong tap or weight is ~1e-2)
    generator = torch.Generator().manual_seed(sum(in_hw) + size)
    images = torch.rand(64, channels, *in_hw, generator=generator)
    augment = BatchedAugment(AugmentConfig(size=size, blur=False, jitter_p=0.0, grayscale_p=0.0))
    params = augment.sample_params(64, *in_hw, generator)
    assert params.flip.any() and not params.flip.all()
    out = augment._crop_flip_resize(images, params.crop, params.flip)
    torch.testing.assert_close(out, _grid_sample_crop(images, params.crop, params.flip, size), atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [3, 1])
def test_accelerator_jitter_and_blur_equal_the_cpus_row_picking(channels):
    # On an accelerator every op runs on every row and is kept where due (no host sync); the
    # CPU picks the rows out. Both must give the same views, bit for bit: every op is per image.
    from simclr_core.method.augment import _GRAY_JITTER_FUNCTIONS, _JITTER_FUNCTIONS, _blur_every_row, _jitter_every_row

    augment = BatchedAugment(AugmentConfig(size=24, strength=1.0, blur=True))
    params = augment.sample_params(256, 24, 24, torch.Generator().manual_seed(3))
    assert 0 < int(params.jitter.sum()) < 256 and 0 < int(params.blur.sum()) < 256  # both kinds of rows
    x = torch.rand(256, channels, 24, 24, generator=torch.Generator().manual_seed(4))
    functions = _JITTER_FUNCTIONS if channels == 3 else _GRAY_JITTER_FUNCTIONS
    picked = augment._jitter(x, params, functions)
    assert torch.equal(_jitter_every_row(x, params, functions), picked)
    assert torch.equal(_blur_every_row(picked, params.blur, params.blur_sigma, augment.config.blur_kernel),
                       augment._blur(picked, params.blur, params.blur_sigma))


@pytest.mark.parametrize("channels", [3, 1])
def test_views_made_off_the_cpu_need_no_host_sync(channels, monkeypatch):
    # Meta tensors have shapes and no values: an op whose output shape depends on the data (a
    # nonzero, a boolean index) cannot run on them, exactly the ops that make a GPU's host wait.
    # The other kind, a tensor built from Python values on the device (a copy from pageable host
    # memory, which waits for the stream), is refused here by hand.
    real_tensor = torch.tensor

    def host_values_only(*args, device=None, **kwargs):
        assert device is None or torch.device(device).type == "cpu", "a tensor copied from host values onto the device"
        return real_tensor(*args, device=device, **kwargs)

    monkeypatch.setattr(torch, "tensor", host_values_only)
    augment = BatchedAugment(AugmentConfig(size=24, strength=1.0, blur=True))
    params = augment.sample_params(8, 32, 32, torch.Generator().manual_seed(0))
    images = torch.zeros(8, channels, 32, 32, dtype=torch.uint8, device="meta")
    views = augment.apply(images, params.to(torch.device("meta")))
    assert views.shape == (8, 3, 24, 24) and views.device.type == "meta"
    with pytest.raises((NotImplementedError, RuntimeError)):  # what the CPU's row picking does, for contrast
        params.blur.to("meta").nonzero()
