"""Weak scaling of pretraining over processes; writes its figures to benchmarks/RESULTS.md.

Runs the real `simclr pretrain` under torchrun with 1, 2, ... processes, each with the same
local batch and one thread (gloo on CPU; on a GPU machine, `--device cuda` gives one GPU per
process and NCCL), and reads the last epoch's images/s from the run's DVCLive metrics. On CPU
the W processes are pinned to W cores (taskset), so each process has one core for its
compute thread and its data thread, with 1 process as with 2.
Weak-scaling efficiency at W processes = rate(W) / (W * rate(1)). Issue 6 target: >= 0.9 for
2 CPU processes. Everything the trainer does across processes is in the figure: the NT-Xent
gather, global BatchNorm's statistics, DDP's gradient all-reduce. On CPU the script also runs
W independent 1-process jobs at once, one per core: what the machine gives W processes with
no communication at all, so the gap between the two figures is what distribution costs.

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


def _pretrain_command(data: Path, out: str, procs: int, cores: str | None, local_batch: int, device: str, cifar_stem: bool, precision: str) -> list[str]:
    """`simclr pretrain` under torchrun on ``procs`` processes, pinned to ``cores`` when given."""
    pin = ["taskset", "-c", cores] if cores is not None and shutil.which("taskset") else []
    return [
        *pin, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
        "-m", "simclr_core", "pretrain", "--data", str(data), "--out", out, "--device", device,
        "--arch", "resnet18", "--width-multiplier", "1.0", "--cifar-stem", "true" if cifar_stem else "false",
        "--batch-size", str(local_batch * procs), "--epochs", "2", "--warmup-epochs", "0",
        "--checkpoint-every", "0", "--num-threads", "1", "--precision", precision,
    ]


def _last_epoch_rate(out: str) -> float:
    return json.loads(Path(out, "live", "metrics.json").read_text())["images_per_second"]


def rate(data: Path, procs: int, local_batch: int, device: str, cifar_stem: bool, precision: str) -> float:
    """Last-epoch images/s (global) of one `simclr pretrain` job on ``procs`` processes."""
    with tempfile.TemporaryDirectory() as out:
        cores = f"0-{procs - 1}" if device == "cpu" else None
        command = _pretrain_command(data, out, procs, cores, local_batch, device, cifar_stem, precision)
        subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return _last_epoch_rate(out)


def side_by_side_rate(data: Path, procs: int, local_batch: int, cifar_stem: bool, precision: str) -> float:
    """Summed images/s of ``procs`` independent 1-process jobs run at once, job k on core k.

    Nothing is communicated, so this is what the machine itself allows ``procs`` processes
    (shared memory bandwidth and caches, the host's scheduling of the VM's cores): the ceiling
    of the distributed job's weak scaling here.
    """
    with tempfile.TemporaryDirectory() as root:
        outs = [str(Path(root, f"job{core}")) for core in range(procs)]
        jobs = []
        for core, out in enumerate(outs):
            command = _pretrain_command(data, out, 1, str(core), local_batch, "cpu", cifar_stem, precision)
            env = dict(os.environ, OMP_NUM_THREADS="1")
            jobs.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for job in jobs:
            if job.wait() != 0:
                raise RuntimeError(f"side-by-side job failed with exit code {job.returncode}: {' '.join(job.args)}")
        return sum(_last_epoch_rate(out) for out in outs)


def run(
    procs: list[int], local_batch: int, steps: int, device: str, cifar_stem: bool, repeats: int, precision: str
) -> list[tuple[str, str, str]]:
    """Median rate per process count over ``repeats`` rounds; each round runs every count once,
    so a slow spell of a shared machine lands on all counts rather than on one. On CPU, each
    count above 1 also runs as that many independent jobs side by side: the machine's ceiling."""
    side_by_side = [count for count in procs if count > 1] if device == "cpu" else []
    with tempfile.TemporaryDirectory() as root:
        data = make_dataset(Path(root), local_batch * max(procs) * steps)
        samples: dict[int, list[float]] = {count: [] for count in procs}
        ceilings: dict[int, list[float]] = {count: [] for count in side_by_side}
        for round_ in range(repeats):
            for count in procs:
                samples[count].append(rate(data, count, local_batch, device, cifar_stem, precision))
                print(f"round {round_ + 1}/{repeats}: {count} process(es) {samples[count][-1]:,.1f} images/s", flush=True)
            for count in side_by_side:
                ceilings[count].append(side_by_side_rate(data, count, local_batch, cifar_stem, precision))
                print(f"round {round_ + 1}/{repeats}: {count} independent jobs {ceilings[count][-1]:,.1f} images/s", flush=True)
    reference = statistics.median(samples[procs[0]]) / procs[0]
    model = f"ResNet-18 32 px ({'CIFAR' if cifar_stem else 'ImageNet'} stem), {device}, precision {precision}"
    rows = []
    for count in procs:
        median = statistics.median(samples[count])
        note = f"weak-scaling efficiency {median / (count * reference):.3f}" + (" (target >= 0.9)" if count > 1 and device == "cpu" else "")
        if count in ceilings:
            note += f"; {median / statistics.median(ceilings[count]):.3f} of the side-by-side ceiling below"
        rows.append((f"{count} process(es) x local batch {local_batch}, {model}", f"{median:,.1f} images/s", note + f"; median of {repeats} ({spread(samples[count])})"))
        print(rows[-1], flush=True)
    for count in side_by_side:
        median = statistics.median(ceilings[count])
        rows.append((
            f"{count} independent 1-process jobs side by side (one core each, nothing shared), local batch {local_batch}, {model}",
            f"{median:,.1f} images/s",
            f"the machine's ceiling for {count} processes: {median / (count * reference):.3f} of {count} x the 1-process rate; median of {repeats} ({spread(ceilings[count])})",
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
