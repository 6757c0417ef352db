"""The pretraining loop as named steps: resume, make the views, train a step, end an epoch, save."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simclr_core.checkpoint import CheckpointManager, save_checkpoint
from simclr_core.config import PretrainConfig, changed_method_settings
from simclr_core.data import PreparedDataset
from simclr_core.method.augment import BatchedAugment
from simclr_core.method.distributed import DistEnv
from simclr_core.method.loss import NTXentLoss
from simclr_core.method.random_streams import RandomStream, seeded_generator
from simclr_core.pretrain.knn_probe import KnnProbe
from simclr_core.pretrain.model_setup import augment_config_for, compiled, model_config_for, optimizer_for, training_model, uses_bf16
from simclr_core.pretrain.observers import DvcLiveMetrics, EpochLog, Observer, ProgressBar, PrometheusMetrics, StepDone
from simclr_core.pretrain.plan import make_plan
from simclr_core.pretrain.prefetch import Prefetcher
from simclr_core.runlock import run_lock
from simclr_core.storage import Store, open_store, staged_output
from simclr_core.errors import TrainingError

__all__ = ["pretrain", "Trainer", "TrainingError", "MODEL_NAME", "finite_check_every"]

log = logging.getLogger("simclr.pretrain")

MODEL_NAME = "model.pt"


# Steps between reads of the losses on an accelerator. Reading a loss (``.item()``) makes the host
# wait until the device has run every kernel queued so far; read every step, the host then queues
# the next step's kernels while the device sits idle. The progress bar and the NaN stop lag by
# this many steps (on a GPU, about a second for a small model).
ACCELERATOR_CHECK_STEPS = 25


def finite_check_every(device: torch.device) -> int:
    """Steps between the checks that the losses are finite (and the observers' step calls) on ``device``.

    1 on a CPU: its ops have run by the time they return, so reading a loss costs no wait.
    Whatever the interval, a check comes before every checkpoint and at the last step, so a
    non-finite step is never saved; the interval changes nothing the run computes.
    """
    return 1 if device.type == "cpu" else ACCELERATOR_CHECK_STEPS


@dataclasses.dataclass(frozen=True)
class _UncheckedStep:
    """A step done whose loss the host has not read yet."""

    step: int  # steps done, this one included
    loss: torch.Tensor  # () on the training device, detached
    lr: float  # learning rate for the next step
    data_wait: float  # seconds the loop waited for the step's views
    start: float  # perf_counter() when the step began


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
        return Trainer(config, data_dir, store, local_out, env).run()


@dataclasses.dataclass
class _EpochTally:
    """This rank's running figures of the current epoch."""

    loss_sum: torch.Tensor  # () on the training device: the sum of this rank's step losses
    steps: int  # steps summed in loss_sum
    start: float = dataclasses.field(default_factory=time.perf_counter)  # when the epoch's clock started
    data_wait: float = 0.0  # seconds the loop waited for views since then

    def add(self, loss: torch.Tensor, data_wait: float) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.data_wait += data_wait

    def clear_sums(self) -> None:
        self.loss_sum.zero_()
        self.steps = 0

    def restart_clock(self) -> None:
        self.start, self.data_wait = time.perf_counter(), 0.0


class Trainer:
    """This process's part of a pretraining run; :meth:`run` trains it to its last step.

    The run is a pure function of the settings and the step number, whatever the world size:
    the images of each step come from the :class:`~simclr_core.pretrain.plan.Plan`; the
    augmentation parameters of the step's 2B views are drawn for the whole global batch from
    :attr:`RandomStream.PRETRAIN_VIEWS` at the step, and each rank applies its own rows; both
    views go through the model in one forward pass, so (global) BatchNorm sees all 2B. So a run
    on W processes computes the same losses as one process on the global batch, and a resumed
    run (from the checkpoint's step) continues exactly where it stopped.

    Args:
        config: the settings. data_dir: a prepared dataset (local). store: where checkpoints go.
        out_dir: local directory for ``live/`` and ``model.pt``. env: this process's place in the job.
    """

    def __init__(self, config: PretrainConfig, data_dir: str | Path, store: Store, out_dir: Path, env: DistEnv) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config, self.store, self.out_dir, self.env = config, store, out_dir, env
        self.dataset = PreparedDataset(data_dir)
        self.train_images = self.dataset.images("train")  # (N, C, H, W) uint8
        self.read_batch = self.dataset.batch_reader("train")  # rows at random, as the steps need them
        self.plan = make_plan(config, len(self.train_images), env.world_size)
        self.image_size = config.image_size or self.dataset.image_shape[-1]
        self.model_config = model_config_for(config, self.image_size)
        self.model = training_model(self.model_config, config.seed, env)
        self.optimizer, self.scheduler = optimizer_for(self.model, config, self.plan)
        self.checkpoints = CheckpointManager(store, keep_last=config.keep_checkpoints)
        self.step = 0  # optimizer steps done
        self.history: list[dict[str, float]] = []  # each finished epoch's metrics, saved with every checkpoint
        # the current epoch's sum of step losses so far, saved with every checkpoint too: rank 0's own
        # (a collective at save time would keep rank 0 from saving once another rank is gone), so a
        # run of several processes resumed mid-epoch logs that epoch's loss with rank 0's share for
        # the steps before the resume; the weights are exact either way
        self.unfinished = {"loss_sum": 0.0, "steps": 0}
        self.results: dict[str, Any] = {}  # the last finished epoch's metrics
        self.own_rows = self.plan.view_rows(env.rank)
        self.augment = BatchedAugment(augment_config_for(config, self.image_size))
        self.loss_fn = NTXentLoss(config.temperature, gather=True)
        self.bf16 = uses_bf16(config.precision, env.device)
        self.knn = KnnProbe.from_dataset(self.dataset, config) if env.is_main else None
        self.check_every = finite_check_every(env.device)
        self.unchecked: list[_UncheckedStep] = []  # the steps since the last finiteness check

    # ---------------------------------------------------------------------------- the run

    def run(self) -> dict[str, Any]:
        """Resume, train to the last step, write ``model.pt`` (rank 0); the last epoch's metrics."""
        self.resume()
        train_model = self._distributed_model()
        observers = self._make_observers()
        self.results = dict(self.history[-1]) if self.history else {}
        tally = _EpochTally(torch.full((), self.unfinished["loss_sum"], device=self.env.device), int(self.unfinished["steps"]))
        train_model.train()
        batches = Prefetcher(self.make_views, self.step, self.plan.total_steps, self.config.data_threads, self.env.device)
        try:
            while self.step < self.plan.total_steps:
                self._step_and_observe(train_model, batches, tally, observers)
        finally:
            batches.close()
            self.read_batch.close()
            for observer in observers:
                observer.close()
        self.save_model()
        return self.results

    def resume(self) -> None:
        """Continue from the newest checkpoint of this very run, if there is one."""
        state = self._resumable_state()
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.history = list(state.get("epoch_metrics", []))
        self.unfinished = dict(state.get("unfinished_epoch", self.unfinished))
        if self.env.is_main:
            uri = self.store.uri(f"checkpoints/step-{self.step:08d}.pt")
            log.info("resuming from %s at step %d of %d", uri, self.step, self.plan.total_steps)

    def _resumable_state(self) -> dict[str, Any] | None:
        """The newest good checkpoint if it continues this very run; None to start from step 0.

        A checkpoint written with other method settings (say, another temperature after
        ``dvc exp run -S pretrain.temperature=0.2``; see :func:`changed_method_settings`) belongs
        to another run: it is not resumed, and the new run's checkpoints replace it.
        """
        found = self.checkpoints.load_latest(map_location=self.env.device)
        if found is None:
            return None
        state, meta = found
        changed = changed_method_settings(state.get("pretrain_config", {}), self.config)
        if changed or state.get("model_config") != self.model_config:
            if self.env.is_main:
                self.checkpoints.clear()  # the new run's checkpoints replace the other run's
                log.warning(
                    "%s was written with other settings (%s); starting a new run from step 0",
                    self.checkpoints.store.uri(meta["file"]), ", ".join(changed) or "model",
                )
            return None
        return state

    def _distributed_model(self) -> nn.Module:
        """The model the steps run: wrapped in DistributedDataParallel on more than one process, then
        compiled when ``pretrain.compile`` asks (checkpoints and the kNN pass use the plain model)."""
        model = self.model
        if self.env.is_distributed:
            device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return compiled(model, self.config.compile, self.env.device)

    def _make_observers(self) -> list[Observer]:
        """The loop's observers, called (and closed) in the list's order.

        Made in this order so that the log reads as it always has: DVCLive (which may refuse to
        start), the run's description, then the bar and the metrics endpoint.
        """
        config, env = self.config, self.env
        dvclive = DvcLiveMetrics(self.out_dir, self.history, enabled=env.is_main)
        if env.is_main:
            log.info(
                "pretraining %s on %d images: %d epochs x %d steps, global batch %d on %d process(es), lr %.4g, device %s, %s%s",
                self.model_config["arch"], self.plan.num_images, config.epochs, self.plan.steps_per_epoch, config.batch_size,
                env.world_size, self.plan.lr, env.device, "bf16 autocast" if self.bf16 else "fp32",
                "" if config.compile == "none" else f", torch.compile mode {config.compile}",
            )
        progress = ProgressBar(self.plan.total_steps, self.step, config.batch_size, config.epochs, enabled=env.is_main)
        prometheus = PrometheusMetrics(env.rank, env.local_rank, config.metrics_port, config.metrics_pushgateway)
        return [progress, EpochLog(config.epochs), dvclive, prometheus]

    # ---------------------------------------------------------------------------- one step

    def make_views(self, step: int) -> torch.Tensor:
        """(2 * local_batch, C, S, S) float views of this rank's images of ``step``: a pure function
        of the step (the :class:`Prefetcher` makes them one step ahead, in a background thread)."""
        images = torch.from_numpy(self.read_batch(self.plan.local_indices(step, self.env.rank)))
        if self.env.device.type == "cuda":
            images = images.pin_memory().to(self.env.device, non_blocking=True)
        generator = seeded_generator(self.config.seed, RandomStream.PRETRAIN_VIEWS, step)
        params = self.augment.sample_params(2 * self.config.batch_size, *self.train_images.shape[-2:], generator)
        views = self.augment.apply(torch.cat([images, images]), params.rows(self.own_rows).to(self.env.device))
        return views.contiguous(memory_format=torch.channels_last)

    def _step_and_observe(self, train_model: nn.Module, batches: Prefetcher, tally: _EpochTally, observers: list[Observer]) -> None:
        """One optimizer step, then what follows it: the finiteness check and the observers when due,
        and an epoch's end or a checkpoint when due (always after a check)."""
        start = time.perf_counter()
        views, data_wait = batches.get(self.step)  # data_wait: seconds until this step's views were on the device
        loss = self.train_step(train_model, views).detach()
        self.step += 1
        tally.add(loss, data_wait)
        self.unchecked.append(_UncheckedStep(self.step, loss, self.optimizer.param_groups[0]["lr"], data_wait, start))
        epoch_end = self.step % self.plan.steps_per_epoch == 0
        checkpoint_due = bool(self.config.checkpoint_every) and self.step % self.config.checkpoint_every == 0
        if epoch_end or checkpoint_due or self.step % self.check_every == 0 or self.step == self.plan.total_steps:
            self._check_and_observe(observers)  # before any checkpoint: a non-finite step is never saved
        if epoch_end:
            self.end_epoch(tally, observers)
        elif checkpoint_due:
            self.save(None, tally, observers)

    def train_step(self, train_model: nn.Module, views: torch.Tensor) -> torch.Tensor:
        """Forward both views of this rank's images in one pass, NT-Xent, backward, LARS and schedule steps.

        ``views``: (2 * local_batch, C, S, S), first views then second views. Returns the loss, a scalar.
        """
        if self.config.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the last step's graph outputs may be overwritten
        with torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            _, z = train_model(views)
        loss = self.loss_fn(z[: self.plan.local_batch], z[self.plan.local_batch :])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss

    def _check_and_observe(self, observers: list[Observer]) -> None:
        """Read the losses of the steps since the last check (one wait for the device), then, step by
        step, stop at the first non-finite one or show it to the observers.

        Each step's ``seconds`` is the checked steps' mean: on an accelerator the host runs ahead of
        the device between checks, so only the time across them is the steps' real time.
        """
        records, self.unchecked = self.unchecked, []
        losses = torch.stack([record.loss for record in records]).tolist()  # the one host sync
        seconds = (time.perf_counter() - records[0].start) / len(records)
        for record, loss in zip(records, losses):
            self._stop_unless_finite(loss, record.step)
            done = StepDone(record.step, self.plan.epoch_of(record.step), loss, record.lr, self.plan.local_batch, seconds, record.data_wait)
            for observer in observers:
                observer.on_step(done)

    def _stop_unless_finite(self, loss_value: float, step: int) -> None:
        """Nothing, or a TrainingError naming ``step`` (whose loss is ``loss_value``) and the checkpoint
        a rerun resumes from."""
        if math.isfinite(loss_value):
            return
        newest = self.checkpoints.list()
        later = f" (nor the {self.step - step} step(s) run after it before this check)" if self.step > step else ""
        raise TrainingError(
            f"loss is {loss_value} at step {step}; stopped without saving it{later}. The latest checkpoint is still "
            f"{self.store.uri(newest[0]['file']) if newest else 'none (no checkpoint yet)'}. "
            "Lower pretrain.base_lr or raise pretrain.warmup_epochs, then rerun to resume from it"
        )

    # ---------------------------------------------------------------------------- epochs and checkpoints

    def end_epoch(self, tally: _EpochTally, observers: list[Observer]) -> None:
        """The epoch's metrics, its checkpoint, then the observers (so what they show is in a checkpoint)."""
        seconds = time.perf_counter() - tally.start
        self.results = self._epoch_results(tally, seconds)
        self.history.append(dict(self.results))
        tally.clear_sums()  # an epoch end's checkpoint holds no unfinished epoch
        self.save(self.results.get("knn_accuracy"), tally, observers)
        for observer in observers:
            observer.on_epoch_end(self.results)
        tally.restart_clock()  # an epoch's images/s counts its steps, not the kNN pass or the save after it

    def _epoch_results(self, tally: _EpochTally, seconds: float) -> dict[str, float]:
        """The finished epoch's loss (mean over steps and ranks), lr, images/s, kNN accuracy (rank 0,
        when the data has labels) and this rank's data-wait share of ``seconds``."""
        loss_sum = tally.loss_sum
        if self.env.is_distributed:
            torch.distributed.all_reduce(loss_sum)  # in place: the tally's sums are cleared next
            loss_sum = loss_sum / self.env.world_size
        results = {
            "epoch": self.step // self.plan.steps_per_epoch,
            "loss": loss_sum.item() / max(1, tally.steps),
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_second": tally.steps * self.config.batch_size / max(seconds, 1e-9),
        }
        if self.knn is not None and self._knn_due(results["epoch"]):
            results["knn_accuracy"] = self.knn.accuracy(self.model, self.image_size, self.env.device)
        results["data_wait_fraction"] = tally.data_wait / max(seconds, 1e-9)  # this rank's
        return results

    def _knn_due(self, epoch: int) -> bool:
        """Whether ``epoch`` (counted from 1) ends with a kNN pass: every ``knn_every``-th and the last."""
        every = self.config.knn_every
        return every > 0 and (epoch % every == 0 or epoch == self.config.epochs)

    def save(self, knn_accuracy: float | None, tally: _EpochTally, observers: list[Observer]) -> None:
        """Rank 0 writes the checkpoint of this step (the other ranks return at once); the observers
        learn how long it took, or that it raised (the error goes on)."""
        if not self.env.is_main:
            return
        start = time.perf_counter()
        try:
            self.checkpoints.save(self._state(tally), self.step, knn_accuracy)
        except Exception:
            for observer in observers:
                observer.on_checkpoint(None)
            raise
        for observer in observers:
            observer.on_checkpoint(time.perf_counter() - start)

    def _state(self, tally: _EpochTally) -> dict[str, Any]:
        """Everything a resumed run needs: weights, optimizer, schedule, step, the epochs so far, the settings."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch_metrics": list(self.history),
            "unfinished_epoch": {"loss_sum": tally.loss_sum.item(), "steps": tally.steps},
            "model_config": self.model_config,
            "pretrain_config": dataclasses.asdict(self.config),
        }

    def save_model(self) -> None:
        """Rank 0 writes ``model.pt``: the weights and the settings that evaluation reads."""
        if self.env.is_main:
            state = {"model": self.model.state_dict(), "model_config": self.model_config,
                     "pretrain_config": dataclasses.asdict(self.config), "step": self.step}
            save_checkpoint(state, self.out_dir / MODEL_NAME)
