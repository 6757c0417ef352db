"""Prepared datasets: writing them from a source, and reading them back.

A prepared dataset is a directory::

    manifest.json             source, counts per split and class, class names, image shape,
                              sha256 of every file, skipped files, simclr_core version
    {split}_images.npy        uint8 (N, C, H, W), memory-mappable; split in train, val, test
                              (STL-10's unlabelled images are in train, with label -1)
    {split}_labels.npy        int64 (N,), -1 where unlabelled
    subsets.json              {"0.01": [train indices], "0.1": [...]}: class-balanced label
                              subsets, fixed by the seed (numpy PCG64: same on any machine)

It is written into a temporary directory beside the destination and renamed into place, so
a failed or interrupted prepare never leaves a half-written dataset.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from simclr_core import __version__
from simclr_core.config import ConfigError, PrepareConfig

__all__ = ["RawSplits", "prepare", "PreparedDataset", "load_source", "class_balanced_subset", "DEBIAN_FASHION_MNIST"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class SourceError(ValueError):
    """The source is missing, empty or unreadable; the message names the path."""


@dataclasses.dataclass
class RawSplits:
    """Images of a source before the val split and subsets: uint8 (N, C, H, W) and int64 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    class_names: list[str]
    extra: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    skipped: list[dict] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------ sources


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise SourceError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise SourceError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem, root / "FashionMNIST" / "raw" / f"{stem}.gz", root / "FashionMNIST" / "raw" / stem):
        if candidate.is_file():
            return candidate
    return None


def _load_fashion_mnist(config: PrepareConfig) -> RawSplits:
    roots = [Path(config.source_root)] if config.source_root else [DEBIAN_FASHION_MNIST]
    for root in roots:
        stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
        paths = [_find(root, stem) for stem in stems]
        if all(paths):
            train_x, train_y, test_x, test_y = (_read_idx(p) for p in paths)
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


def _load_torchvision(config: PrepareConfig) -> RawSplits:
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


def _load_digits(config: PrepareConfig) -> RawSplits:
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


