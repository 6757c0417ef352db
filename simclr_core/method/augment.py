"""SimCLR's augmentation policy, per sample (DataLoader) and batched (on the training device).

The pretraining policy (Chen et al., 2020, appendix A; the official ``data_util.py``), in
order, every image drawing its own parameters:

1. random resized crop: area fraction U(0.08, 1), log-uniform aspect ratio in (3/4, 4/3),
   10 tries then a centre crop, resized to ``size`` x ``size`` with bicubic interpolation;
2. horizontal flip, p = 0.5;
3. colour jitter, p = 0.8: brightness, contrast, saturation factors U(1 - 0.8s, 1 + 0.8s),
   hue shift U(-0.2s, 0.2s), the four applied in a random order, each result clipped to [0, 1];
4. grayscale, p = 0.2 (three equal channels);
5. Gaussian blur, p = 0.5, sigma U(0.1, 2.0), odd kernel of about 10% of the side; off for
   32 px images (the paper's CIFAR setting);
6. clip to [0, 1].

``s`` (strength) is 1.0 for ImageNet/STL-10-sized images and 0.5 for 32 px ones. Linear
evaluation and fine-tuning train with crop + flip only; testing uses a centre crop (none at
32 px).

Two implementations of the same :class:`AugmentConfig`:

- :func:`sample_transform`: torchvision.transforms.v2, per sample, for a DataLoader; accepts
  PIL images or (C, H, W) uint8/float tensors.
- :class:`BatchedAugment`: one call on a (B, C, H, W) batch on the training device (CPU or
  GPU), with independent parameters per image drawn from a seeded generator. The crop is a
  bicubic resample of the original image, computed as ``grid_sample`` would but as two small
  matrix products per image (no anti-aliasing: downscaling by more than ~2x aliases, so feed
  it images stored near the training size).

Both return float32 (…, 3, size, size) in [0, 1]; single-channel inputs are repeated to three.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

__all__ = [
    "AugmentConfig",
    "ViewParams",
    "BatchedAugment",
    "sample_transform",
    "TwoViews",
    "eval_train_transform",
    "test_transform",
    "batched_test_transform",
    "blur_kernel_size",
]

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
# Official SimCLR centre crop for evaluation above 32 px.
CENTER_CROP_FRACTION = 0.875
# Jitter operations, in the index order used by ViewParams.jitter_order.
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian kernel of about 10% of the side, as the official code: 2 * (size // 20) + 1."""
    return 2 * ((size // 10) // 2) + 1


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """One augmentation policy. :meth:`for_image_size` gives the paper's defaults.

    Attributes:
        size: output side in pixels.
        strength: colour-jitter strength s.
        blur: whether the Gaussian blur step is on.
        crop_scale: range of the crop's area as a fraction of the image.
        crop_ratio: range of the crop's aspect ratio (width / height).
        flip_p, jitter_p, grayscale_p, blur_p: probabilities of the random steps.
        blur_sigma: range of the blur's standard deviation, in pixels.
    """

    size: int
    strength: float = 1.0
    blur: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"augment size must be >= 1, got {self.size}")
        if self.strength < 0:
            raise ValueError(f"augment strength must be >= 0, got {self.strength}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment {name} must be in [0, 1], got {value}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"augment crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"augment crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")

    @classmethod
    def for_image_size(cls, size: int, strength: float | None = None, blur: bool | None = None) -> "AugmentConfig":
        """The paper's pretraining policy for ``size``: s = 0.5 and no blur at <= 32 px, else s = 1 with blur."""
        small = size <= 32
        return cls(
            size=size,
            strength=(0.5 if small else 1.0) if strength is None else strength,
            blur=(not small) if blur is None else blur,
        )

    @classmethod
    def crop_flip_only(cls, size: int) -> "AugmentConfig":
        """Linear-eval / fine-tune training policy: random resized crop and flip, nothing else."""
        return cls(size=size, strength=0.0, blur=False, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)

    @property
    def blur_kernel(self) -> int:
        return blur_kernel_size(self.size)

    @property
    def blur_enabled(self) -> bool:
        return self.blur and self.blur_p > 0 and self.blur_kernel > 1

    @property
    def jitter_ranges(self) -> tuple[tuple[float, float], ...]:
        """(low, high) of the brightness, contrast, saturation factors and the hue shift."""
        s = self.strength
        factor = (max(0.0, 1 - 0.8 * s), 1 + 0.8 * s)
        return factor, factor, factor, (-0.2 * s, 0.2 * s)


# --------------------------------------------------------------------------- per sample


def _to_float(image: torch.Tensor) -> torch.Tensor:
    """(…, 1|3, H, W) uint8 or float -> float32 in [0, 1], channels kept."""
    if image.shape[-3] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(image.shape)}")
    return image.float().div_(255) if image.dtype == torch.uint8 else image.float()


