"""SimCLR pretraining: one explicit loop for one process, torchrun, or a multi-node PyTorchJob.

The run is a pure function of the settings and the step number, whatever the world size:

- epoch e visits the training images in the order ``randperm(N, seed=(seed, e))``, cut into
  global batches of B (the remainder is dropped); rank r takes rows [r*B/W, (r+1)*B/W);
- the augmentation parameters of the 2B views of step s are drawn for the whole global batch
  from a generator seeded with (seed, s), and each rank applies its own rows;
- both views go through the model in one forward pass, so (global) BatchNorm sees all 2B.

So a run on W processes computes the same losses as one process on the global batch, and a
resumed run (from the checkpoint's step) continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from simclr_core.method.augment import AugmentConfig, BatchedAugment, batched_test_transform
from simclr_core.checkpoint import CheckpointManager, save_checkpoint
from simclr_core.config import ConfigError, PretrainConfig, changed_method_settings
from simclr_core.data import PreparedDataset
from simclr_core.method.distributed import DistEnv, convert_to_global_bn
from simclr_core.features import extract
from simclr_core.knn import knn_accuracy
from simclr_core.method.loss import NTXentLoss
from simclr_core.method.models import SimCLRModel, uses_cifar_stem
from simclr_core.monitoring import TrainingMonitor
from simclr_core.method.random_streams import RandomStream, seeded_generator
from simclr_core.method.optim import LARS, lars_param_groups, scale_learning_rate, warmup_cosine_scheduler
from simclr_core.runlock import run_lock
from simclr_core.storage import Store, open_store, staged_output

__all__ = ["pretrain", "check_world_size", "model_config_for", "build_model", "TrainingError"]

log = logging.getLogger("simclr.pretrain")

MODEL_NAME = "model.pt"
LIVE_DIR = "live"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, for one); the message names the step."""


def model_config_for(config: PretrainConfig, image_size: int) -> dict[str, Any]:
    """The arguments of :meth:`SimCLRModel.build` for ``config``; stored with every checkpoint."""
    cifar_stem = uses_cifar_stem(image_size) if config.cifar_stem == "auto" else config.cifar_stem == "true"
    return {
        "arch": config.arch,
        "image_size": image_size,
        "cifar_stem": cifar_stem,
        "width_multiplier": config.width_multiplier,
        "proj_layers": config.proj_layers,
        "proj_hidden_dim": config.proj_hidden_dim or None,
        "proj_out_dim": config.proj_out_dim,
    }


def build_model(model_config: dict[str, Any]) -> SimCLRModel:
    try:
        return SimCLRModel.build(**model_config)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model settings {model_config}: {error}") from None


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether pretraining's forward pass runs under bf16 autocast on ``device``.

    ``precision`` is "bf16", "fp32" or "auto": bf16 on CUDA, fp32 on CPUs. On a CPU with native
    bf16 (AVX512-BF16 or AMX) identical bf16 runs of a tiny model reached a NaN loss in about
    half of the tries (2026-11-30, an Intel Xeon with AMX; the cause, below our code, is not
    isolated), so bf16 on a CPU is an explicit choice. Weights, optimizer state and NT-Xent's
    logits stay float32 either way.
    """
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda"


def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN runs bf16 convolutions natively (elsewhere it emulates them)."""
    cpu = torch.cpu
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # a torch build without these queries (not x86)
        return False


def _augment_config(config: PretrainConfig, image_size: int) -> AugmentConfig:
    strength = None if config.strength < 0 else config.strength
    blur = None if config.blur == "auto" else config.blur == "true"
    policy = AugmentConfig.for_image_size(image_size, strength=strength, blur=blur)
    return dataclasses.replace(policy, crop_scale=(config.crop_min_scale, 1.0))


@dataclasses.dataclass
class _Plan:
    """Sizes derived from the settings, the dataset and the world size."""

    num_images: int
    local_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float


