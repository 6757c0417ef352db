"""Typed settings for every stage, read from params.yaml with command-line overrides.

Each stage has one dataclass; its field names are the keys of the stage's section in
params.yaml and, with ``_`` written as ``-``, the stage's command-line options
(``pretrain.batch_size`` in params.yaml is ``simclr pretrain --batch-size``). Validation
errors are :class:`ConfigError` and name the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "PrepareConfig",
    "PretrainConfig",
    "LinearEvalConfig",
    "FinetuneConfig",
    "TransferConfig",
    "load_section",
    "add_config_arguments",
    "config_from_args",
]

SOURCES = ("fashion-mnist", "cifar10", "cifar100", "stl10", "digits", "imagefolder")
MAX_PREPARE_IMAGE_SIZE = 4096  # prepare.image_size: 16.7 MP, 50 MB an RGB image; SimCLR trains at <= 224


class ConfigError(ValueError):
    """A setting is missing, of the wrong type, or out of range; the message names it."""


# Bounds that hold for every numeric setting, whatever its own range: beyond them a value is a
# typo or an attack, and it would surface as an overflow deep in numpy or torch.
MAX_INT = 2**31 - 1
MAX_FLOAT = 1e9
MAX_SHOWN = 80  # characters of a bad value that an error message repeats


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text)} chars)"


def _check(condition: bool, field: str, expected: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{field} must be {expected}, got {shown(value)}")


def _check_magnitudes(config: Any, section: str) -> None:
    """Every int (and list of ints) within [-MAX_INT, MAX_INT], every float finite and within +-MAX_FLOAT."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if isinstance(item, int):
                _check(abs(item) <= MAX_INT, f"{section}.{field.name}", f"an integer of magnitude <= {MAX_INT}", value)
            else:
                _check(math.isfinite(item) and abs(item) <= MAX_FLOAT, f"{section}.{field.name}",
                       f"a finite number of magnitude <= {MAX_FLOAT:g}", value)


@dataclasses.dataclass
class PrepareConfig:
    """``simclr prepare``: turn a source into a prepared dataset directory."""

    source: str = "fashion-mnist"  # one of SOURCES
    source_root: str = ""  # where the source's files are ("" = the source's default place)
    download: bool = False  # let torchvision download cifar10/cifar100/stl10/fashion-mnist
    val_fraction: float = 0.05  # share of the training images held out as the 'val' split
    max_train: int = 0  # keep at most this many training images (0 = all)
    image_size: int = 0  # imagefolder: resize + centre-crop every image to this side (0 = keep)
    label_fractions: list[float] = dataclasses.field(default_factory=lambda: [0.01, 0.1])
    seed: int = 0  # fixes the val split and the label subsets
    # Budgets against decompression bombs (a 132 KB PNG can claim 12000 x 12000 pixels): an image
    # whose header claims more pixels is skipped before it is decoded; a source whose images
    # would take more (N x C x H x W bytes, all splits) is refused before they are read or stacked.
    max_image_pixels: int = 50_000_000  # above any camera's photo, below PIL's own 89 MP warning
    max_dataset_mib: int = 4096  # 4 GiB; STL-10 with its unlabelled images is 2.9 GB
    workers: int = 0  # image-folder decoding processes (0 = the CPUs this process may use)

    def __post_init__(self) -> None:
        _check_magnitudes(self, "prepare")
        _check(self.source in SOURCES, "prepare.source", f"one of {', '.join(SOURCES)}", self.source)
        _check(0 <= self.val_fraction < 1, "prepare.val_fraction", "in [0, 1)", self.val_fraction)
        _check(self.max_train >= 0, "prepare.max_train", ">= 0", self.max_train)
        _check(0 <= self.image_size <= MAX_PREPARE_IMAGE_SIZE, "prepare.image_size", f"in [0, {MAX_PREPARE_IMAGE_SIZE}]", self.image_size)
        _check(self.max_image_pixels >= 1, "prepare.max_image_pixels", ">= 1", self.max_image_pixels)
        _check(self.max_dataset_mib >= 1, "prepare.max_dataset_mib", ">= 1", self.max_dataset_mib)
        _check(  # the resized image is an image too
            self.image_size**2 <= self.max_image_pixels, "prepare.image_size",
            f"at most {math.isqrt(self.max_image_pixels)} (its square within prepare.max_image_pixels)", self.image_size,
        )
        _check(self.seed >= 0, "prepare.seed", ">= 0", self.seed)
        _check(0 <= self.workers <= 1024, "prepare.workers", "in [0, 1024] (0 = the CPUs available)", self.workers)
        for fraction in self.label_fractions:
            _check(0 < fraction <= 1, "prepare.label_fractions", "a list of values in (0, 1]", self.label_fractions)


