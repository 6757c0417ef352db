"""The pretraining step on a GPU against the hardware's limit; writes a GPU section to benchmarks/RESULTS.md.

For ResNet-18 at 32 px (CIFAR stem, B=512) and ResNet-50 at 224 px (B=256, blur on), issue 16's rows:

- **end to end**: images/s of `simclr pretrain`'s loop itself (:class:`Trainer`: a prepared
  dataset read from disk, views made on the device in the prefetch thread, both views in one
  pass, NT-Xent, LARS, the schedule, the progress bar), its second epoch (the first pays the
  warm-up); DVCLive left out (not installed on the device machine; it writes once an epoch);
- **bare**: images/s of forward + backward of the same model on 2B ready views (channels_last,
  bf16 autocast where pretraining uses it), ``--warmup`` steps then ``--steps`` timed ones,
  synchronised; **efficiency** = end to end / bare (target >= 0.9);
- **NT-Xent + LARS share**: the bare step plus the loss, the LARS step and the schedule, timed the
  same way; its extra time as a share of that step (target < 5%);
- **data wait**: the trainer's own share of the epoch spent waiting for views (target < 1%);
- **host syncs per step** (CUDA): what torch's sync debug mode reports in one more epoch;
- **peak memory**: of the end-to-end run (GPU: max allocated; CPU: RSS above the process before).

Usage (PYTHONPATH = the repository; imports neither dvclive, kfp nor google-cloud-storage):

    PYTHONPATH=. python3 benchmarks/bench_gpu.py                        # on a GPU, about 3 minutes
    PYTHONPATH=. python3 benchmarks/bench_gpu.py --compile default --rounds 1   # the same with torch.compile
    python benchmarks/bench_gpu.py --tiny --results /tmp/RESULTS.md     # CPU, tiny models: every row, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, peak_rss_kib, reset_peak_rss_kib, spread, write_results  # benchmarks/ is the script's directory
from simclr_core.config import COMPILE_MODES, PrepareConfig, PretrainConfig
from simclr_core.data import prepare
from simclr_core.launch import init_distributed
from simclr_core.method.distributed import DistEnv
from simclr_core.method.loss import NTXentLoss
from simclr_core.pretrain.model_setup import compiled, model_config_for, optimizer_for, training_model, uses_bf16
from simclr_core.pretrain.observers import EpochLog, Observer, ProgressBar
from simclr_core.pretrain.plan import make_plan
from simclr_core.pretrain.trainer import Trainer
from simclr_core.storage import open_store

SECTION = "bench_gpu"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One model and batch to measure; ``steps_per_epoch`` sizes the generated dataset."""

    label: str
    arch: str
    size: int  # image side in pixels, stored and trained
    batch: int  # B images a step (2B views)
    cifar_stem: bool
    blur: bool
    width: float = 1.0
    steps_per_epoch: int = 20

    def config(self, epochs: int, compile_mode: str = "none") -> PretrainConfig:
        return PretrainConfig(
            arch=self.arch, width_multiplier=self.width, cifar_stem=str(self.cifar_stem).lower(), blur=str(self.blur).lower(),
            batch_size=self.batch, epochs=epochs, warmup_epochs=0.0, checkpoint_every=0, keep_checkpoints=1,
            base_lr=2.0 * 256 / 512, temperature=0.5,  # lr 2.0 at B=512, as DESIGN.md's measured CIFAR-10 run
            compile=compile_mode,
        )


FULL = (
    Setting("ResNet-18, 32 px, CIFAR stem, B=512", "resnet18", 32, 512, cifar_stem=True, blur=False, steps_per_epoch=20),
    Setting("ResNet-50, 224 px, B=256, blur on", "resnet50", 224, 256, cifar_stem=False, blur=True, steps_per_epoch=12),
)
TINY = (  # the same rows, small enough for seconds on a CPU (CI)
    Setting("tiny ResNet-18 (width 1/8), 16 px, CIFAR stem, B=8", "resnet18", 16, 8, True, False, width=0.125, steps_per_epoch=2),
    Setting("tiny ResNet-50 (width 1/8), 32 px, B=4, blur on", "resnet50", 32, 4, False, True, width=0.125, steps_per_epoch=2),
)