def check_world_size(config: PretrainConfig, world_size: int, num_images: int | None = None) -> None:
    """The global batch must split evenly over the processes and fit in the training split.

    Called by the CLI before any rendezvous, so a bad launch fails at once instead of hanging.
    """
    if config.batch_size < world_size or config.batch_size % world_size:
        raise ConfigError(
            f"pretrain.batch_size={config.batch_size} must be a multiple of the number of processes ({world_size})"
        )
    if num_images is not None and num_images < config.batch_size:
        more = f"; {world_size} processes cannot each get an image" if world_size > num_images else ""
        raise ConfigError(f"pretrain.batch_size={config.batch_size} is larger than the training split ({num_images} images){more}")


def _plan(config: PretrainConfig, num_images: int, world_size: int) -> _Plan:
    check_world_size(config, world_size, num_images)
    steps_per_epoch = num_images // config.batch_size
    total = steps_per_epoch * config.epochs
    return _Plan(
        num_images=num_images,
        local_batch=config.batch_size // world_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=min(total, round(config.warmup_epochs * steps_per_epoch)),
        lr=scale_learning_rate(config.base_lr, config.batch_size, config.lr_scaling),
    )


def _local_indices(config: PretrainConfig, plan: _Plan, step: int, rank: int) -> np.ndarray:
    epoch, position = divmod(step, plan.steps_per_epoch)
    order = torch.randperm(plan.num_images, generator=seeded_generator(config.seed, RandomStream.PRETRAIN_ORDER, epoch)).numpy()
    global_batch = np.sort(order[position * config.batch_size : (position + 1) * config.batch_size])  # sorted: memmap reads in order
    return global_batch[rank * plan.local_batch : (rank + 1) * plan.local_batch]


class _Metrics:
    """DVCLive on rank 0: one point per epoch (loss, lr, images/s, kNN accuracy).

    ``history`` holds the epochs already done (a resumed run's, from its checkpoint): they are
    written again first, so ``live/`` is whole even where it was deleted since (``dvc repro``
    removes a stage's outputs before it reruns the stage) or never reached this machine.
    """

    def __init__(self, out_dir: Path, history: list[dict[str, float]], enabled: bool) -> None:
        self.live = None
        if enabled:
            from dvclive import Live

            try:
                self.live = Live(dir=str(out_dir / LIVE_DIR), resume=False, save_dvc_exp=False, dvcyaml=None)
            except Exception as error:  # dvclive 3.x fails inside a git repository without commits
                if "Empty git repo" in str(error):
                    raise ConfigError("the git repository around this DVC project has no commit yet; commit once, then rerun") from None
                raise
            for values in history:
                self.log_epoch(values)

    def log_epoch(self, values: dict[str, float]) -> None:
        if self.live is None:
            return
        for name, value in values.items():
            self.live.log_metric(name, value)
        self.live.next_step()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


def progress_bar(total_steps: int, initial_step: int, batch_size: int, enabled: bool = True, desc: str | None = None):
    """A bar counted in steps and shown in images (so its rate is images/s), with the ETA.

    On a terminal it redraws twice a second; in a log (DVC, a pod) it writes a line every 10 s.
    """
    from tqdm import tqdm

    return tqdm(
        total=total_steps, initial=initial_step, disable=not enabled, unit="img", unit_scale=batch_size, desc=desc,
        dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0, file=sys.stderr,
    )


def pretrain(config: PretrainConfig, data_dir: str | Path, out_dir: str | Path, env: DistEnv) -> dict[str, Any]:
    """Pretrain on ``data_dir``'s train split; write checkpoints, metrics and ``model.pt`` under ``out_dir``.

    ``out_dir`` is a local directory or a gs:// or s3:// URI. Checkpoints go there as they are written
    (see :class:`CheckpointManager`); the run resumes from the newest good one. The DVCLive
    metrics (``live/``) and ``model.pt`` are written locally and, for gs:// and s3://, uploaded at the end.
    Rank 0 holds the lock of a local ``out_dir`` throughout (see :mod:`simclr_core.runlock`),
    taken before anything there is cleaned up: a second run on it is refused with RunLocked.
    Returns the final epoch's metrics.
    """
    with run_lock(out_dir, enabled=env.is_main), open_store(out_dir) as store, staged_output(out_dir, upload=env.is_main) as local_out:
        return _pretrain(config, data_dir, store, local_out, env)