# Every PretrainConfig setting names its group in its field's metadata (tests/test_config_groups.py
# fails on one that does not): a "method" setting changes what the run computes, so a checkpoint
# written under another value belongs to another run and is not resumed; a "runtime" setting
# changes how or where it computes, not what (precision: only its rounding), so a checkpoint
# written under another value resumes.
GROUP, METHOD, RUNTIME = "group", "method", "runtime"
# pretrain.compile's values: "none", or one of torch.compile's modes
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


def _method(default: Any) -> Any:
    """A setting that changes what pretraining computes; see GROUP."""
    return dataclasses.field(default=default, metadata={GROUP: METHOD})


def _runtime(default: Any) -> Any:
    """A setting that changes how or where pretraining computes, not what; see GROUP."""
    return dataclasses.field(default=default, metadata={GROUP: RUNTIME})


def settings_in_group(cls, group: str) -> frozenset[str]:
    """The names of ``cls``'s fields whose metadata puts them in ``group``."""
    return frozenset(field.name for field in dataclasses.fields(cls) if field.metadata.get(GROUP) == group)


def changed_method_settings(saved: dict[str, Any], config: PretrainConfig) -> list[str]:
    """The settings, sorted, in which ``saved`` (a checkpoint's ``pretrain_config``) and ``config``
    describe different runs: every setting but the runtime ones, a key that only one side has too
    (a setting added or removed since the checkpoint was written)."""
    current = dataclasses.asdict(config)
    runtime = settings_in_group(PretrainConfig, RUNTIME)
    return sorted(key for key in set(saved) | set(current) if key not in runtime and saved.get(key) != current.get(key))


