"""Pretraining step efficiency, data path and memory; writes its figures to benchmarks/RESULTS.md.

For ResNet-18 at 32 px (CIFAR stem and ImageNet stem), global batch B:

- **end to end**: images/s of `simclr_core.pretrain.pretrain` itself (a prepared dataset read
  from disk, the paper's augmentations drawn per image, both views in one forward pass,
  NT-Xent, LARS, global BN), from the second epoch (the first pays warm-up);
- **bare**: images/s of the same model's forward + backward on 2B already-made tensors
  (B images per step, as above), same threads, the mean over as many steps as the timed epoch;
- **step efficiency** = end to end / bare (issue 6 target >= 0.95 on this CPU), the median over
  rounds that each time the bare step and then the run (this VM's speed drifts by 10-20%);
- **data path alone**: images/s of reading + augmenting a batch the way the trainer does,
  and the trainer's own data-wait share of its step time (target < 2%);
- **memory**: peak RSS of the pretraining run above the process before it, per image.

Usage: python benchmarks/bench_step.py [--batch-size 256] [--steps 4] [--stems imagenet,cifar] [--rounds 3] [--precision auto] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import best_seconds, mean_seconds, peak_rss_kib, reset_peak_rss_kib, spread, write_results  # benchmarks/ is the script's directory
from simclr_core.config import PrepareConfig, PretrainConfig
from simclr_core.data import PreparedDataset, prepare
from simclr_core.method.augment import BatchedAugment
from simclr_core.method.distributed import DistEnv
from simclr_core.method.random_streams import RandomStream, seeded_generator
from simclr_core.pretrain import pretrain
from simclr_core.pretrain.model_setup import augment_config_for, build_model, model_config_for, uses_bf16

SECTION = "bench_step"
SIZE = 32


def make_dataset(root: Path, images: int) -> Path:
    """A prepared dataset of ``images`` random 32 px RGB images (unlabelled: no kNN pass)."""
    from PIL import Image

    folder = root / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(images):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{index:05d}.png")
    out = root / "prepared"
    prepare(PrepareConfig(source="imagefolder", source_root=str(folder), val_fraction=0.0, label_fractions=[0.5]), out)
    return out


def pretrain_config(batch_size: int, cifar_stem: bool, epochs: int, precision: str = "auto") -> PretrainConfig:
    return PretrainConfig(
        arch="resnet18", width_multiplier=1.0, cifar_stem="true" if cifar_stem else "false", batch_size=batch_size,
        epochs=epochs, warmup_epochs=0.0, checkpoint_every=0, keep_checkpoints=1, precision=precision,
    )


def end_to_end(data: Path, config: PretrainConfig) -> tuple[float, float]:
    """(images/s, data-wait share of the step time) of the last epoch of a real pretraining run."""
    with tempfile.TemporaryDirectory() as out:
        results = pretrain(config, data, out, DistEnv())
    return results["images_per_second"], results["data_wait_fraction"]


def bare_rate(config: PretrainConfig, repeats: int) -> float:
    """images/s of forward + backward of the same model on 2B ready tensors (B images a step)."""
    torch.manual_seed(0)
    model = build_model(model_config_for(config, SIZE)).train().to(memory_format=torch.channels_last)
    views = torch.randn(2 * config.batch_size, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)  # as the trainer

    bf16 = uses_bf16(config.precision, torch.device("cpu"))  # the trainer's precision

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, z = model(views)
        z.float().sum().backward()

    # an epoch's rate is a mean over its steps too; the run's timed epoch follows an untimed one of
    # as many steps, so the reference is warmed up as long (with one warm-up step, every paired round
    # read the trainer faster than this reference, by up to 11%)
    return config.batch_size / mean_seconds(step, repeats, warmup=repeats)


def data_path_rate(data: Path, config: PretrainConfig, repeats: int) -> float:
    """images/s of the trainer's data path alone: memmap read of a batch, then both views."""
    images = PreparedDataset(data).images("train")
    augment = BatchedAugment(augment_config_for(config, SIZE))
    batch = config.batch_size
    rng = np.random.default_rng(0)

    def fetch():
        index = np.sort(rng.choice(len(images), batch, replace=False))
        x = torch.from_numpy(images[index])
        params = augment.sample_params(2 * batch, SIZE, SIZE, seeded_generator(0, RandomStream.PRETRAIN_VIEWS, 0))
        return augment.apply(torch.cat([x, x]), params)

    return batch / best_seconds(fetch, repeats)