def _pretrain(config: PretrainConfig, data_dir: str | Path, store: Store, out_dir: Path, env: DistEnv) -> dict[str, Any]:
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    dataset = PreparedDataset(data_dir)
    train_images = dataset.images("train")
    plan = _plan(config, len(train_images), env.world_size)
    image_size = config.image_size or dataset.image_shape[-1]
    model_config = model_config_for(config, image_size)

    torch.manual_seed(config.seed)  # same initial weights on every rank
    model = convert_to_global_bn(build_model(model_config), env).to(env.device)
    use_cuda = env.device.type == "cuda"
    # channels_last pays on every device: cuDNN's NHWC kernels on GPUs, oneDNN's on CPUs
    # (ResNet-18 forward+backward 1.1x to 1.5x faster on this project's 2-core CPU; benchmarks/).
    model = model.to(memory_format=torch.channels_last)
    optimizer = LARS(lars_param_groups(model, config.weight_decay), lr=plan.lr, momentum=config.momentum)
    scheduler = warmup_cosine_scheduler(optimizer, plan.total_steps, plan.warmup_steps)

    step = 0
    history: list[dict[str, float]] = []  # each finished epoch's metrics, saved with every checkpoint
    # the current epoch's sum of step losses so far, saved with every checkpoint too: rank 0's own
    # (a collective at save time would keep rank 0 from saving once another rank is gone), so a
    # run of several processes resumed mid-epoch logs that epoch's loss with rank 0's share for
    # the steps before the resume; the weights are exact either way
    unfinished = {"loss_sum": 0.0, "steps": 0}
    checkpoints = CheckpointManager(store, keep_last=config.keep_checkpoints)
    state = _resumable_state(checkpoints, config, model_config, env)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        history = list(state.get("epoch_metrics", []))
        unfinished = dict(state.get("unfinished_epoch", unfinished))
        if env.is_main:
            log.info("resuming from %s at step %d of %d", store.uri(f"checkpoints/step-{step:08d}.pt"), step, plan.total_steps)
    train_model: nn.Module = model
    if env.is_distributed:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if use_cuda else None)

    augment = BatchedAugment(_augment_config(config, image_size))
    loss_fn = NTXentLoss(config.temperature, gather=True)
    bf16 = uses_bf16(config.precision, env.device)
    knn_data = _knn_data(dataset, config) if env.is_main else None
    metrics = _Metrics(out_dir, history, enabled=env.is_main)
    if env.is_main:
        log.info(
            "pretraining %s on %d images: %d epochs x %d steps, global batch %d on %d process(es), lr %.4g, device %s, %s",
            model_config["arch"], plan.num_images, config.epochs, plan.steps_per_epoch, config.batch_size,
            env.world_size, plan.lr, env.device, "bf16 autocast" if bf16 else "fp32",
        )

    def save(step_done: int, knn_accuracy: float | None, loss_sum: torch.Tensor, steps: int) -> None:
        if env.is_main:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step_done,
                "epoch_metrics": list(history),
                "unfinished_epoch": {"loss_sum": loss_sum.item(), "steps": steps},
                "model_config": model_config,
                "pretrain_config": dataclasses.asdict(config),
            }
            checkpoints.save(state, step_done, knn_accuracy)

    own_rows = torch.arange(plan.local_batch) + env.rank * plan.local_batch
    own_rows = torch.cat([own_rows, own_rows + config.batch_size])  # this rank's rows of the 2B global views

    def make_views(at_step: int) -> torch.Tensor:
        """(2 * local_batch, C, S, S) float views of this rank's images of step ``at_step``: a pure function of the step."""
        images = torch.from_numpy(train_images[_local_indices(config, plan, at_step, env.rank)])
        if use_cuda:
            images = images.pin_memory().to(env.device, non_blocking=True)
        params = augment.sample_params(2 * config.batch_size, *train_images.shape[-2:], seeded_generator(config.seed, RandomStream.PRETRAIN_VIEWS, at_step))
        views = augment.apply(torch.cat([images, images]), params.rows(own_rows).to(env.device))
        return views.contiguous(memory_format=torch.channels_last)

    results: dict[str, Any] = dict(history[-1]) if history else {}
    progress = progress_bar(plan.total_steps, step, config.batch_size, env.is_main)
    epoch_loss = torch.full((), unfinished["loss_sum"], device=env.device)  # this rank's sum of step losses
    epoch_steps, epoch_start, epoch_wait = int(unfinished["steps"]), time.perf_counter(), 0.0
    train_model.train()
    monitor = TrainingMonitor(env.rank, env.local_rank, config.metrics_port, config.metrics_pushgateway)
    batches = _Prefetcher(make_views, step, plan.total_steps, config.data_threads)
    try:
        while step < plan.total_steps:
            step_start = time.perf_counter()
            views, data_wait = batches.get(step)  # data_wait: seconds until this step's views were on the device
            with torch.autocast(device_type=env.device.type, dtype=torch.bfloat16, enabled=bf16):
                _, z = train_model(views)
            loss = loss_fn(z[: plan.local_batch], z[plan.local_batch :])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1

            loss_value = loss.item()
            if not math.isfinite(loss_value):
                newest = checkpoints.list()
                raise TrainingError(
                    f"loss is {loss_value} at step {step}; stopped without saving it. The latest checkpoint is still "
                    f"{store.uri(newest[0]['file']) if newest else 'none (no checkpoint yet)'}. "
                    "Lower pretrain.base_lr or raise pretrain.warmup_epochs, then rerun to resume from it"
                )
            epoch_loss += loss.detach()
            epoch_steps += 1
            epoch = (step - 1) // plan.steps_per_epoch + 1
            lr = optimizer.param_groups[0]["lr"]
            monitor.on_step(step, epoch, loss_value, lr, plan.local_batch, time.perf_counter() - step_start, data_wait)
            epoch_wait += data_wait
            progress.update(1)
            progress.set_postfix(epoch=f"{epoch}/{config.epochs}", loss=f"{loss_value:.4f}", lr=f"{lr:.4g}", refresh=False)
            end_of_epoch = step % plan.steps_per_epoch == 0
            if end_of_epoch:
                epoch_seconds = time.perf_counter() - epoch_start
                results = _end_epoch(
                    step // plan.steps_per_epoch, epoch_loss, epoch_steps, epoch_seconds,
                    plan, config, env, model, knn_data, image_size, optimizer,
                )
                results["data_wait_fraction"] = epoch_wait / max(epoch_seconds, 1e-9)  # this rank's
                history.append(dict(results))
                metrics.log_epoch(results)
                progress.write(_describe(results, config.epochs))
                epoch_loss.zero_()
                epoch_steps = 0
            if end_of_epoch or (config.checkpoint_every and step % config.checkpoint_every == 0):
                with monitor.saving_checkpoint(record=env.is_main):  # rank 0 writes checkpoints
                    save(step, results.get("knn_accuracy") if end_of_epoch else None, epoch_loss, epoch_steps)
            if end_of_epoch:  # an epoch's images/s counts its steps, not the kNN pass or the save after it
                monitor.on_epoch(results)  # after the save: what the Pushgateway shows is in a checkpoint
                epoch_start, epoch_wait = time.perf_counter(), 0.0
    finally:
        batches.close()
        progress.close()
        metrics.close()
        monitor.close()

    if env.is_main:
        save_checkpoint(
            {"model": model.state_dict(), "model_config": model_config, "pretrain_config": dataclasses.asdict(config), "step": step},
            out_dir / MODEL_NAME,
        )
    return results