@dataclasses.dataclass
class PretrainConfig:
    """``simclr pretrain``: SimCLR pretraining. Each setting is ``_method`` or ``_runtime`` (see GROUP)."""

    arch: str = _method("resnet18")
    width_multiplier: float = _method(1.0)
    cifar_stem: str = _method("auto")  # "auto" (<= 64 px), "true" or "false"
    image_size: int = _method(0)  # training side in pixels (0 = the dataset's)
    proj_layers: int = _method(2)
    proj_hidden_dim: int = _method(0)  # 0 = the encoder's feature width
    proj_out_dim: int = _method(128)
    epochs: int = _method(100)
    batch_size: int = _method(512)  # global, over all processes
    temperature: float = _method(0.5)
    base_lr: float = _method(0.3)
    lr_scaling: str = _method("linear")  # "linear" (base_lr * B / 256) or "sqrt" (base_lr * sqrt(B))
    warmup_epochs: float = _method(10.0)
    weight_decay: float = _method(1e-6)
    momentum: float = _method(0.9)
    strength: float = _method(-1.0)  # colour-jitter strength s (< 0 = by image size: 0.5 at <= 32 px, else 1)
    blur: str = _method("auto")  # "auto" (off at <= 32 px), "true" or "false"
    crop_min_scale: float = _method(0.08)  # smallest crop area, as a fraction of the image (the paper: 0.08)
    seed: int = _method(0)
    checkpoint_every: int = _runtime(200)  # steps between mid-epoch checkpoints (0 = epoch ends only)
    knn_k: int = _runtime(200)
    knn_temperature: float = _runtime(0.1)
    knn_bank_size: int = _runtime(10000)  # labelled training images in the kNN memory bank (0 = all)
    knn_every: int = _runtime(1)  # epochs between kNN passes; the last epoch always gets one (0 = none)
    num_threads: int = _runtime(0)  # torch CPU threads per process (0 = torch's default)
    # node-local copy of the dataset: each pod copies --data here once (verified, resumable)
    # and trains from the copy; "" = read --data where it is (a PVC fast enough, or local)
    stage_dir: str = _runtime("")
    data_threads: int = _runtime(1)  # torch CPU threads of the background thread that makes the views
    precision: str = _runtime("auto")  # "auto" (bf16 where the device computes it natively), "bf16" or "fp32"
    # torch.compile of the training model: "none", or a torch.compile mode ("default";
    # "reduce-overhead" adds CUDA graphs; "max-autotune"). Fused kernels round differently, so a run
    # is reproducible bit for bit only under one value of it, as under one precision
    compile: str = _runtime("none")
    keep_checkpoints: int = _runtime(3)  # the last K checkpoints kept (the best by kNN accuracy is kept too)
    metrics_port: int = _runtime(0)  # Prometheus endpoint on this port + local rank (0 = off)
    metrics_pushgateway: str = _runtime("")  # Pushgateway address (host:port) to push to at epoch ends ("" = off)
    # seconds a collective may wait for the other ranks before this rank fails (a lost peer is
    # noticed after this long, and the job restarts from its checkpoint); it must outlast what
    # rank 0 does alone between steps (a checkpoint upload, the epoch's kNN pass)
    collective_timeout_s: float = _runtime(600.0)

    def __post_init__(self) -> None:
        _check_magnitudes(self, "pretrain")
        _check(self.epochs >= 1, "pretrain.epochs", ">= 1", self.epochs)
        _check(self.batch_size >= 2, "pretrain.batch_size", ">= 2", self.batch_size)
        _check(self.temperature > 0, "pretrain.temperature", "> 0", self.temperature)
        _check(self.base_lr > 0, "pretrain.base_lr", "> 0", self.base_lr)
        _check(self.lr_scaling in ("linear", "sqrt"), "pretrain.lr_scaling", "'linear' or 'sqrt'", self.lr_scaling)
        _check(self.warmup_epochs >= 0, "pretrain.warmup_epochs", ">= 0 (a warm-up longer than the run is cut at its end)", self.warmup_epochs)
        _check(0 < self.width_multiplier <= 8, "pretrain.width_multiplier", "in (0, 8] (the paper's widest ResNet is 4x)", self.width_multiplier)
        _check(self.cifar_stem in ("auto", "true", "false"), "pretrain.cifar_stem", "'auto', 'true' or 'false'", self.cifar_stem)
        _check(self.blur in ("auto", "true", "false"), "pretrain.blur", "'auto', 'true' or 'false'", self.blur)
        _check(0 < self.crop_min_scale <= 1, "pretrain.crop_min_scale", "in (0, 1]", self.crop_min_scale)
        _check(self.proj_layers >= 1, "pretrain.proj_layers", ">= 1", self.proj_layers)
        _check(self.image_size >= 0, "pretrain.image_size", ">= 0", self.image_size)
        _check(self.checkpoint_every >= 0, "pretrain.checkpoint_every", ">= 0", self.checkpoint_every)
        _check(self.knn_k >= 1, "pretrain.knn_k", ">= 1", self.knn_k)
        _check(self.keep_checkpoints >= 1, "pretrain.keep_checkpoints", ">= 1", self.keep_checkpoints)
        _check(self.proj_hidden_dim >= 0, "pretrain.proj_hidden_dim", ">= 0 (0 = the encoder's width)", self.proj_hidden_dim)
        _check(self.proj_out_dim >= 1, "pretrain.proj_out_dim", ">= 1", self.proj_out_dim)
        _check(self.collective_timeout_s > 0, "pretrain.collective_timeout_s", "> 0", self.collective_timeout_s)
        _check(self.weight_decay >= 0, "pretrain.weight_decay", ">= 0", self.weight_decay)
        _check(0 <= self.momentum < 1, "pretrain.momentum", "in [0, 1)", self.momentum)
        _check(self.seed >= 0, "pretrain.seed", ">= 0", self.seed)
        _check(self.knn_temperature > 0, "pretrain.knn_temperature", "> 0", self.knn_temperature)
        _check(self.knn_bank_size >= 0, "pretrain.knn_bank_size", ">= 0 (0 = all)", self.knn_bank_size)
        _check(self.knn_every >= 0, "pretrain.knn_every", ">= 0 (0 = no kNN pass)", self.knn_every)
        _check(self.compile in COMPILE_MODES, "pretrain.compile", " or ".join(repr(m) for m in COMPILE_MODES), self.compile)
        _check(self.num_threads >= 0, "pretrain.num_threads", ">= 0 (0 = torch's default)", self.num_threads)
        _check(self.data_threads >= 1, "pretrain.data_threads", ">= 1", self.data_threads)
        _check(self.precision in ("auto", "bf16", "fp32"), "pretrain.precision", "'auto', 'bf16' or 'fp32'", self.precision)
        _check(0 <= self.metrics_port <= 65535, "pretrain.metrics_port", "a TCP port in [0, 65535] (0 = off)", self.metrics_port)


