"""PreparedDataset.batch_reader: a training step's rows read with preadv (large images) or
gathered from the memory map (small ones); either way exactly the memory map's rows."""

from __future__ import annotations

import numpy as np
import pytest

from simclr_core.config import PrepareConfig
from simclr_core.data import PreparedDataset, prepare, sources
from simclr_core.data.prepared import LARGE_ROW_BYTES
from simclr_core.data.rows import RowReader
from simclr_core.data.sources import RawSplits, Source


def _prepared(root, side: int, count: int = 300):
    rng = np.random.default_rng(side)
    raw = RawSplits(rng.integers(0, 256, (count, 3, side, side), dtype=np.uint8), np.arange(count, dtype=np.int64) % 3,
                    None, None, ["a", "b", "c"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sources.SOURCES, "digits", Source(lambda config, scratch: raw))
        prepare(PrepareConfig(source="digits", val_fraction=0.0), root)
    return PreparedDataset(root)


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> PreparedDataset:
    return _prepared(tmp_path_factory.mktemp("rows") / "large", side=80)  # 19,200 bytes a row


@pytest.mark.parametrize("threads", [1, 4])
def test_rows_read_are_the_memory_maps_rows(large, threads):
    images = large.images("train")
    assert images[0].nbytes >= LARGE_ROW_BYTES
    rng = np.random.default_rng(0)
    indices = [
        np.sort(rng.choice(len(images), 64, replace=False)),  # a training step's: sorted, unique
        np.arange(10, 50),  # one run
        np.array([5, 6, 7, 100, 101, 3, 299, 0]),  # runs, out of order, both ends
        np.zeros(0, dtype=np.int64),
    ]
    with RowReader(large.root / "train_images.npy", images.shape, images.offset, threads) as reader:
        for index in indices:
            np.testing.assert_array_equal(reader(index), images[index])


def test_large_rows_get_the_preadv_reader_and_small_ones_the_map(large, tmp_path):
    reader = large.batch_reader("train")
    try:
        assert isinstance(reader, RowReader)
        index = np.array([1, 2, 40, 41, 42, 250])
        np.testing.assert_array_equal(reader(index), large.images("train")[index])
    finally:
        reader.close()
    small = _prepared(tmp_path / "small", side=16)
    small_reader = small.batch_reader("train")
    assert not isinstance(small_reader, RowReader)
    np.testing.assert_array_equal(small_reader(np.array([3, 4, 9])), small.images("train")[[3, 4, 9]])


def test_a_row_past_the_end_or_a_truncated_file_is_an_error_naming_it(large, tmp_path):
    images = large.images("train")
    with RowReader(large.root / "train_images.npy", images.shape, images.offset, threads=2) as reader:
        with pytest.raises(IndexError, match="train_images.npy, which has 300"):
            reader(np.array([299, 300]))
    cut = tmp_path / "cut.npy"
    cut.write_bytes((large.root / "train_images.npy").read_bytes()[: images.offset + 100 * images[0].nbytes])
    with RowReader(cut, images.shape, images.offset, threads=1) as reader:
        with pytest.raises(OSError, match="cut.npy ended at byte .* the file was truncated"):
            reader(np.array([99, 150]))


def test_pretraining_through_the_reader_equals_pretraining_through_the_map(large, tmp_path, monkeypatch):
    """The same run with the preadv reader and with the memory map's gather: the same weights, bit for bit."""
    import torch

    from simclr_core.data import prepared
    from simclr_core.launch import DistEnv
    from simclr_core.pretrain import pretrain
    from tests.test_pretrain_resume import _tiny_config

    config = _tiny_config(image_size=32, batch_size=16, epochs=1, checkpoint_every=0, knn_bank_size=0)
    pretrain(config, large.root, tmp_path / "reader", DistEnv())
    monkeypatch.setattr(prepared, "LARGE_ROW_BYTES", 10**9)  # every row through the memory map
    pretrain(config, large.root, tmp_path / "map", DistEnv())
    weights = [torch.load(tmp_path / run / "model.pt", map_location="cpu", weights_only=True)["model"] for run in ("reader", "map")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