def run(batch_size: int, steps: int, stems: list[str], repeats: int, rounds: int, precision: str) -> list[tuple[str, str, str]]:
    rows = []
    with tempfile.TemporaryDirectory() as root:
        data = make_dataset(Path(root), batch_size * steps)
        for stem in stems:
            config = pretrain_config(batch_size, stem == "cifar", epochs=2, precision=precision)
            mode = "bf16 autocast" if uses_bf16(precision, torch.device("cpu")) else "fp32"
            label = f"ResNet-18, 32 px, {stem} stem, B={batch_size}, {mode}"
            start = time.perf_counter()
            e2e_rates, bare_rates, waits, peaks = [], [], [], []
            bare_rate(config, 2)  # warm-up: oneDNN's first calls of a shape are slow (the first round read 0.78x)
            for round_ in range(rounds):  # each round pairs a bare measurement with the run right after it
                bare_rates.append(bare_rate(config, steps))
                baseline = reset_peak_rss_kib()
                e2e, wait = end_to_end(data, config)
                peaks.append((peak_rss_kib() - baseline) / 1024)
                e2e_rates.append(e2e)
                waits.append(wait)
                print(f"round {round_ + 1}/{rounds}: end to end {e2e:,.1f}, bare {bare_rates[-1]:,.1f} images/s, "
                      f"ratio {e2e / bare_rates[-1]:.3f}", flush=True)
            ratios = [e / b for e, b in zip(e2e_rates, bare_rates)]
            e2e, bare, ratio = (statistics.median(v) for v in (e2e_rates, bare_rates, ratios))
            wait, peak_mib = statistics.median(waits), max(peaks)
            path = data_path_rate(data, config, repeats)
            of_rounds = f"median of {rounds} rounds"
            rows += [
                (f"end to end (pretrain), {label}", f"{e2e:,.1f} images/s",
                 f"2 epochs x {steps} steps, the second timed; {of_rounds} ({spread(e2e_rates)})"),
                (f"bare forward+backward, {label}", f"{bare:,.1f} images/s",
                 f"2B ready tensors, same model and threads; {of_rounds} ({spread(bare_rates)})"),
                (f"**step efficiency**, {label}", f"**{ratio:.3f}**",
                 f"target >= 0.95; median of the rounds' ratios ({spread(ratios, '.3f')})"),
                (f"data path alone (read + 2 views), {label}", f"{path:,.0f} images/s",
                 f"{path / e2e:,.0f}x what the trainer consumes; {bare / path:.1%} of the bare step if not overlapped"),
                (f"trainer's data wait, {label}", f"{100 * wait:.2f}% of step time", "made in a background thread; target < 2%"),
                (f"peak RSS of pretraining above the process before it, {label}", f"{peak_mib:,.0f} MiB",
                 f"{peak_mib / batch_size:.2f} MiB per image (both views, activations, model, optimizer)"),
            ]
            for row in rows[-6:]:
                print(row, f"({time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="steps per epoch (two epochs are run)")
    parser.add_argument("--stems", default="imagenet,cifar", help="comma-separated: imagenet, cifar")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of the data path (the fastest counts)")
    parser.add_argument("--rounds", type=int, default=3, help="paired bare + end-to-end rounds; medians are reported")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="pretrain.precision")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    rows = run(args.batch_size, args.steps, args.stems.split(","), args.repeats, args.rounds, args.precision)
    if not args.no_write:
        command = "python benchmarks/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results(f"{SECTION} (B={args.batch_size}, {args.stems} stem, precision {args.precision})", rows, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