def _to_float_rgb(image: torch.Tensor) -> torch.Tensor:
    """(…, 1|3, H, W) uint8 or float -> float32 in [0, 1] with three channels."""
    image = _to_float(image)
    return image.expand(*image.shape[:-3], 3, *image.shape[-2:]) if image.shape[-3] == 1 else image


def _clip(image: torch.Tensor) -> torch.Tensor:
    return image.clamp(0.0, 1.0)


def sample_transform(config: AugmentConfig) -> v2.Compose:
    """Per-sample SimCLR view transform (torchvision.transforms.v2) for ``config``.

    Input: a PIL image or a (C, H, W) uint8/float tensor with C in {1, 3}.
    Output: float32 (3, size, size) in [0, 1].
    """
    steps: list = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            config.size,
            scale=config.crop_scale,
            ratio=config.crop_ratio,
            interpolation=v2.InterpolationMode.BICUBIC,
            antialias=True,
        ),
        v2.RandomHorizontalFlip(config.flip_p),
        v2.Lambda(_to_float_rgb),
    ]
    if config.jitter_p > 0 and config.strength > 0:
        brightness, contrast, saturation, hue = config.jitter_ranges
        jitter = v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        steps.append(v2.RandomApply([jitter], p=config.jitter_p))
    if config.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(config.grayscale_p))
    if config.blur_enabled:
        blur = v2.GaussianBlur(config.blur_kernel, sigma=config.blur_sigma)
        steps.append(v2.RandomApply([blur], p=config.blur_p))
    steps.append(v2.Lambda(_clip))
    return v2.Compose(steps)


class TwoViews:
    """Applies a transform twice to one image: ``image -> (view_a, view_b)``."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)


def eval_train_transform(size: int) -> v2.Compose:
    """Per-sample training transform for linear eval / fine-tuning: crop + flip only."""
    return sample_transform(AugmentConfig.crop_flip_only(size))


def test_transform(size: int) -> v2.Compose:
    """Per-sample test transform: centre crop of 87.5% then resize above 32 px; at <= 32 px
    only a resize to ``size`` (a no-op for images already that size)."""
    steps: list = [v2.ToImage()]
    if size > 32:
        steps.append(v2.Lambda(lambda img: v2.functional.center_crop(img, _center_crop_side(img.shape[-2:]))))
    steps += [
        v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.Lambda(_to_float_rgb),
        v2.Lambda(_clip),
    ]
    return v2.Compose(steps)


def batched_test_transform(images: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`test_transform` on a (B, C, H, W) batch: float32 (B, 3, size, size) in [0, 1]."""
    x = _to_float_rgb(images)
    if size > 32:
        side = _center_crop_side(x.shape[-2:])
        x = v2.functional.center_crop(x, side)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0.0, 1.0)


def _center_crop_side(hw) -> list[int]:
    side = round(min(int(hw[0]), int(hw[1])) * CENTER_CROP_FRACTION)
    return [max(1, side), max(1, side)]


