"""Archives of image folders (.tar, .tar.gz, .tar.bz2, .tar.xz, .zip), checked before extraction.

Every member is checked before anything is written: no absolute paths, no ``..``, no links
leading outside, no devices, FIFOs or other special files, and the extracted size must fit the
free space. An archive is extracted into a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path

from simclr_core.data.images import _ignored
from simclr_core.manifest import SourceError


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
