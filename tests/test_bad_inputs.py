"""Bad inputs across every stage: one table, each row with its exit code, message fragment and aftermath.

Each row builds its input under ``tmp_path`` and returns the ``simclr`` command line; the CLI
runs in this process (``simclr_core.cli.main``), so a row costs milliseconds, except the few
that train or evaluate a tiny model. Every row then checks what it must leave behind: for a
failure, no output at all (or the previous good output, untouched) and no temporary leftovers;
for a skippable problem in a source (exit 0), the manifest's ``skipped`` list naming the file.

The gs:// rows need no emulator: a URI without a bucket fails before any request, and an
unreachable emulator is a closed port on 127.0.0.1 (the working gs:// paths are in test_gcs.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_core.checkpoint import CheckpointManager
from simclr_core.cli import main
from simclr_core.data import PreparedDataset
from simclr_core import storage
from simclr_core.storage import LocalStore
from tests.conftest import DIST_VARS, TINY_PRETRAIN, make_imagefolder

OK, FAILURE, USAGE = 0, 1, 2
LEFTOVER = re.compile(r"\.tmp-|\.old-|\.tmp$|\.part$")


# ------------------------------------------------------------------------------ helpers


def _cli(argv: list[str]) -> int:
    try:
        return main([str(arg) for arg in argv])
    except SystemExit as exit:  # argparse's usage errors
        return int(exit.code)


def _image(path: Path, size=(16, 16), mode: str = "RGB", colour=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if colour is None:
        rng = np.random.default_rng(zlib.crc32(path.name.encode()))
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(mode) if mode != "RGB" else Image.fromarray(pixels)
    else:
        image = Image.new(mode, size, colour)
    image.save(path)
    return path


def _png_bytes(size=(16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 128, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _params(ctx: "Ctx", text: str) -> Path:
    path = ctx.tmp / "params.yaml"
    path.write_text(text)
    return path


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _save_model(path: Path, arch: str = "resnet18", width: float = 0.125, edit: Callable[[dict], None] | None = None) -> Path:
    """A pretraining-format model.pt with untrained weights (what `simclr pretrain` writes, minus the training)."""
    from simclr_core.config import PretrainConfig
    from simclr_core.pretrain.model_setup import build_model, model_config_for

    model_config = model_config_for(PretrainConfig(arch=arch, width_multiplier=width, cifar_stem="false"), 16)
    torch.manual_seed(0)
    state = {"model": build_model(model_config).state_dict(), "model_config": model_config, "step": 0}
    if edit is not None:
        edit(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


@dataclasses.dataclass
class Ctx:
    """What a row's build and check functions get: a scratch directory and the shared fixtures."""

    tmp: Path
    shared: dict
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def prepared(self) -> Path:
        """The shared tiny prepared dataset: 54 train, 18 val, 18 test images of 3 classes (read only)."""
        return self.shared["prepared"]

    @property
    def model(self) -> Path:
        return self.shared["model"]

    def folder(self, classes: int = 2, train: int = 4, test: int = 2, size: int = 16) -> Path:
        """A fresh imagefolder (train/ and test/ with class0, class1, ...), generated."""
        return make_imagefolder(self.tmp / "src", classes=classes, train_per_class=train, test_per_class=test, size=size)

    def copy_prepared(self) -> Path:
        copy = self.tmp / "data"
        shutil.copytree(self.prepared, copy)
        return copy

    def manifest(self, root: Path | None = None) -> dict:
        return json.loads(((root or self.out) / "manifest.json").read_text())

    def skipped(self, root: Path | None = None) -> dict[str, str]:
        return {entry["path"]: entry["reason"] for entry in self.manifest(root)["skipped"]}


def prepare_args(ctx: Ctx, root: Path, *extra) -> list:
    return ["prepare", "--source", "imagefolder", "--source-root", root, "--out", ctx.out, *extra]


def eval_args(ctx: Ctx, stage: str, model: Path, data: Path, *extra) -> list:
    return [stage, "--model", model, "--data", data, "--out", ctx.out, "--device", "cpu", *extra]


def pretrain_args(ctx: Ctx, data: Path, *extra) -> list:
    return ["pretrain", "--data", data, "--out", ctx.out, "--device", "cpu", *TINY_PRETRAIN, *extra]


@dataclasses.dataclass
class BadInput:
    id: str
    build: Callable[[Ctx], list]  # makes the input, returns the command line
    exit: int
    fragment: str  # must appear in stderr (or the log, for warnings)
    check: Callable[[Ctx], None] | None = None  # what must (not) be there afterwards
    outputs_absent: bool = True  # on failure: nothing at ctx.out (off when a previous output must survive)
    marks: tuple = ()


# ------------------------------------------------------------------------------ source rows


def _with_file(name: str, data: bytes, where: str = "train/class1"):
    def build(ctx: Ctx) -> list:
        root = ctx.folder()
        (root / where / name).write_bytes(data)
        return prepare_args(ctx, root)

    return build


def _lists(*names: str, reason: str = ""):
    def check(ctx: Ctx) -> None:
        skipped = ctx.skipped()
        for name in names:
            hits = [path for path in skipped if path.endswith(name)]
            assert hits, f"{name} is not in the manifest's skipped list {skipped}"
            assert reason in skipped[hits[0]], skipped[hits[0]]
        PreparedDataset(ctx.out)  # and the dataset itself is whole

    return check


def _all(*checks):
    def check(ctx: Ctx) -> None:
        for one in checks:
            one(ctx)

    return check


def _non_image_files(ctx: Ctx) -> list:
    root = ctx.folder()
    (root / "train" / "class0" / "notes.txt").write_text("labels are in the folder names")
    (root / "train" / "class1" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "README.md").write_text("a file beside the class folders")
    return prepare_args(ctx, root)


def _empty_class(ctx: Ctx) -> list:
    root = ctx.folder()
    (root / "train" / "class2").mkdir()
    return prepare_args(ctx, root)


def _unreadable_class(ctx: Ctx) -> list:
    root = ctx.folder()
    (root / "train" / "class2").mkdir()
    (root / "train" / "class2" / "broken.png").write_bytes(b"not a png")
    return prepare_args(ctx, root)


def _mixed_modes(ctx: Ctx) -> list:
    root = ctx.tmp / "src"
    for index in range(3):
        _image(root / "rgb" / f"{index}.png", colour=(200, 10, 10))
        _image(root / "gray" / f"{index}.png", mode="L", colour=77)
        _image(root / "alpha" / f"{index}.png", mode="RGBA", colour=(10, 20, 30, 0))  # fully transparent
        _image(root / "palette" / f"{index}.gif", mode="P", colour=3)
    return prepare_args(ctx, root, "--val-fraction", "0")


def _mixed_modes_check(ctx: Ctx) -> None:
    dataset = PreparedDataset(ctx.out)
    assert dataset.image_shape == (3, 16, 16) and not ctx.manifest()["skipped"]
    images, labels = np.asarray(dataset.images("train")), dataset.labels("train")
    by_class = {name: images[labels == index] for index, name in enumerate(dataset.class_names)}
    assert (by_class["gray"] == 77).all()  # replicated into R, G and B
    assert (by_class["alpha"] == 255).all()  # transparent over white
    assert (by_class["rgb"][:, 0] == 200).all() and (by_class["rgb"][:, 1] == 10).all()
    assert len(by_class["palette"]) == 3


