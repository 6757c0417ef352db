"""What a prepared dataset must look like: the manifest's schema and the arrays' headers.

:class:`~simclr_core.data.PreparedDataset` trusts nothing it reads from a dataset directory:
the directory may come from a shared volume or a bucket that someone else writes. These checks
run when a dataset is opened and cost a few kilobytes of reading, whatever the dataset's size:

- ``manifest.json``: at most :data:`MAX_MANIFEST_BYTES`, parsed without unbounded recursion,
  and valid against :data:`MANIFEST_SCHEMA` (class names, image shape, splits, and a sha256
  for every file, where the files must include each split's arrays and ``subsets.json``);
- each split's ``.npy`` files: their headers only, before any data is mapped: uint8
  (N, C, H, W) images of the manifest's shape, int64 (N,) labels, never an object dtype (which
  numpy would unpickle);
- labels within [-1, classes) and ``subsets.json`` indices within the training split, when read.

Every failure is a :class:`SourceError` naming the file and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from simclr_core.config import shown

__all__ = ["MANIFEST_SCHEMA", "SourceError", "read_manifest", "check_manifest", "check_array", "check_labels", "read_subsets"]

MAX_MANIFEST_BYTES = 64 * 2**20  # the skipped list of a million-image source fits
MAX_SUBSETS_BYTES = 256 * 2**20
MAX_SIDE = 8192  # pixels; prepare.image_size is bounded below this
SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
SPLIT_NAME = "^[a-z][a-z0-9_]{0,31}$"

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["class_names", "image_shape", "splits", "files"],
    "properties": {
        "format_version": {"type": "integer"},
        "class_names": {
            "type": "array", "maxItems": 1_000_000,  # empty for an unlabelled folder
            "items": {"type": "string", "minLength": 1, "maxLength": 1000},
        },
        "image_shape": {
            "type": "array",
            "prefixItems": [{"enum": [1, 3]}, {"type": "integer", "minimum": 1, "maximum": MAX_SIDE},
                            {"type": "integer", "minimum": 1, "maximum": MAX_SIDE}],
            "minItems": 3, "maxItems": 3,
        },
        "splits": {
            "type": "object", "required": ["train"], "propertyNames": {"pattern": SPLIT_NAME},
            "additionalProperties": {
                "type": "object", "required": ["images"],
                "properties": {"images": {"type": "integer", "minimum": 0}},
            },
        },
        "files": {
            "type": "object", "required": ["subsets.json"],
            "propertyNames": {"pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"},
            "additionalProperties": SHA256,
        },
        "skipped": {"type": "array"},
    },
}


class SourceError(ValueError):
    """The source is missing, empty or unreadable; the message names the path."""


def _again(path: Path, problem: str) -> SourceError:
    return SourceError(f"{path} {problem}; run `simclr prepare` again")


def _read_json(path: Path, limit: int) -> Any:
    if not path.is_file():
        raise SourceError(f"{path} is missing or not a regular file; run `simclr prepare` again")
    size = path.stat().st_size
    if size > limit:
        raise _again(path, f"is {size} bytes, more than the {limit} a prepared dataset writes")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as error:
        raise _again(path, f"is not valid JSON ({str(error)[:120]})") from None
    except RecursionError:  # json recurses once per nesting level
        raise _again(path, "is nested too deeply to be a prepared dataset's JSON") from None


def read_manifest(root: Path) -> dict[str, Any]:
    """``root/manifest.json``, valid against :data:`MANIFEST_SCHEMA` and listing every split's arrays."""
    path = root / "manifest.json"
    if not path.is_file():
        raise SourceError(f"{root} is not a prepared dataset (no manifest.json); run `simclr prepare` first")
    manifest = _read_json(path, MAX_MANIFEST_BYTES)
    if not isinstance(manifest, dict):
        raise _again(path, "does not hold a JSON object")
    return manifest


def check_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """The manifest's schema, and the files it must list (each split's two arrays and subsets.json)."""
    path = root / "manifest.json"
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(MANIFEST_SCHEMA).iter_errors(manifest))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "the top level"
        raise _again(path, f"is not a valid manifest: at {where[:60]}: {error.message[:200]}")
    needed = [f"{split}_{kind}.npy" for split in manifest["splits"] for kind in ("images", "labels")]
    unlisted = [name for name in needed if name not in manifest["files"]]
    if unlisted:
        raise _again(path, f"does not list {', '.join(unlisted)} in its files (each split's arrays must have a sha256)")


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) from the header of the .npy file ``path``."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version not in ((1, 0), (2, 0)):  # what np.save writes; 3.0 only adds utf-8 field names
                raise ValueError(f"format version {version}")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(handle, max_header_size=10_000)
            offset = handle.tell()
    except (OSError, ValueError, SyntaxError) as error:
        raise _again(path, f"is not a readable .npy file ({str(error)[:120]})") from None
    return tuple(shape), dtype, offset


def check_array(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """The .npy file at ``path`` holds ``dtype`` of ``shape``, judged from its header alone."""
    if not path.is_file():
        raise _again(path, "is listed in the manifest but missing or not a regular file: the dataset is incomplete")
    actual_shape, actual_dtype, offset = _npy_header(path)
    if actual_dtype != dtype or actual_shape != shape:
        raise _again(path, f"holds {actual_dtype} {actual_shape}, expected {np.dtype(dtype)} {shape}")
    size, needed = path.stat().st_size, offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if size != needed:
        raise _again(path, f"is {size} bytes, but its header promises {needed} ({np.dtype(dtype)} {shape}): it is truncated or padded")


def check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
    """Labels are -1 (unlabelled) or a class index in [0, num_classes)."""
    if len(labels) and (labels.min() < -1 or labels.max() >= num_classes):
        raise _again(path, f"holds labels from {labels.min()} to {labels.max()}, expected -1 to {num_classes - 1}")


def read_subsets(path: Path, train_labels: np.ndarray) -> dict[str, np.ndarray]:
    """subsets.json: label fraction -> sorted indices of labelled training images."""
    subsets = _read_json(path, MAX_SUBSETS_BYTES)
    if not isinstance(subsets, dict):
        raise _again(path, "does not hold a JSON object of fraction: [indices]")
    result = {}
    for key, indices in subsets.items():
        try:
            fraction_ok = 0 < float(key) <= 1
        except ValueError:
            fraction_ok = False
        if not fraction_ok or not isinstance(indices, list) or not all(type(i) is int for i in indices):
            raise _again(path, f"has the entry {shown(key, 30)}: expected a fraction in (0, 1] and a list of integers")
        array = np.asarray(indices, dtype=np.int64)
        if len(array) and (array.min() < 0 or array.max() >= len(train_labels) or (train_labels[array] < 0).any()):
            raise _again(path, f"subset {key} holds indices that are not labelled training images (0 to {len(train_labels) - 1})")
        result[key] = array
    return result
