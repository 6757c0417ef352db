"""Hostile sources for `simclr prepare`: decompression bombs, lying IDX headers, special files, EXIF.

One table, as in test_bad_inputs.py (whose helpers it uses): each row builds its source under
``tmp_path`` and returns the command line; the row's exit code (2 for a source that cannot make
a dataset, 0 where files are skipped), a message fragment naming the file or the setting, no
traceback, nothing half-written at --out and no temporaries left are checked for every row.

A regression must fail a row, not the machine: every row runs with its data segment capped
(RLIMIT_DATA) at what the process had before the CLI ran plus HEADROOM, and decoding one
144 MP bomb needs over twice that (RLIMIT_AS would also count torch's 2 GB of mapped
libraries, which vary by build). Every row has a timeout too (pytest-timeout interrupts a
blocked open()). The rows where a regression would decode several bombs, read a .gz to its
gigabyte end, or block on a FIFO run the CLI in a child process (cap and timeout its own), as
the tester saw them; the rest run in this process (a child costs seconds: torch's import).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import os
import re
import resource
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image, ImageOps

from simclr_core.data import PreparedDataset
from tests.conftest import DIST_VARS, cli_env, make_fashion_mnist_like
from tests.test_bad_inputs import LEFTOVER, OK, USAGE, Ctx, _cli, _image, prepare_args

HEADROOM = 400 * 2**20
TIMEOUT_S = 60
BOMB_SIDE = 12000  # 144 MP: over the 50 MP default budget, under PIL's own 179 MP hard limit
BUDGET_REASON = "over the pixel budget prepare.max_image_pixels (50000000)"

# The child: import what prepare needs, cap the data segment at what that took + HEADROOM (as
# data_capped does), run the CLI.
CHILD = f"""
import re, resource, sys
import PIL.Image, PIL.ImageOps, PIL.PngImagePlugin, PIL.GifImagePlugin
import simclr_core.cli, simclr_core.data
now = int(re.search(r"VmData:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (now + {HEADROOM}, resource.getrlimit(resource.RLIMIT_DATA)[1]))
sys.exit(simclr_core.cli.main(sys.argv[1:]))
"""


@contextlib.contextmanager
def data_capped(headroom: int = HEADROOM):
    """RLIMIT_DATA at this process's data segment now + ``headroom``, restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    now = int(re.search(r"VmData:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (now + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


# ------------------------------------------------------------------------------ hostile files


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(path: Path, side: int = BOMB_SIDE) -> Path:
    """A valid 1-bit PNG of side x side black pixels: ~18 KB on disk, 144 MB once decoded (576 MB as RGB)."""
    rows = bytes((1 + (side + 7) // 8) * side)  # filter byte + packed bits, per row
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows, 9)) + _png_chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _gif_bomb(path: Path, side: int = 9000) -> Path:
    """A valid GIF of side x side (81 MP), ~60 KB on disk."""
    Image.new("P", (side, side)).save(path)
    return path


def _bmp_claiming(path: Path, width: int, height: int) -> Path:
    """A 1-bit BMP header claiming width x height, followed by a few bytes of pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 1, 0, 0, 2835, 2835, 2, 0)
    palette = b"\0\0\0\0\xff\xff\xff\0"
    offset = 14 + len(info) + len(palette)
    path.write_bytes(b"BM" + struct.pack("<IHHI", offset + 64, 0, 0, offset) + info + palette + bytes(64))
    return path


def _tiff_claiming(path: Path, width: int, height: int) -> Path:
    """An uncompressed 1-bit little-endian TIFF whose IFD claims width x height, with 64 bytes of pixels."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 1), (259, 3, 1), (262, 3, 1),
               (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, 64)]
    ifd_size = 2 + 12 * len(entries) + 4
    pixels_at = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = pixels_at if tag == 273 else value
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(64))
    return path


def _idx_header(count: int, dims: tuple[int, ...] = (28, 28)) -> bytes:
    shape = (count, *dims)
    return struct.pack(">HBB", 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape)


