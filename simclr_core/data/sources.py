"""The built-in sources behind one registry, :data:`SOURCES`: a name -> :class:`Source`.

Each source reads its files as :class:`RawSplits` (in memory, or on disk for image folders); :func:`load_source` picks the
one ``prepare.source`` names. Adding a source is a loader and one entry in :data:`SOURCES` here
(its name is also listed in :data:`simclr_core.config.SOURCES`, which validates
``prepare.source`` below this package; tests/test_layout.py checks that the two agree).

- ``fashion-mnist``: the four IDX files (:mod:`simclr_core.data.idx`) under Debian's
  ``/usr/share/datasets/fashion-mnist`` or ``prepare.source_root``; torchvision downloads them
  with ``--download true``.
- ``cifar10``, ``cifar100``, ``stl10``: torchvision's datasets under ``prepare.source_root``
  (STL-10's unlabelled images go into train, with label -1).
- ``digits``: scikit-learn's bundled 8x8 digits (no download).
- ``imagefolder``: a directory (class subfolders, optionally under ``train/`` and ``test/``, with
  ``unlabeled/`` beside them; a flat folder is unlabelled), decoded in parallel by
  :mod:`simclr_core.data.folder` into scratch files, or an archive of one,
  checked member by member by :mod:`simclr_core.data.archive` before anything is extracted.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np

from simclr_core.config import PrepareConfig
from simclr_core.data.archive import ARCHIVE_SUFFIXES, _archive_root, _extracted, _is_archive, _member_name
from simclr_core.data.idx import _idx_header, _read_idx, _shape_text
from simclr_core.data.folder import load_image_folder
from simclr_core.data.images import _special_kind
from simclr_core.data.raw import RawSplits
from simclr_core.manifest import SourceError

__all__ = ["RawSplits", "Source", "SOURCES", "load_source", "source_root", "DEBIAN_FASHION_MNIST"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _find(root: Path, stem: str) -> Path | None:
    """The file of Fashion-MNIST's ``stem`` under ``root``; a SourceError if one is there but not a regular file."""
    for candidate in (root / f"{stem}.gz", root / stem, root / "FashionMNIST" / "raw" / f"{stem}.gz", root / "FashionMNIST" / "raw" / stem):
        kind = _special_kind(candidate)
        if kind is not None:
            raise SourceError(f"{candidate} is a {kind}, not a regular file: Fashion-MNIST's IDX files must be regular files")
        if candidate.is_file():
            return candidate
    return None


def _check_fashion_mnist_headers(paths: list[Path], config: PrepareConfig) -> None:
    """The four IDX headers agree (images 3-D, labels 1-D, as many of each) and the images fit
    ``prepare.max_dataset_mib``: checked before any data is read."""
    shapes = [_idx_header(path) for path in paths]
    for images, labels in ((0, 1), (2, 3)):
        if len(shapes[images]) != 3 or len(shapes[labels]) != 1 or shapes[images][0] != shapes[labels][0]:
            raise SourceError(
                f"{paths[images]} claims {_shape_text(shapes[images])} images but {paths[labels]} claims "
                f"{_shape_text(shapes[labels])} labels: expected N x H x W images and N labels"
            )
    total = math.prod(shapes[0]) + math.prod(shapes[2])
    if total > config.max_dataset_mib * 2**20:
        raise SourceError(
            f"{paths[0]} and {paths[2]} claim {shapes[0][0]} + {shapes[2][0]} images of {shapes[0][1]} x {shapes[0][2]} "
            f"= {total / 2**20:.0f} MiB, over prepare.max_dataset_mib ({config.max_dataset_mib}); raise it if the files are genuine"
        )


def _load_fashion_mnist(config: PrepareConfig, scratch: Path) -> RawSplits:
    roots = [Path(config.source_root)] if config.source_root else [DEBIAN_FASHION_MNIST]
    for root in roots:
        stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
        paths = [_find(root, stem) for stem in stems]
        if all(paths):
            _check_fashion_mnist_headers(paths, config)
            train_x, train_y, test_x, test_y = (_read_idx(p, config.max_dataset_mib * 2**20) for p in paths)
            return RawSplits(
                train_x[:, None], train_y.astype(np.int64), test_x[:, None], test_y.astype(np.int64), list(FASHION_MNIST_CLASSES)
            )
    if config.download:
        import torchvision

        root = config.source_root or str(Path.home() / ".cache" / "simclr" / "fashion-mnist")
        train = torchvision.datasets.FashionMNIST(root, train=True, download=True)
        test = torchvision.datasets.FashionMNIST(root, train=False, download=True)
        return RawSplits(
            train.data.numpy()[:, None], train.targets.numpy().astype(np.int64),
            test.data.numpy()[:, None], test.targets.numpy().astype(np.int64), list(train.classes),
        )
    where = config.source_root or str(DEBIAN_FASHION_MNIST)
    raise SourceError(
        f"Fashion-MNIST not found under {where} (expected train-images-idx3-ubyte.gz and the other three IDX "
        "files); install Debian's dataset-fashion-mnist, set prepare.source_root, or pass --download true"
    )