def _all_gray(ctx: Ctx) -> list:
    root = ctx.tmp / "src"
    for label, colour in (("dark", 30), ("light", 220)):
        for index in range(3):
            _image(root / label / f"{index}.png", mode="L", colour=colour)
    return prepare_args(ctx, root)


# 16-bit gray values spanning the 16-bit range; image k adds 1000 * k (Pillow saves uint16 as 16-bit PNG)
_SIXTEEN_BIT = np.arange(256, dtype=np.uint16).reshape(16, 16) * 240


def _sixteen_bit_gray(ctx: Ctx) -> list:
    root = ctx.tmp / "src"
    for label in ("a", "b"):
        for index in range(3):
            (root / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_SIXTEEN_BIT + 1000 * index).save(root / label / f"{index}.png")
    assert Image.open(root / "a" / "0.png").mode == "I;16"
    return prepare_args(ctx, root, "--val-fraction", "0")


def _sixteen_bit_scaled(ctx: Ctx) -> None:
    # every image is its 16-bit values * 255 / 65535, rounded: not clipped at 255 (which would
    # leave all but the first 256 / 65535 of the range white)
    dataset = PreparedDataset(ctx.out)
    assert dataset.image_shape == (1, 16, 16)
    expected = {np.rint((_SIXTEEN_BIT + 1000.0 * k) * 255 / 65535).astype(np.uint8).tobytes() for k in range(3)}
    images = np.asarray(dataset.images("train"))
    assert len(images) == 6 and all(image.tobytes() in expected for image in images)


def _zip_bomb(ctx: Ctx) -> list:
    """A 64 KiB zip that expands to 64 MiB of zeros, on a disk reported to have 16 MiB free."""
    path = ctx.tmp / "images.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for member, content in _good_members():
            bundle.writestr(member, content)
        bundle.writestr("images/class0/zeros.png", bytes(64 * 2**20))
    assert path.stat().st_size < 2**20
    real_disk_usage = shutil.disk_usage
    ctx.monkeypatch.setattr(shutil, "disk_usage", lambda where: real_disk_usage(where)._replace(free=16 * 2**20))
    return prepare_args(ctx, path)


def _other_size(ctx: Ctx) -> list:
    root = ctx.folder()
    _image(root / "train" / "class1" / "wide.png", size=(20, 16))
    return prepare_args(ctx, root)


def _other_size_resized(ctx: Ctx) -> list:
    return [*_other_size(ctx), "--image-size", "12"]


def _test_split_other_size(ctx: Ctx) -> list:
    root = ctx.folder()
    shutil.rmtree(root / "test")
    for label in ("class0", "class1"):
        _image(root / "test" / label / "big.png", size=(24, 24))
    return prepare_args(ctx, root)


def _unicode_paths(ctx: Ctx) -> list:
    root = ctx.tmp / "my images" / "données ünï 数据"
    for label in ("chat noir", "café ☕"):
        for index in range(3):
            _image(root / label / f"photo {index} é.png")
    return ["prepare", "--source", "imagefolder", "--source-root", root, "--out", ctx.tmp / "out dir" / "préparé 数据"]


def _unicode_check(ctx: Ctx) -> None:
    dataset = PreparedDataset(ctx.tmp / "out dir" / "préparé 数据")
    assert dataset.class_names == ["café ☕", "chat noir"]
    assert dataset.manifest["splits"]["train"]["images"] + dataset.manifest["splits"]["val"]["images"] == 6


def _symlink_loops(ctx: Ctx) -> list:
    root = ctx.folder()
    os.symlink("..", root / "train" / "class0" / "up")  # class0/up -> train (contains class0)
    os.symlink(".", root / "train" / "class1" / "here")  # class1/here -> class1
    os.symlink(root / "train", root / "train" / "class1" / "absolute")  # an absolute link back up
    return prepare_args(ctx, root)


def _symlink_loops_check(ctx: Ctx) -> None:
    skipped = ctx.skipped()
    loops = sorted(Path(path).name for path, reason in skipped.items() if reason.startswith("symlink loop"))
    assert loops == ["absolute", "here", "up"], skipped
    assert ctx.manifest()["splits"]["train"]["images"] + ctx.manifest()["splits"]["val"]["images"] == 8  # nothing twice


def _class_folder_loop(ctx: Ctx) -> list:
    root = ctx.folder()
    os.symlink(".", root / "train" / "everything")  # a "class" that is the train folder itself
    return prepare_args(ctx, root)


def _self_link(ctx: Ctx) -> list:
    root = ctx.folder()
    os.symlink("self.png", root / "train" / "class0" / "self.png")
    return prepare_args(ctx, root)


# ------------------------------------------------------------------------------ archive rows


def _tar(ctx: Ctx, name: str, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    path = ctx.tmp / name
    with tarfile.open(path, "w:gz" if name.endswith("gz") else "w") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return path


def _good_members() -> list[tuple[str, bytes]]:
    return [(f"images/class{c}/{i}.png", _png_bytes()) for c in range(2) for i in range(3)]


def _tar_with(member) -> Callable[[Ctx], list]:
    def build(ctx: Ctx) -> list:
        extra = member(ctx) if callable(member) else member
        return prepare_args(ctx, _tar(ctx, "images.tar.gz", [*_good_members(), extra]))

    return build


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _tar_chain(ctx: Ctx) -> list:
    """Each link alone stays inside (a -> ., b -> a/..), but b leads out through a: tarfile's data filter sees it."""
    members = [*_good_members(), _link("a", "."), _link("b", "a/.."), ("b/evil-chain.png", b"x")]
    return prepare_args(ctx, _tar(ctx, "images.tar", members))


def _device() -> tarfile.TarInfo:
    info = tarfile.TarInfo("images/class0/null")
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


def _zip_with(name: str, data: bytes = b"", symlink_to: str | None = None) -> Callable[[Ctx], list]:
    def build(ctx: Ctx) -> list:
        path = ctx.tmp / "images.zip"
        with zipfile.ZipFile(path, "w") as bundle:
            for member, content in _good_members():
                bundle.writestr(member, content)
            info = zipfile.ZipInfo(name)
            if symlink_to is not None:
                info.external_attr = (0o120777 << 16)  # a symlink, as Info-ZIP stores one
                bundle.writestr(info, symlink_to)
            else:
                bundle.writestr(info, data)
        return prepare_args(ctx, path)

    return build


def _nothing_outside(ctx: Ctx) -> None:
    for name in ("evil.png", "escape", "etc"):
        assert not (ctx.tmp / name).exists() and not (ctx.tmp.parent / name).exists()
    assert not Path("/evil-absolute.png").exists()
    assert not (Path(tempfile.gettempdir()) / "evil-chain.png").exists()


def _nothing_extracted(ctx: Ctx) -> None:
    assert not list(Path(tempfile.gettempdir()).glob("simclr-extract-*"))


def _corrupt_archive(ctx: Ctx) -> list:
    path = ctx.tmp / "images.tar.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage that is not gzip")
    return prepare_args(ctx, path)


def _truncated_zip(ctx: Ctx) -> list:
    path = _zip_with("images/class0/extra.png", _png_bytes())(ctx)[4]
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return prepare_args(ctx, path)


def _plain_file_root(ctx: Ctx) -> list:
    return prepare_args(ctx, _image(ctx.tmp / "one.png"))


# ------------------------------------------------------------------------------ output rows


def _out_not_a_dataset(ctx: Ctx) -> list:
    ctx.out.mkdir()
    (ctx.out / "keep.txt").write_text("someone's notes")
    return prepare_args(ctx, ctx.folder())


