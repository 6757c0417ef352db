"""The pretraining trainer applies the augmentation policy it claims (DESIGN.md: crop area
(0.08, 1), flip 0.5, colour jitter 0.8, grayscale 0.2, blur 0.5 above 32 px and off at 32).

The views are captured where the trainer hands them to the model (``SimCLRModel.forward``)
during a real in-process ``pretrain`` run, on images made so that each part of the policy
shows in the pixels:
- one solid colour: crops, flips and blur keep a solid image as it is, so a view whose colour
  changed was jittered, and a view with R = G = B was turned gray;
- a ramp (R = x, G = y) with jitter off: a view's R and G ranges are its crop's width and
  height, and a falling R is a flip;
- a black-and-white checkerboard with jitter off and full-image crops: a view that differs
  from the (possibly flipped) image was blurred.
The audit's mutation (pretraining with the crop + flip only policy) passed every test before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_core.config import PretrainConfig
from simclr_core.launch import init_distributed
from simclr_core.method.models import SimCLRModel
from simclr_core.pretrain import pretrain
from tests.conftest import run_cli

IMAGES_PER_CLASS = 64
COLOUR = (200, 60, 30)


def _prepared(root: Path, image: np.ndarray) -> Path:
    """A prepared dataset of 2 classes x IMAGES_PER_CLASS copies of ``image`` (H, W, 3 uint8)."""
    for name in ("a", "b"):
        folder = root / "images" / "train" / name
        folder.mkdir(parents=True)
        for index in range(IMAGES_PER_CLASS):
            Image.fromarray(image).save(folder / f"{index}.png")
    out = root / "prepared"
    result = run_cli("prepare", "--source", "imagefolder", "--source-root", str(root / "images"), "--val-fraction", "0",
                     "--label-fractions", "0.5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def _views(monkeypatch, data: Path, out: Path, **settings) -> torch.Tensor:
    """Every view the trainer fed the model in one epoch: (2 * images, 3, S, S) float in [0, 1]."""
    captured: list[torch.Tensor] = []
    forward = SimCLRModel.forward

    def recording(self, x):
        captured.append(x.detach().float().clone())
        return forward(self, x)

    monkeypatch.setattr(SimCLRModel, "forward", recording)
    config = PretrainConfig(
        width_multiplier=0.0625, batch_size=64, epochs=1, warmup_epochs=0, knn_bank_size=0, knn_k=1, num_threads=1,
        precision="fp32", checkpoint_every=0, cifar_stem="false", **settings,
    )
    pretrain(config, data, out, init_distributed(device="cpu"))
    views = torch.cat(captured)
    assert views.shape[0] == 2 * 2 * IMAGES_PER_CLASS  # both views of every image, once
    return views


def test_colour_jitter_and_grayscale_rates(tmp_path, monkeypatch):
    image = np.empty((32, 32, 3), np.uint8)
    image[...] = COLOUR
    views = _views(monkeypatch, _prepared(tmp_path, image), tmp_path / "run")
    flat = views.flatten(2)
    assert flat.std(dim=2).max() < 1e-3  # still solid: crops and flips cannot show here
    colour = flat.mean(dim=2)  # (V, 3)
    gray = (colour.max(dim=1).values - colour.min(dim=1).values) < 1e-4
    changed = (colour - torch.tensor(COLOUR) / 255).abs().max(dim=1).values > 2e-3
    gray_rate = gray.float().mean().item()
    jitter_rate = changed[~gray].float().mean().item()  # a solid colour changes only when jittered
    assert 0.12 <= gray_rate <= 0.28, f"grayscale applied to {gray_rate:.2f} of the views, expected 0.2"
    assert 0.70 <= jitter_rate <= 0.90, f"colour jitter applied to {jitter_rate:.2f} of the views, expected 0.8"


def test_crop_areas_and_flips(tmp_path, monkeypatch):
    side = 32
    ramp = np.linspace(0, 255, side)
    image = np.stack([np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side)), np.full((side, side), 128.0)], axis=2)
    views = _views(monkeypatch, _prepared(tmp_path, image.round().astype(np.uint8)), tmp_path / "run", strength=0.0)
    red, green = views[:, 0], views[:, 1]
    colour = ~torch.isclose(red, green, atol=1e-3).all(dim=(1, 2))  # gray views (0.2) lose the ramp
    red, green = red[colour], green[colour]
    row = red.mean(dim=1)  # (V, S): R along x
    flipped = row[:, -1] < row[:, 0]
    # the crop's width and height as fractions of the image: the span of the ramp it covers
    # (views are the image's size, so the S view samples span (S - 1) / S of the crop, as the
    # ramp's W pixels span (W - 1) / W of the image: the two cancel)
    width = row.max(dim=1).values - row.min(dim=1).values
    height = green.amax(dim=(1, 2)) - green.amin(dim=(1, 2))
    area = (width * height).numpy()
    flip_rate = flipped.float().mean().item()
    assert 0.36 <= flip_rate <= 0.64, f"{flip_rate:.2f} of the views flipped, expected 0.5"
    assert area.min() >= 0.06 and area.max() <= 1.01, (area.min(), area.max())
    assert (area < 0.3).mean() > 0.1 and (area > 0.7).mean() > 0.1, "crop areas do not spread over (0.08, 1)"
    assert 0.35 <= np.median(area) <= 0.7, np.median(area)


@pytest.mark.parametrize("side,blur_expected", [(32, False), (64, True)])
def test_blur_is_on_above_32_pixels_only(tmp_path, monkeypatch, side, blur_expected):
    cells = (np.add.outer(np.arange(side) // 4, np.arange(side) // 4) % 2 * 255).astype(np.uint8)
    image = np.repeat(cells[:, :, None], 3, axis=2)
    views = _views(monkeypatch, _prepared(tmp_path, image), tmp_path / "run", strength=0.0, crop_min_scale=1.0)
    sharp = torch.from_numpy(cells).float() / 255
    gray = views.mean(dim=1)  # (V, S, S); the image is gray, so grayscale changes nothing
    difference = torch.minimum((gray - sharp).abs().amax(dim=(1, 2)), (gray - sharp.flip(-1)).abs().amax(dim=(1, 2)))
    blur_rate = (difference > 0.01).float().mean().item()
    if blur_expected:
        assert 0.3 <= blur_rate <= 0.62, f"{blur_rate:.2f} of the views blurred at {side} px, expected about 0.45 (0.5, sigma >= 0.3)"
    else:
        assert blur_rate == 0.0, f"{blur_rate:.2f} of the views blurred at {side} px, where blur is off"
