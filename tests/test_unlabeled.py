"""An image folder's unlabeled/ (STL-10's layout): pretrained on, kept out of every evaluation.

The unlabelled images are solid colours and the labelled ones patterned, so a row tells which
it is; pretraining and linear eval are run for real and every row they read is recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_core.config import LinearEvalConfig, PrepareConfig
from simclr_core.data import PreparedDataset, prepare
from simclr_core.launch import DistEnv
from tests.conftest import _pattern_image
from tests.test_pretrain_resume import _tiny_config

UNLABELED = 24
SIZE = 16


def _is_solid(rows: np.ndarray) -> np.ndarray:
    """(N,) bool: which uint8 (N, C, H, W) rows are one colour (the unlabelled images)."""
    flat = rows.reshape(len(rows), rows.shape[1], -1)
    return np.all(flat == flat[:, :, :1], axis=(1, 2))


@pytest.fixture(scope="module")
def stl_like(tmp_path_factory) -> Path:
    """train/ and test/ of 2 classes, and unlabeled/ of solid images in two nested folders."""
    root = tmp_path_factory.mktemp("stl") / "images"
    for split, count in (("train", 16), ("test", 6)):
        for label in range(2):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                Image.fromarray(_pattern_image(label, index + 100 * (split == "test"), SIZE)).save(folder / f"{index}.png")
    for index in range(UNLABELED):
        folder = root / "unlabeled" / f"part{index % 2}" / ("deeper" if index % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (SIZE, SIZE), (index * 10, 255 - index * 10, 77)).save(folder / f"u{index}.png")
    return root


@pytest.fixture(scope="module")
def prepared(stl_like, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stl-prepared") / "data"
    prepare(PrepareConfig(source="imagefolder", source_root=str(stl_like), val_fraction=0.25, label_fractions=[0.1, 0.5], workers=2), out)
    return out


def test_unlabeled_images_go_into_the_pretraining_splits_with_label_minus_one(prepared):
    dataset = PreparedDataset(prepared)
    manifest = json.loads((prepared / "manifest.json").read_text())
    unlabeled = sum(manifest["splits"][split]["unlabeled"] for split in ("train", "val"))
    assert unlabeled == UNLABELED and manifest["splits"]["test"]["unlabeled"] == 0
    for split in ("train", "val", "test"):
        images, labels = np.asarray(dataset.images(split)), dataset.labels(split)
        np.testing.assert_array_equal(_is_solid(images), labels == -1)  # the solid rows, and only they, are unlabelled
    for fraction in (0.1, 0.5):
        assert np.all(dataset.labels("train")[dataset.subset(fraction)] >= 0)  # label subsets hold labelled rows only
    assert dataset.class_names == ["class0", "class1"]  # unlabeled/ is not a class


class _Recorded(np.ndarray):
    """The train split's array, noting every row index read from it."""

    reads: list[np.ndarray]

    def __getitem__(self, index):
        if isinstance(index, np.ndarray):
            type(self).reads.append(np.asarray(index))
        return np.asarray(super().__getitem__(index))


def test_pretraining_reads_the_unlabeled_rows(prepared, tmp_path, monkeypatch):
    from simclr_core.pretrain import trainer

    real_images = trainer.PreparedDataset.images
    _Recorded.reads = []

    def images(self, split):
        array = real_images(self, split)
        return np.asarray(array).view(_Recorded) if split == "train" else array

    monkeypatch.setattr(trainer.PreparedDataset, "images", images)
    trainer.pretrain(_tiny_config(batch_size=8, epochs=2, checkpoint_every=0), prepared, tmp_path / "run", DistEnv())
    labels = PreparedDataset(prepared).labels("train")
    read = np.unique(np.concatenate(_Recorded.reads))
    steps_per_epoch = len(labels) // 8
    unread = np.setdiff1d(np.flatnonzero(labels == -1), read)
    assert len(unread) <= 2 * (len(labels) - 8 * steps_per_epoch)  # each epoch leaves out only its last partial batch
    assert np.sum(labels == -1) >= 15


def test_linear_eval_never_sees_an_unlabeled_image(prepared, tmp_path, monkeypatch):
    from simclr_core import evaluate
    from simclr_core.evaluate import linear
    from simclr_core.pretrain import pretrain

    pretrain(_tiny_config(epochs=1, checkpoint_every=0), prepared, tmp_path / "run", DistEnv())
    extracted: list[np.ndarray] = []
    real_extract = linear.extract

    def extract(encoder, images, *args, **kwargs):
        extracted.append(np.asarray(images))
        return real_extract(encoder, images, *args, **kwargs)

    monkeypatch.setattr(linear, "extract", extract)
    evaluate.linear_eval(tmp_path / "run" / "model.pt", prepared, LinearEvalConfig(max_iter=5, augment_copies=0), torch.device("cpu"))
    dataset = PreparedDataset(prepared)
    labelled = sum(int(np.sum(dataset.labels(split) >= 0)) for split in ("train", "val", "test"))
    assert extracted and not any(_is_solid(rows).any() for rows in extracted)
    assert sum(len(rows) for rows in extracted) == 2 * labelled  # pretrained and random-init encoders, labelled rows only