def _out_kept(ctx: Ctx) -> None:
    assert (ctx.out / "keep.txt").read_text() == "someone's notes"


def _prepare_good_then(make_bad: Callable[[Ctx, Path], list]) -> Callable[[Ctx], list]:
    """Prepare a good dataset at ctx.out first; then the bad re-run."""

    def build(ctx: Ctx) -> list:
        good = make_imagefolder(ctx.tmp / "good", classes=2, train_per_class=4, test_per_class=2)
        assert _cli(prepare_args(ctx, good)) == OK
        ctx.shared["before"] = ctx.manifest()["files"]
        return make_bad(ctx, good)

    return build


def _old_dataset_intact(ctx: Ctx) -> None:
    dataset = PreparedDataset(ctx.out, verify=True)  # every sha256
    assert dataset.manifest["files"] == ctx.shared["before"]


def _rerun_bad_source(ctx: Ctx, good: Path) -> list:
    (good / "train" / "class2").mkdir()  # now a class without images
    return prepare_args(ctx, good)


# ------------------------------------------------------------------------------ prepared-dataset rows


def _tampered(ctx: Ctx) -> Path:
    data = ctx.copy_prepared()
    with open(data / "train_images.npy", "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0xFF]))
    return data


def _file_missing(ctx: Ctx) -> Path:
    data = ctx.copy_prepared()
    (data / "test_labels.npy").unlink()
    return data


def _manifest_edit(edit: Callable[[dict], None]) -> Callable[[Ctx], Path]:
    def make(ctx: Ctx) -> Path:
        data = ctx.copy_prepared()
        manifest = ctx.manifest(data)
        edit(manifest)
        (data / "manifest.json").write_text(json.dumps(manifest))
        return data

    return make


def _manifest_garbage(ctx: Ctx) -> Path:
    data = ctx.copy_prepared()
    (data / "manifest.json").write_text('{"format_version": 1, "class_names": [')
    return data


def _swap_file(name: str, write: Callable[[Path, Ctx], None]) -> Callable[[Ctx], Path]:
    """A copy of the dataset with ``name`` rewritten by ``write`` AND its sha256 updated in the
    manifest: only the checks of shapes, dtypes and ranges stand between it and the stages."""

    def make(ctx: Ctx) -> Path:
        data = ctx.copy_prepared()
        write(data / name, ctx)
        manifest = ctx.manifest(data)
        manifest["files"][name] = storage.sha256_file(data / name)
        (data / "manifest.json").write_text(json.dumps(manifest))
        return data

    return make


def _npy(array_of: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path, Ctx], None]:
    def write(path: Path, ctx: Ctx) -> None:
        original = np.load(path)
        np.save(path, array_of(original), allow_pickle=True)

    return write


def _object_array(original: np.ndarray) -> np.ndarray:
    array = np.empty(len(original), dtype=object)
    array[:] = [{"pickled": index} for index in range(len(original))]
    return array


def _json_file(value) -> Callable[[Path, Ctx], None]:
    return lambda path, ctx: path.write_text(json.dumps(value))


def _manifest_list(ctx: Ctx) -> Path:
    data = ctx.copy_prepared()
    (data / "manifest.json").write_text("[1, 2]")
    return data


def _deep_manifest(ctx: Ctx) -> Path:
    data = ctx.copy_prepared()
    (data / "manifest.json").write_text('{"format_version": 1, "class_names": ' + "[" * 200_000 + "]" * 200_000 + "}")
    return data


def _truncated_images(ctx: Ctx) -> Path:
    data = ctx.copy_prepared()
    path = data / "test_images.npy"
    path.write_bytes(path.read_bytes()[:-100])
    return data


def _no_test_split(ctx: Ctx) -> Path:
    """What prepare makes of an image folder without test/: a dataset with train and val only."""
    root = ctx.folder(classes=2, train=6)
    shutil.rmtree(root / "test")
    assert _cli(["prepare", "--source", "imagefolder", "--source-root", root, "--out", ctx.tmp / "data"]) == OK
    return ctx.tmp / "data"


def _one_test_image(ctx: Ctx) -> list:
    """A report on a dataset whose test split is one image: no image has a neighbour."""
    root = ctx.folder(classes=2, train=6, test=1)
    shutil.rmtree(root / "test" / "class1")
    assert _cli(["prepare", "--source", "imagefolder", "--source-root", root, "--out", ctx.tmp / "data"]) == OK
    return ["report", "--run", ctx.model.parent, "--data", ctx.tmp / "data", "--out", ctx.out, "--device", "cpu"]


def _report_readable(ctx: Ctx) -> None:
    text = (ctx.out / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text) == {"neighbour_precision": None}
    for name in ("metrics.json", "report.html"):  # readable by another uid on a shared volume, like np.save's files
        assert stat.S_IMODE((ctx.out / name).stat().st_mode) == storage.OUTPUT_FILE_MODE == 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _out_under_a_file(stage: str) -> Callable[[Ctx], list]:
    def build(ctx: Ctx) -> list:
        (ctx.tmp / "a-file").write_text("not a directory")
        out = ctx.tmp / "a-file" / "sub" / "out"
        if stage == "prepare":
            return ["prepare", "--source", "digits", "--out", out]
        if stage == "pretrain":
            return [*pretrain_args(ctx, ctx.prepared), "--out", out]
        if stage == "report":
            return ["report", "--run", ctx.model.parent, "--data", ctx.prepared, "--out", out]
        return [*eval_args(ctx, stage, ctx.model, ctx.prepared), "--out", out]

    return build


def _out_is_a_file(ctx: Ctx) -> list:
    ctx.out.write_text("precious")
    return eval_args(ctx, "linear-eval", ctx.model, ctx.prepared)


def _file_kept(ctx: Ctx) -> None:
    assert ctx.out.read_text() == "precious"


# ------------------------------------------------------------------------------ checkpoint rows


def _model(**kwargs) -> Callable[[Ctx], Path]:
    return lambda ctx: _save_model(ctx.tmp / "model.pt", **kwargs)


def _other_arch(state: dict) -> None:
    state["model_config"] = {**state["model_config"], "arch": "resnet34"}  # resnet18's weights


def _drop_key(state: dict) -> None:
    del state["model"]["encoder.layer4.1.bn2.weight"]


def _other_width(state: dict) -> None:
    state["model_config"] = {**state["model_config"], "width_multiplier": 0.25}


def _unknown_arch(state: dict) -> None:
    state["model_config"] = {**state["model_config"], "arch": "vgg11"}


def _plain_state_dict(ctx: Ctx) -> Path:
    path = _save_model(ctx.tmp / "weights.pt")
    torch.save(torch.load(path, weights_only=True)["model"], path)  # weights only, no model_config
    return path


def _truncated_model(ctx: Ctx) -> Path:
    path = _save_model(ctx.tmp / "model.pt")
    path.write_bytes(path.read_bytes()[:5000])
    return path


def _eval_row(stage: str, make_model, make_data=None, *extra) -> Callable[[Ctx], list]:
    def build(ctx: Ctx) -> list:
        model = make_model(ctx) if callable(make_model) else ctx.model
        data = make_data(ctx) if make_data is not None else ctx.prepared
        return eval_args(ctx, stage, model, data, *extra)

    return build


def _pretrain_on(make_data: Callable[[Ctx], Path]) -> Callable[[Ctx], list]:
    return lambda ctx: pretrain_args(ctx, make_data(ctx))


