"""Weak scaling of pretraining over processes; writes its figures to benchmarks/RESULTS.md.

Runs the real `simclr pretrain` under torchrun with 1, 2, ... processes, each with the same
local batch and one thread (gloo on CPU; on a GPU machine, `--device cuda` gives one GPU per
process and NCCL), and reads the last epoch's images/s from the run's DVCLive metrics. On CPU
the W processes are pinned to W cores (taskset), so each process has one core for its
compute thread and its data thread, with 1 process as with 2.
Weak-scaling efficiency at W processes = rate(W) / (W * rate(1)). Issue 6 target: >= 0.9 for
2 CPU processes. Everything the trainer does across processes is in the figure: the NT-Xent
gather, global BatchNorm's statistics, DDP's gradient all-reduce.

Usage: python benchmarks/bench_scaling.py [--procs 1,2] [--local-batch 64] [--repeats 3] [--device cpu] [--precision auto] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_step import make_dataset  # benchmarks/ is the script's directory
from common import spread, write_results

SECTION = "bench_scaling"


def rate(data: Path, procs: int, local_batch: int, steps: int, device: str, cifar_stem: bool, precision: str) -> float:
    """Last-epoch images/s (global) of `simclr pretrain` on ``procs`` processes."""
    with tempfile.TemporaryDirectory() as out:
        pin = ["taskset", "-c", f"0-{procs - 1}"] if device == "cpu" and shutil.which("taskset") else []
        command = [
            *pin, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
            "-m", "simclr_core", "pretrain", "--data", str(data), "--out", out, "--device", device,
            "--arch", "resnet18", "--width-multiplier", "1.0", "--cifar-stem", "true" if cifar_stem else "false",
            "--batch-size", str(local_batch * procs), "--epochs", "2", "--warmup-epochs", "0",
            "--checkpoint-every", "0", "--num-threads", "1", "--precision", precision,
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(Path(out, "live", "metrics.json").read_text())["images_per_second"]


def run(
    procs: list[int], local_batch: int, steps: int, device: str, cifar_stem: bool, repeats: int, precision: str
) -> list[tuple[str, str, str]]:
    """Median rate per process count over ``repeats`` rounds; each round runs every count once,
    so a slow spell of a shared machine lands on all counts rather than on one."""
    with tempfile.TemporaryDirectory() as root:
        data = make_dataset(Path(root), local_batch * max(procs) * steps)
        samples: dict[int, list[float]] = {count: [] for count in procs}
        for round_ in range(repeats):
            for count in procs:
                samples[count].append(rate(data, count, local_batch, steps, device, cifar_stem, precision))
                print(f"round {round_ + 1}/{repeats}: {count} process(es) {samples[count][-1]:,.1f} images/s", flush=True)
    medians = {count: statistics.median(values) for count, values in samples.items()}
    reference = medians[procs[0]] / procs[0]
    rows = []
    for count in procs:
        efficiency = medians[count] / (count * reference)
        rows.append((
            f"{count} process(es) x local batch {local_batch}, ResNet-18 32 px ({'CIFAR' if cifar_stem else 'ImageNet'} stem), {device}, precision {precision}",
            f"{medians[count]:,.1f} images/s",
            f"weak-scaling efficiency {efficiency:.3f}" + (" (target >= 0.9)" if count > 1 and device == "cpu" else "")
            + f"; median of {repeats} ({spread(samples[count])})",
        ))
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", default="1,2", help="comma-separated process counts; the first is the reference")
    parser.add_argument("--local-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="steps per epoch at the largest process count")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cifar-stem", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median rate of each count is reported")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="pretrain.precision")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    rows = run([int(p) for p in args.procs.split(",")], args.local_batch, args.steps, args.device, args.cifar_stem, args.repeats, args.precision)
    if not args.no_write:
        write_results(f"{SECTION} ({args.device})", rows, "python benchmarks/bench_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