def make_dataset(root: Path, setting: Setting) -> Path:
    """A prepared, unlabelled dataset (no kNN pass) of B x steps_per_epoch random images at the setting's side."""
    from PIL import Image

    folder = root / f"images-{setting.size}"
    folder.mkdir(parents=True)
    count = setting.batch * setting.steps_per_epoch

    def write(index: int) -> None:
        pixels = np.random.default_rng(index).integers(0, 256, (setting.size, setting.size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:06d}.png", compress_level=1)  # fast: PIL releases the GIL

    with ThreadPoolExecutor() as pool:
        list(pool.map(write, range(count)))
    out = root / f"prepared-{setting.size}"
    prepare(PrepareConfig(source="imagefolder", source_root=str(folder), val_fraction=0.0, label_fractions=[0.5]), out)
    return out


class LoopTrainer(Trainer):
    """`simclr pretrain`'s loop with the observers the device machine can run (no DVCLive)."""

    def _make_observers(self) -> list[Observer]:
        bar = ProgressBar(self.plan.total_steps, self.step, self.config.batch_size, self.config.epochs, enabled=True)
        return [bar, EpochLog(self.config.epochs)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def end_to_end(data: Path, config: PretrainConfig, env: DistEnv, trainer_cls: type[Trainer] = LoopTrainer) -> tuple[float, float, float]:
    """(images/s, data-wait share, peak memory in MiB) of the last epoch of the trainer's loop."""
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    baseline = reset_peak_rss_kib()
    with tempfile.TemporaryDirectory() as out, open_store(out) as store:
        results = trainer_cls(config, data, store, Path(out), env).run()
    if env.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(env.device) / 2**20
    else:
        peak = (peak_rss_kib() - baseline) / 1024
    return results["images_per_second"], results["data_wait_fraction"], peak


class _SyncCountingTrainer(LoopTrainer):
    """The loop with torch's sync debug mode on for every step but an epoch's last (whose end
    saves a checkpoint, which copies the weights to the host). The mode is process-wide: the
    prefetch thread's syncs during those steps count too."""

    counted_steps = 0
    # steps not counted first: under torch.compile the first steps compile (and, for reduce-overhead,
    # warm up and record CUDA graphs), which syncs as a step never does afterwards
    uncounted_first = 0

    def _step_and_observe(self, *args) -> None:
        if (self.step + 1) % self.plan.steps_per_epoch and self.step >= self.uncounted_first:
            type(self).counted_steps += 1
            torch.cuda.set_sync_debug_mode("warn")
        try:
            super()._step_and_observe(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def syncs_per_step(data: Path, setting: Setting, env: DistEnv, args: argparse.Namespace) -> float | None:
    """Host syncs per step that torch's sync debug mode reports in a one-epoch run; None off CUDA."""
    if env.device.type != "cuda":
        return None
    _SyncCountingTrainer.counted_steps = 0
    _SyncCountingTrainer.uncounted_first = 0 if args.compile == "none" else 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        end_to_end(data, setting.config(epochs=1, compile_mode=args.compile), env, _SyncCountingTrainer)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return len(syncs) / max(1, _SyncCountingTrainer.counted_steps)


def step_seconds(config: PretrainConfig, setting: Setting, env: DistEnv, warmup: int, steps: int, full: bool) -> float:
    """Mean seconds of one step on 2B ready views: forward + backward (``full``: + NT-Xent, LARS, schedule)."""
    model = training_model(model_config_for(config, setting.size), config.seed, env)  # the trainer's model, on the device
    views = torch.randn(2 * setting.batch, 3, setting.size, setting.size, device=env.device)
    views = views.contiguous(memory_format=torch.channels_last)
    bf16 = uses_bf16(config.precision, env.device)
    optimizer, scheduler = optimizer_for(model, config, make_plan(config, setting.batch * setting.steps_per_epoch, 1))
    loss_fn = NTXentLoss(config.temperature, gather=True)
    run_model = compiled(model, config.compile, env.device)  # as the trainer runs it

    def step() -> None:
        if config.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device_type=env.device.type, dtype=torch.bfloat16, enabled=bf16):
            _, z = run_model(views)
        if not full:
            model.zero_grad(set_to_none=True)
            z.float().sum().backward()
            return
        loss = loss_fn(z[: setting.batch], z[setting.batch :])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    for _ in range(warmup):
        step()
    synchronize(env.device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(env.device)
    return (time.perf_counter() - start) / steps


@dataclasses.dataclass
class Rounds:
    """Each round's figures of one setting."""

    e2e: list[float] = dataclasses.field(default_factory=list)  # images/s
    bare: list[float] = dataclasses.field(default_factory=list)  # images/s
    full: list[float] = dataclasses.field(default_factory=list)  # images/s with NT-Xent + LARS
    waits: list[float] = dataclasses.field(default_factory=list)  # data-wait shares
    peaks: list[float] = dataclasses.field(default_factory=list)  # MiB


def measure(setting: Setting, data: Path, env: DistEnv, args: argparse.Namespace) -> Rounds:
    """``args.rounds`` rounds of bare, bare + NT-Xent + LARS, then the trainer's loop (paired, as bench_step.py)."""
    config = setting.config(epochs=2, compile_mode=args.compile)
    rounds = Rounds()
    for number in range(args.rounds):
        rounds.bare.append(setting.batch / step_seconds(config, setting, env, args.warmup, args.steps, full=False))
        rounds.full.append(setting.batch / step_seconds(config, setting, env, args.warmup, args.steps, full=True))
        e2e, wait, peak = end_to_end(data, config, env)
        rounds.e2e.append(e2e)
        rounds.waits.append(wait)
        rounds.peaks.append(peak)
        print(f"{setting.label}, round {number + 1}/{args.rounds}: end to end {e2e:,.0f}, bare {rounds.bare[-1]:,.0f}, "
              f"with NT-Xent + LARS {rounds.full[-1]:,.0f} images/s, data wait {wait:.2%}", flush=True)
    return rounds


def rows_of(setting: Setting, rounds: Rounds, syncs: float | None, env: DistEnv, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """The section's rows of one setting: medians over the rounds, their ranges in the notes."""
    e2e, bare, full = (statistics.median(values) for values in (rounds.e2e, rounds.bare, rounds.full))
    ratios = [a / b for a, b in zip(rounds.e2e, rounds.bare)]
    shares = [1 - f / b for f, b in zip(rounds.full, rounds.bare)]  # (t_full - t_bare) / t_full
    mode = ("bf16 autocast" if uses_bf16("auto", env.device) else "fp32") + ("" if args.compile == "none" else f", torch.compile {args.compile}")
    label, of = f"{setting.label}, {mode}", f"median of {args.rounds} round(s)"
    memory = "max allocated on the GPU" if env.device.type == "cuda" else "RSS above the process before it"
    synced = "n/a (CPU ops run as they are called)" if syncs is None else f"{syncs:.1f}"
    return [
        (f"end to end (pretrain loop), {label}", f"{e2e:,.0f} images/s",
         f"2 epochs x {setting.steps_per_epoch} steps, the second timed; {of} ({spread(rounds.e2e, ',.0f')})"),
        (f"bare forward+backward, {label}", f"{bare:,.0f} images/s",
         f"2B ready views, channels_last; {args.warmup} warm-up + {args.steps} timed steps, synchronised; {of} ({spread(rounds.bare, ',.0f')})"),
        (f"**efficiency** (end to end / bare), {label}", f"**{statistics.median(ratios):.3f}**",
         f"target >= 0.9; median of the rounds' ratios ({spread(ratios, '.3f')})"),
        (f"bare + NT-Xent + LARS step, {label}", f"{full:,.0f} images/s", f"the same steps plus the loss, LARS and the schedule; {of}"),
        (f"NT-Xent + LARS share of the step, {label}", f"{100 * statistics.median(shares):.1f}%",
         f"target < 5%; {100 * (bare / full - 1):.1f}% of the bare step ({spread([100 * s for s in shares], '.1f')} %)"),
        (f"trainer's data wait, {label}", f"{100 * statistics.median(rounds.waits):.2f}% of step time",
         f"target < 1%; views made on the device in the prefetch thread ({spread([100 * w for w in rounds.waits], '.2f')} %)"),
        (f"host syncs per step, {label}", synced, "torch.cuda sync debug mode over one more epoch, every thread (target 0)"),
        (f"peak memory, {label}", f"{max(rounds.peaks):,.0f} MiB", f"{memory}, during the end-to-end run"),
    ]


def run(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    env = init_distributed(device=args.device)
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as root:
        for setting in TINY if args.tiny else FULL:
            start = time.perf_counter()
            data = make_dataset(Path(root), setting)
            print(f"{setting.label}: dataset ready in {time.perf_counter() - start:.0f} s", flush=True)
            rounds = measure(setting, data, env, args)
            rows += rows_of(setting, rounds, syncs_per_step(data, setting, env, args), env, args)
            for row in rows[-8:]:
                print(row, flush=True)
            print(f"{setting.label}: {time.perf_counter() - start:.0f} s in all", flush=True)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches, for a CPU (CI)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--rounds", type=int, default=None, help="paired rounds, medians reported (default 3; 1 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed bare steps (default 10; 1 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed bare steps (default 40; 2 with --tiny)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="none",
                        help="pretrain.compile for the loop and the bare steps alike (default none; compiling takes a minute or more a model)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results file to write the section into")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    for name, full, tiny in (("rounds", 3, 1), ("warmup", 10, 1), ("steps", 40, 2)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    if not args.no_write:
        command = "python3 benchmarks/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu"
        compiled = "" if args.compile == "none" else f", torch.compile {args.compile}"  # a section of its own
        write_results(f"{SECTION} ({device}{', tiny' if args.tiny else ''}{compiled})", rows, command.strip(), results=args.results,
                      notes=f"torch {torch.__version__}; settings: {', '.join(s.label for s in (TINY if args.tiny else FULL))}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
