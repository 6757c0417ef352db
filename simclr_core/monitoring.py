"""Prometheus metrics of the pretraining loop, one set per process (rank).

Every metric carries a ``rank`` label (the process's global rank), so a PodMonitor scraping
several pods, or a Pushgateway receiving several ranks, keeps them apart. Sum over ranks
(``sum(rate(simclr_train_images_total[5m]))``) for the job's throughput.

======================================================  =========  ==========================================
metric                                                  type       meaning (unit)
======================================================  =========  ==========================================
``simclr_train_step``                                   gauge      optimizer steps done (steps)
``simclr_train_epoch``                                  gauge      epoch of the last step, from 1 (epochs)
``simclr_train_loss``                                   gauge      NT-Xent loss of the last step, this rank's rows
``simclr_train_learning_rate``                          gauge      learning rate for the next step
``simclr_train_images_per_second``                      gauge      this rank's images / the last step's seconds
``simclr_train_images_total``                           counter    images this rank trained on (images; 2 views each)
``simclr_train_data_wait_seconds_total``                counter    seconds the loop waited for its views (seconds)
``simclr_train_step_duration_seconds``                  histogram  whole step, data wait included (seconds)
``simclr_train_knn_accuracy_ratio``                     gauge      weighted kNN top-1 at the last epoch end (0..1)
``simclr_checkpoint_save_duration_seconds``             histogram  checkpoint saves that succeeded (seconds)
``simclr_checkpoint_save_failures_total``               counter    checkpoint saves that raised (saves)
``simclr_train_last_success_timestamp_seconds``         gauge      Unix time of the last completed step (seconds)
======================================================  =========  ==========================================

:class:`TrainingMonitor` serves them at ``http://0.0.0.0:PORT/metrics`` with PORT =
``port + local_rank`` (one endpoint per process on a node) and, for jobs too short to be
scraped, pushes them to a Pushgateway (group ``job="simclr_pretrain", rank=R``) at each epoch
end and at :meth:`TrainingMonitor.close`. Each monitor has its own registry, so several can
live in one process. With neither an endpoint nor a Pushgateway it records nothing.
This module knows nothing about Kubernetes or Kubeflow.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, start_http_server

from simclr_core.config import ConfigError

__all__ = ["TrainingMonitor", "PUSH_JOB", "STEP_BUCKETS", "SAVE_BUCKETS"]

log = logging.getLogger("simclr.monitoring")

PUSH_JOB = "simclr_pretrain"  # the Pushgateway's job label
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
SAVE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)  # seconds
PUSH_TIMEOUT_S = 10.0


class TrainingMonitor:
    """The pretraining metrics of one process; see the module docstring for the list.

    Args:
        rank: global rank, the value of every metric's ``rank`` label.
        local_rank: rank on this node; the endpoint listens on ``port + local_rank``.
        port: first port of the HTTP endpoint (0 = no endpoint).
        pushgateway: Pushgateway ``host:port`` or URL ("" = no push).
        addr: the address the endpoint binds (all interfaces by default, for the PodMonitor).

    Raises:
        ConfigError: the endpoint's port is in use or cannot be bound.
    """

    def __init__(self, rank: int, local_rank: int = 0, port: int = 0, pushgateway: str = "", addr: str = "0.0.0.0") -> None:
        self.rank = rank
        self.pushgateway = pushgateway
        self.enabled = port > 0 or bool(pushgateway)
        self.registry = CollectorRegistry(auto_describe=True)
        self.port = port + local_rank if port > 0 else 0
        self._server = None
        self._define_metrics()
        if self.port:
            self._server = _serve(self.port, addr, self.registry, port, local_rank)
            log.info("rank %d serves Prometheus metrics at http://%s:%d/metrics", rank, addr, self.port)

    def _define_metrics(self) -> None:
        def make(kind, name: str, doc: str, **kwargs: Any):
            return kind(name, doc, ["rank"], registry=self.registry, **kwargs).labels(rank=str(self.rank))

        self._step = make(Gauge, "simclr_train_step", "Optimizer steps done.")
        self._epoch = make(Gauge, "simclr_train_epoch", "Epoch of the last step, counting from 1.")
        self._loss = make(Gauge, "simclr_train_loss", "NT-Xent loss of the last step (this rank's rows).")
        self._lr = make(Gauge, "simclr_train_learning_rate", "Learning rate for the next step.")
        self._rate = make(Gauge, "simclr_train_images_per_second", "Images this rank trained on per second, last step.")
        self._images = make(Counter, "simclr_train_images", "Images this rank trained on (two views each).")
        self._data_wait = make(Counter, "simclr_train_data_wait_seconds", "Seconds the loop waited for its input views.")
        self._step_seconds = make(
            Histogram, "simclr_train_step_duration_seconds", "Seconds per training step, data wait included.", buckets=STEP_BUCKETS
        )
        self._knn = make(Gauge, "simclr_train_knn_accuracy_ratio", "Weighted kNN top-1 accuracy at the last epoch end (0..1).")
        self._save_seconds = make(
            Histogram, "simclr_checkpoint_save_duration_seconds", "Seconds per successful checkpoint save.", buckets=SAVE_BUCKETS
        )
        self._save_failures = make(Counter, "simclr_checkpoint_save_failures", "Checkpoint saves that raised.")
        self._last_success = make(Gauge, "simclr_train_last_success_timestamp_seconds", "Unix time of the last completed step.")

    def on_step(
        self, step: int, epoch: int, loss: float, lr: float, images: int, step_seconds: float, data_wait_seconds: float
    ) -> None:
        """Record a completed step: ``images`` trained on by this rank in ``step_seconds`` (seconds),
        of which ``data_wait_seconds`` (seconds) waiting for the input."""
        if not self.enabled:
            return
        self._step.set(step)
        self._epoch.set(epoch)
        self._loss.set(loss)
        self._lr.set(lr)
        self._images.inc(images)
        self._rate.set(images / step_seconds if step_seconds > 0 else 0.0)
        self._data_wait.inc(max(0.0, data_wait_seconds))
        self._step_seconds.observe(step_seconds)
        self._last_success.set_to_current_time()

    def on_epoch(self, results: dict[str, float]) -> None:
        """Record an epoch's end (its ``knn_accuracy``, 0..1, when present) and push if configured."""
        if not self.enabled:
            return
        if "knn_accuracy" in results:
            self._knn.set(results["knn_accuracy"])
        self.push()

    def checkpoint_saved(self, seconds: float) -> None:
        """Record a successful checkpoint save that took ``seconds`` (seconds)."""
        if self.enabled:
            self._save_seconds.observe(seconds)

    def checkpoint_failed(self) -> None:
        """Record a checkpoint save that raised."""
        if self.enabled:
            self._save_failures.inc()

    def push(self) -> None:
        """Push every metric to the Pushgateway, if one is set; a failure is a warning, never fatal."""
        if not self.pushgateway:
            return
        try:
            push_to_gateway(
                self.pushgateway, job=PUSH_JOB, registry=self.registry, grouping_key={"rank": str(self.rank)}, timeout=PUSH_TIMEOUT_S
            )
        except Exception as error:  # an unreachable or refusing gateway must not stop training
            log.warning("could not push metrics to the Pushgateway %s (pretrain.metrics_pushgateway): %s", self.pushgateway, error)

    def close(self) -> None:
        """Push one last time and stop the endpoint; safe to call twice."""
        self.push()
        if self._server is not None:
            server, self._server = self._server, None
            server[0].shutdown()
            server[0].server_close()
            server[1].join(timeout=5)


def _serve(port: int, addr: str, registry: CollectorRegistry, base_port: int, local_rank: int):
    """Start the endpoint on ``addr:port``; a port that cannot be bound is a :class:`ConfigError`."""
    where = f"port {port} (pretrain.metrics_port={base_port} + local rank {local_rank})"
    if port > 65535:
        raise ConfigError(f"metrics {where} is above 65535; lower pretrain.metrics_port")
    try:
        return start_http_server(port, addr=addr, registry=registry)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"metrics {where} is already in use; set another pretrain.metrics_port (--metrics-port), or 0 to turn the endpoint off"
            ) from None
        raise ConfigError(f"cannot serve metrics on {where}: {error.strerror or error}") from None