@dataclasses.dataclass
class LinearEvalConfig:
    """``simclr linear-eval``: logistic regression on frozen features (L-BFGS)."""

    l2_grid: list[float] = dataclasses.field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2])
    max_iter: int = 200  # L-BFGS iterations per fit
    augment_copies: int = 1  # crop + flip copies of the training images added to the clean ones
    batch_size: int = 1024  # feature extraction batch
    seed: int = 0
    # weighted kNN of the test images' features among the training images' (k neighbours, 0 = none):
    # the label-free figure SSL papers report beside linear eval (lightly's CIFAR-10 benchmarks)
    knn_k: int = 200
    knn_temperature: float = 0.1

    def __post_init__(self) -> None:
        _check_magnitudes(self, "linear_eval")
        _check(len(self.l2_grid) > 0 and all(v >= 0 for v in self.l2_grid), "linear_eval.l2_grid", "a non-empty list of values >= 0", self.l2_grid)
        _check(self.max_iter >= 1, "linear_eval.max_iter", ">= 1", self.max_iter)
        _check(self.augment_copies >= 0, "linear_eval.augment_copies", ">= 0", self.augment_copies)
        _check(self.batch_size >= 1, "linear_eval.batch_size", ">= 1", self.batch_size)
        _check(self.seed >= 0, "linear_eval.seed", ">= 0", self.seed)
        _check(self.knn_k >= 0, "linear_eval.knn_k", ">= 0 (0 = no kNN)", self.knn_k)
        _check(self.knn_temperature > 0, "linear_eval.knn_temperature", "> 0", self.knn_temperature)


@dataclasses.dataclass
class FinetuneConfig:
    """``simclr finetune``: fine-tune the whole network on the labelled subsets."""

    label_fractions: list[float] = dataclasses.field(default_factory=lambda: [0.01, 0.1])
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.05  # SGD with Nesterov momentum 0.9, cosine to 0
    weight_decay: float = 0.0
    head_layers: int = 0  # start from h (0) or from the output of the first k projection-head blocks
    min_steps: int = 100  # small subsets get at least this many steps
    seed: int = 0

    def __post_init__(self) -> None:
        _check_magnitudes(self, "finetune")
        _check(self.epochs >= 1, "finetune.epochs", ">= 1", self.epochs)
        # BatchNorm in training mode needs two samples per channel; batches are never smaller than this
        _check(self.batch_size >= 2, "finetune.batch_size", ">= 2 (BatchNorm trains on batches of two or more)", self.batch_size)
        _check(self.lr > 0, "finetune.lr", "> 0", self.lr)
        _check(self.head_layers >= 0, "finetune.head_layers", ">= 0", self.head_layers)
        _check(self.weight_decay >= 0, "finetune.weight_decay", ">= 0", self.weight_decay)
        _check(self.min_steps >= 0, "finetune.min_steps", ">= 0", self.min_steps)
        _check(self.seed >= 0, "finetune.seed", ">= 0", self.seed)
        _check(len(self.label_fractions) > 0, "finetune.label_fractions", "a non-empty list", self.label_fractions)
        for fraction in self.label_fractions:
            _check(0 < fraction <= 1, "finetune.label_fractions", "a list of values in (0, 1]", self.label_fractions)


@dataclasses.dataclass
class TransferConfig:
    """``simclr transfer``: the pretrained encoder on another dataset."""

    l2_grid: list[float] = dataclasses.field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    max_iter: int = 300
    finetune_epochs: int = 30
    finetune_lr: float = 0.05
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        _check_magnitudes(self, "transfer")
        _check(len(self.l2_grid) > 0 and all(v >= 0 for v in self.l2_grid), "transfer.l2_grid", "a non-empty list of values >= 0", self.l2_grid)
        _check(self.max_iter >= 1, "transfer.max_iter", ">= 1", self.max_iter)
        _check(self.finetune_epochs >= 0, "transfer.finetune_epochs", ">= 0", self.finetune_epochs)
        _check(self.finetune_lr > 0, "transfer.finetune_lr", "> 0", self.finetune_lr)
        _check(self.batch_size >= 2, "transfer.batch_size", ">= 2 (BatchNorm trains on batches of two or more)", self.batch_size)
        _check(self.seed >= 0, "transfer.seed", ">= 0", self.seed)


