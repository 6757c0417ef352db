"""Every CLI stage on tiny generated data, and the errors users get for bad input."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import pytest

from simclr_core.data import PreparedDataset, class_balanced_subset
from tests.conftest import TINY_PRETRAIN, make_fashion_mnist_like, run_cli


# ------------------------------------------------------------------------------ prepare


def test_prepare_imagefolder_writes_arrays_manifest_and_subsets(tiny_prepared):
    dataset = PreparedDataset(tiny_prepared)
    manifest = dataset.manifest
    assert manifest["class_names"] == ["class0", "class1", "class2"]
    assert manifest["image_shape"] == [3, 16, 16]
    assert manifest["splits"]["train"]["images"] + manifest["splits"]["val"]["images"] == 72
    assert manifest["splits"]["test"]["images"] == 18
    assert manifest["splits"]["test"]["per_class"] == {"class0": 6, "class1": 6, "class2": 6}
    train = dataset.images("train")
    assert train.dtype == np.uint8 and train.shape[1:] == (3, 16, 16)
    assert isinstance(train, np.memmap)
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((tiny_prepared / name).read_bytes()).hexdigest() == digest
    labels = dataset.labels("train")
    half = dataset.subset(0.5)
    per_class = np.bincount(labels[half], minlength=3)
    expected = [round(0.5 * c) for c in np.bincount(labels, minlength=3)]
    assert per_class.tolist() == expected
    assert len(dataset.subset(0.1)) >= 3  # at least one per class


def test_class_balanced_subset_is_deterministic_and_balanced():
    labels = np.repeat(np.arange(10), 100)
    first = class_balanced_subset(labels, 0.1, seed=0)
    assert np.array_equal(first, class_balanced_subset(labels, 0.1, seed=0))
    assert not np.array_equal(first, class_balanced_subset(labels, 0.1, seed=1))
    assert np.bincount(labels[first]).tolist() == [10] * 10
    # a fixed seed gives a fixed subset on any machine (numpy's PCG64 stream is specified)
    assert first[:3].tolist() == class_balanced_subset(labels, 0.1, seed=0)[:3].tolist()


def test_prepare_is_reproducible(tiny_folder, tmp_path):
    outs = []
    for name in ("a", "b"):
        result = run_cli("prepare", "--source", "imagefolder", "--source-root", str(tiny_folder), "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        outs.append(json.loads((tmp_path / name / "manifest.json").read_text())["files"])
    assert outs[0] == outs[1]


def test_prepare_fashion_mnist_idx_files(tmp_path):
    root = make_fashion_mnist_like(tmp_path / "fmnist")
    result = run_cli("prepare", "--source", "fashion-mnist", "--source-root", str(root), "--val-fraction", "0.1", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    dataset = PreparedDataset(tmp_path / "out")
    assert dataset.image_shape == (1, 28, 28)
    assert dataset.class_names[0] == "T-shirt/top"
    assert len(dataset.images("train")) == 54 and len(dataset.images("val")) == 6 and len(dataset.images("test")) == 20


def test_prepare_digits_is_offline(tmp_path):
    result = run_cli("prepare", "--source", "digits", "--out", str(tmp_path / "digits"))
    assert result.returncode == 0, result.stderr
    dataset = PreparedDataset(tmp_path / "digits")
    assert dataset.image_shape == (1, 8, 8) and dataset.num_classes == 10
    total = sum(split["images"] for split in dataset.manifest["splits"].values())
    assert total == 1797


def test_prepare_skips_corrupt_images_and_lists_them(tiny_folder, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(tiny_folder, folder)
    (folder / "train" / "class1" / "broken.png").write_bytes(b"not a png at all")
    result = run_cli("prepare", "--source", "imagefolder", "--source-root", str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [entry["path"].endswith("broken.png") for entry in manifest["skipped"]] == [True]
    assert "skipped 1 unreadable" in result.stderr


def test_prepare_flat_folder_is_unlabelled(tmp_path, tiny_folder):
    flat = tmp_path / "flat"
    flat.mkdir()
    for index, path in enumerate(sorted((tiny_folder / "train" / "class0").glob("*.png"))[:8]):
        shutil.copy(path, flat / f"{index}.png")
    result = run_cli("prepare", "--source", "imagefolder", "--source-root", str(flat), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert (PreparedDataset(tmp_path / "out").labels("train") == -1).all()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--source", "imagefolder", "--source-root", "/nonexistent/images"], "/nonexistent/images does not exist"),
        (["--source", "fashion-mnist", "--source-root", "/nonexistent/fmnist"], "Fashion-MNIST not found under /nonexistent/fmnist"),
        (["--source", "imagenet-22k"], "prepare.source must be one of"),
        (["--source", "cifar10", "--source-root", "/nonexistent/cifar"], "cifar10 under /nonexistent/cifar"),
        (["--val-fraction", "1.5"], "prepare.val_fraction must be in [0, 1)"),
        (["--max-train", "many"], "prepare.max_train must be of type int"),
    ],
)
def test_prepare_bad_input_exits_2_naming_the_problem(tmp_path, args, message):
    result = run_cli("prepare", *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_prepare_empty_folder_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("prepare", "--source", "imagefolder", "--source-root", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "holds no readable images" in result.stderr


def test_params_file_sections_and_overrides(tmp_path, tiny_folder):
    params = tmp_path / "params.yaml"
    params.write_text(f"prepare:\n  source: imagefolder\n  source_root: {tiny_folder}\n  val_fraction: 0.5\n")
    result = run_cli("prepare", "--params", str(params), "--val-fraction", "0.25", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    splits = json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]
    assert splits["val"]["images"] == 18  # the command line won over params.yaml
    params.write_text("prepare:\n  sauce: digits\n")
    result = run_cli("prepare", "--params", str(params), "--out", str(tmp_path / "out2"))
    assert result.returncode == 2 and "unknown setting(s) prepare.sauce" in result.stderr


# ------------------------------------------------------------------------------ pretrain


def test_pretrain_writes_model_checkpoint_and_metrics(tiny_pretrained):
    assert (tiny_pretrained / "model.pt").is_file()
    assert (tiny_pretrained / "checkpoints" / "latest.json").is_file()
    metrics = json.loads((tiny_pretrained / "live" / "metrics.json").read_text())
    assert metrics["epoch"] == 2
    assert metrics["loss"] > 0 and metrics["images_per_second"] > 0
    assert 0.0 <= metrics["knn_accuracy"] <= 1.0
    rows = (tiny_pretrained / "live" / "plots" / "metrics" / "loss.tsv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + one row per epoch


@pytest.mark.parametrize(
    "args,message",
    [
        (["--epochs", "-1"], "pretrain.epochs must be >= 1"),
        (["--batch-size", "4096"], "larger than the training split"),
        (["--temperature", "0"], "pretrain.temperature must be > 0"),
        (["--lr-scaling", "cubic"], "pretrain.lr_scaling"),
        (["--arch", "vgg11"], "unknown encoder arch 'vgg11'"),
    ],
)
def test_pretrain_bad_settings_exit_2(tiny_prepared, tmp_path, args, message):
    result = run_cli("pretrain", "--data", str(tiny_prepared), "--out", str(tmp_path / "run"), *TINY_PRETRAIN, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_pretrain_missing_dataset_exits_2(tmp_path):
    result = run_cli("pretrain", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "run"), *TINY_PRETRAIN)
    assert result.returncode == 2
    assert "is not a prepared dataset" in result.stderr


# ------------------------------------------------------------------------------ evaluations


def _metrics(path):
    return json.loads((path / "metrics.json").read_text())


def test_linear_eval_reports_accuracies_baseline_and_confusion(tiny_pretrained, tiny_prepared, tmp_path):
    result = run_cli("linear-eval", "--model", str(tiny_pretrained / "model.pt"), "--data", str(tiny_prepared), "--out", str(tmp_path), "--max-iter", "30")
    assert result.returncode == 0, result.stderr
    metrics = _metrics(tmp_path)
    for key in ("top1", "top5", "random_init_top1", "random_init_top5"):
        assert 0.0 <= metrics[key] <= 1.0
    confusion = json.loads((tmp_path / "confusion.json").read_text())
    assert len(confusion) == 18 and set(confusion[0]) == {"actual", "predicted"}
    # the reported top-1 is the confusion rows' own hit rate (what an accuracy means is tested
    # by outcome in test_pretraining_beats_random_init_in_every_evaluation)
    assert metrics["top1"] == pytest.approx(sum(row["actual"] == row["predicted"] for row in confusion) / 18)


def test_finetune_reports_each_fraction_with_scratch_baseline(tiny_pretrained, tiny_prepared, tmp_path):
    result = run_cli(
        "finetune", "--model", str(tiny_pretrained / "model.pt"), "--data", str(tiny_prepared), "--out", str(tmp_path),
        "--label-fractions", "0.1,0.5", "--epochs", "1", "--min-steps", "3", "--batch-size", "8",
    )
    assert result.returncode == 0, result.stderr
    for fraction in ("0.1", "0.5"):  # a progress bar for each of the four trainings, counted in images
        for init in ("pretrained", "scratch"):
            assert re.search(rf"finetune {fraction} of the labels, {init}: 100%\|.*\| (\d+)/\1 \[.*img/s", result.stderr), result.stderr[-2000:]
    metrics = _metrics(tmp_path)
    assert set(metrics) == {"labels_10pct", "labels_50pct"}
    for values in metrics.values():
        assert set(values) == {"top1", "top5", "scratch_top1", "scratch_top5"}
        assert all(0.0 <= v <= 1.0 for v in values.values())


def test_finetune_unknown_fraction_exits_2(tiny_pretrained, tiny_prepared, tmp_path):
    result = run_cli("finetune", "--model", str(tiny_pretrained / "model.pt"), "--data", str(tiny_prepared), "--out", str(tmp_path), "--label-fractions", "0.3")
    assert result.returncode == 2 and "label fraction 0.3 was not prepared" in result.stderr


def test_transfer_linear_and_finetuned_with_baselines(tiny_pretrained, tmp_path):
    digits = tmp_path / "digits"
    assert run_cli("prepare", "--source", "digits", "--max-train", "200", "--out", str(digits)).returncode == 0
    result = run_cli(
        "transfer", "--model", str(tiny_pretrained / "model.pt"), "--data", str(digits), "--out", str(tmp_path / "out"),
        "--finetune-epochs", "1", "--max-iter", "20", "--l2-grid", "0.001,0.1",
    )
    assert result.returncode == 0, result.stderr
    metrics = _metrics(tmp_path / "out")
    for key in ("linear_top1", "linear_random_init_top1", "finetune_top1", "finetune_random_init_top1"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["linear_l2"] in (0.001, 0.1)


def test_evaluation_refuses_a_file_that_is_not_a_checkpoint(tiny_prepared, tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"\x80\x04garbage")
    result = run_cli("linear-eval", "--model", str(bogus), "--data", str(tiny_prepared), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "model.pt cannot be read" in result.stderr


# ------------------------------------------------------------------------------ outcomes


def test_pretraining_beats_random_init_in_every_evaluation(tmp_path):
    """On a dataset with a known answer (conftest.make_texture_folder), the pretrained encoder
    beats a random-init one by a clear margin in linear eval, fine-tuning and transfer: what
    users pretrain for, and what fails if an evaluation ignored the pretrained weights."""
    from components.common import cli_options
    from tests.conftest import OUTCOME_FINETUNE_SETTINGS, OUTCOME_PRETRAIN, OUTCOME_TRANSFER_SETTINGS, make_texture_folder

    make_texture_folder(tmp_path / "images", train_per_class=100, test_per_class=60, seed=0)
    make_texture_folder(tmp_path / "other", train_per_class=15, test_per_class=30, seed=1)
    for source, out, fraction in (("images", "data", "0.1"), ("other", "transfer_data", "0.5")):
        result = run_cli("prepare", "--source", "imagefolder", "--source-root", str(tmp_path / source), "--val-fraction", "0.2",
                         "--label-fractions", fraction, "--out", str(tmp_path / out), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    model = tmp_path / "run" / "model.pt"
    # cwd: a directory without params.yaml, so only these settings and the CLI's defaults apply
    result = run_cli("pretrain", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *OUTCOME_PRETRAIN,
                     env={"OMP_NUM_THREADS": "2"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    steps = [
        ("linear-eval", "--data", tmp_path / "data"),
        ("finetune", "--data", tmp_path / "data", "--label-fractions", "0.1", *cli_options(OUTCOME_FINETUNE_SETTINGS)),
        ("transfer", "--data", tmp_path / "transfer_data", *cli_options(OUTCOME_TRANSFER_SETTINGS)),
    ]
    metrics = {}
    for command, *args in steps:
        result = run_cli(command, "--model", str(model), *map(str, args), "--out", str(tmp_path / command), env={"OMP_NUM_THREADS": "2"},
                         cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        metrics[command] = json.loads((tmp_path / command / "metrics.json").read_text())
    linear, finetuned, transfer = metrics["linear-eval"], metrics["finetune"]["labels_10pct"], metrics["transfer"]
    summary = f"linear {linear}, finetune {finetuned}, transfer {transfer}"
    assert linear["top1"] >= linear["random_init_top1"] + 0.2, summary
    assert finetuned["top1"] >= finetuned["scratch_top1"] + 0.12, summary
    assert transfer["linear_top1"] >= transfer["linear_random_init_top1"] + 0.15, summary
    assert transfer["finetune_top1"] >= transfer["finetune_random_init_top1"] + 0.12, summary
