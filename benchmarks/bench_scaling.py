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
no communication at all, so the gap between the two figures is what distribution costs; and
it times the collectives one distributed step makes (global BN's per layer, the NT-Xent
gather's, DDP's gradient all-reduce) on their own, to put a number on that cost.

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


def _pinned(cores: str | None) -> list[str]:
    """The command prefix that pins a process tree to ``cores`` (none without taskset or cores)."""
    return ["taskset", "-c", cores] if cores is not None and shutil.which("taskset") else []


def _pretrain_command(data: Path, out: str, procs: int, cores: str | None, local_batch: int, device: str, cifar_stem: bool, precision: str) -> list[str]:
    """`simclr pretrain` under torchrun on ``procs`` processes, pinned to ``cores`` when given."""
    return [
        *_pinned(cores), sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
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


def _collectives_worker(out: str) -> None:
    """torchrun worker: the median time of one step's kinds of collective, written by rank 0 to ``out`` (JSON)."""
    import time

    import torch
    import torch.distributed as dist

    from simclr_core.method.models import SimCLRModel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = SimCLRModel.build("resnet18", image_size=32, cifar_stem=False)
    bn_layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    widest = max(m.num_features for m in bn_layers)
    gradient_numel = sum(p.numel() for p in model.parameters())

    def median_seconds(collective, repeats: int) -> float:
        for _ in range(3):
            collective()
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            collective()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    sums = torch.randn(2 * widest)  # a BN layer's backward all_reduce: sum(dy), sum(dy * xhat)
    gradients = torch.randn(gradient_numel)
    result = {
        "bn_layers": len(bn_layers),
        "small_all_reduce_s": median_seconds(lambda: dist.all_reduce(sums), 200),
        "small_bytes": sums.numel() * 4,
        "gradient_all_reduce_s": median_seconds(lambda: dist.all_reduce(gradients), 5),
        "gradient_bytes": gradients.numel() * 4,
    }
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def collective_costs(procs: int, local_batch: int, one_process_rate: float) -> list[tuple[str, str, str]]:
    """Rows: one distributed step's collectives timed alone on ``procs`` gloo processes, against
    the 1-process step time (``local_batch`` / ``one_process_rate``)."""
    with tempfile.TemporaryDirectory() as root:
        out = Path(root, "collectives.json")
        command = [
            *_pinned(f"0-{procs - 1}"), sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(procs), __file__, "--collectives-worker", str(out),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        costs = json.loads(out.read_text())
    small_ms, gradient_ms = 1000 * costs["small_all_reduce_s"], 1000 * costs["gradient_all_reduce_s"]
    # forward: one all_gather per BN layer; backward: one all_reduce per BN layer; the loss: the
    # gather forward and its all_reduce backward; DDP: the gradients, in buckets, once
    small_per_step = 2 * costs["bn_layers"] + 2
    per_step_ms = small_per_step * small_ms + gradient_ms
    step_ms = 1000 * local_batch / one_process_rate
    return [
        (f"gloo all_reduce, {procs} processes, {costs['small_bytes'] / 1024:.0f} KiB (a BN layer's statistics)", f"{small_ms:.2f} ms",
         "median of 200, nothing else running; the latency every global-BN layer pays twice a step"),
        (f"gloo all_reduce, {procs} processes, {costs['gradient_bytes'] / 2**20:.0f} MiB (ResNet-18 + head gradients)", f"{gradient_ms:.1f} ms",
         f"median of 5 ({costs['gradient_bytes'] / 1e9 / costs['gradient_all_reduce_s']:.2f} GB/s)"),
        (f"one step's collectives, timed alone, local batch {local_batch}", f"{per_step_ms:.0f} ms",
         f"{small_per_step} small ({costs['bn_layers']} BN layers x 2, the gather x 2) + the gradients: "
         f"{per_step_ms / step_ms:.1%} of the 1-process step ({step_ms:,.0f} ms), before any wait for the slower rank"),
    ]


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
    if side_by_side:
        rows += collective_costs(max(side_by_side), local_batch, reference)
        print(*rows[-3:], sep="\n", flush=True)
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
    parser.add_argument("--collectives-worker", metavar="OUT", help=argparse.SUPPRESS)  # internal: the torchrun worker
    args = parser.parse_args(argv)
    if args.collectives_worker:
        _collectives_worker(args.collectives_worker)
        return 0
    rows = run([int(p) for p in args.procs.split(",")], args.local_batch, args.steps, args.device, args.cifar_stem, args.repeats, args.precision)
    if not args.no_write:
        write_results(f"{SECTION} ({args.device})", rows, "python benchmarks/bench_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