def _resumable_state(
    checkpoints: CheckpointManager, config: PretrainConfig, model_config: dict[str, Any], env: DistEnv
) -> dict[str, Any] | None:
    """The newest good checkpoint if it continues this very run; None to start from step 0.

    A checkpoint written with other settings (say, another temperature after
    ``dvc exp run -S pretrain.temperature=0.2``) belongs to another run: it is not resumed,
    and the new run's checkpoints replace it.
    """
    found = checkpoints.load_latest(map_location=env.device)
    if found is None:
        return None
    state, meta = found
    changed = changed_method_settings(state.get("pretrain_config", {}), config)
    if changed or state.get("model_config") != model_config:
        if env.is_main:
            checkpoints.clear()  # the new run's checkpoints replace the other run's
            log.warning(
                "%s was written with other settings (%s); starting a new run from step 0",
                checkpoints.store.uri(meta["file"]), ", ".join(changed) or "model",
            )
        return None
    return state


def _knn_data(dataset: PreparedDataset, config: PretrainConfig):
    """(bank images, bank labels, query images, query labels) or None when the data has no labels."""
    if not dataset.has_split("val"):
        return None
    train_labels = dataset.labels("train")
    labelled = np.flatnonzero(train_labels >= 0)
    val_labels = dataset.labels("val")
    queries = np.flatnonzero(val_labels >= 0)
    if len(labelled) == 0 or len(queries) == 0:
        return None
    if config.knn_bank_size:
        labelled = labelled[np.linspace(0, len(labelled) - 1, min(config.knn_bank_size, len(labelled))).astype(int)]
    return (
        dataset.images("train")[labelled], torch.from_numpy(train_labels[labelled]),
        dataset.images("val")[queries], torch.from_numpy(val_labels[queries]), dataset.num_classes,
    )