MAX_PARAMS_BYTES = 2**20  # a params file is a few KB; a larger one is not a params file
MAX_YAML_DEPTH = 16  # params nest two levels; deeper nesting would only recurse the parser


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, minus what a params file never needs and an attacker would use.

    Aliases are refused: a few hundred bytes of nested aliases ("billion laughs") expand to
    gigabytes. Nesting is bounded, since composing recurses once per level. A key given twice
    is an error (YAML would keep the last one silently).
    """

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed in a params file", event.start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {shown(key)} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_params(path: Path) -> Any:
    """The YAML document of the params file ``path``, read strictly (see :class:`_StrictLoader`)."""
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ConfigError(f"params file {path} is {size} bytes; a params file must be under {MAX_PARAMS_BYTES} bytes")
    try:
        return yaml.load(path.read_bytes()[: MAX_PARAMS_BYTES + 1], Loader=_StrictLoader)  # noqa: S506 (a safe loader)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"params file {path} is not valid YAML: {str(error)[:400]}") from None


def load_section(path: str | Path | None, section: str) -> dict[str, Any]:
    """The ``section`` mapping of a params.yaml file ({} when ``path`` is None).

    The file must exist, be YAML holding a mapping, and have the section (``section: {}``, or
    an empty ``section:``, selects every default); each failure is a ConfigError naming the file.
    """
    if path is None:
        return {}
    path = Path(path)
    document = _read_params(path)
    if not isinstance(document, dict):
        raise ConfigError(f"params file {path} must hold a mapping of sections (prepare:, pretrain:, ...), got {type(document).__name__}")
    if section not in document:
        sections = ", ".join(shown(str(name), 40) for name in list(document)[:20])
        raise ConfigError(
            f"params file {path} has no {section!r} section (it has {sections or 'none'}); "
            f"add '{section}: {{}}' to use the defaults"
        )
    values = document[section]
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"section {section!r} of {path} must be a mapping of settings, got {type(values).__name__}")
    return dict(values)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _scalar(item_type: Any, value: Any) -> Any:
    """``value`` as ``item_type`` (int, float, str, bool), or TypeError/ValueError."""
    if isinstance(value, (list, tuple, dict, set)) or value is None:
        raise TypeError
    if item_type is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise TypeError
    if item_type in (int, float) and isinstance(value, bool):
        raise TypeError  # YAML's `true` is not a number
    if item_type is int and isinstance(value, float) and not value.is_integer():
        raise TypeError
    if item_type is str and isinstance(value, bool):
        return "true" if value else "false"
    result = item_type(value)
    if item_type is float and not math.isfinite(result):
        raise ValueError
    return result


def _coerce(section: str, name: str, annotation: Any, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    key = f"{section}.{name}"
    origin = typing.get_origin(annotation)
    try:
        if origin is list:
            (item_type,) = typing.get_args(annotation)
            if isinstance(value, str):
                value = [part for part in value.replace(",", " ").split() if part]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [_scalar(item_type, item) for item in value]
        return _scalar(annotation, value)
    except (TypeError, ValueError, OverflowError):
        if origin is list:
            type_name = f"list of {typing.get_args(annotation)[0].__name__}"
        else:
            type_name = getattr(annotation, "__name__", str(annotation))
        finite = " (finite)" if annotation is float or typing.get_args(annotation) == (float,) else ""
        raise ConfigError(f"{key} must be of type {type_name}{finite}, got {shown(value)}") from None


def build_config(cls, section: str, values: dict[str, Any]):
    """Instantiate ``cls`` from a mapping, naming unknown keys and bad values."""
    types = _field_types(cls)
    unknown = sorted(shown(str(key), 40).strip("'") for key in values if key not in types)
    if unknown:
        listed = ", ".join(f"{section}.{key}" for key in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ConfigError(f"unknown setting(s) {listed}; known: {', '.join(types)}")
    return cls(**{name: _coerce(section, name, types[name], value) for name, value in values.items()})


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--field-name`` option per field of ``cls``; unset options keep params.yaml's value."""
    group = parser.add_argument_group("settings (override params.yaml; defaults in brackets)")
    defaults = cls()
    for name in _field_types(cls):
        default = getattr(defaults, name)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"cfg_{name}", default=None, metavar="V", help=f"[{shown}]")


def config_from_args(cls, section: str, args: argparse.Namespace):
    """params.yaml's ``section`` (from ``args.params``) updated by the options given on the command line."""
    values = load_section(getattr(args, "params", None), section)
    for name in _field_types(cls):
        given = getattr(args, f"cfg_{name}", None)
        if given is not None:
            values[name] = given
    return build_config(cls, section, values)
