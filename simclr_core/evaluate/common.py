"""What the three evaluations share: the pretrained model and a random-init one, top-k accuracy,
the labelled rows of a split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from simclr_core.checkpoint import CheckpointError, load_checkpoint
from simclr_core.config import ConfigError
from simclr_core.data import PreparedDataset
from simclr_core.method.models import SimCLRModel
from simclr_core.pretrain.model_setup import build_model

__all__ = ["load_pretrained", "random_init_model", "topk_accuracy", "labelled"]


def load_pretrained(path: str | Path, device: torch.device) -> tuple[SimCLRModel, dict[str, Any]]:
    """The model saved by pretraining (``model.pt`` or a training checkpoint), and its model settings.

    Raises CheckpointError, naming the file, when it is not a pretraining checkpoint or its
    weights do not fit the model its ``model_config`` describes (another architecture or width,
    missing or extra weights).
    """
    state = load_checkpoint(path, map_location="cpu")
    weights, model_config = state.get("model"), state.get("model_config")
    if not isinstance(weights, dict) or not isinstance(model_config, dict):
        raise CheckpointError(
            f"{path} is not a simclr pretraining checkpoint: it needs 'model' (weights) and 'model_config' entries, "
            f"it has {sorted(map(str, state))[:8]}; use the model.pt that `simclr pretrain` writes"
        )
    image_size = model_config.get("image_size")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise CheckpointError(f"{path}: model_config.image_size must be a positive integer, got {image_size!r}")
    try:
        model = build_model(model_config)
    except ConfigError as error:
        raise CheckpointError(f"{path}: its model_config cannot be built: {error}") from None
    problems = _weight_mismatches(model.state_dict(), weights)
    if problems:
        raise CheckpointError(
            f"{path}: its weights do not fit its model_config ({_describe_model(model_config)}): {'; '.join(problems)}. "
            "It was written for another architecture or width, or edited; use the model.pt of the `simclr pretrain` run"
        )
    model.load_state_dict(weights)
    return model.to(device, memory_format=torch.channels_last), model_config  # faster on CPU and GPU (pretrain/model_setup.py)


def _describe_model(model_config: dict[str, Any]) -> str:
    keys = ("arch", "width_multiplier", "cifar_stem", "proj_layers", "proj_hidden_dim", "proj_out_dim")
    return ", ".join(f"{key} {model_config[key]}" for key in keys if key in model_config)


def _weight_mismatches(expected: dict[str, torch.Tensor], weights: dict[str, Any], shown: int = 3) -> list[str]:
    """What keeps ``weights`` from loading into a model whose state dict is ``expected`` (empty when it loads)."""
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    wrong = [
        f"{key}: checkpoint {tuple(weights[key].shape) if torch.is_tensor(weights[key]) else type(weights[key]).__name__}, "
        f"model {tuple(expected[key].shape)}"
        for key in expected
        if key in weights and (not torch.is_tensor(weights[key]) or weights[key].shape != expected[key].shape)
    ]
    problems = []
    for label, keys in (("missing weight(s)", missing), ("unexpected weight(s)", unexpected), ("size mismatch(es)", wrong)):
        if keys:
            more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
            problems.append(f"{len(keys)} {label}: {', '.join(map(str, keys[:shown]))}{more}")
    return problems


def random_init_model(model_config: dict[str, Any], seed: int, device: torch.device) -> SimCLRModel:
    torch.manual_seed(seed)
    return build_model(model_config).to(device, memory_format=torch.channels_last)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits; logits (N, C), labels (N,)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1).float().mean().item()


def labelled(dataset: PreparedDataset, split: str) -> tuple[np.ndarray, torch.Tensor]:
    labels = dataset.labels(split)
    keep = np.flatnonzero(labels >= 0)
    if len(keep) == 0:
        raise ConfigError(f"split '{split}' of {dataset.root} has no labels; evaluation needs a labelled dataset")
    images = dataset.images(split)
    if len(keep) < len(labels):
        images = images[keep]
    return images, torch.from_numpy(labels[keep])
