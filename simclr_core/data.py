"""Prepared datasets: writing them from a source, and reading them back.

A prepared dataset is a directory::

    manifest.json             format_version, source, counts per split and class, class names,
                              image shape, sha256 of every file, skipped files, simclr_core version
    {split}_images.npy        uint8 (N, C, H, W), memory-mappable; split in train, val, test
                              (STL-10's unlabelled images are in train, with label -1)
    {split}_labels.npy        int64 (N,), -1 where unlabelled
    subsets.json              {"0.01": [train indices], "0.1": [...]}: class-balanced label
                              subsets, fixed by the seed (numpy PCG64: same on any machine)

It is written into a temporary directory beside the destination, fsynced and renamed into
place, so a failed or interrupted prepare never leaves a half-written dataset, and a dataset
already there is replaced only by a complete new one. :class:`PreparedDataset` checks the
format version and every file's sha256 when it opens one.

An ``imagefolder`` source is a directory (class subfolders, optionally under ``train/`` and
``test/``; a flat folder is unlabelled) or a ``.tar``, ``.tar.gz`` or ``.zip`` of one, which is
checked member by member (no absolute paths, no ``..``, no links leading outside, no special
files) before anything is extracted to a temporary directory. Files that cannot be used
(unreadable, truncated, empty, not images, hidden, symlink loops) are skipped and listed in
the manifest's ``skipped``; grayscale, palette and transparent images are converted (one
channel when every training image is grayscale, else RGB; transparency over white). A class
folder without a readable image, or images of different sizes without
``prepare.image_size``, is a :class:`SourceError` that names the folder or the two files.

Sources are read within budgets, against decompression bombs: an image whose header claims
more than ``prepare.max_image_pixels`` is skipped before it is decoded, and a source whose
images would take more than ``prepare.max_dataset_mib`` (IDX headers are checked before their
data is read) is a SourceError. Only regular files are opened: a FIFO, socket or device among
the images (or a link to one, such as /dev/zero) is skipped, never read. Photos stored
sideways with an EXIF Orientation tag are turned upright.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import json
import math
import os
import posixpath
import shutil
import stat
import struct
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from simclr_core import __version__
from simclr_core.config import ConfigError, PrepareConfig, shown
from simclr_core.manifest import SourceError, check_array, check_labels, check_manifest, read_manifest, read_subsets
from simclr_core.storage import sha256_file

__all__ = ["RawSplits", "prepare", "PreparedDataset", "load_source", "class_balanced_subset", "DEBIAN_FASHION_MNIST"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FORMAT_VERSION = 1  # of the prepared dataset layout; PreparedDataset refuses other versions
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


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


def _file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words."""
    kinds = ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
             (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
    return next((name for test, name in kinds if test(mode)), "special file")


def _special_kind(path: str | Path) -> str | None:
    """What ``path`` is (links followed) when it exists and is neither a regular file nor a directory.

    None for regular files, directories and paths that cannot be stat'ed (missing, a link
    loop): whoever opens those reports them. ``os.stat`` never opens the file, so a FIFO
    cannot block it and a device cannot react to it.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else _file_kind(mode)


def _open_regular(path: Path):
    """``path`` opened for binary reading, or a SourceError if it is not a regular file.

    Opened non-blocking and checked with fstat before any read: opening a FIFO would wait for a
    writer forever, and a device (/dev/zero behind a link named x.png) would be read forever.
    """
    kind = _special_kind(path)
    if kind is not None:
        raise SourceError(f"{path} is not a regular file ({kind})")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode  # again, on what was opened: the path may have changed since
        if not stat.S_ISREG(mode):
            raise SourceError(f"{path} is not a regular file ({_file_kind(mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


IDX_UNSIGNED_BYTE = 0x08
_READ_CHUNK = 1 << 20


@contextlib.contextmanager
def _idx_stream(path: Path):
    """The decompressed bytes of the IDX file ``path`` (gzipped when it ends in .gz), as a stream."""
    with _open_regular(path) as raw:
        if path.suffix != ".gz":
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
            yield stream


def _idx_shape(stream, path: Path) -> tuple[int, ...]:
    """The dimensions in the IDX header at the start of ``stream`` (which is left just past it)."""
    head = stream.read(4)
    if len(head) < 4:
        raise SourceError(f"{path} is not an IDX file: it is shorter than the 4-byte IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", head)
    if zero != 0 or dtype_code != IDX_UNSIGNED_BYTE or not 1 <= ndim <= 4:
        raise SourceError(f"{path} is not an IDX file of unsigned bytes (its header starts {head.hex()})")
    dims = stream.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise SourceError(f"{path} is truncated inside its IDX header")
    return struct.unpack(f">{ndim}I", dims)


def _idx_header(path: Path) -> tuple[int, ...]:
    """The dimensions the IDX file ``path`` claims, reading only its header."""
    with _idx_errors(path), _idx_stream(path) as stream:
        return _idx_shape(stream, path)


@contextlib.contextmanager
def _idx_errors(path: Path):
    """gzip's and the file system's errors as SourceErrors naming ``path``."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError; a cut .gz is an EOFError
        raise SourceError(f"{path} cannot be read ({type(error).__name__}: {error}); is it complete?") from None


def _read_at_most(stream, limit: int) -> bytearray:
    """Up to ``limit`` bytes of ``stream``, read in chunks: memory follows what is there, not a claim."""
    data = bytearray()
    while len(data) < limit:
        chunk = stream.read(min(_READ_CHUNK, limit - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def _shape_text(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape))


def _read_idx(path: Path, max_bytes: int) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not, read no further than its header claims.

    The header's claim (count x dims bytes) must be within ``max_bytes`` before any data is
    read, and at most that many bytes + 1 are read: a small .gz that inflates to gigabytes, or a
    header claiming more images than the file holds, cannot make prepare read or allocate them.
    """
    with _idx_errors(path), _idx_stream(path) as stream:
        shape = _idx_shape(stream, path)
        expected = math.prod(shape)
        if expected > max_bytes:
            raise SourceError(
                f"{path} claims {_shape_text(shape)} = {expected / 2**20:.0f} MiB of values, over "
                f"prepare.max_dataset_mib ({max_bytes // 2**20}); raise it if the file is genuine"
            )
        data = _read_at_most(stream, expected + 1)
    if len(data) != expected:
        found = f"{len(data)}" if len(data) < expected else "more"
        raise SourceError(f"{path} does not match its header: it claims {_shape_text(shape)} = {expected} values, and holds {found}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


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


def _load_fashion_mnist(config: PrepareConfig) -> RawSplits:
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


_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F"}
_IGNORED_NAMES = {"__MACOSX"}  # zip tools' metadata folders


def _ignored(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_NAMES


class _OverBudget(ValueError):
    """An image whose header claims more pixels than ``prepare.max_image_pixels``: skipped, never decoded."""


def _open_image(handle, max_pixels: int):
    """The PIL image in ``handle``, its header read but nothing decoded, checked against ``max_pixels``."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own budget decides, just below
        try:
            image = Image.open(handle)
        except Image.DecompressionBombError as error:  # over PIL's hard limit (2 x 89 MP), before our check
            raise _OverBudget(f"{error} (over PIL's limit; prepare.max_image_pixels is {max_pixels})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise _OverBudget(
            f"{width}x{height} = {width * height / 1e6:.1f} megapixels, over the pixel budget "
            f"prepare.max_image_pixels ({max_pixels}): not decoded (a decompression bomb?); raise it to use this image"
        )
    return image


_EXIF_ORIENTATION = 0x0112


def _upright(image):
    """``image`` (decoded) turned upright by its EXIF Orientation tag: photos are often stored sideways
    with the tag saying so. Without the tag, or with a malformed EXIF block, ``image`` as stored."""
    from PIL import ImageOps

    try:
        if image.getexif().get(_EXIF_ORIENTATION, 1) == 1:
            return image  # no copy for the usual, upright case
        return ImageOps.exif_transpose(image)
    except (ValueError, SyntaxError, struct.error, OSError):
        return image


def _decode_image(path: Path, size: int, max_pixels: int) -> tuple[np.ndarray, tuple[int, int], bool]:
    """(RGB uint8 (3, H, W), the upright image's (width, height), whether the file is grayscale).

    Only regular files are opened, and an image over ``max_pixels`` (by its header) is refused
    (:class:`_OverBudget`) before it is decoded. The EXIF orientation is applied. Transparent
    images (RGBA, LA, palette with transparency) are composited over white; every image is
    resized (shorter side) and centre-cropped to ``size`` when size > 0 (the (width, height)
    returned is then that of the decoded image, possibly reduced: it is compared only when size is 0).
    """
    from PIL import Image

    with _open_regular(path) as handle, _open_image(handle, max_pixels) as image:
        if size > 0:
            image.draft(None, (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still at least size x size
        image.load()  # decode now: a truncated file fails here
        image = _upright(image)
        original = image.size
        gray = image.mode in _GRAY_MODES
        if image.mode in _WIDE_GRAY_MODES:
            image = _gray_to_8_bits(image)
        if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        else:
            image = image.convert("RGB")
        if size > 0:
            # The centre square of the source, resized straight to size x size: resizing the whole
            # image first would make a 1 x 50M strip 800M pixels long.
            side = min(image.size)
            left, top = (image.width - side) / 2, (image.height - side) / 2
            image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy(), original, gray


# Gray modes wider than 8 bits: 16-bit PNG/TIFF/PGM ("I;16*"), and 32-bit integer ("I"), which
# PIL's convert() would clip at 255 (everything above 1/256 of the range turned white).
_WIDE_GRAY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_SIXTEEN_BIT_MAX = 65535


def _gray_to_8_bits(image):
    """A 16-bit gray image scaled to 8 bits (v * 255 / 65535, rounded), as an "L" image.

    Mode "I" holds 32-bit integers with no declared depth: it is read as 16-bit when a value
    exceeds 255 (and clipped to 16 bits), else as 8-bit values already.
    """
    from PIL import Image

    values = np.asarray(image).astype(np.float64)
    if image.mode != "I" or values.max(initial=0) > 255:
        values = np.clip(values, 0, _SIXTEEN_BIT_MAX) * (255 / _SIXTEEN_BIT_MAX)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3, H, W) -> (..., 1, H, W), with PIL's ITU-R 601-2 weights (as ``convert("L")``)."""
    r, g, b = (rgb[..., c : c + 1, :, :].astype(np.uint32) for c in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


class _FolderReader:
    """Reads the image folders of one source, collecting skipped files and checking sizes.

    ``show`` turns a path into what messages print (an archive member's name for archives).
    """

    def __init__(self, config: PrepareConfig, show=str) -> None:
        self.size = config.image_size
        self.max_pixels = config.max_image_pixels
        self.max_mib = config.max_dataset_mib
        self.show = show
        self.skipped: list[dict] = []
        self.over_budget = 0  # how many of the skipped files were over max_pixels
        self.held = 0  # bytes of the decoded images so far
        self.reference: tuple[Path, tuple[int, int]] | None = None  # first image read, and its (width, height)

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append({"path": self.show(path), "reason": reason})

    def skipped_since(self, before: int, over_before: int, where: str = "") -> str:
        """" (N file(s){where} skipped[, K of them over the pixel budget])": the skips after the counts given."""
        count, over = len(self.skipped) - before, self.over_budget - over_before
        if not count:
            return ""
        why = f", {over} of them over the pixel budget prepare.max_image_pixels ({self.max_pixels})" if over else ""
        return f" ({count} file(s){where} skipped{why})"

    def _subdirs(self, folder: Path) -> tuple[list[Path], list[Path]]:
        """The directories in ``folder`` (links to directories included), and those that are loops."""
        dirs, loops = [], []
        for path in sorted(folder.iterdir()):
            if not _ignored(path.name) and path.is_dir():
                (loops if _is_loop(path, [os.path.realpath(folder)]) else dirs).append(path)
        return dirs, loops

    def _loop(self, path: Path) -> None:
        self.skip(path, f"symlink loop: it points to {self.show(Path(os.path.realpath(path)))}, which contains it")

    def files(self, directory: Path, recursive: bool) -> list[Path]:
        """Image files under ``directory``, sorted; other files are skipped (listed)."""
        found: list[Path] = []

        def walk(current: Path, ancestors: list[str]) -> None:
            try:
                entries = sorted(os.scandir(current), key=lambda entry: entry.name)
            except OSError as error:
                self.skip(current, f"cannot be listed: {error.strerror or error}")
                return
            for entry in entries:
                path = Path(entry.path)
                if _ignored(entry.name):
                    self.skip(path, "hidden or metadata entry")
                    continue
                try:
                    is_dir = entry.is_dir()  # follows links
                except OSError:
                    is_dir = False
                if is_dir:
                    if not recursive:
                        self.skip(path, "a folder inside a flat image folder")
                    elif _is_loop(path, ancestors):
                        self._loop(path)
                    else:
                        walk(path, ancestors + [os.path.realpath(path)])
                elif path.suffix.lower() in IMAGE_SUFFIXES:
                    kind = _special_kind(path)  # stat, not open: a FIFO would block, /dev/zero never end
                    if kind is None:
                        found.append(path)
                    else:
                        self.skip(path, f"not a regular file ({kind})")
                else:
                    self.skip(path, f"not an image file (suffix {path.suffix or 'none'!r})")

        walk(directory, [os.path.realpath(directory)])
        return found

    def read(self, paths: list[Path]) -> tuple[list[np.ndarray], list[bool]]:
        """The decoded images of ``paths`` (unreadable ones skipped) and whether each file is grayscale."""
        images, grays = [], []
        for path in paths:
            try:
                array, original, gray = _decode_image(path, self.size, self.max_pixels)
            except _OverBudget as error:
                self.over_budget += 1
                self.skip(path, str(error))
                continue
            except Exception as error:  # PIL raises many types for bad files
                self.skip(path, f"{type(error).__name__}: {error}")
                continue
            self._hold(path, array)
            if self.size == 0:
                if self.reference is None:
                    self.reference = (path, original)
                elif original != self.reference[1]:
                    (first, first_size) = self.reference
                    raise SourceError(
                        f"images differ in size: {self.show(first)} is {first_size[0]}x{first_size[1]} but "
                        f"{self.show(path)} is {original[0]}x{original[1]} (width x height); set prepare.image_size "
                        "(--image-size N) to resize and centre-crop every image to N x N"
                    )
            images.append(array)
            grays.append(gray)
        return images, grays

    def _hold(self, path: Path, array: np.ndarray) -> None:
        """Count ``array`` against prepare.max_dataset_mib: a SourceError once the images read exceed it."""
        self.held += array.nbytes
        if self.held > self.max_mib * 2**20:
            raise SourceError(
                f"the images read up to {self.show(path)} take {self.held / 2**20:.0f} MiB (3 bytes a pixel), over "
                f"prepare.max_dataset_mib ({self.max_mib}); set --image-size to shrink them, or raise the budget "
                "if this machine has the memory (about twice it)"
            )

    def load(self, folder: Path, class_names: list[str] | None):
        """Images under ``folder``: class subfolders (labelled) or a flat folder (unlabelled).

        Returns (images, gray flags, labels, class names); images are RGB (3, H, W) arrays.
        """
        subdirs, loops = self._subdirs(folder)
        if class_names is None:
            class_names = [path.name for path in subdirs]
        images, grays, labels = [], [], []
        if subdirs:
            for path in sorted(folder.iterdir()):
                if path in loops:
                    self._loop(path)
                elif _ignored(path.name):
                    self.skip(path, "hidden or metadata entry")
                elif not path.is_dir():
                    self.skip(path, "a file beside the class folders (not in any class)")
            for path in subdirs:
                if path.name not in class_names:
                    raise SourceError(f"class folder {self.show(path)} is not among the training classes {class_names}")
                before, over_before = len(self.skipped), self.over_budget
                class_images, class_grays = self.read(self.files(path, recursive=True))
                if not class_images:
                    detail = self.skipped_since(before, over_before, where=" in it")
                    raise SourceError(
                        f"class folder {self.show(path)} holds no readable images{detail}; add images to it or remove it"
                    )
                images += class_images
                grays += class_grays
                labels += [class_names.index(path.name)] * len(class_images)
        else:
            images, grays = self.read(self.files(folder, recursive=False))
            labels = [-1] * len(images)
        return images, grays, labels, class_names


def _is_loop(path: Path, ancestors: list[str]) -> bool:
    """Whether the directory ``path`` leads back up the tree: to a directory being walked, or one containing it."""
    target = os.path.realpath(path)
    if target in ancestors:
        return True
    parent = os.path.realpath(path.parent)
    return os.path.commonpath([target, parent]) == target


def _stack(images: list[np.ndarray], grays: list[bool], channels: int) -> np.ndarray:
    """One (N, channels, H, W) array of the RGB ``images``; each is dropped from the list once copied,
    so the images are held once, not twice (the list and the stack)."""
    array = np.empty((len(images), channels, *images[0].shape[1:]), dtype=np.uint8)
    for index, gray in enumerate(grays):
        image, images[index] = images[index], None
        array[index] = image if channels == 3 else (image[:1] if gray else _luminance(image))
    return array


def _load_imagefolder_dir(root: Path, config: PrepareConfig, show=str) -> RawSplits:
    reader = _FolderReader(config, show)
    has_splits = (root / "train").is_dir()
    train_dir = root / "train" if has_splits else root
    images, grays, labels, classes = reader.load(train_dir, None)
    if not images:
        raise SourceError(f"image folder {show(train_dir)} holds no readable images{reader.skipped_since(0, 0) or ' (0 file(s) skipped)'}")
    # One channel when every training image is grayscale; otherwise RGB (gray images replicated).
    channels = 1 if all(grays) else 3
    train_x = _stack(images, grays, channels)
    test_x = test_y = None
    if has_splits and (root / "test").is_dir():
        test_images, test_grays, test_labels, _ = reader.load(root / "test", classes)
        if test_images:
            test_x = _stack(test_images, test_grays, channels)
            test_y = np.asarray(test_labels, dtype=np.int64)
    return RawSplits(train_x, np.asarray(labels, dtype=np.int64), test_x, test_y, classes, skipped=reader.skipped)


# ------------------------------------------------------------------------------ archives

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _absolute(path: str) -> bool:
    """POSIX or Windows absolute (``/x``, ``\\x``, ``C:x``)."""
    return path.startswith(("/", "\\")) or (len(path) > 1 and path[0].isalpha() and path[1] == ":")


def _unsafe_name(name: str) -> str | None:
    """Why the archive member name ``name`` would land outside the extraction directory, or None."""
    if not name:
        return "it has an empty name"
    if _absolute(name):
        return "its path is absolute"
    if ".." in name.replace("\\", "/").split("/"):
        return "its path has a '..' component"
    return None


def _unsafe_link(name: str, target: str, hard: bool, strict: bool = False) -> str | None:
    """Why a link member ``name`` -> ``target`` would point outside the extraction directory, or None.

    ``strict`` also refuses '..' anywhere in a symlink's target: without tarfile's ``data``
    filter (Python < 3.11.4) that is what keeps a chain of links (``a -> .``, ``b -> a/..``)
    from leading outside.
    """
    if _absolute(target):
        return f"it is a link to the absolute path {target!r}"
    if strict and not hard and ".." in target.replace("\\", "/").split("/"):
        return f"it is a link to {target!r}, with a '..' component"
    base = "" if hard else posixpath.dirname(name.replace("\\", "/"))  # hard links name a member; symlinks are relative
    resolved = posixpath.normpath(posixpath.join(base, target.replace("\\", "/")))
    if resolved == ".." or resolved.startswith("../"):
        return f"it is a link to {target!r}, outside the archive"
    return None


def _refuse(archive: Path, member: str, reason: str):
    return SourceError(
        f"archive {archive}: member {member!r} refused: {reason}. Nothing from the archive is used or left "
        "on disk; rebuild it with relative paths inside one folder"
    )


def _check_room(archive: Path, extracted_bytes: int, dest: Path) -> None:
    """Refuse, before writing anything, an archive whose members need more than the free space
    under ``dest`` (a zip or tar bomb, or an archive too big for this disk). Zip members'
    declared sizes bound what extraction writes (zipfile stops at them and checks the CRC); a
    tar member's size is its stored length."""
    free = shutil.disk_usage(dest).free
    if extracted_bytes > free:
        raise SourceError(
            f"archive {archive} would extract to {extracted_bytes / 2**30:.2f} GiB, more than the "
            f"{free / 2**30:.2f} GiB free in {dest.parent}; nothing was extracted. Point TMPDIR at a "
            "larger disk, or unpack the archive and give prepare.source_root the folder"
        )


def _extract_tar(archive: Path, dest: Path) -> None:
    has_filter = hasattr(tarfile, "data_filter")
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            reason = _unsafe_name(member.name)
            if reason is None and (member.issym() or member.islnk()):
                reason = _unsafe_link(member.name, member.linkname, hard=member.islnk(), strict=not has_filter)
            if reason is None and (member.isdev() or not (member.isfile() or member.isdir() or member.issym() or member.islnk())):
                reason = "it is a device, FIFO or other special file"
            if reason:
                raise _refuse(archive, member.name, reason)
        _check_room(archive, sum(member.size for member in members if member.isfile()), dest)
        if not has_filter:
            tar.extractall(dest, members=members)
            return
        try:
            tar.extractall(dest, members=members, filter="data")  # the stdlib's own checks, on top of ours
        except tarfile.FilterError as error:
            raise _refuse(archive, error.tarinfo.name, str(error)) from None


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as bundle:
        infos = bundle.infolist()
        for info in infos:
            reason = _unsafe_name(info.filename)
            if reason is None and stat.S_ISLNK(info.external_attr >> 16):
                reason = _unsafe_link(info.filename, bundle.read(info).decode("utf-8", "replace"), hard=False)
            if reason:
                raise _refuse(archive, info.filename, reason)
        _check_room(archive, sum(info.file_size for info in infos), dest)
        bundle.extractall(dest)  # zipfile writes links as small regular files: they are skipped as non-images


@contextlib.contextmanager
def _extracted(archive: Path):
    """A temporary directory holding the checked, extracted ``archive``; removed afterwards."""
    import gzip as gzip_module
    import lzma
    import zlib

    with tempfile.TemporaryDirectory(prefix="simclr-extract-") as scratch:
        dest = Path(scratch)
        try:
            if archive.name.lower().endswith(".zip"):
                _extract_zip(archive, dest)
            else:
                _extract_tar(archive, dest)
        except SourceError:
            raise
        except (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, gzip_module.BadGzipFile, EOFError, RuntimeError) as error:
            raise SourceError(f"archive {archive} cannot be read ({type(error).__name__}: {error}); is it complete?") from None
        yield dest


def _archive_root(dest: Path) -> Path:
    """The extracted tree's image folder: the archive's single top folder if it has one (and it is not train/)."""
    entries = [path for path in dest.iterdir() if not _ignored(path.name)]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink() and entries[0].name not in ("train", "test"):
        return entries[0]
    return dest


def _member_name(archive: Path, dest: Path, path: Path) -> str:
    """``ARCHIVE:member/path`` for a file extracted from ``archive`` into ``dest``."""
    for base in (dest, Path(os.path.realpath(dest))):
        try:
            return f"{archive}:{Path(path).relative_to(base)}"
        except ValueError:
            continue
    return str(path)


def _load_imagefolder(config: PrepareConfig) -> RawSplits:
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
            return _load_imagefolder_dir(top, config, show=lambda path: _member_name(root, dest, path))
    if not root.is_dir():
        raise SourceError(f"image folder {root} does not exist")
    return _load_imagefolder_dir(root, config)


def load_source(config: PrepareConfig) -> RawSplits:
    """Read the source named by ``config.source`` into memory."""
    kind = _special_kind(config.source_root) if config.source_root else None
    if kind is not None:  # a FIFO would block the first open, a device never end
        raise SourceError(f"prepare.source_root {config.source_root} is a {kind}, not a directory or a regular file")
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


def _check_dataset_size(raw: RawSplits, config: PrepareConfig) -> None:
    """The source's images (N x C x H x W bytes, all splits) within prepare.max_dataset_mib, before
    the splits copy them. Image folders and IDX files are checked while read; this covers the rest."""
    arrays = [raw.train_images, raw.test_images, *(images for images, _ in raw.extra.values())]
    total = sum(array.nbytes for array in arrays if array is not None)
    if total > config.max_dataset_mib * 2**20:
        raise SourceError(
            f"{config.source}: the images take {total / 2**20:.0f} MiB (N x C x H x W bytes, all splits), over "
            f"prepare.max_dataset_mib ({config.max_dataset_mib}); raise it if this machine has the memory (about twice it)"
        )


def _check_out_dir(out_dir: Path) -> None:
    """``out_dir`` may be absent, an empty directory, or a prepared dataset (which is replaced)."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise SourceError(f"--out {out_dir} exists and is not a directory; refusing to replace it")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise SourceError(
            f"--out {out_dir} is a non-empty directory that is not a prepared dataset (no manifest.json); "
            "refusing to replace it: choose another --out or empty it"
        )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, out_dir: Path) -> None:
    """Put the finished ``tmp`` in place of ``out_dir``: the old dataset goes only once the new one is there."""
    for path in tmp.iterdir():
        _fsync(path)
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent)) / "data"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
            shutil.rmtree(old.parent, ignore_errors=True)
        raise
    _fsync(out_dir.parent)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def _clean_leftovers(out_dir: Path) -> None:
    """Remove what a prepare killed half-way left beside ``out_dir`` (restoring a dataset moved aside)."""
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in out_dir.parent.glob(f".{out_dir.name}.old-*"):
        if not out_dir.exists() and (old / "data" / "manifest.json").is_file():
            os.replace(old / "data", out_dir)  # killed between the two renames of _commit
        shutil.rmtree(old, ignore_errors=True)


def prepare(config: PrepareConfig, out_dir: str | Path) -> dict:
    """Write the prepared dataset of ``config`` to ``out_dir`` (atomically); return its manifest.

    The dataset is written into a temporary sibling directory, fsynced and renamed into place:
    on any failure nothing is left behind, and a prepared dataset already at ``out_dir`` stays
    as it was. ``out_dir`` must be absent, empty, or a prepared dataset.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    raw = load_source(config)
    _check_dataset_size(raw, config)
    splits = _split_val(raw, config)
    if len(splits["train"][0]) == 0:
        raise SourceError(f"{config.source}: no training images left after the val split")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(out_dir)
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
            "format_version": FORMAT_VERSION,
            "source": config.source,
            "source_root": config.source_root or (str(DEBIAN_FASHION_MNIST) if config.source == "fashion-mnist" else ""),
            "config": dataclasses.asdict(config),
            "image_shape": list(splits["train"][0].shape[1:]),
            "class_names": raw.class_names,
            "splits": counts,
            "label_subsets": {k: len(v) for k, v in subsets.items()},
            "skipped": raw.skipped,
            "simclr_core_version": __version__,
            "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it private
        _commit(tmp, out_dir)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                error.errno,
                f"{os.strerror(error.errno)} while writing the prepared dataset {out_dir}; nothing was written "
                "(a dataset already there is untouched): free some space and rerun",
            ) from error
        raise
    return manifest


# ------------------------------------------------------------------------------ reading


class PreparedDataset:
    """Read access to a prepared dataset directory (images memory-mapped).

    Opening one checks it without reading the data (:mod:`simclr_core.manifest`): the
    manifest's ``format_version`` must be :data:`FORMAT_VERSION` (a manifest without the field
    predates it and has the same layout), the manifest must match its schema, and every
    split's arrays must have the dtype and shape it gives. With ``verify``, every file the
    manifest lists must also match its sha256. Failures are SourceErrors that name the file
    and say to run ``simclr prepare`` again.
    """

    def __init__(self, root: str | Path, verify: bool = True) -> None:
        self.root = Path(root)
        manifest = read_manifest(self.root)
        version = manifest.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise SourceError(
                f"{self.root} is a prepared dataset of format version {shown(version, 20)}, but this simclr_core ({__version__}) "
                f"reads version {FORMAT_VERSION}; run `simclr prepare` again to rewrite it"
            )
        check_manifest(self.root, manifest)
        self.manifest = manifest
        self.class_names: list[str] = manifest["class_names"]
        self.image_shape: tuple[int, int, int] = tuple(manifest["image_shape"])
        for split, counts in manifest["splits"].items():
            check_array(self.root / f"{split}_images.npy", np.dtype(np.uint8), (counts["images"], *self.image_shape))
            check_array(self.root / f"{split}_labels.npy", np.dtype(np.int64), (counts["images"],))
        if verify:
            self.verify()

    def verify(self) -> None:
        """Check that every file the manifest lists is there and matches its sha256."""
        manifest_path = self.root / "manifest.json"
        for name, expected in sorted(self.manifest["files"].items()):
            path = self.root / name
            if not path.is_file():
                raise SourceError(
                    f"{path} is listed in {manifest_path} but missing: the dataset is incomplete; run `simclr prepare` again"
                )
            actual = sha256_file(path)
            if actual != expected:
                raise SourceError(
                    f"{path} does not match its sha256 in {manifest_path} (expected {str(expected)[:12]}..., found "
                    f"{actual[:12]}...): it was changed or corrupted after prepare; run `simclr prepare` again"
                )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def has_split(self, split: str) -> bool:
        return split in self.manifest["splits"]

    def _split_file(self, split: str, kind: str) -> Path:
        if split not in self.manifest["splits"]:
            remedy = _MISSING_SPLIT_REMEDY.get(split, "run `simclr prepare` with a source that has it")
            raise SourceError(f"{self.root} has no '{split}' split; {remedy}")
        return self.root / f"{split}_{kind}.npy"

    def images(self, split: str) -> np.ndarray:
        """uint8 (N, C, H, W), memory-mapped."""
        return np.load(self._split_file(split, "images"), mmap_mode="r", allow_pickle=False)

    def labels(self, split: str) -> np.ndarray:
        """int64 (N,): a class index, or -1 for an unlabelled image."""
        path = self._split_file(split, "labels")
        labels = np.load(path, allow_pickle=False)
        check_labels(path, labels, self.num_classes)
        return labels

    def subset(self, fraction: float) -> np.ndarray:
        """Training indices of the class-balanced ``fraction`` label subset."""
        subsets = read_subsets(self.root / "subsets.json", self.labels("train"))
        key = next((k for k in subsets if abs(float(k) - fraction) < 1e-9), None)
        if key is None:
            raise ConfigError(f"label fraction {fraction} was not prepared; {self.root} has {sorted(subsets)}")
        return subsets[key]

    def tensor(self, split: str, index: np.ndarray | None = None) -> torch.Tensor:
        """uint8 (N, C, H, W) tensor of ``split`` (rows ``index`` if given)."""
        images = self.images(split)
        array = images[index] if index is not None else np.asarray(images)
        return torch.from_numpy(np.ascontiguousarray(array))


_MISSING_SPLIT_REMEDY = {
    "test": "every evaluation scores the encoder on the test split: give the image folder a test/ folder "
    "(class subfolders, as in train/) and run `simclr prepare` again",
    "val": "run `simclr prepare` again with prepare.val_fraction > 0",
}