def _read_image(path: Path, size: int) -> np.ndarray:
    """RGB uint8 (3, H, W), resized (shorter side) and centre-cropped to ``size`` when size > 0."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if size > 0:
            scale = size / min(image.size)
            image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC)
            left, top = (image.width - size) // 2, (image.height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def _load_folder(folder: Path, size: int, class_names: list[str] | None, skipped: list[dict]):
    """Images under ``folder``: class subfolders (labelled) or a flat folder (unlabelled)."""
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if class_names is None:
        class_names = [p.name for p in subdirs]
    entries: list[tuple[Path, int]] = []
    if subdirs:
        for path in subdirs:
            if path.name not in class_names:
                raise SourceError(f"class folder {path} is not among the training classes {class_names}")
            label = class_names.index(path.name)
            entries += [(f, label) for f in sorted(path.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        entries = [(f, -1) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    images, labels, shapes = [], [], set()
    for path, label in entries:
        try:
            array = _read_image(path, size)
        except Exception as error:  # PIL raises many types for bad files
            skipped.append({"path": str(path), "reason": f"{type(error).__name__}: {error}"})
            continue
        images.append(array)
        labels.append(label)
        shapes.add(array.shape)
    if len(shapes) > 1:
        raise SourceError(f"images under {folder} have different sizes {sorted(shapes)[:3]}...; set prepare.image_size to resize them")
    if not images:
        return None, None, class_names
    return np.stack(images), np.asarray(labels, dtype=np.int64), class_names


def _load_imagefolder(config: PrepareConfig) -> RawSplits:
    if not config.source_root:
        raise SourceError("prepare.source_root must name the image folder")
    root = Path(config.source_root)
    if not root.is_dir():
        raise SourceError(f"image folder {root} does not exist")
    skipped: list[dict] = []
    has_splits = (root / "train").is_dir()
    train_dir = root / "train" if has_splits else root
    train_x, train_y, classes = _load_folder(train_dir, config.image_size, None, skipped)
    if train_x is None:
        raise SourceError(f"image folder {train_dir} holds no readable images ({len(skipped)} unreadable)")
    test_x = test_y = None
    if has_splits and (root / "test").is_dir():
        test_x, test_y, _ = _load_folder(root / "test", config.image_size, classes, skipped)
    return RawSplits(train_x, train_y, test_x, test_y, classes, skipped=skipped)


def load_source(config: PrepareConfig) -> RawSplits:
    """Read the source named by ``config.source`` into memory."""
    if config.source == "fashion-mnist":
        return _load_fashion_mnist(config)
    if config.source in ("cifar10", "cifar100", "stl10"):
        return _load_torchvision(config)
    if config.source == "digits":
        return _load_digits(config)
    return _load_imagefolder(config)


# ------------------------------------------------------------------------------ prepare


def class_balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``fraction`` of each class's examples (at least one per class).

    Deterministic: the same labels, fraction and seed give the same subset on any machine.
    """
    rng = np.random.default_rng([seed, round(fraction * 1e6)])
    chosen = []
    for label in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == label)
        take = max(1, round(fraction * len(members)))
        chosen.append(rng.permutation(members)[:take])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _split_val(raw: RawSplits, config: PrepareConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(raw.train_images))
    n_val = round(config.val_fraction * len(order))
    val_index, train_index = order[:n_val], order[n_val:]
    if config.max_train:
        train_index = train_index[: config.max_train]
    val_index, train_index = np.sort(val_index), np.sort(train_index)
    splits = {
        "train": (raw.train_images[train_index], raw.train_labels[train_index]),
        "val": (raw.train_images[val_index], raw.train_labels[val_index]),
    }
    if raw.test_images is not None:
        splits["test"] = (raw.test_images, raw.test_labels)
    splits.update(raw.extra)
    return splits


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare(config: PrepareConfig, out_dir: str | Path) -> dict:
    """Write the prepared dataset of ``config`` to ``out_dir`` (atomically); return its manifest."""
    out_dir = Path(out_dir)
    raw = load_source(config)
    splits = _split_val(raw, config)
    if len(splits["train"][0]) == 0:
        raise SourceError(f"{config.source}: no training images left after the val split")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        counts = {}
        for split, (images, labels) in splits.items():
            np.save(tmp / f"{split}_images.npy", np.ascontiguousarray(images, dtype=np.uint8))
            np.save(tmp / f"{split}_labels.npy", labels.astype(np.int64))
            per_class = {raw.class_names[c]: int((labels == c).sum()) for c in range(len(raw.class_names))}
            counts[split] = {"images": int(len(images)), "per_class": per_class, "unlabeled": int((labels < 0).sum())}
        train_labels = splits["train"][1]
        subsets = {str(f): class_balanced_subset(train_labels, f, config.seed).tolist() for f in config.label_fractions}
        (tmp / "subsets.json").write_text(json.dumps(subsets))
        manifest = {
            "source": config.source,
            "source_root": config.source_root or (str(DEBIAN_FASHION_MNIST) if config.source == "fashion-mnist" else ""),
            "config": dataclasses.asdict(config),
            "image_shape": list(splits["train"][0].shape[1:]),
            "class_names": raw.class_names,
            "splits": counts,
            "label_subsets": {k: len(v) for k, v in subsets.items()},
            "skipped": raw.skipped,
            "simclr_core_version": __version__,
            "files": {p.name: _sha256(p) for p in sorted(tmp.iterdir())},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ------------------------------------------------------------------------------ reading


class PreparedDataset:
    """Read access to a prepared dataset directory (images memory-mapped)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise SourceError(f"{self.root} is not a prepared dataset (no manifest.json); run `simclr prepare` first")
        self.manifest = json.loads(manifest_path.read_text())
        self.class_names: list[str] = self.manifest["class_names"]
        self.image_shape: tuple[int, int, int] = tuple(self.manifest["image_shape"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def has_split(self, split: str) -> bool:
        return (self.root / f"{split}_images.npy").is_file()

    def images(self, split: str) -> np.ndarray:
        """uint8 (N, C, H, W), memory-mapped."""
        path = self.root / f"{split}_images.npy"
        if not path.is_file():
            raise SourceError(f"{self.root} has no '{split}' split ({path.name} is missing)")
        return np.load(path, mmap_mode="r")

    def labels(self, split: str) -> np.ndarray:
        return np.load(self.root / f"{split}_labels.npy")

    def subset(self, fraction: float) -> np.ndarray:
        """Training indices of the class-balanced ``fraction`` label subset."""
        subsets = json.loads((self.root / "subsets.json").read_text())
        key = next((k for k in subsets if abs(float(k) - fraction) < 1e-9), None)
        if key is None:
            raise ConfigError(f"label fraction {fraction} was not prepared; {self.root} has {sorted(subsets)}")
        return np.asarray(subsets[key], dtype=np.int64)

    def tensor(self, split: str, index: np.ndarray | None = None) -> torch.Tensor:
        """uint8 (N, C, H, W) tensor of ``split`` (rows ``index`` if given)."""
        images = self.images(split)
        array = images[index] if index is not None else np.asarray(images)
        return torch.from_numpy(np.ascontiguousarray(array))
