"""Reading image files within budgets: regular files only, headers checked before decoding.

Only regular files are opened: a FIFO, socket or device among the images (or a link to one,
such as /dev/zero) is skipped, never read. An image whose header claims more than
``prepare.max_image_pixels`` is skipped before it is decoded, and the images read are counted
against ``prepare.max_dataset_mib``. Grayscale, palette and transparent images are converted
(one channel when every training image is grayscale, else RGB; transparency over white), and
photos stored sideways with an EXIF Orientation tag are turned upright.

:class:`_FolderReader` lists a folder of class subfolders (or a flat, unlabelled folder) as
:class:`_Group` s of files, listing every file it skips and why; :mod:`simclr_core.data.folder`
decodes them (:func:`_decode_image`, one file) and counts them against the budgets here.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np

from simclr_core.config import PrepareConfig
from simclr_core.manifest import SourceError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


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
        except Image.UnidentifiedImageError:  # PIL's message names the handle's file descriptor, not the file
            raise Image.UnidentifiedImageError("cannot identify image file (not an image format PIL reads, or damaged)") from None
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


@dataclasses.dataclass
class _Group:
    """The image files of one folder, in reading order, all with one ``label`` (-1: unlabelled).

    ``skips`` are the files its listing skipped (listed before those its decoding skips);
    ``folder`` is the class folder, which must end up holding an image (None for a flat folder).
    """

    label: int
    paths: list[Path]
    skips: list[dict]
    folder: Path | None = None


class _FolderReader:
    """Lists the image folders of one source, collecting skipped files and checking sizes.

    Listing (:meth:`plan`) only stats files; decoding them is :mod:`simclr_core.data.folder`'s,
    which counts them here (:meth:`hold`, :meth:`skip`). ``show`` turns a path into what
    messages print (an archive member's name for archives).
    """

    def __init__(self, config: PrepareConfig, show=str) -> None:
        self.max_pixels = config.max_image_pixels
        self.max_mib = config.max_dataset_mib
        self.show = show
        self.skipped: list[dict] = []
        self.over_budget = 0  # how many of the skipped files were over max_pixels
        self.held = 0  # bytes of the decoded images so far

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

    def _listed(self, label: int, directory: Path, recursive: bool, folder: Path | None) -> _Group:
        """A group of ``directory``'s files; the skips of its listing go into the group, not yet into ``skipped``."""
        mark = len(self.skipped)
        paths = self.files(directory, recursive)
        skips = self.skipped[mark:]
        del self.skipped[mark:]
        return _Group(label, paths, skips, folder)

    def plan(self, folder: Path, class_names: list[str] | None) -> tuple[list[_Group], list[str]]:
        """The groups of ``folder``: one per class subfolder (labelled, in sorted order), or one
        flat, unlabelled group. Returns them and the class names (``class_names``, or the subfolders')."""
        subdirs, loops = self._subdirs(folder)
        if class_names is None:
            class_names = [path.name for path in subdirs]
        if not subdirs:
            return [self._listed(-1, folder, recursive=False, folder=None)], class_names
        mark = len(self.skipped)
        for path in sorted(folder.iterdir()):
            if path in loops:
                self._loop(path)
            elif _ignored(path.name):
                self.skip(path, "hidden or metadata entry")
            elif not path.is_dir():
                self.skip(path, "a file beside the class folders (not in any class)")
        beside = self.skipped[mark:]
        del self.skipped[mark:]
        groups = []
        for path in subdirs:
            if path.name not in class_names:
                raise SourceError(f"class folder {self.show(path)} is not among the training classes {class_names}")
            groups.append(self._listed(class_names.index(path.name), path, recursive=True, folder=path))
        groups[0].skips[:0] = beside
        return groups, class_names

    def plan_unlabeled(self, folder: Path) -> _Group:
        """``folder``'s images, in any subfolders, as one unlabelled group (STL-10's unlabeled/)."""
        return self._listed(-1, folder, recursive=True, folder=None)

    def hold(self, path: Path, nbytes: int) -> None:
        """Count an image of ``nbytes`` against prepare.max_dataset_mib: a SourceError once the images read exceed it."""
        self.held += nbytes
        if self.held > self.max_mib * 2**20:
            raise SourceError(
                f"the images read up to {self.show(path)} take {self.held / 2**20:.0f} MiB (3 bytes a pixel), over "
                f"prepare.max_dataset_mib ({self.max_mib}); set --image-size to shrink them, or raise the budget "
                "if the disk has room for them (they are written once, to the prepared dataset)"
            )


def _is_loop(path: Path, ancestors: list[str]) -> bool:
    """Whether the directory ``path`` leads back up the tree: to a directory being walked, or one containing it."""
    target = os.path.realpath(path)
    if target in ancestors:
        return True
    parent = os.path.realpath(path.parent)
    return os.path.commonpath([target, parent]) == target
