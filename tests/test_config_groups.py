"""Resume identity comes from PretrainConfig itself: every setting declares whether it changes
what pretraining computes ("method") or only how ("runtime"), so a new setting cannot be
forgotten, and a checkpoint is resumed exactly when no method setting differs."""

from __future__ import annotations

import dataclasses

import pytest

from simclr_core.config import GROUP, METHOD, RUNTIME, PretrainConfig, changed_method_settings, settings_in_group

# A setting joins this set deliberately: a run resumed under another value of it must compute
# the same numbers (the same rounding, for precision).
RUNTIME_SETTINGS = {
    "checkpoint_every", "num_threads", "data_threads", "precision", "knn_k", "knn_temperature", "knn_bank_size",
    "keep_checkpoints", "metrics_port", "metrics_pushgateway", "collective_timeout_s", "stage_dir", "knn_every", "compile",
}


def test_every_pretrain_setting_declares_its_group():
    missing = [field.name for field in dataclasses.fields(PretrainConfig) if field.metadata.get(GROUP) not in (METHOD, RUNTIME)]
    assert missing == [], "give each setting _method(...) or _runtime(...) in simclr_core/config.py"


def test_runtime_settings_are_exactly_the_ones_that_resume():
    assert settings_in_group(PretrainConfig, RUNTIME) == RUNTIME_SETTINGS
    names = {field.name for field in dataclasses.fields(PretrainConfig)}
    assert settings_in_group(PretrainConfig, METHOD) == names - RUNTIME_SETTINGS


def _saved(**changes) -> dict:
    return dataclasses.asdict(dataclasses.replace(PretrainConfig(), **changes))


@pytest.mark.parametrize(
    "changes", [dict(checkpoint_every=7), dict(precision="bf16"), dict(num_threads=3, knn_k=5, metrics_port=9100)], ids=str
)
def test_other_runtime_settings_do_not_change_the_run(changes):
    assert changed_method_settings(_saved(**changes), PretrainConfig()) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [(dict(temperature=0.2), ["temperature"]), (dict(seed=1, batch_size=256), ["batch_size", "seed"]),
     (dict(seed=1, num_threads=2), ["seed"])],
    ids=str,
)
def test_other_method_settings_make_another_run(changes, expected):
    assert changed_method_settings(_saved(**changes), PretrainConfig()) == expected


def test_a_setting_only_one_side_has_makes_another_run():
    saved = _saved()
    saved["retired_setting"] = 1
    del saved["crop_min_scale"]
    assert changed_method_settings(saved, PretrainConfig()) == ["crop_min_scale", "retired_setting"]