def _end_epoch(epoch, epoch_loss, epoch_steps, seconds, plan, config, env, model, knn_data, image_size, optimizer) -> dict[str, float]:
    if env.is_distributed:
        torch.distributed.all_reduce(epoch_loss)
        epoch_loss = epoch_loss / env.world_size
    results = {
        "epoch": epoch,
        "loss": epoch_loss.item() / max(1, epoch_steps),
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_second": epoch_steps * config.batch_size / max(seconds, 1e-9),
    }
    if knn_data is not None:
        bank_x, bank_y, query_x, query_y, num_classes = knn_data
        was_training = model.training
        model.eval()
        test_transform = lambda x: batched_test_transform(x, image_size)  # noqa: E731
        bank = extract(model.encoder, bank_x, test_transform, env.device)
        queries = extract(model.encoder, query_x, test_transform, env.device)
        model.train(was_training)
        results["knn_accuracy"] = knn_accuracy(bank, bank_y, queries, query_y, num_classes, config.knn_k, config.knn_temperature)
    return results


class _Prefetcher:
    """Makes the next step's views in a background thread while the current step trains.

    ``make(step)`` must be a pure function of the step (the trainer's views are), so the
    order of work does not change what is computed. :meth:`get` returns the views and the
    seconds the loop waited for them (the data wait; near zero when the data path keeps up).

    The background thread runs torch ops on one thread (``data_threads``): left at torch's
    default it starts an OpenMP team of its own, and two teams on the same cores stall each
    other's barriers (on 2 cores the step lost 11% to a data path that costs 5% of it;
    benchmarks/bench_step.py). The training thread keeps its own count.
    """

    def __init__(self, make, first_step: int, total_steps: int, data_threads: int = 1) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._make, self._total = make, total_steps
        self._train_threads = torch.get_num_threads()
        # OpenMP keeps a thread count per thread, but torch also keeps one process-wide default:
        # pin the training thread's own count before the data thread changes the default.
        torch.set_num_threads(self._train_threads)
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="simclr-data", initializer=torch.set_num_threads, initargs=(data_threads,)
        )
        self._pending = self._submit(first_step)

    def _submit(self, step: int):
        return self._pool.submit(self._make, step) if step < self._total else None

    def get(self, step: int) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        views = self._pending.result()
        waited = time.perf_counter() - start
        self._pending = self._submit(step + 1)
        return views, waited

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self._train_threads)  # the process-wide default back as it was


def _describe(results: dict[str, float], epochs: int) -> str:
    text = (
        f"epoch {results['epoch']}/{epochs}: loss {results['loss']:.4f}, lr {results['lr']:.4g}, "
        f"{results['images_per_second']:.0f} images/s"
    )
    if "knn_accuracy" in results:
        text += f", kNN accuracy {100 * results['knn_accuracy']:.2f}%"
    return text