def _load_torchvision(config: PrepareConfig, scratch: Path) -> RawSplits:
    import torchvision

    if not config.source_root:
        raise SourceError(f"prepare.source_root must name the directory holding {config.source}'s files")
    root = config.source_root
    try:
        if config.source in ("cifar10", "cifar100"):
            cls = torchvision.datasets.CIFAR10 if config.source == "cifar10" else torchvision.datasets.CIFAR100
            train = cls(root, train=True, download=config.download)
            test = cls(root, train=False, download=config.download)
            return RawSplits(
                train.data.transpose(0, 3, 1, 2).copy(), np.asarray(train.targets, dtype=np.int64),
                test.data.transpose(0, 3, 1, 2).copy(), np.asarray(test.targets, dtype=np.int64), list(train.classes),
            )
        train = torchvision.datasets.STL10(root, split="train", download=config.download)
        test = torchvision.datasets.STL10(root, split="test", download=config.download)
        unlabeled = torchvision.datasets.STL10(root, split="unlabeled", download=config.download)
        # SimCLR pretrains on train + unlabeled: both go into 'train', the unlabelled with label -1
        # (evaluations and label subsets use the labelled rows only).
        images = np.concatenate([train.data, unlabeled.data])
        labels = np.concatenate([train.labels.astype(np.int64), np.full(len(unlabeled.data), -1, dtype=np.int64)])
        return RawSplits(images, labels, test.data, test.labels.astype(np.int64), list(train.classes))
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise SourceError(f"{config.source} under {root}: {error} (pass --download true to fetch it)") from None


def _load_digits(config: PrepareConfig, scratch: Path) -> RawSplits:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download); a stratified 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    test_mask = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(config.seed)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        test_mask[rng.permutation(members)[: round(0.2 * len(members))]] = True
    return RawSplits(
        images[~test_mask], labels[~test_mask], images[test_mask], labels[test_mask], [str(d) for d in range(10)]
    )


def _load_imagefolder(config: PrepareConfig, scratch: Path) -> RawSplits:
    if not config.source_root:
        raise SourceError("prepare.source_root must name the image folder (or a .tar, .tar.gz or .zip of it)")
    root = Path(config.source_root)
    if root.is_file():
        if not _is_archive(root):
            raise SourceError(
                f"{root} is a file, not an image folder or an archive of one ({', '.join(ARCHIVE_SUFFIXES)})"
            )
        with _extracted(root) as dest:
            top = _archive_root(dest)
            return load_image_folder(top, config, scratch, show=lambda path: _member_name(root, dest, path))
    if not root.is_dir():
        raise SourceError(f"image folder {root} does not exist")
    return load_image_folder(root, config, scratch)


@dataclasses.dataclass(frozen=True)
class Source:
    """A built-in source: its loader, and where its files are when ``prepare.source_root`` is empty.

    The loader gets the config and a scratch directory (inside the prepare's temporary
    directory, removed with it) where it may keep images too large for memory.
    """

    load: Callable[[PrepareConfig, Path], RawSplits]
    default_root: str = ""  # the manifest's source_root when prepare.source_root is empty


SOURCES: dict[str, Source] = {
    "fashion-mnist": Source(_load_fashion_mnist, default_root=str(DEBIAN_FASHION_MNIST)),
    "cifar10": Source(_load_torchvision),
    "cifar100": Source(_load_torchvision),
    "stl10": Source(_load_torchvision),
    "digits": Source(_load_digits),
    "imagefolder": Source(_load_imagefolder),
}


def source_root(config: PrepareConfig) -> str:
    """Where ``config``'s source is read from: ``prepare.source_root``, or the source's default place."""
    return config.source_root or SOURCES[config.source].default_root


def load_source(config: PrepareConfig, scratch: Path) -> RawSplits:
    """Read the source named by ``config.source`` (a key of :data:`SOURCES`); image folders are
    decoded into files under ``scratch``, the others read into memory."""
    kind = _special_kind(config.source_root) if config.source_root else None
    if kind is not None:  # a FIFO would block the first open, a device never end
        raise SourceError(f"prepare.source_root {config.source_root} is a {kind}, not a directory or a regular file")
    return SOURCES[config.source].load(config, Path(scratch))
