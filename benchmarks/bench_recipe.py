"""A training recipe end to end (presets/cifar10-gpu.yaml by default): its time and accuracy against its goals.

Issue 16's CIFAR-10 goal on one H200: pretraining under 6 minutes, linear eval >= 86% and kNN on
the test set >= 84.8% (lightly's published 200-epoch SimCLR figure). This script runs the
recipe's stages as ``simclr prepare / pretrain / linear-eval --params PRESET`` do, but through the
library in this process, because the device machine has neither dvclive nor kfp:

- **prepare** the image folder ``--images DIR`` (``train/`` and ``test/`` with a folder per class,
  e.g. CIFAR-10 as PNGs or JPEGs), with the preset's prepare settings;
- **pretrain** with the preset's settings: the trainer's own loop, progress bar and epoch log
  (no DVCLive); the time is the stage's wall time, model set-up, kNN passes and checkpoints included;
- **linear eval** with the preset's settings: the linear probe's top-1 and the test set's
  weighted kNN top-1 (bank: every labelled training image), each beside a random-init encoder's.

A run stopped part way (the device machine's calls last at most 10 minutes) continues where it
stopped when started again with the same ``--work``: the prepared dataset is kept, and pretraining
resumes from its last checkpoint (the section then says from which step, and the time counts
this call only).

Usage (PYTHONPATH = the repository):

    PYTHONPATH=. python3 benchmarks/bench_recipe.py --images /data/cifar10 --work /tmp/recipe   # a GPU
    PYTHONPATH=. python3 benchmarks/bench_recipe.py --images DIR --epochs 100 ...                # part of the recipe
    python benchmarks/bench_recipe.py --tiny --results /tmp/RESULTS.md                           # CPU: generated images, seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_gpu import LoopTrainer  # benchmarks/ is the script's directory
from common import RESULTS, write_results
from simclr_core.config import LinearEvalConfig, PrepareConfig, PretrainConfig, build_config, load_section
from simclr_core.data import PreparedDataset, prepare
from simclr_core.evaluate import linear_eval
from simclr_core.launch import init_distributed
from simclr_core.method.distributed import DistEnv
from simclr_core.pretrain.trainer import MODEL_NAME
from simclr_core.storage import open_store

SECTION = "bench_recipe"
PRESET = Path(__file__).resolve().parents[1] / "presets" / "cifar10-gpu.yaml"
GOALS = {"pretrain_minutes": 6.0, "linear_top1": 0.86, "knn_top1": 0.848}  # issue 16, item 3

# --tiny: a model and data small enough for seconds on a CPU (CI); every row is still written
TINY_PRETRAIN = dict(width_multiplier=0.125, batch_size=16, epochs=2, warmup_epochs=0.5, knn_k=5, knn_bank_size=0, knn_every=1,
                     num_threads=1, precision="fp32", checkpoint_every=0)
TINY_LINEAR = dict(l2_grid=[1e-3], max_iter=5, knn_k=5)


class RecipeTrainer(LoopTrainer):
    """bench_gpu's loop (`simclr pretrain`'s, without DVCLive) that remembers the step it resumed from."""

    resumed_from = 0

    def resume(self) -> None:
        super().resume()
        self.resumed_from = self.step


def write_tiny_images(root: Path, classes: int = 3, train_per_class: int = 24, test_per_class: int = 6, size: int = 16) -> Path:
    """root/{train,test}/c<k>/*.png: random images, each class around a colour of its own."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label in range(classes):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True)
            colour = np.array([80 * label, 255 - 80 * label, 128])
            for index in range(count):
                noise = rng.integers(-60, 60, (size, size, 3))
                Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(folder / f"{index}.png")
    return root


def settings(args: argparse.Namespace) -> tuple[PrepareConfig, PretrainConfig, LinearEvalConfig]:
    """The preset's prepare, pretrain and linear_eval sections, with this script's changes."""
    prepare_values = load_section(args.params, "prepare") | {"source": "imagefolder", "source_root": str(args.images), "download": False}
    pretrain_values = load_section(args.params, "pretrain") | (TINY_PRETRAIN if args.tiny else {})
    linear_values = load_section(args.params, "linear_eval") | (TINY_LINEAR if args.tiny else {})
    if args.epochs:
        pretrain_values["epochs"] = args.epochs
    return (build_config(PrepareConfig, "prepare", prepare_values), build_config(PretrainConfig, "pretrain", pretrain_values),
            build_config(LinearEvalConfig, "linear_eval", linear_values))


def timed(fn):
    """(what ``fn()`` returns, its wall time in seconds)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_pretrain(config: PretrainConfig, data: Path, out: Path, env: DistEnv) -> tuple[RecipeTrainer, dict, float]:
    """The trainer (for its plan and resume step), the last epoch's metrics and the stage's seconds."""
    out.mkdir(parents=True, exist_ok=True)
    with open_store(out) as store:
        start = time.perf_counter()  # the set-up (dataset, model, the kNN bank) is part of the stage's time
        trainer = RecipeTrainer(config, data, store, out, env)
        results = trainer.run()
        return trainer, results, time.perf_counter() - start


def rows_of(prepared: dict, pretrained: tuple[RecipeTrainer, dict, float], evaluated: tuple[dict, float], args) -> list[tuple[str, str, str]]:
    """The section's rows: each stage's time and figures, each goal beside what was measured."""
    trainer, last_epoch, pretrain_seconds = pretrained
    results, linear_seconds = evaluated
    mine, baseline = results["pretrained"], results["random_init"]
    config = trainer.config
    resumed = f"; resumed from step {trainer.resumed_from} of {trainer.plan.total_steps}: this call's part only" if trainer.resumed_from else ""
    knn_val = last_epoch.get("knn_accuracy")
    return [
        ("prepare", prepared["time"], prepared["note"]),
        (f"pretrain, {config.arch} x {config.width_multiplier:g}, {config.epochs} epochs at B={config.batch_size}",
         f"**{pretrain_seconds / 60:.2f} min** ({pretrain_seconds:.1f} s)",
         f"goal < {GOALS['pretrain_minutes']:g} min; the stage's wall time (set-up, kNN passes every {config.knn_every} epoch(s), "
         f"checkpoints){resumed}"),
        ("pretrain speed, last epoch", f"{last_epoch.get('images_per_second', 0):,.0f} images/s",
         f"data wait {100 * last_epoch.get('data_wait_fraction', 0):.2f}% of it"),
        ("kNN on val at the last epoch (the monitor)", "n/a" if knn_val is None else f"{100 * knn_val:.2f}%",
         f"k={config.knn_k}, bank of {config.knn_bank_size or 'all'} training images"),
        ("linear eval top-1 on test", f"**{100 * mine['top1']:.2f}%**",
         f"goal >= {100 * GOALS['linear_top1']:g}%; random-init encoder {100 * baseline['top1']:.2f}%; L2 {mine['l2']:g}"),
        ("kNN top-1 on test (bank: every training image)", f"**{100 * mine.get('knn_top1', float('nan')):.2f}%**",
         f"goal >= {100 * GOALS['knn_top1']:g}% (lightly's 200-epoch SimCLR); random-init encoder "
         f"{100 * baseline.get('knn_top1', float('nan')):.2f}%"),
        ("linear eval (both encoders, kNN included)", f"{linear_seconds:.1f} s", "features on the device, L-BFGS on the CPU"),
    ]


def run(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    env = init_distributed(device=args.device)
    prepare_config, pretrain_config, linear_config = settings(args)
    data, run_dir = args.work / "prepared", args.work / "pretrain"
    if (data / "manifest.json").exists():
        prepared = {"time": "kept", "note": f"{data} from an earlier call (delete it to measure prepare)"}
    else:
        _, seconds = timed(lambda: prepare(prepare_config, data))
        dataset = PreparedDataset(data)
        count = sum(len(dataset.labels(split)) for split in ("train", "val", "test") if dataset.has_split(split))
        prepared = {"time": f"{seconds:.0f} s", "note": f"{count:,} images from {args.images}, prepare.workers {prepare_config.workers or 'all CPUs'}"}
    print(f"prepare: {prepared['time']}", flush=True)
    pretrained = run_pretrain(pretrain_config, data, run_dir, env)
    print(f"pretrain: {pretrained[2]:.0f} s", flush=True)
    evaluated = timed(lambda: linear_eval(run_dir / MODEL_NAME, data, linear_config, env.device))
    rows = rows_of(prepared, pretrained, evaluated, args)
    for row in rows:
        print(row, flush=True)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="image folder with train/ and test/ (not with --tiny)")
    parser.add_argument("--params", type=Path, default=PRESET, help="the recipe (default presets/cifar10-gpu.yaml)")
    parser.add_argument("--epochs", type=int, default=0, help="pretrain this many epochs instead of the recipe's (0 = the recipe's)")
    parser.add_argument("--work", type=Path, default=None, help="where the dataset and the run go (kept; default: a temporary directory)")
    parser.add_argument("--tiny", action="store_true", help="generated images and a tiny model, for a CPU (CI)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results file to write the section into")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if not args.tiny and args.images is None:
        parser.error("--images DIR is required (or --tiny)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        if args.work is None:
            args.work = Path(scratch) / "work"
        if args.tiny and args.images is None:
            args.images = write_tiny_images(Path(scratch) / "images")
        rows = run(args)
    if not args.no_write:
        command = "python3 benchmarks/bench_recipe.py " + " ".join(argv if argv is not None else sys.argv[1:])
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu"
        write_results(f"{SECTION} ({device}, {args.params.name}{', tiny' if args.tiny else ''})", rows, command.strip(),
                      results=args.results, notes=f"torch {torch.__version__}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
