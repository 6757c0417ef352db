"""Images of mixed sizes stored at a larger side than pretraining's: each is resized (short side)
and centre-cropped to prepare.image_size, and pretraining's random resized crops are drawn from
that whole stored frame and resized to pretrain.image_size."""

from __future__ import annotations

import numpy as np
from PIL import Image

from simclr_core.config import PrepareConfig
from simclr_core.data import PreparedDataset, prepare
from simclr_core.launch import DistEnv
from simclr_core.pretrain import trainer
from tests.conftest import _pattern_image
from tests.test_pretrain_resume import _tiny_config

STORED, TRAINED = 32, 24


def _mixed_sizes(root) -> None:
    """2 classes of 12 landscape and portrait images of different sizes, all above STORED."""
    rng = np.random.default_rng(0)
    for label in range(2):
        (root / "train" / f"class{label}").mkdir(parents=True)
        for index in range(12):
            width, height = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
            tile = Image.fromarray(_pattern_image(label, index, 16)).resize((width, height), Image.NEAREST)
            tile.save(root / "train" / f"class{label}" / f"{index}.png")


def test_mixed_sizes_are_stored_at_the_side_and_cropped_from_it_when_pretraining(tmp_path, monkeypatch):
    _mixed_sizes(tmp_path / "images")
    prepare(PrepareConfig(source="imagefolder", source_root=str(tmp_path / "images"), image_size=STORED, workers=1), tmp_path / "data")
    first = sorted((tmp_path / "images" / "train" / "class0").iterdir())[0]
    with Image.open(first) as image:  # the reference: the centre square, resized to STORED
        side = min(image.size)
        box = ((image.width - side) / 2, (image.height - side) / 2, (image.width + side) / 2, (image.height + side) / 2)
        expected = np.asarray(image.convert("RGB").resize((STORED, STORED), Image.BICUBIC, box=box)).transpose(2, 0, 1)
    dataset = PreparedDataset(tmp_path / "data")
    assert dataset.image_shape == (3, STORED, STORED)
    rows = np.concatenate([np.asarray(dataset.images("train")), np.asarray(dataset.images("val"))])
    assert any(np.array_equal(row, expected) for row in rows)

    frames, views = [], []
    real_sample, real_make = trainer.BatchedAugment.sample_params, trainer.Trainer.make_views
    monkeypatch.setattr(trainer.BatchedAugment, "sample_params",
                        lambda self, count, height, width, generator: frames.append((height, width)) or real_sample(self, count, height, width, generator))
    monkeypatch.setattr(trainer.Trainer, "make_views", lambda self, step: views.append(real_make(self, step)) or views[-1])
    trainer.pretrain(_tiny_config(image_size=TRAINED, batch_size=8, epochs=1, checkpoint_every=0), tmp_path / "data", tmp_path / "run", DistEnv())
    assert frames and set(frames) == {(STORED, STORED)}  # crops are drawn from the whole stored image
    assert views and all(tuple(v.shape[-2:]) == (TRAINED, TRAINED) for v in views)