# --------------------------------------------------------------------------- batched


@dataclasses.dataclass
class ViewParams:
    """Random parameters of one batch of views; every field has the batch size B first.

    Attributes:
        crop: (B, 4) int64 crop boxes (top, left, height, width) in input pixels.
        flip: (B,) bool, horizontal flip.
        jitter: (B,) bool, colour jitter applied.
        jitter_factors: (B, 4) float32 brightness, contrast, saturation factors, hue shift.
        jitter_order: (B, 4) int64, a permutation of 0..3 per image (indices into JITTER_OPS).
        grayscale: (B,) bool.
        blur: (B,) bool.
        blur_sigma: (B,) float32, in pixels.
    """

    crop: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    jitter_factors: torch.Tensor
    jitter_order: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    blur_sigma: torch.Tensor

    def rows(self, index: torch.Tensor | slice) -> "ViewParams":
        """The parameters of the views at ``index`` (a rank's share of a global batch's)."""
        return ViewParams(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    def to(self, device: torch.device) -> "ViewParams":
        """The parameters on ``device``. To CUDA they go through pinned memory: a copy from pageable
        memory would make the host wait for the stream's queued kernels first."""
        pin = device.type == "cuda"
        return ViewParams(**{
            f.name: (getattr(self, f.name).pin_memory() if pin else getattr(self, f.name)).to(device, non_blocking=True)
            for f in dataclasses.fields(self)
        })


class BatchedAugment:
    """SimCLR augmentations of a whole (B, C, H, W) batch in a few tensor operations.

    ``augment(images, generator)`` draws independent parameters for every image from
    ``generator`` (a CPU ``torch.Generator``; the same seed gives the same views on any
    device) and returns float32 (B, 3, size, size) in [0, 1] on ``images.device``.
    ``sample_params`` and ``apply`` are the two halves, for tests and for reuse.
    """

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"BatchedAugment expects (B, C, H, W) images, got shape {tuple(images.shape)}")
        params = self.sample_params(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, params.to(images.device))

    # -- parameters -----------------------------------------------------------------

    def sample_params(self, batch: int, height: int, width: int, generator: torch.Generator | None = None) -> ViewParams:
        """Draw the parameters of ``batch`` views of ``height`` x ``width`` images (on the CPU)."""
        cfg = self.config
        rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
        crop = self._sample_crops(batch, height, width, generator)
        flip = rand(batch) < cfg.flip_p
        jitter = rand(batch) < cfg.jitter_p if cfg.strength > 0 else torch.zeros(batch, dtype=torch.bool)
        lows = torch.tensor([r[0] for r in cfg.jitter_ranges])
        highs = torch.tensor([r[1] for r in cfg.jitter_ranges])
        jitter_factors = lows + (highs - lows) * rand(batch, 4)
        jitter_order = torch.argsort(rand(batch, 4), dim=1)
        grayscale = rand(batch) < cfg.grayscale_p
        blur = rand(batch) < cfg.blur_p if cfg.blur_enabled else torch.zeros(batch, dtype=torch.bool)
        sigma_low, sigma_high = cfg.blur_sigma
        blur_sigma = sigma_low + (sigma_high - sigma_low) * rand(batch)
        return ViewParams(crop, flip, jitter, jitter_factors, jitter_order, grayscale, blur, blur_sigma)

    def _sample_crops(self, batch: int, height: int, width: int, generator: torch.Generator | None) -> torch.Tensor:
        """torchvision's RandomResizedCrop.get_params, vectorised: 10 tries, then a centre crop."""
        cfg = self.config
        tries = 10
        area = height * width
        scale = cfg.crop_scale[0] + (cfg.crop_scale[1] - cfg.crop_scale[0]) * torch.rand(batch, tries, generator=generator, dtype=torch.float64)
        log_low, log_high = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
        ratio = torch.exp(log_low + (log_high - log_low) * torch.rand(batch, tries, generator=generator, dtype=torch.float64))
        crop_w = torch.round(torch.sqrt(area * scale * ratio)).long()
        crop_h = torch.round(torch.sqrt(area * scale / ratio)).long()
        fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
        first = fits.long().argmax(dim=1)  # index of the first try that fits (0 if none)
        any_fit = fits.any(dim=1)
        rows = torch.arange(batch)
        crop_w, crop_h = crop_w[rows, first], crop_h[rows, first]

        fallback_h, fallback_w = self._fallback_crop(height, width)
        crop_w = torch.where(any_fit, crop_w, torch.full_like(crop_w, fallback_w))
        crop_h = torch.where(any_fit, crop_h, torch.full_like(crop_h, fallback_h))
        offsets = torch.rand(batch, 2, generator=generator, dtype=torch.float64)
        top = torch.floor(offsets[:, 0] * (height - crop_h + 1)).long().clamp(max=height - crop_h)
        left = torch.floor(offsets[:, 1] * (width - crop_w + 1)).long().clamp(max=width - crop_w)
        top = torch.where(any_fit, top, (height - crop_h) // 2)
        left = torch.where(any_fit, left, (width - crop_w) // 2)
        return torch.stack([top, left, crop_h, crop_w], dim=1)

    def _fallback_crop(self, height: int, width: int) -> tuple[int, int]:
        low, high = self.config.crop_ratio
        in_ratio = width / height
        if in_ratio < low:
            return int(round(width / low)), width
        if in_ratio > high:
            return height, int(round(height * high))
        return height, width

    # -- application ----------------------------------------------------------------

    def apply(self, images: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """Apply ``params`` to (B, C, H, W) uint8 or float images -> float32 (B, 3, size, size).

        Single-channel images stay single-channel until the end (a third of the work): on an
        image whose three channels are equal, saturation and grayscale scale it by the luma
        weights' sum and hue leaves it as it is, so their one-channel forms give what the
        three-channel ones would (to float32 rounding; tested).
        """
        x = _to_float(images)
        gray = x.shape[1] == 1
        x = self._crop_flip_resize(x, params.crop, params.flip)
        x = self._jitter(x, params, _GRAY_JITTER_FUNCTIONS if gray else _JITTER_FUNCTIONS)
        x = _where_rows(params.grayscale, _LUMA_SUM * x if gray else _grayscale(x).expand_as(x), x)
        if self.config.blur_enabled:
            x = self._blur(x, params.blur, params.blur_sigma)
        x = x.clamp_(0.0, 1.0)
        # gray: the one copy to three channels, in the layout the models are kept in (pretrain/model_setup.py)
        return x.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last) if gray else x

    def _crop_flip_resize(self, x: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Bicubic resample of each crop box (flipped where asked) to size x size.

        The crop, flip and resize are separable, so the resample is two small matrix products
        per image, ``rows @ x @ cols^T`` with (size, H) and (size, W) bicubic weight matrices:
        what ``F.grid_sample(mode="bicubic", padding_mode="border", align_corners=False)`` computes
        on the same boxes (tested against it), at a fraction of its cost on a CPU (benchmarks/).
        x: (B, C, H, W) float32 -> (B, C, size, size) float32.
        """
        _, _, height, width = x.shape
        size = self.config.size
        top, left, crop_h, crop_w = (crop[:, k].to(device=x.device, dtype=torch.float32) for k in range(4))
        rows = _bicubic_resample_matrix(top, crop_h, torch.zeros_like(flip, device=x.device), height, size)
        cols = _bicubic_resample_matrix(left, crop_w, flip.to(x.device), width, size)
        return rows.unsqueeze(1) @ x @ cols.transpose(1, 2).unsqueeze(1)

    def _jitter(self, x: torch.Tensor, params: ViewParams, functions) -> torch.Tensor:
        """Brightness, contrast, saturation, hue in each image's own order, on jittered images only.

        ``functions``: the four ops in JITTER_OPS order; None for one that leaves images as they are.
        On a CPU each op runs on its rows only; on an accelerator on every row, kept where due
        (:func:`_jitter_every_row`), because picking the rows out needs their count on the host.
        """
        if x.device.type != "cpu":
            return _jitter_every_row(x, params, functions)
        selected = params.jitter.nonzero().squeeze(1)
        if selected.numel() == 0:
            return x
        out = x.clone()
        views = x[selected]
        factors = params.jitter_factors[selected]
        order = params.jitter_order[selected]
        for position in range(4):
            for op_index, op in enumerate(functions):
                if op is None:
                    continue
                rows = (order[:, position] == op_index).nonzero().squeeze(1)
                if rows.numel():
                    views[rows] = op(views[rows], factors[rows, op_index])
        out[selected] = views
        return out

    def _blur(self, x: torch.Tensor, apply: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Blurred where ``apply``; on an accelerator every row is blurred and the rest kept (no host sync)."""
        kernel = self.config.blur_kernel
        if x.device.type != "cpu":
            return _blur_every_row(x, apply, sigma, kernel)
        selected = apply.nonzero().squeeze(1)
        if selected.numel() == 0:
            return x
        out = x.clone()
        out[selected] = gaussian_blur(x[selected], sigma[selected], kernel)
        return out


def _blur_every_row(x: torch.Tensor, apply: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """:meth:`BatchedAugment._blur` without a host sync: every row blurred, kept where ``apply``."""
    return _where_rows(apply, gaussian_blur(x, sigma, kernel_size), x)


def _jitter_every_row(x: torch.Tensor, params: ViewParams, functions) -> torch.Tensor:
    """:meth:`BatchedAugment._jitter` without a host sync: at each of the four positions, each op
    runs on the whole batch and is kept on the rows whose order puts it there. Four times the
    arithmetic of picking the rows out, on a device where the arithmetic is cheap and a wait for
    the host is not; the same values (every op is per image; tested on the CPU)."""
    for position in range(4):
        for op_index, op in enumerate(functions):
            if op is None:
                continue
            due = params.jitter & (params.jitter_order[:, position] == op_index)
            x = _where_rows(due, op(x, params.jitter_factors[:, op_index]), x)
    return x


# grid_sample's bicubic convolution coefficient (Keys' kernel with A = -0.75, as PIL and OpenCV).
_CUBIC_A = -0.75


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """(...,) fractional positions in [0, 1) -> (..., 4) weights of the taps at -1, 0, 1, 2."""
    a = _CUBIC_A
    near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1  # noqa: E731  |d| <= 1
    far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # noqa: E731  1 < |d| < 2
    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)


def _bicubic_resample_matrix(start: torch.Tensor, length: torch.Tensor, flip: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """(B, out_size, in_size) weights that resample each image's [start, start + length) span.

    Output pixel j samples the input at the span's point (j + 0.5) / out_size (mirrored where
    ``flip``), in grid_sample's pixel-centre convention (align_corners=False); the four taps
    around it get Keys' cubic weights, and taps beyond the image read its edge pixel (border
    padding). start, length: (B,) float32 input pixels; flip: (B,) bool.
    """
    # grid_sample's normalised coordinates: the affine grid's base point, scaled and shifted by the box
    base = (2 * torch.arange(out_size, device=start.device, dtype=torch.float32) + 1) / out_size - 1  # (out_size,)
    scale = torch.where(flip, -length, length) / in_size
    centre = (2 * start + length) / in_size - 1
    normalised = scale[:, None] * base + centre[:, None]  # (B, out_size)
    position = ((normalised + 1) * in_size - 1) / 2  # input pixel coordinate
    whole = torch.floor(position)
    taps = (whole.long()[..., None] + torch.arange(-1, 3, device=start.device)).clamp_(0, in_size - 1)
    weights = _cubic_weights(position - whole)
    matrix = torch.zeros(*position.shape, in_size, device=start.device, dtype=torch.float32)
    return matrix.scatter_add_(2, taps, weights)


def _where_rows(mask: torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), if_true, if_false)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * factor, clipped; x (B, 3, H, W), factor (B,)."""
    return (x * _per_image(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma, clipped."""
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_image(factor)
    return (f * x + (1 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the per-pixel luma, clipped."""
    f = _per_image(factor)
    return (f * x + (1 - f) * _grayscale(x)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` turns (in [-0.5, 0.5]); x (B, 3, H, W), shift (B,).

    The HSV round trip of torchvision's ``adjust_hue`` without materialising H, S and V: a hue
    rotation keeps each pixel's max (V) and chroma C = max - min, so with the hexagonal hue
    6H = (g - b) / C if r is the max, 2 + (b - r) / C if g is, 4 + (r - g) / C otherwise, the
    result is channel_n = max - C * clip(2 - |k - 2|, 0, 1), k = (n + 6H') mod 6, n = 5, 3, 1
    for R, G, B. (Element-wise ops on channel slices: reductions over dim 1 are slow on CPU.)
    """
    r, g, b = x[:, 0], x[:, 1], x[:, 2]  # (B, H, W) each
    max_c = torch.maximum(torch.maximum(r, g), b)
    chroma = max_c - torch.minimum(torch.minimum(r, g), b)
    numerator = torch.where(r == max_c, g - b, torch.where(g == max_c, 2.0 * chroma + b - r, 4.0 * chroma + r - g))
    hue6 = numerator / torch.where(chroma > 0, chroma, torch.ones_like(chroma))  # 6H, in [-1, 5]
    hue6 = hue6 + 6.0 * shift.to(x.dtype).view(-1, 1, 1)
    # n = 5, 3, 1, made on the device: a tensor from a Python list is a host-to-device copy, which on a GPU waits for the stream
    offsets = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(hue6.unsqueeze(1) + offsets, 6.0)  # (B, 3, H, W)
    ramp = (2.0 - (k - 2.0).abs_()).clamp_(0.0, 1.0)
    return max_c.unsqueeze(1) - chroma.unsqueeze(1) * ramp


_JITTER_FUNCTIONS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)

# One-channel forms for images whose three channels are equal (gray), where luma = _LUMA_SUM * x.
_LUMA_SUM = sum(_LUMA)  # 0.9999, as torchvision's weights


def _adjust_contrast_gray(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """:func:`adjust_contrast` of a gray image, on its one channel (B, 1, H, W)."""
    mean = _LUMA_SUM * x.mean(dim=(1, 2, 3), keepdim=True)
    f = _per_image(factor)
    return (f * x + (1 - f) * mean).clamp_(0.0, 1.0)


def _adjust_saturation_gray(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """:func:`adjust_saturation` of a gray image, on its one channel (B, 1, H, W)."""
    f = _per_image(factor)
    return (x * (f + (1 - f) * _LUMA_SUM)).clamp_(0.0, 1.0)


# hue: a gray pixel has no chroma, so a hue rotation leaves it as it is
_GRAY_JITTER_FUNCTIONS = (adjust_brightness, _adjust_contrast_gray, _adjust_saturation_gray, None)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image and reflect padding.

    Args:
        x: (B, C, H, W) float.
        sigma: (B,) standard deviations in pixels.
        kernel_size: odd kernel side.
    """
    batch, channels, height, width = x.shape
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)  # (K,)
    kernel = torch.exp(-0.5 * (taps / sigma.to(x.dtype).view(-1, 1)) ** 2)  # (B, K)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(channels, dim=0)  # (B*C, K)
    pad = kernel_size // 2
    flat = x.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)