# ------------------------------------------------------------------------------ params rows


def _params_row(stage: str, text: str, *extra) -> Callable[[Ctx], list]:
    def build(ctx: Ctx) -> list:
        params = _params(ctx, text)
        if stage == "pretrain":
            return [*pretrain_args(ctx, ctx.prepared, *extra), "--params", params]
        return [*eval_args(ctx, stage, ctx.model, ctx.prepared, *extra), "--params", params]

    return build


def _missing_params_file(ctx: Ctx) -> list:
    return [*pretrain_args(ctx, ctx.prepared), "--params", ctx.tmp / "nope" / "params.yaml"]


_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
) + "pretrain:\n  epochs: *i\n"  # 500 bytes that expand to 9**9 strings


def _huge_params(ctx: Ctx) -> list:
    params = _params(ctx, "pretrain:\n  epochs: 1\n" + "# padding\n" * 200_000)
    return [*pretrain_args(ctx, ctx.prepared), "--params", params]


# ------------------------------------------------------------------------------ world-size rows


def _world(size: int, *extra) -> Callable[[Ctx], list]:
    def build(ctx: Ctx) -> list:
        ctx.monkeypatch.setenv("WORLD_SIZE", str(size))
        ctx.monkeypatch.setenv("RANK", "0")
        ctx.monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # nobody listens: the check must come before any rendezvous
        ctx.monkeypatch.setenv("MASTER_PORT", "9")
        return [*pretrain_args(ctx, ctx.prepared), *extra]

    return build


def _env_row(**variables: str) -> Callable[[Ctx], list]:
    """The stage run with these torch.distributed variables; malformed ones must fail before any rendezvous."""

    def build(ctx: Ctx) -> list:
        for name, value in variables.items():
            ctx.monkeypatch.setenv(name, value)
        return [*pretrain_args(ctx, ctx.prepared), "--collective-timeout-s", "5"]

    return build


# ------------------------------------------------------------------------------ full-disk rows


