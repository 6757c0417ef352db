"""What pretraining trains, and with what: the model from the settings, its optimizer and
schedule, the augmentation policy, and the precision of the forward pass."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Any

import torch

from simclr_core.config import ConfigError, PretrainConfig
from simclr_core.method.augment import AugmentConfig
from simclr_core.method.distributed import DistEnv, convert_to_global_bn
from simclr_core.method.models import SimCLRModel, uses_cifar_stem
from simclr_core.method.optim import LARS, lars_param_groups, warmup_cosine_scheduler
from simclr_core.pretrain.plan import Plan

__all__ = [
    "model_config_for", "build_model", "training_model", "optimizer_for", "augment_config_for", "uses_bf16", "eval_uses_bf16",
    "compiled",
]

# What torch.compile's kernels are built with: C++ on a CPU (inductor), C for Triton's launchers on CUDA,
# each tried as torch and Triton try them ($CXX / $CC first).
_COMPILERS = {"cpu": ("CXX", ("g++", "clang++", "c++")), "cuda": ("CC", ("gcc", "clang", "cc"))}


def model_config_for(config: PretrainConfig, image_size: int) -> dict[str, Any]:
    """The arguments of :meth:`SimCLRModel.build` for ``config``; stored with every checkpoint."""
    cifar_stem = uses_cifar_stem(image_size) if config.cifar_stem == "auto" else config.cifar_stem == "true"
    return {
        "arch": config.arch,
        "image_size": image_size,
        "cifar_stem": cifar_stem,
        "width_multiplier": config.width_multiplier,
        "proj_layers": config.proj_layers,
        "proj_hidden_dim": config.proj_hidden_dim or None,
        "proj_out_dim": config.proj_out_dim,
    }


def build_model(model_config: dict[str, Any]) -> SimCLRModel:
    """:meth:`SimCLRModel.build` of ``model_config``; settings it refuses are a ConfigError."""
    try:
        return SimCLRModel.build(**model_config)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model settings {model_config}: {error}") from None


def training_model(model_config: dict[str, Any], seed: int, env: DistEnv) -> SimCLRModel:
    """The model to pretrain: the same initial weights on every rank (from ``seed``), global
    BatchNorm, on ``env.device`` in channels_last."""
    torch.manual_seed(seed)  # same initial weights on every rank
    model = convert_to_global_bn(build_model(model_config), env).to(env.device)
    # channels_last pays on every device: cuDNN's NHWC kernels on GPUs, oneDNN's on CPUs
    # (ResNet-18 forward+backward 1.1x to 1.5x faster on this project's 2-core CPU; benchmarks/).
    return model.to(memory_format=torch.channels_last)


def optimizer_for(
    model: SimCLRModel, config: PretrainConfig, plan: Plan
) -> tuple[LARS, torch.optim.lr_scheduler.LambdaLR]:
    """LARS over ``model`` (BN and biases excluded from decay and adaptation) and its per-step
    warmup + cosine schedule to zero at ``plan.total_steps``."""
    optimizer = LARS(lars_param_groups(model, config.weight_decay), lr=plan.lr, momentum=config.momentum)
    return optimizer, warmup_cosine_scheduler(optimizer, plan.total_steps, plan.warmup_steps)


def augment_config_for(config: PretrainConfig, image_size: int) -> AugmentConfig:
    """The paper's policy for ``image_size``, with the strength, blur and crop scale of ``config``."""
    strength = None if config.strength < 0 else config.strength
    blur = None if config.blur == "auto" else config.blur == "true"
    policy = AugmentConfig.for_image_size(image_size, strength=strength, blur=blur)
    return dataclasses.replace(policy, crop_scale=(config.crop_min_scale, 1.0))


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether pretraining's forward pass runs under bf16 autocast on ``device``.

    ``precision`` is "bf16", "fp32" or "auto": bf16 on CUDA, fp32 on CPUs. On a CPU with native
    bf16 (AVX512-BF16 or AMX) identical bf16 runs of a tiny model reached a NaN loss in about
    half of the tries (2026-11-30, an Intel Xeon with AMX; the cause, below our code, is not
    isolated), so bf16 on a CPU is an explicit choice. Weights, optimizer state and NT-Xent's
    logits stay float32 either way.
    """
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda"


def eval_uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether evaluation's forward passes (feature extraction, fine-tuning, the kNN probe) run
    under bf16 autocast on ``device``: where :func:`uses_bf16` would pretrain in bf16, on CUDA only.

    On a CPU evaluation stays float32 whatever ``precision`` says: its figures are compared across
    runs, and bf16 gains little there (the NaNs of :func:`uses_bf16`'s note aside). The evaluation
    stages have no precision setting of their own, so they pass the default, "auto".
    """
    return device.type == "cuda" and uses_bf16(precision, device)


def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN runs bf16 convolutions natively (elsewhere it emulates them)."""
    cpu = torch.cpu
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # a torch build without these queries (not x86)
        return False


def compiled(model: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """``model`` under torch.compile in ``mode`` (``pretrain.compile``), or itself for "none".

    Compiling happens at the first step, minutes into a run; the compiler its kernels need is
    checked here, before anything runs, so that its absence is a ConfigError that says what to do.
    """
    if mode == "none":
        return model
    variable, names = _COMPILERS.get(device.type, _COMPILERS["cuda"])
    missing = []
    if not os.environ.get(variable) and not any(shutil.which(name) for name in names):
        missing.append(f"a compiler (${variable}, or one of {', '.join(names)} on PATH)")
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if not headers.is_file():  # both inductor's CPU kernels and Triton's launcher include it
        missing.append(f"Python's C headers ({headers}; Debian: python3-dev)")
    if missing:
        raise ConfigError(
            f"pretrain.compile {mode!r} builds torch.compile's kernels on {device.type}, which needs {' and '.join(missing)}: "
            "install them (the image: build it with --build-arg WITH_COMPILER=true) or set pretrain.compile to 'none'"
        )
    return torch.compile(model, mode=mode)