def _fashion(ctx: Ctx, images_count: int | None = None, labels_count: int | None = None, gz: bool = True,
             tail: bytes = b"", real: int = 60) -> Path:
    """Fashion-MNIST's four files with ``real`` training images, the train headers claiming the counts given."""
    root = make_fashion_mnist_like(ctx.tmp / "fmnist", train=real, test=20)
    for stem, count, dims in (("train-images-idx3-ubyte", images_count, (28, 28)), ("train-labels-idx1-ubyte", labels_count, ())):
        if count is None:
            continue
        path = root / f"{stem}.gz"
        body = gzip.decompress(path.read_bytes())[len(_idx_header(0, dims)):]
        path.unlink()
        if gz:
            path.write_bytes(gzip.compress(_idx_header(count, dims) + body) + tail)
        else:
            (root / stem).write_bytes(_idx_header(count, dims) + body)
    return root


def _gzip_members_of_zeros(total: int, member: int = 8 * 2**20) -> bytes:
    """gzip members that inflate to ``total`` zero bytes: ~1 KB per 1 MB (a .gz may hold many members)."""
    one = gzip.compress(bytes(member), 9)
    return one * (total // member)


def fashion_args(ctx: Ctx, root: Path, *extra) -> list:
    return ["prepare", "--source", "fashion-mnist", "--source-root", root, "--out", ctx.out, *extra]


# ------------------------------------------------------------------------------ the rows


@dataclasses.dataclass
class Hostile:
    id: str
    build: Callable[[Ctx], list]  # makes the source, returns the command line
    exit: int
    fragment: str  # must appear in stderr (or the log)
    check: Callable[[Ctx], None] | None = None  # what must be there afterwards
    child: bool = False  # run in a child process with a memory cap and a timeout


def _folder_with(*make: Callable[[Path], object], where: str = "train/class1", extra: tuple = ()) -> Callable[[Ctx], list]:
    """A generated image folder with files made by ``make`` (each given the folder ``where``)."""

    def build(ctx: Ctx) -> list:
        root = ctx.folder()
        for one in make:
            one(root / where)
        return prepare_args(ctx, root, *extra)

    return build


def _only(*make: Callable[[Path], object], count: int = 1, extra: tuple = (), flat: bool = False) -> Callable[[Ctx], list]:
    """A source holding nothing but ``count`` copies of each hostile file (in class0/, or flat)."""

    def build(ctx: Ctx) -> list:
        folder = ctx.tmp / "src" / ("" if flat else "class0")
        folder.mkdir(parents=True)
        for index in range(count):
            for one in make:
                one(folder / f"{index}")
        return prepare_args(ctx, ctx.tmp / "src", *extra)

    return build


def _skips(name: str, reason: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        skipped = ctx.skipped()
        hits = [path for path in skipped if path.endswith(name)]
        assert hits, f"{name} is not in the manifest's skipped list {skipped}"
        assert reason in skipped[hits[0]], skipped[hits[0]]
        assert PreparedDataset(ctx.out).manifest["splits"]["train"]["images"] > 0

    return check


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _socket(path: Path) -> Path:
    """A UNIX socket at ``path``, bound by a relative name (a socket path is limited to 107 bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(path.parent)
    try:
        server = socket.socket(socket.AF_UNIX)
        server.bind(path.name)
        server.close()  # the socket file stays
    finally:
        os.chdir(here)
    return path


def _symlink_to(target: str) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)
        return path

    return make


def _fifo_root(ctx: Ctx) -> list:
    return prepare_args(ctx, _fifo(ctx.tmp / "images"))


def _fashion_fifo_file(ctx: Ctx) -> list:
    root = make_fashion_mnist_like(ctx.tmp / "fmnist")
    (root / "t10k-images-idx3-ubyte.gz").unlink()
    _fifo(root / "t10k-images-idx3-ubyte.gz")
    return fashion_args(ctx, root)


def _fashion_device_file(ctx: Ctx) -> list:
    root = make_fashion_mnist_like(ctx.tmp / "fmnist")
    (root / "train-labels-idx1-ubyte.gz").unlink()
    os.symlink("/dev/zero", root / "train-labels-idx1-ubyte.gz")
    return fashion_args(ctx, root)


def _upright_pair(suffix: str, orientation: int, stored: tuple[int, int]) -> Callable[[Ctx], list]:
    """Two classes of 8 wide x 12 high images; class1's first is stored ``stored`` with an EXIF Orientation tag."""

    def build(ctx: Ctx) -> list:
        root = ctx.tmp / "src"
        for label in ("class0", "class1"):
            for index in range(2):
                _image(root / "train" / label / f"{index}.png", size=(8, 12))
        rotated = root / "train" / "class1" / f"0{suffix}"
        (root / "train" / "class1" / "0.png").unlink()
        pixels = np.random.default_rng(7).integers(0, 256, (stored[1], stored[0], 3), dtype=np.uint8)
        pixels[: stored[1] // 2, : stored[0] // 2] = (255, 0, 0)  # a red corner, to see which way it turned
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(pixels).save(rotated, exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
        return prepare_args(ctx, root, "--val-fraction", "0")

    return build


def _is_upright(name: str) -> Callable[[Ctx], None]:
    """The prepared image of class1's first file equals the file decoded and turned by PIL's exif_transpose."""

    def check(ctx: Ctx) -> None:
        dataset = PreparedDataset(ctx.out)
        with Image.open(ctx.tmp / "src" / "train" / "class1" / name) as image:
            upright = ImageOps.exif_transpose(image).convert("RGB")
        assert upright.size == (8, 12)
        expected = np.asarray(upright).transpose(2, 0, 1)
        images, labels = dataset.images("train"), dataset.labels("train")
        assert dataset.image_shape == (3, 12, 8)
        np.testing.assert_array_equal(images[np.flatnonzero(labels == 1)[0]], expected)

    return check


def _square_turned(ctx: Ctx) -> list:
    """Square images, one stored upside down (Orientation 3), resized by --image-size."""
    root = ctx.folder(classes=2, train=2, test=1)
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:8] = 255  # white top half, as stored: upright, the white half is at the bottom
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(pixels).save(root / "train" / "class0" / "0.png", exif=exif)
    return prepare_args(ctx, root, "--image-size", "8", "--val-fraction", "0")


def _white_at_the_bottom(ctx: Ctx) -> None:
    image = PreparedDataset(ctx.out).images("train")[0]  # class0/0.png
    assert (image[:, 6:] > 200).all() and (image[:, :2] < 50).all(), image[0]


def _large_images(count: int, side: int = 512) -> Callable[[Ctx], list]:
    def build(ctx: Ctx) -> list:
        for index in range(count):
            _image(ctx.tmp / "src" / "class0" / f"{index}.png", size=(side, side))
        return prepare_args(ctx, ctx.tmp / "src", "--max-dataset-mib", "1")

    return build


def _bombs(count: int) -> Callable[[Path], None]:
    return lambda folder: [_png_bomb(folder / f"bomb{index}.png") for index in range(count)]


ROWS = [
    # -- decompression bombs: skipped by their header, never decoded (exit 0), or, when nothing else is there, refused
    Hostile("png-1bit-bombs-only", _only(lambda p: _png_bomb(p.with_suffix(".png")), count=6, flat=True), USAGE,
            "holds no readable images (6 file(s) skipped, 6 of them " + BUDGET_REASON, child=True),
    Hostile("png-1bit-bombs-only-image-size-16", _only(lambda p: _png_bomb(p.with_suffix(".png")), count=4, extra=("--image-size", "16")), USAGE,
            "class0 holds no readable images (4 file(s) in it skipped, 4 of them over the pixel budget", child=True),
    Hostile("png-1bit-bombs-among-images", _folder_with(_bombs(2)), OK, "skipped 2 unreadable",
            _skips("bomb1.png", f"{BOMB_SIDE}x{BOMB_SIDE} = 144.0 megapixels, {BUDGET_REASON}"), child=True),
    Hostile("png-1bit-bomb-with-image-size", _folder_with(_bombs(1), extra=("--image-size", "12")), OK, "skipped 1 unreadable",
            _skips("bomb0.png", BUDGET_REASON)),
    Hostile("gif-bomb-among-images", _folder_with(lambda f: _gif_bomb(f / "big.gif")), OK, "skipped 1 unreadable",
            _skips("big.gif", f"9000x9000 = 81.0 megapixels, {BUDGET_REASON}"), child=True),
    Hostile("bmp-header-over-pils-limit", _folder_with(lambda f: _bmp_claiming(f / "huge.bmp", 100000, 100000)), OK, "skipped 1 unreadable",
            _skips("huge.bmp", "prepare.max_image_pixels is 50000000")),
    Hostile("bmp-header-over-budget", _folder_with(lambda f: _bmp_claiming(f / "wide.bmp", 9000, 9000)), OK, "skipped 1 unreadable",
            _skips("wide.bmp", "9000x9000 = 81.0 megapixels, " + BUDGET_REASON)),
    Hostile("tiff-header-over-budget", _folder_with(lambda f: _tiff_claiming(f / "tall.tif", 10, 10_000_000)), OK, "skipped 1 unreadable",
            _skips("tall.tif", "10x10000000 = 100.0 megapixels, " + BUDGET_REASON)),
    Hostile("tiff-header-over-pils-limit", _folder_with(lambda f: _tiff_claiming(f / "huge.tiff", 30000, 30000)), OK, "skipped 1 unreadable",
            _skips("huge.tiff", "prepare.max_image_pixels is 50000000")),
    Hostile("every-image-over-a-low-budget", lambda ctx: prepare_args(ctx, ctx.folder(), "--max-image-pixels", "255"), USAGE,
            "class0 holds no readable images (4 file(s) in it skipped, 4 of them over the pixel budget prepare.max_image_pixels (255))"),
    # -- --image-size: the output is an image too
    Hostile("image-size-100000", lambda ctx: prepare_args(ctx, ctx.folder(), "--image-size", "100000"), USAGE,
            "prepare.image_size must be in [0, 4096], got 100000"),
    Hostile("image-size-over-the-pixel-budget", lambda ctx: prepare_args(ctx, ctx.folder(), "--image-size", "64", "--max-image-pixels", "1000"), USAGE,
            "prepare.image_size must be at most 31 (its square within prepare.max_image_pixels), got 64"),
    # -- the whole dataset's budget, checked while images are read
    Hostile("images-over-the-dataset-budget", _large_images(3), USAGE, "over prepare.max_dataset_mib (1)"),
    Hostile("idx-over-the-dataset-budget", lambda ctx: fashion_args(ctx, _fashion(ctx, real=1400), "--max-dataset-mib", "1"), USAGE,
            "claim 1400 + 20 images of 28 x 28 = 1 MiB, over prepare.max_dataset_mib (1)"),
    # -- IDX headers that lie
    Hostile("idx-gz-claims-6m-images", lambda ctx: fashion_args(ctx, _fashion(ctx, images_count=6_000_000, labels_count=6_000_000)), USAGE,
            "claim 6000000 + 20 images of 28 x 28 = 4486 MiB, over prepare.max_dataset_mib (4096)"),
    Hostile("idx-gz-claims-2m-images-holds-60", lambda ctx: fashion_args(ctx, _fashion(ctx, images_count=2_000_000, labels_count=2_000_000)), USAGE,
            "train-images-idx3-ubyte.gz does not match its header: it claims 2000000 x 28 x 28 = 1568000000 values, and holds 47040"),
    Hostile("idx-gz-images-and-labels-disagree", lambda ctx: fashion_args(ctx, _fashion(ctx, images_count=2_000_000)), USAGE,
            "train-images-idx3-ubyte.gz claims 2000000 x 28 x 28 images but"),
    Hostile("idx-gz-inflates-past-its-header", lambda ctx: fashion_args(ctx, _fashion(ctx, images_count=60, tail=_gzip_members_of_zeros(2**30))), USAGE,
            "train-images-idx3-ubyte.gz does not match its header: it claims 60 x 28 x 28 = 47040 values, and holds more", child=True),
    Hostile("idx-raw-claims-2m-images", lambda ctx: fashion_args(ctx, _fashion(ctx, images_count=2_000_000, labels_count=2_000_000, gz=False)), USAGE,
            "train-images-idx3-ubyte does not match its header: it claims 2000000 x 28 x 28 = 1568000000 values, and holds 47040"),
    Hostile("idx-gz-cut-short", lambda ctx: fashion_args(ctx, _cut_gz(_fashion(ctx))), USAGE,
            "t10k-images-idx3-ubyte.gz cannot be read (EOFError"),
    # -- special files: never opened
    Hostile("fifo-among-images", _folder_with(lambda f: _fifo(f / "pipe.png")), OK, "skipped 1 unreadable",
            _skips("pipe.png", "not a regular file (FIFO)"), child=True),
    Hostile("symlink-to-a-fifo-among-images", _folder_with(lambda f: _fifo(f / "pipe"), lambda f: _symlink_to("pipe")(f / "pipe.jpg")), OK,
            "skipped 2 unreadable", _skips("pipe.jpg", "not a regular file (FIFO)")),
    Hostile("dev-zero-named-x-png", _folder_with(lambda f: _symlink_to("/dev/zero")(f / "x.png")), OK, "skipped 1 unreadable",
            _skips("x.png", "not a regular file (character device)"), child=True),
    Hostile("socket-among-images", _folder_with(lambda f: _socket(f / "s.png")), OK, "skipped 1 unreadable",
            _skips("s.png", "not a regular file (socket)")),
    Hostile("fifo-as-source-root", _fifo_root, USAGE, "images is a FIFO, not a directory or a regular file"),
    Hostile("dev-zero-as-archive-root", lambda ctx: prepare_args(ctx, _symlink_to("/dev/zero")(ctx.tmp / "images.tar")), USAGE,
            "images.tar is a character device, not a directory or a regular file"),
    Hostile("fifo-named-like-fashion-mnist", _fashion_fifo_file, USAGE,
            "t10k-images-idx3-ubyte.gz is a FIFO, not a regular file"),
    Hostile("dev-zero-named-like-fashion-mnist", _fashion_device_file, USAGE,
            "train-labels-idx1-ubyte.gz is a character device, not a regular file"),
    Hostile("fifo-as-fashion-mnist-root", lambda ctx: fashion_args(ctx, _fifo(ctx.tmp / "fmnist")), USAGE,
            "fmnist is a FIFO, not a directory"),
    # -- EXIF orientation: photos stored sideways come out upright
    Hostile("exif-orientation-6-png", _upright_pair(".png", 6, stored=(12, 8)), OK, "of shape [3, 12, 8]", _is_upright("0.png")),
    Hostile("exif-orientation-8-jpeg", _upright_pair(".jpg", 8, stored=(12, 8)), OK, "of shape [3, 12, 8]", _is_upright("0.jpg")),
    Hostile("exif-orientation-3-with-image-size", _square_turned, OK, "of shape [3, 8, 8]", _white_at_the_bottom),
]


def _cut_gz(root: Path) -> Path:
    path = root / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-200])
    return root


# ------------------------------------------------------------------------------ running a row


def _run_child(ctx: Ctx, argv: list) -> tuple[int, str]:
    """The CLI in a child process, capped at HEADROOM of data beyond its imports: (exit code, stderr)."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *[str(arg) for arg in argv]], cwd=ctx.tmp, env=cli_env(),
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    return result.returncode, result.stderr


@pytest.fixture
def ctx(tmp_path, monkeypatch) -> Ctx:
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no ./params.yaml: the defaults and the options given are all there is
    return Ctx(tmp_path, {}, monkeypatch)


@pytest.mark.timeout(2 * TIMEOUT_S)
@pytest.mark.parametrize("row", [pytest.param(row, id=row.id) for row in ROWS])
def test_hostile_source(row: Hostile, ctx: Ctx, capsys, caplog):
    caplog.set_level(logging.INFO)
    argv = row.build(ctx)
    capsys.readouterr()
    caplog.clear()
    if row.child:
        code, output = _run_child(ctx, argv)
    else:
        with data_capped():
            code = _cli(argv)
        output = capsys.readouterr().err + caplog.text
    assert "Traceback" not in output and "MemoryError" not in output, output[-3000:]
    assert "DecompressionBombWarning" not in output, output[-3000:]  # our budget decides, PIL's warning is noise
    assert row.fragment in output, output[-3000:]
    assert code == row.exit, output[-3000:]
    if code != OK:
        assert re.search(r"^simclr prepare: error: ", output, flags=re.M), output
        assert not ctx.out.exists(), f"{ctx.out} was written: {list(ctx.out.rglob('*'))}"
    leftovers = [str(path) for path in ctx.tmp.rglob("*") if LEFTOVER.search(path.name)]
    assert not leftovers, leftovers
    if row.check is not None:
        row.check(ctx)


def test_the_table_covers_each_class():
    ids = {row.id for row in ROWS}
    assert len(ids) == len(ROWS)
    for word, least in (("bomb", 5), ("header", 4), ("idx", 7), ("fifo", 5), ("exif", 3)):
        assert sum(word in row_id for row_id in ids) >= least, word