def _full_disk_writes(ctx: Ctx, writes_before: int) -> None:
    """The writer writes ``writes_before`` files, then half of the next one's first block and fails with ENOSPC."""
    from simclr_core.data import writer

    real_file, calls = writer._HashingFile, {"n": 0}

    class FillingFile(real_file):
        def __init__(self, handle) -> None:
            super().__init__(handle)
            calls["n"] += 1
            self.full = calls["n"] > writes_before

        def write(self, data) -> int:
            if self.full:
                data = memoryview(data).cast("B")
                self.handle.write(data[: len(data) // 2])
                raise _enospc()
            return super().write(data)

    ctx.monkeypatch.setattr(writer, "_HashingFile", FillingFile)


def _disk_full_prepare(ctx: Ctx) -> list:
    args = prepare_args(ctx, ctx.folder())
    _full_disk_writes(ctx, writes_before=2)
    return args


def _disk_full_rerun(ctx: Ctx, good: Path) -> list:
    _full_disk_writes(ctx, writes_before=3)
    return prepare_args(ctx, good, "--seed", "1")


def _disk_full_checkpoint(ctx: Ctx) -> list:
    """The first checkpoint (step 3) is written; the second (step 6) runs out of space half-way."""
    real_save, calls = torch.save, {"n": 0}

    def save(obj, stream, *args, **kwargs):
        if isinstance(stream, (str, os.PathLike, io.BytesIO)):
            return real_save(obj, stream, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            return real_save(obj, stream, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        stream.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise _enospc()

    ctx.monkeypatch.setattr(torch, "save", save)
    return pretrain_args(ctx, ctx.prepared)


def _latest_checkpoint_good(ctx: Ctx) -> None:
    found = CheckpointManager(LocalStore(ctx.out)).load_latest()
    assert found is not None and found[1]["step"] == 3  # the one before the failed write, verified by sha256
    assert json.loads((ctx.out / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert not (ctx.out / "model.pt").exists()


def _disk_full_metrics(ctx: Ctx) -> list:
    def fsync(fd):
        raise _enospc()

    ctx.monkeypatch.setattr(os, "fsync", fsync)  # write_atomic: write, flush, fsync -> ENOSPC, as on a full volume
    return eval_args(ctx, "linear-eval", ctx.model, ctx.prepared, "--max-iter", "3", "--l2-grid", "0.01", "--augment-copies", "0")


def _no_output_files(ctx: Ctx) -> None:
    assert not ctx.out.exists() or not any(ctx.out.rglob("*"))


# ------------------------------------------------------------------------------ the table


def _gs(*argv_tail: str, unreachable: bool = False) -> Callable[[Ctx], list]:
    """A command line with gs:// URIs; with ``unreachable``, the client is pointed at a closed port."""

    def build(ctx: Ctx) -> list:
        if unreachable:
            ctx.monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_closed_port()}")
            ctx.monkeypatch.setenv("SIMCLR_GCS_RETRY_SECONDS", "1")
        ctx.monkeypatch.setattr(storage, "_CLIENT", None)
        return [
            {"MODEL": ctx.model, "DATA": ctx.prepared, "OUT": ctx.out}.get(part, part) for part in argv_tail
        ]

    return build


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ROWS = [
    # -- a source with skippable files: exit 0, a warning, the file listed in the manifest
    BadInput("corrupt-image", _with_file("broken.png", b"not a png at all"), OK, "skipped 1 unreadable", _lists("broken.png", reason="UnidentifiedImageError")),
    BadInput("truncated-png", _with_file("cut.png", _png_bytes((64, 64))[:120]), OK, "skipped 1 unreadable", _lists("cut.png", reason="truncated")),
    BadInput("zero-byte-jpg", _with_file("empty.jpg", b""), OK, "skipped 1 unreadable", _lists("empty.jpg", reason="cannot identify image file")),
    BadInput("non-image-files", _non_image_files, OK, "skipped 3 unreadable",
             _all(_lists("notes.txt", reason="not an image file"), _lists(".DS_Store", reason="hidden"), _lists("README.md", reason="beside the class folders"))),
    BadInput("symlink-loops-skipped", _symlink_loops, OK, "skipped 3 unreadable", _symlink_loops_check),
    BadInput("class-folder-is-a-loop", _class_folder_loop, OK, "skipped 1 unreadable", _lists("everything", reason="symlink loop")),
    BadInput("self-referencing-symlink", _self_link, OK, "skipped 1 unreadable", _lists("self.png", reason="symbolic links")),
    # -- images that are fine once converted
    BadInput("gray-rgba-palette-mixed-with-rgb", _mixed_modes, OK, "prepared imagefolder", _mixed_modes_check),
    BadInput("all-grayscale-one-channel", _all_gray, OK, "of shape [1, 16, 16]", lambda ctx: PreparedDataset(ctx.out)),
    BadInput("sixteen-bit-gray-pngs", _sixteen_bit_gray, OK, "of shape [1, 16, 16]", _sixteen_bit_scaled),
    BadInput("sizes-differ-with-image-size", _other_size_resized, OK, "of shape [3, 12, 12]", lambda ctx: PreparedDataset(ctx.out)),
    BadInput("spaces-and-unicode-paths", _unicode_paths, OK, "prepared imagefolder", _unicode_check),
    # -- a source that cannot make a dataset: exit 2, nothing written
    BadInput("class-folder-without-images", _empty_class, USAGE, "train/class2 holds no readable images"),
    BadInput("class-folder-only-unreadable", _unreadable_class, USAGE, "class2 holds no readable images (1 file(s) in it skipped)"),
    BadInput("sizes-differ", _other_size, USAGE, "is 20x16 (width x height); set prepare.image_size"),
    BadInput("test-split-other-size", _test_split_other_size, USAGE, "test/class0/big.png is 24x24"),
    BadInput("source-root-is-a-plain-file", _plain_file_root, USAGE, "one.png is a file, not an image folder"),
    # -- archives: unsafe members refused before anything is extracted
    BadInput("tar-dotdot-member", _tar_with(("images/../../evil.png", b"x")), USAGE, "member 'images/../../evil.png' refused: its path has a '..'", _nothing_outside),
    BadInput("tar-absolute-member", _tar_with(("/evil-absolute.png", b"x")), USAGE, "member '/evil-absolute.png' refused: its path is absolute", _nothing_outside),
    BadInput("tar-symlink-outside", _tar_with(_link("images/class0/etc", "../../../etc")), USAGE, "refused: it is a link to '../../../etc', outside", _nothing_outside),
    BadInput("tar-absolute-symlink", _tar_with(_link("images/class0/escape", "/etc/passwd")), USAGE, "link to the absolute path '/etc/passwd'", _nothing_outside),
    BadInput("tar-symlink-chain-outside", _tar_chain, USAGE, "member 'b' refused", _nothing_outside),
    BadInput("tar-hardlink-outside", _tar_with(_link("images/class0/hard.png", "../evil.png", tarfile.LNKTYPE)), USAGE, "member 'images/class0/hard.png' refused"),
    BadInput("tar-device-file", _tar_with(lambda ctx: _device()), USAGE, "device, FIFO or other special file"),
    BadInput("zip-dotdot-member", _zip_with("../evil.png", b"x"), USAGE, "member '../evil.png' refused: its path has a '..'", _nothing_outside),
    BadInput("zip-absolute-member", _zip_with("/evil-absolute.png", b"x"), USAGE, "its path is absolute", _nothing_outside),
    BadInput("zip-symlink-outside", _zip_with("images/class0/escape", symlink_to="../../../etc"), USAGE, "member 'images/class0/escape' refused: it is a link"),
    BadInput("corrupt-archive", _corrupt_archive, USAGE, "images.tar.gz cannot be read"),
    BadInput("truncated-zip", _truncated_zip, USAGE, "images.zip cannot be read"),
    BadInput("zip-bomb", _zip_bomb, USAGE, "would extract to 0.06 GiB, more than the 0.02 GiB free", _nothing_extracted),
    # -- where the output goes
    BadInput("out-is-someone-elses-folder", _out_not_a_dataset, USAGE, "is a non-empty directory that is not a prepared dataset", _out_kept, outputs_absent=False),
    BadInput("failed-rerun-keeps-old-dataset", _prepare_good_then(_rerun_bad_source), USAGE, "class2 holds no readable images", _old_dataset_intact, outputs_absent=False),
    # -- a prepared dataset that is not what prepare wrote
    # opening a dataset is O(1) (headers and sizes): a byte changed in place is for `simclr verify` to find
    BadInput("manifest-sha256-mismatch", lambda ctx: ["verify", _tampered(ctx)], FAILURE, "train_images.npy does not match its sha256"),
    BadInput("verify-file-missing", lambda ctx: ["verify", _file_missing(ctx)], USAGE, "test_labels.npy is listed in the manifest but missing"),
    BadInput("verify-not-a-dataset", lambda ctx: ["verify", ctx.folder()], USAGE, "is not a prepared dataset (no manifest.json)"),
    BadInput("manifest-file-missing", _eval_row("linear-eval", None, _file_missing), USAGE, "test_labels.npy is listed in"),
    BadInput("dataset-of-another-version", _eval_row("finetune", None, _manifest_edit(lambda m: m.update(format_version=99))), USAGE,
             "format version 99, but this simclr_core"),
    BadInput("manifest-not-json", _eval_row("transfer", None, _manifest_garbage), USAGE, "manifest.json is not valid JSON"),
    BadInput("manifest-lists-a-path", _pretrain_on(_manifest_edit(lambda m: m["files"].update({"../secret": "0" * 64}))), USAGE, "is not a valid manifest: at files"),
    BadInput("manifest-files-empty", _pretrain_on(_manifest_edit(lambda m: m.update(files={}))), USAGE, "is not a valid manifest: at files: 'subsets.json' is a required property"),
    BadInput("manifest-files-without-an-array", _eval_row("linear-eval", None, _manifest_edit(lambda m: m["files"].pop("test_images.npy"))), USAGE, "does not list test_images.npy in its files"),
    BadInput("manifest-bad-sha256", _eval_row("finetune", None, _manifest_edit(lambda m: m["files"].update({"train_labels.npy": None}))), USAGE, "at files/train_labels.npy: None is not of type 'string'"),
    BadInput("manifest-class-names-null", _eval_row("linear-eval", None, _manifest_edit(lambda m: m.update(class_names=None))), USAGE, "at class_names: None is not of type 'array'"),
    BadInput("manifest-class-names-numbers", _pretrain_on(_manifest_edit(lambda m: m.update(class_names=["a", "b", 3]))), USAGE, "at class_names/2: 3 is not of type 'string'"),
    BadInput("manifest-huge-image-shape", _pretrain_on(_manifest_edit(lambda m: m.update(image_shape=[3, 10**9, 10**9]))), USAGE, "1000000000 is greater than the maximum of 8192"),
    BadInput("manifest-four-channels", _eval_row("transfer", None, _manifest_edit(lambda m: m.update(image_shape=[4, 16, 16]))), USAGE, "at image_shape/0: 4 is not one of [1, 3]"),
    BadInput("manifest-without-splits", _eval_row("finetune", None, _manifest_edit(lambda m: m.pop("splits"))), USAGE, "'splits' is a required property"),
    BadInput("manifest-split-with-a-path", _pretrain_on(_manifest_edit(lambda m: m["splits"].update({"../x": {"images": 1}}))), USAGE, "at splits: '../x' does not match"),
    BadInput("manifest-count-disagrees", _pretrain_on(_manifest_edit(lambda m: m["splits"]["train"].update(images=10**6))), USAGE, "train_images.npy holds uint8 (54, 3, 16, 16), expected uint8 (1000000, 3, 16, 16)"),
    BadInput("manifest-deeply-nested", _eval_row("linear-eval", None, _deep_manifest), USAGE, "manifest.json is nested too deeply"),
    BadInput("manifest-a-list", _pretrain_on(_manifest_list), USAGE, "manifest.json does not hold a JSON object"),
    BadInput("array-object-dtype", _pretrain_on(_swap_file("train_images.npy", _npy(_object_array))), USAGE, "train_images.npy holds object (54,), expected uint8 (54, 3, 16, 16)"),
    BadInput("array-object-labels", _eval_row("linear-eval", None, _swap_file("test_labels.npy", _npy(_object_array))), USAGE, "test_labels.npy holds object (18,), expected int64 (18,)"),
    BadInput("array-images-2d", _eval_row("finetune", None, _swap_file("test_images.npy", _npy(lambda a: a.reshape(len(a), -1)))), USAGE, "test_images.npy holds uint8 (18, 768), expected uint8 (18, 3, 16, 16)"),
    BadInput("array-four-channels", _pretrain_on(_swap_file("train_images.npy", _npy(lambda a: np.concatenate([a, a[:, :1]], axis=1)))), USAGE, "holds uint8 (54, 4, 16, 16), expected uint8 (54, 3, 16, 16)"),
    BadInput("array-float-images", _eval_row("transfer", None, _swap_file("train_images.npy", _npy(lambda a: a.astype(np.float32)))), USAGE, "holds float32 (54, 3, 16, 16), expected uint8"),
    BadInput("array-truncated", _eval_row("linear-eval", None, _truncated_images), USAGE, "test_images.npy is 13852 bytes, but its header promises 13952"),
    BadInput("array-not-npy", _eval_row("finetune", None, _swap_file("val_labels.npy", lambda path, ctx: path.write_bytes(b"\x93NUMPY\x01\x00garbage"))), USAGE, "val_labels.npy is not a readable .npy file"),
    BadInput("labels-out-of-range", _eval_row("linear-eval", None, _swap_file("train_labels.npy", _npy(lambda a: a + 7))), USAGE, "train_labels.npy holds labels from 7 to 9, expected -1 to 2"),
    BadInput("labels-below-minus-one", _eval_row("transfer", None, _swap_file("test_labels.npy", _npy(lambda a: a - 5))), USAGE, "test_labels.npy holds labels from -5 to -3, expected -1 to 2"),
    BadInput("subsets-not-a-mapping", _eval_row("finetune", None, _swap_file("subsets.json", _json_file([[0, 1]]))), USAGE, "subsets.json does not hold a JSON object"),
    BadInput("subsets-index-out-of-range", _eval_row("finetune", None, _swap_file("subsets.json", _json_file({"0.1": [0, 10**6], "0.5": [1]}))), USAGE, "subset 0.1 holds indices that are not labelled training images"),
    BadInput("subsets-bad-fraction", _eval_row("finetune", None, _swap_file("subsets.json", _json_file({"lots": [0]}))), USAGE, "has the entry 'lots': expected a fraction in (0, 1]"),
    BadInput("subsets-indices-not-ints", _eval_row("finetune", None, _swap_file("subsets.json", _json_file({"0.1": ["0"]}))), USAGE, "expected a fraction in (0, 1] and a list of integers"),
    BadInput("no-test-split-linear-eval", _eval_row("linear-eval", None, _no_test_split), USAGE, "has no 'test' split; every evaluation scores the encoder on the test split"),
    BadInput("no-test-split-finetune", _eval_row("finetune", None, _no_test_split), USAGE, "give the image folder a test/ folder"),
    # -- a checkpoint that does not fit
    BadInput("checkpoint-of-another-arch", _eval_row("linear-eval", _model(edit=_other_arch)), USAGE, "do not fit its model_config (arch resnet34"),
    BadInput("checkpoint-missing-keys", _eval_row("finetune", _model(edit=_drop_key)), USAGE, "1 missing weight(s): encoder.layer4.1.bn2.weight"),
    BadInput("checkpoint-of-another-width", _eval_row("transfer", _model(edit=_other_width)), USAGE, "size mismatch(es): encoder.conv1.weight: checkpoint (8, 3, 7, 7), model (16, 3, 7, 7)"),
    BadInput("checkpoint-unknown-arch", _eval_row("linear-eval", _model(edit=_unknown_arch)), USAGE, "model_config cannot be built"),
    BadInput("checkpoint-plain-state-dict", _eval_row("linear-eval", _plain_state_dict), USAGE, "is not a simclr pretraining checkpoint"),
    BadInput("checkpoint-truncated", _eval_row("finetune", _truncated_model), USAGE, "model.pt cannot be read"),
    BadInput("checkpoint-missing", _eval_row("transfer", lambda ctx: ctx.tmp / "no-model.pt"), USAGE, "no-model.pt does not exist"),
    # -- params.yaml
    BadInput("params-wrong-type", _params_row("pretrain", "pretrain:\n  proj_out_dim: ten\n"), USAGE, "pretrain.proj_out_dim must be of type int, got 'ten'"),
    BadInput("params-bool-for-int", _params_row("pretrain", "pretrain:\n  keep_checkpoints: true\n"), USAGE, "pretrain.keep_checkpoints must be of type int, got True"),
    BadInput("params-out-of-range", _params_row("pretrain", "pretrain:\n  momentum: 1.5\n"), USAGE, "pretrain.momentum must be in [0, 1), got 1.5"),
    BadInput("params-not-finite", _params_row("pretrain", "pretrain:\n  base_lr: .inf\n"), USAGE, "pretrain.base_lr must be of type float (finite)"),
    BadInput("params-unknown-key", _params_row("pretrain", "pretrain:\n  tempreature: 0.2\n"), USAGE, "unknown setting(s) pretrain.tempreature"),
    BadInput("params-missing-section", _params_row("linear-eval", "pretrain: {}\n"), USAGE, "has no 'linear_eval' section"),
    BadInput("params-not-a-mapping", _params_row("finetune", "- finetune\n- epochs\n"), USAGE, "must hold a mapping of sections"),
    BadInput("params-section-not-a-mapping", _params_row("transfer", "transfer: 5\n"), USAGE, "section 'transfer' of"),
    BadInput("params-invalid-yaml", _params_row("pretrain", "pretrain: {epochs: [1,\n"), USAGE, "is not valid YAML"),
    BadInput("params-list-of-words", _params_row("linear-eval", "linear_eval:\n  l2_grid: [small, big]\n"), USAGE, "linear_eval.l2_grid must be of type list of float"),
    BadInput("params-file-missing", _missing_params_file, USAGE, "nope/params.yaml does not exist"),
    BadInput("option-negative-seed", _eval_row("finetune", None, None, "--seed", "-1"), USAGE, "finetune.seed must be >= 0"),
    BadInput("params-billion-laughs", _params_row("pretrain", _LAUGHS), USAGE, "aliases (*a) are not allowed in a params file"),
    BadInput("params-merge-key-alias", _params_row("linear-eval", "base: &base {max_iter: 5}\nlinear_eval:\n  <<: *base\n"), USAGE, "aliases (*base) are not allowed"),
    BadInput("params-deep-nesting", _params_row("pretrain", "pretrain: " + "[" * 100_000 + "]" * 100_000 + "\n"), USAGE, "nested deeper than 16 levels"),
    BadInput("params-deep-block-nesting", _params_row("finetune", "".join(f"{'  ' * i}k{i}:\n" for i in range(40)) + "finetune: {}\n"), USAGE, "nested deeper than 16 levels"),
    BadInput("params-duplicate-key", _params_row("pretrain", "pretrain:\n  epochs: 1\n  epochs: 2\n"), USAGE, "key 'epochs' is given twice"),
    BadInput("params-duplicate-section", _params_row("transfer", "transfer: {}\ntransfer: {max_iter: 3}\n"), USAGE, "key 'transfer' is given twice"),
    BadInput("params-too-large", _huge_params, USAGE, "a params file must be under 1048576 bytes"),
    BadInput("option-huge-seed", _eval_row("finetune", None, None, "--seed", "99999999999999999999999"), USAGE, "finetune.seed must be an integer of magnitude <= 2147483647"),
    BadInput("option-huge-int", _params_row("pretrain", "pretrain:\n  checkpoint_every: 3000000000\n"), USAGE, "pretrain.checkpoint_every must be an integer of magnitude"),
    BadInput("option-huge-warmup", _params_row("pretrain", "pretrain: {}\n", "--warmup-epochs", "1e308"), USAGE, "pretrain.warmup_epochs must be a finite number of magnitude"),
    BadInput("option-huge-epochs", _params_row("pretrain", "pretrain: {}\n", "--epochs", "1" * 20), USAGE, "pretrain.epochs must be an integer of magnitude"),
    BadInput("option-huge-width", _params_row("pretrain", "pretrain: {}\n", "--width-multiplier", "1000"), USAGE, "pretrain.width_multiplier must be in (0, 8]"),
    BadInput("option-huge-lr", _eval_row("finetune", None, None, "--lr", "1e300"), USAGE, "finetune.lr must be a finite number of magnitude"),
    BadInput("option-nan-momentum", _params_row("pretrain", "pretrain: {}\n", "--momentum", "nan"), USAGE, "pretrain.momentum must be of type float (finite)"),
    BadInput("option-huge-l2", _eval_row("linear-eval", None, None, "--l2-grid", "1e-4,1e300"), USAGE, "linear_eval.l2_grid must be a finite number"),
    BadInput("finetune-batch-of-one", _eval_row("finetune", None, None, "--batch-size", "1", "--head-layers", "1"), USAGE, "finetune.batch_size must be >= 2"),
    BadInput("transfer-batch-of-one", _eval_row("transfer", None, None, "--batch-size", "1"), USAGE, "transfer.batch_size must be >= 2"),
    BadInput("option-long-value", _eval_row("finetune", None, None, "--epochs", "x" * 100_000), USAGE, "(100002 chars)"),
    # -- processes
    BadInput("batch-not-divisible-by-world-size", _world(3), USAGE, "must be a multiple of the number of processes (3)"),
    BadInput("more-processes-than-batch", _world(32), USAGE, "must be a multiple of the number of processes (32)"),
    BadInput("more-processes-than-samples", _world(64, "--batch-size", "64"), USAGE, "64 processes cannot each get an image"),
    BadInput("world-size-zero", _env_row(WORLD_SIZE="0"), USAGE, "WORLD_SIZE=0 is out of range: expected 1 to"),
    BadInput("world-size-with-space", _env_row(WORLD_SIZE=" 3"), USAGE, "WORLD_SIZE=' 3' is not a plain decimal integer"),
    BadInput("world-size-signed", _env_row(WORLD_SIZE="+2"), USAGE, "WORLD_SIZE='+2' is not a plain decimal integer"),
    BadInput("world-size-float", _env_row(WORLD_SIZE="2.0"), USAGE, "WORLD_SIZE='2.0' is not a plain decimal integer"),
    BadInput("world-size-unicode-digits", _env_row(WORLD_SIZE="\u0662"), USAGE, "is not a plain decimal integer"),
    BadInput("rank-negative", _env_row(WORLD_SIZE="2", RANK="-1"), USAGE, "RANK='-1' is not a plain decimal integer"),
    BadInput("rank-past-world", _env_row(WORLD_SIZE="2", RANK="2"), USAGE, "RANK must be in [0, WORLD_SIZE=2), got 2"),
    BadInput("master-port-too-big", _env_row(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="99999"), USAGE, "MASTER_PORT=99999 is out of range: expected 1 to 65535"),
    BadInput("master-port-zero", _env_row(WORLD_SIZE="2", RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0"), USAGE, "MASTER_PORT=0 is out of range"),
    BadInput("pet-master-port-bad", _env_row(WORLD_SIZE="2", RANK="1", PET_MASTER_ADDR="h", PET_MASTER_PORT="http"), USAGE, "PET_MASTER_PORT='http' is not a plain decimal integer"),
    BadInput("master-addr-with-space", _env_row(WORLD_SIZE="2", RANK="1", MASTER_ADDR="host name", MASTER_PORT="29500"), USAGE, "MASTER_ADDR='host name' is not a host name"),
    BadInput("master-addr-missing", _env_row(WORLD_SIZE="2", RANK="1", MASTER_PORT="29500"), USAGE, "WORLD_SIZE=2 but MASTER_ADDR is not set"),
    BadInput("local-rank-garbage", _env_row(LOCAL_RANK="zero"), USAGE, "LOCAL_RANK='zero' is not a plain decimal integer"),
    # -- gs:// URIs: no bucket is a usage error; storage that does not answer is a failure after retries
    BadInput("gs-model-without-bucket", _gs("linear-eval", "--model", "gs:///model.pt", "--data", "DATA", "--out", "OUT"), USAGE, "names no bucket"),
    BadInput("gs-out-without-bucket", _gs("prepare", "--source", "digits", "--out", "gs://"), USAGE, "names no bucket"),
    BadInput("gs-data-without-bucket", _gs("pretrain", "--data", "gs://", "--out", "OUT"), USAGE, "names no bucket"),
    BadInput("gs-unreachable-emulator", _gs("linear-eval", "--model", "gs://bucket/run/model.pt", "--data", "DATA", "--out", "OUT", unreachable=True), FAILURE, "did not answer within 1 s"),
    BadInput("gs-unreachable-emulator-pretrain", _gs("pretrain", "--data", "DATA", "--out", "gs://bucket/run", *TINY_PRETRAIN, unreachable=True), FAILURE, "did not answer within 1 s"),
    # -- where outputs go, and what they hold
    BadInput("report-one-test-image", _one_test_image, OK, "n/a (fewer than 2 test images)", _report_readable),
    BadInput("out-under-a-file-prepare", _out_under_a_file("prepare"), USAGE, "a-file is a file, not a directory"),
    BadInput("out-under-a-file-pretrain", _out_under_a_file("pretrain"), USAGE, "cannot be created:"),
    BadInput("out-under-a-file-linear-eval", _out_under_a_file("linear-eval"), USAGE, "a-file is a file, not a directory"),
    BadInput("out-under-a-file-report", _out_under_a_file("report"), USAGE, "a-file is a file, not a directory"),
    BadInput("out-is-a-file", _out_is_a_file, USAGE, "exists and is a file, not a directory", _file_kept, outputs_absent=False),
    # -- a full disk: exit 1, nothing half-written
    BadInput("disk-full-during-prepare", _disk_full_prepare, FAILURE, "No space left on device while writing the prepared dataset"),
    BadInput("disk-full-rerun-keeps-old-dataset", _prepare_good_then(_disk_full_rerun), FAILURE, "No space left on device", _old_dataset_intact, outputs_absent=False),
    BadInput("disk-full-during-checkpoint", _disk_full_checkpoint, FAILURE, "No space left on device", _latest_checkpoint_good, outputs_absent=False),
    BadInput("disk-full-writing-metrics", _disk_full_metrics, FAILURE, "No space left on device", _no_output_files, outputs_absent=False),
]


# ------------------------------------------------------------------------------ fixtures and the test


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    """A tiny prepared dataset (like conftest's tiny_prepared, in this process) and an untrained model.pt."""
    root = tmp_path_factory.mktemp("bad-inputs-shared")
    folder = make_imagefolder(root / "folder")
    with contextlib.chdir(root):  # no ./params.yaml: the defaults and the options given are all there is
        code = _cli(["prepare", "--source", "imagefolder", "--source-root", folder, "--val-fraction", "0.25",
                     "--label-fractions", "0.1,0.5", "--out", root / "prepared"])
    assert code == OK
    return {"prepared": root / "prepared", "model": _save_model(root / "model" / "model.pt")}


@pytest.fixture
def ctx(tmp_path, shared, monkeypatch) -> Ctx:
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no ./params.yaml unless a row writes one and passes --params
    return Ctx(tmp_path, dict(shared), monkeypatch)


def _leftovers(root: Path) -> list[str]:
    return [str(path) for path in root.rglob("*") if LEFTOVER.search(path.name)]


@pytest.mark.parametrize("row", [pytest.param(row, id=row.id, marks=row.marks) for row in ROWS])
def test_bad_input(row: BadInput, ctx: Ctx, capsys, caplog):
    caplog.set_level(logging.INFO)
    argv = row.build(ctx)
    capsys.readouterr()
    caplog.clear()
    code = _cli(argv)
    stderr = capsys.readouterr().err
    output = stderr + caplog.text
    assert "Traceback" not in output
    assert row.fragment in output, output[-3000:]
    assert code == row.exit, output[-3000:]
    if code != OK:
        kind = "error" if code == USAGE else "failed"
        assert re.search(rf"^simclr {argv[0]}: {kind}: ", stderr, flags=re.M), stderr
        if row.outputs_absent:
            assert not ctx.out.exists(), f"{ctx.out} was written: {list(ctx.out.rglob('*'))}"
    assert not _leftovers(ctx.tmp), _leftovers(ctx.tmp)
    if row.check is not None:
        row.check(ctx)


def test_the_table_is_big_enough():
    assert len({row.id for row in ROWS}) == len(ROWS) >= 30


# ------------------------------------------------------------------------------ beyond the table


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".zip"])
def test_archive_source_gives_the_same_dataset_as_the_folder(tmp_path, monkeypatch, suffix):
    monkeypatch.chdir(tmp_path)
    folder = make_imagefolder(tmp_path / "images", classes=2, train_per_class=4, test_per_class=2)
    (folder / "train" / "class1" / "broken.png").write_bytes(b"junk")
    archive = tmp_path / f"images{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as bundle:
            for path in sorted(folder.rglob("*")):
                bundle.write(path, path.relative_to(tmp_path))  # under one top folder, images/
    else:
        with tarfile.open(archive, "w:gz" if suffix == ".tar.gz" else "w") as tar:
            tar.add(folder, arcname="images")
    assert _cli(prepare_args(Ctx(tmp_path, {}, monkeypatch), folder)) == OK
    from_folder = json.loads((tmp_path / "out" / "manifest.json").read_text())
    shutil.rmtree(tmp_path / "out")
    assert _cli(prepare_args(Ctx(tmp_path, {}, monkeypatch), archive)) == OK
    from_archive = json.loads((tmp_path / "out" / "manifest.json").read_text())
    arrays = ("train_images.npy", "train_labels.npy", "test_images.npy", "val_images.npy", "subsets.json")
    assert {name: from_archive["files"][name] for name in arrays} == {name: from_folder["files"][name] for name in arrays}
    assert from_archive["class_names"] == ["class0", "class1"]
    assert [entry["path"] for entry in from_archive["skipped"]] == [f"{archive}:images/train/class1/broken.png"]


def test_colour_test_images_follow_a_grayscale_training_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for label in ("a", "b"):
        for index in range(3):
            _image(tmp_path / "src" / "train" / label / f"{index}.png", mode="L", colour=50)
        _image(tmp_path / "src" / "test" / label / "colour.png", colour=(255, 0, 0))
    assert _cli(["prepare", "--source", "imagefolder", "--source-root", tmp_path / "src", "--out", tmp_path / "out"]) == OK
    dataset = PreparedDataset(tmp_path / "out")
    assert dataset.image_shape == (1, 16, 16)
    assert (np.asarray(dataset.images("test")) == 76).all()  # pure red's luminance, as PIL's convert("L")
    assert (np.asarray(dataset.images("train")) == 50).all()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


def test_prepare_onto_a_really_full_tmpfs(tmp_path, monkeypatch, capsys):
    """The same as the disk-full row, with a real 64 KiB tmpfs (where this container may mount one)."""
    monkeypatch.chdir(tmp_path)
    folder = make_imagefolder(tmp_path / "images", classes=3, train_per_class=24, test_per_class=6)  # ~80 KB of arrays
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        code = _cli(["prepare", "--source", "imagefolder", "--source-root", folder, "--out", disk / "out"])
        assert code == FAILURE
        assert "No space left on device while writing the prepared dataset" in capsys.readouterr().err
        assert list(disk.iterdir()) == []  # no dataset, no temporary directory
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_prepare_cleans_up_after_a_run_killed_half_way(ctx):
    """A SIGKILLed prepare leaves a .tmp- sibling (removed next time), or, between its two renames,
    the previous dataset moved aside with nothing in place (put back, then replaced)."""
    folder = ctx.folder()
    assert _cli(prepare_args(ctx, folder)) == OK
    aside = ctx.tmp / ".out.old-killed"
    aside.mkdir()
    os.replace(ctx.out, aside / "data")  # killed after moving the old dataset aside
    (ctx.tmp / ".out.tmp-killed").mkdir()
    (ctx.tmp / ".out.tmp-killed" / "train_images.npy").write_bytes(b"half")

    from simclr_core.data.writer import _clean_leftovers

    _clean_leftovers(ctx.out)
    assert PreparedDataset(ctx.out).manifest["splits"]["train"]["images"] > 0  # the old dataset is back
    assert not _leftovers(ctx.tmp)
    assert _cli(prepare_args(ctx, folder)) == OK and not _leftovers(ctx.tmp)


def test_error_messages_stay_short_whatever_the_value(ctx, capsys):
    """A bad value is echoed cut to a line: a megabyte of it does not become a megabyte of log."""
    params = _params(ctx, "pretrain:\n  arch: " + "r" * 500_000 + "\n  " + "k" * 200_000 + ": 1\n")
    assert _cli([*pretrain_args(ctx, ctx.prepared), "--params", params]) == USAGE
    assert len(capsys.readouterr().err) < 1000
    assert _cli([*pretrain_args(ctx, ctx.prepared), "--lr-scaling", "q" * 1_000_000]) == USAGE
    assert len(capsys.readouterr().err) < 1000


def test_checkpoint_onto_a_really_full_tmpfs(ctx, capsys):
    """A real full filesystem under a checkpoint (torch.save reported it as "unexpected pos"):
    exit 1 naming the checkpoint and ENOSPC, and the checkpoint before it stays the latest."""
    sizing = ctx.tmp / "sizing"
    assert _cli([*pretrain_args(ctx, ctx.prepared), "--out", sizing]) == OK
    checkpoint = max((sizing / "checkpoints").glob("step-*.pt")).stat().st_size
    disk = ctx.tmp / "disk"
    pages = int(checkpoint * 1.6) // 4096 + 8  # room for one checkpoint and the small files, not for two
    if not _mount_tmpfs(disk, f"{pages * 4}k"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        capsys.readouterr()
        out = disk / "run"
        code = _cli([*pretrain_args(ctx, ctx.prepared), "--out", out])
        stderr = capsys.readouterr().err
        assert code == FAILURE, stderr[-2000:]
        assert "Traceback" not in stderr
        assert re.search(r"simclr pretrain: failed: (\[Errno 28\] )?No space left on device while writing checkpoint \S+step-00000006\.pt", stderr), stderr[-2000:]
        found = CheckpointManager(LocalStore(out)).load_latest()
        assert found is not None and found[1]["step"] == 3
        assert not (out / "model.pt").exists() and not _leftovers(disk)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
