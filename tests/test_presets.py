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
    "pretrain.weight_decay": 1e-4, "pretrain.checkpoint_every": 0, "pretrain.knn_every": 5,
}
IMAGENET = {  # what the ImageNet-1k recipe changes, and to what
    "prepare.source": "imagefolder", "prepare.source_root": "/mnt/simclr/imagenet", "prepare.val_fraction": 0.01,
    "prepare.image_size": 256, "prepare.max_dataset_mib": 256000,
    "pretrain.arch": "resnet50", "pretrain.width_multiplier": 1.0, "pretrain.image_size": 224, "pretrain.epochs": 100,
    "pretrain.batch_size": 4096, "pretrain.base_lr": 0.3, "pretrain.lr_scaling": "linear", "pretrain.warmup_epochs": 10.0,
    "pretrain.strength": 1.0, "pretrain.blur": "true", "pretrain.knn_bank_size": 25000, "pretrain.stage_dir": "/stage",
    "finetune.epochs": 30, "finetune.batch_size": 256, "finetune.min_steps": 100,
    "transfer.finetune_epochs": 30, "transfer.batch_size": 256,
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


@pytest.mark.parametrize(("preset", "changes"), [("cifar10-gpu.yaml", CIFAR10_GPU), ("imagenet.yaml", IMAGENET)])
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


def _pretrain_config(preset: str) -> PretrainConfig:
    return build_config(PretrainConfig, "pretrain", load_section(REPO / "presets" / preset, "pretrain"))


def test_imagenet_recipe_is_the_papers():
    """SimCLR's ImageNet setting (Chen et al. 2020, and DESIGN.md's facts): ResNet-50 with the ImageNet
    stem at 224 px, B=4096, LARS at 0.3 * B / 256 = 4.8, 10 warm-up epochs of 100, t=0.1, weight decay
    1e-6, colour strength 1.0 and blur with an odd kernel of about 10% of the side."""
    from simclr_core.method.optim import scale_learning_rate
    from simclr_core.pretrain.model_setup import augment_config_for, model_config_for

    config = _pretrain_config("imagenet.yaml")
    prepare = build_config(PrepareConfig, "prepare", load_section(REPO / "presets" / "imagenet.yaml", "prepare"))
    assert scale_learning_rate(config.base_lr, config.batch_size, config.lr_scaling) == pytest.approx(4.8)
    assert (config.batch_size, config.epochs, config.warmup_epochs) == (4096, 100, 10.0)
    assert (config.temperature, config.weight_decay, config.momentum) == (0.1, 1e-6, 0.9)
    model = model_config_for(config, config.image_size)
    assert (model["arch"], model["width_multiplier"], model["image_size"]) == ("resnet50", 1.0, 224)
    assert model["cifar_stem"] is False  # 7x7 stride-2 conv and max-pool
    assert (model["proj_layers"], model["proj_out_dim"]) == (2, 128)
    assert prepare.image_size > config.image_size  # stored larger than trained: the crop has room

    policy = augment_config_for(config, config.image_size)
    assert policy.size == 224 and policy.strength == 1.0
    assert policy.blur_enabled and policy.blur_p == 0.5 and policy.blur_sigma == (0.1, 2.0)
    assert policy.blur_kernel % 2 == 1 and abs(policy.blur_kernel - 0.1 * 224) <= 1  # 23 at 224 px
    assert policy.crop_scale == (0.08, 1.0) and policy.jitter_p == 0.8 and policy.grayscale_p == 0.2


def test_imagenet_recipe_budget_holds_imagenet_at_256_px():
    """prepare.max_dataset_mib admits ILSVRC2012's 1,281,167 training and 50,000 validation images
    stored at 3 x 256 x 256 bytes (it is checked against N x C x H x W of all splits)."""
    prepare = build_config(PrepareConfig, "prepare", load_section(REPO / "presets" / "imagenet.yaml", "prepare"))
    images = (1_281_167 + 50_000) * 3 * prepare.image_size**2
    assert images == 261_718_081_536
    assert images <= prepare.max_dataset_mib * 2**20 < 1.05 * images


def _readme_imagenet_submit() -> list[str]:
    """The name=value arguments of the README's ImageNet `pipelines.submit` command."""
    import re
    import shlex

    section = (REPO / "README.md").read_text().split("### An ImageNet-1k recipe", 1)[1].split("\n## ", 1)[0]
    commands = [block for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S) if "pipelines.submit" in block]
    assert commands, "the README's ImageNet section has no pipelines.submit command"
    words = shlex.split(commands[0].replace("\\\n", " "), comments=True)
    return [word for word in words if "=" in word and not word.startswith("-")]


def test_readme_imagenet_pipeline_run_computes_what_the_preset_does():
    """The README's pipeline run of the recipe gives every stage the preset's settings: the step's
    CLI defaults (the components run without a params file), then the component's own inputs and
    the run's parameters, then the *_settings dicts, as the components merge them."""
    import inspect

    from components.prepare.component import prepare
    from pipelines.submit import parse_arguments, pipeline_parameters

    parameters = pipeline_parameters(REPO / "pipelines" / "simclr_pipeline.yaml")
    run = {name: spec.get("defaultValue") for name, spec in parameters.items()}
    run.update(parse_arguments(_readme_imagenet_submit(), parameters))
    component_defaults = {
        name: p.default for name, p in inspect.signature(prepare.python_func).parameters.items() if p.default is not p.empty
    }
    given = {
        "prepare": {**component_defaults, "source": run["source"], "source_root": run["source_uri"], "download": run["download"],
                    "label_fractions": run["label_fractions"], **run["prepare_settings"]},
        "pretrain": {"epochs": run["epochs"], "batch_size": run["batch_size"], "temperature": run["temperature"], **run["pretrain_settings"]},
        "linear_eval": run["linear_eval_settings"],
        "finetune": {"label_fractions": run["label_fractions"], **run["finetune_settings"]},
        "transfer": run["transfer_settings"],
    }
    given["prepare"].pop("settings", None)
    preset = _settings(REPO / "presets" / "imagenet.yaml")[0]
    for section, values in given.items():
        config = dataclasses.asdict(build_config(SECTIONS[section], section, values))
        ran = {f"{section}.{key}": value for key, value in config.items()}
        # the README's source is a gs:// placeholder; the PyTorchJob serves metrics on 9090
        skip = {"prepare.source_root", "pretrain.metrics_port"}
        assert {k: v for k, v in ran.items() if k not in skip} == {k: preset[k] for k in ran if k not in skip}, section
    assert run["source_uri"].startswith("gs://")
    assert (run["transfer_source"], run["backend"]) == ("digits", "pytorchjob")
