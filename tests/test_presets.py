"""presets/: whole params files for other machines. Each loads with the strict loader that
`simclr --params` uses, and differs from params.yaml only in the settings it is meant to change."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from simclr_core.config import FinetuneConfig, LinearEvalConfig, PrepareConfig, PretrainConfig, TransferConfig, build_config, load_section

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {
    "prepare": PrepareConfig, "pretrain": PretrainConfig, "linear_eval": LinearEvalConfig, "finetune": FinetuneConfig,
    "transfer_data": PrepareConfig, "transfer": TransferConfig,
}
CIFAR10_GPU = {  # what the CIFAR-10 GPU recipe changes, and to what
    "prepare.source": "cifar10", "prepare.download": True,
    "pretrain.width_multiplier": 1.0, "pretrain.cifar_stem": "auto", "pretrain.epochs": 200, "pretrain.batch_size": 512,
    "pretrain.temperature": 0.5, "pretrain.base_lr": 1.0, "pretrain.lr_scaling": "linear", "pretrain.warmup_epochs": 10.0,
    "pretrain.weight_decay": 1e-4, "pretrain.checkpoint_every": 0,
}


def _settings(path: Path) -> tuple[dict[str, object], set[str]]:
    """Every setting of every section of ``path`` as the stages read it (``section.key`` -> value,
    defaults included), and the keys the file names."""
    settings, named = {}, set()
    for section, cls in SECTIONS.items():
        values = load_section(path, section)
        named |= {f"{section}.{key}" for key in values}
        config = build_config(cls, section, values)
        settings.update({f"{section}.{key}": value for key, value in dataclasses.asdict(config).items()})
    return settings, named


@pytest.mark.parametrize(("preset", "changes"), [("cifar10-gpu.yaml", CIFAR10_GPU)])
def test_preset_loads_strictly_and_changes_only_its_settings(preset, changes):
    (base, base_keys), (loaded, keys) = _settings(REPO / "params.yaml"), _settings(REPO / "presets" / preset)
    assert keys == base_keys  # the same keys as params.yaml: none dropped (to a default), none added
    assert {key: value for key, value in loaded.items() if base[key] != value} == changes


def test_cifar10_gpu_recipe_runs_at_lr_2_with_the_cifar_stem():
    config = build_config(PretrainConfig, "pretrain", load_section(REPO / "presets" / "cifar10-gpu.yaml", "pretrain"))
    from simclr_core.method.optim import scale_learning_rate
    from simclr_core.pretrain.model_setup import model_config_for

    assert scale_learning_rate(config.base_lr, config.batch_size, config.lr_scaling) == 2.0  # DESIGN.md's measured GPU runs
    assert model_config_for(config, 32)["cifar_stem"] is True
