"""Prometheus metrics of the pretraining loop: the monitor, the trainer's endpoint, and
Debian's Prometheus server and Pushgateway scraping / receiving a real run (slow)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from simclr_core import monitoring
from simclr_core.checkpoint import CheckpointManager, load_checkpoint
from simclr_core.config import ConfigError
from simclr_core.method.distributed import DistEnv
from simclr_core.monitoring import TrainingMonitor
from simclr_core.pretrain import observers, pretrain
from tests.conftest import DIST_VARS, TINY_PRETRAIN, cli_cwd, run_cli
from tests.multiproc import free_port
from tests.test_pretrain_resume import _tiny_config

PROMETHEUS = "/usr/bin/prometheus"
PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"
INSTALL_HINT = "apt-get install prometheus prometheus-pushgateway (scripts/setup.sh test installs them)"


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, its labels): value} of a /metrics page."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _wait_for(check, timeout: float, what: str, process: subprocess.Popen | None = None, interval: float = 0.2):
    """Poll ``check()`` until it returns a truthy value; fail after ``timeout`` seconds or when ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {process.returncode}:\n{_output(process)}")
        try:
            result = check()
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            result = None
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f":\n{_output(process)}" if process else ""))


def _start(args: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``args`` with stdout and stderr going to ``log_path`` (a file: a pipe nobody reads could fill up)."""
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=cli_cwd())  # tests/params.yaml
    process.log_path = log_path
    return process


def _output(process: subprocess.Popen) -> str:
    return process.log_path.read_text()[-4000:]


def _assert_nothing_listens(port: int) -> None:
    """A new server can listen on ``port`` (SO_REUSEADDR, as servers set it: closed connections do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen()


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ------------------------------------------------------------------------------ the monitor


def test_endpoint_reports_steps_epochs_and_checkpoints_with_the_rank_label():
    base = free_port()
    monitor = TrainingMonitor(rank=3, local_rank=0, port=base, addr="127.0.0.1")
    try:
        monitor.on_step(step=1, epoch=1, loss=4.5, lr=0.1, images=16, step_seconds=0.5, data_wait_seconds=0.125)
        monitor.on_step(step=2, epoch=1, loss=4.25, lr=0.2, images=16, step_seconds=2.0, data_wait_seconds=0.25)
        monitor.on_epoch({"epoch": 1, "loss": 4.4, "knn_accuracy": 0.625})
        monitor.checkpoint_saved(0.3)
        monitor.checkpoint_failed()
        before = time.time()
        monitor.on_step(step=3, epoch=2, loss=4.0, lr=0.3, images=16, step_seconds=0.02, data_wait_seconds=0.0)
        samples = _samples(_get(f"http://127.0.0.1:{base}/metrics"))
    finally:
        monitor.close()
    rank = {"rank": "3"}
    assert _value(samples, "simclr_train_step", **rank) == 3
    assert _value(samples, "simclr_train_epoch", **rank) == 2
    assert _value(samples, "simclr_train_loss", **rank) == 4.0
    assert _value(samples, "simclr_train_learning_rate", **rank) == 0.3
    assert _value(samples, "simclr_train_images_per_second", **rank) == pytest.approx(16 / 0.02)
    assert _value(samples, "simclr_train_images_total", **rank) == 48
    assert _value(samples, "simclr_train_data_wait_seconds_total", **rank) == pytest.approx(0.375)
    assert _value(samples, "simclr_train_knn_accuracy_ratio", **rank) == 0.625
    assert _value(samples, "simclr_train_step_duration_seconds_count", **rank) == 3
    assert _value(samples, "simclr_train_step_duration_seconds_sum", **rank) == pytest.approx(2.52)
    assert _value(samples, "simclr_train_step_duration_seconds_bucket", le="0.01", **rank) == 0
    assert _value(samples, "simclr_train_step_duration_seconds_bucket", le="0.5", **rank) == 2
    assert _value(samples, "simclr_train_step_duration_seconds_bucket", le="60.0", **rank) == 3
    assert _value(samples, "simclr_checkpoint_save_duration_seconds_count", **rank) == 1
    assert _value(samples, "simclr_checkpoint_save_duration_seconds_sum", **rank) == pytest.approx(0.3)
    assert _value(samples, "simclr_checkpoint_save_failures_total", **rank) == 1
    assert before - 1 <= _value(samples, "simclr_train_last_success_timestamp_seconds", **rank) <= time.time() + 1
    ours = {name for name, _ in samples if name.startswith("simclr_")}
    assert all(dict(labels).get("rank") == "3" for name, labels in samples if name in ours)


def test_endpoint_listens_on_port_plus_local_rank_and_stops_at_close():
    base = free_port()
    monitor = TrainingMonitor(rank=5, local_rank=1, port=base - 1, addr="127.0.0.1")
    assert monitor.port == base
    monitor.on_step(step=7, epoch=1, loss=1.0, lr=0.1, images=8, step_seconds=0.1, data_wait_seconds=0.0)
    assert _value(_samples(_get(f"http://127.0.0.1:{base}/metrics")), "simclr_train_step", rank="5") == 7
    monitor.close()
    monitor.close()
    _assert_nothing_listens(base)


def test_a_port_in_use_is_a_config_error_naming_the_setting():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"port {port}.*pretrain\.metrics_port={port}.*already in use"):
            TrainingMonitor(rank=0, local_rank=0, port=port, addr="127.0.0.1")


def test_an_unreachable_pushgateway_is_a_warning_not_an_error(caplog):
    monitor = TrainingMonitor(rank=0, pushgateway=f"127.0.0.1:{free_port()}")  # nothing listens there
    with caplog.at_level("WARNING", logger="simclr.monitoring"):
        monitor.on_step(step=1, epoch=1, loss=1.0, lr=0.1, images=8, step_seconds=0.1, data_wait_seconds=0.0)
        monitor.on_epoch({"epoch": 1})
        monitor.close()
    assert caplog.text.count("could not push metrics to the Pushgateway") == 2  # epoch end + close
    assert monitor.registry.get_sample_value("simclr_train_step", {"rank": "0"}) == 1


def test_a_disabled_monitor_records_nothing():
    monitor = TrainingMonitor(rank=0)
    assert not monitor.enabled
    monitor.on_step(step=1, epoch=1, loss=1.0, lr=0.1, images=8, step_seconds=0.1, data_wait_seconds=0.0)
    monitor.checkpoint_saved(1.0)
    monitor.close()
    assert monitor.registry.get_sample_value("simclr_train_step", {"rank": "0"}) == 0
    assert monitor.registry.get_sample_value("simclr_checkpoint_save_duration_seconds_count", {"rank": "0"}) == 0


def test_metric_names_follow_prometheus_conventions():
    monitor = TrainingMonitor(rank=0)
    families = {family.name: family.type for family in monitor.registry.collect()}
    for name, kind in families.items():
        assert name.startswith("simclr_"), name
        if kind == "counter":  # exposed with _total
            assert name.endswith(("_seconds", "_images", "_failures")), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
    assert families["simclr_train_data_wait_seconds"] == "counter"
    assert families["simclr_train_step_duration_seconds"] == "histogram"
    for name in families:  # every metric is listed in the module docstring
        assert f"``{name}" in monitoring.__doc__, name


# ------------------------------------------------------------------------------ in the trainer


def test_pretrain_serves_its_metrics_while_it_runs(tiny_prepared, tmp_path, monkeypatch):
    port = free_port()
    seen: dict = {"monitors": [], "scrapes": []}

    class Recording(TrainingMonitor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["monitors"].append(self)

        def on_epoch(self, results):
            super().on_epoch(results)
            seen["scrapes"].append((results, _samples(_get(f"http://127.0.0.1:{port}/metrics"))))

    monkeypatch.setattr(observers, "TrainingMonitor", Recording)
    start = time.time()
    results = pretrain(_tiny_config(metrics_port=port), tiny_prepared, tmp_path / "run", DistEnv())

    (monitor,) = seen["monitors"]
    assert monitor.port == port
    steps = load_checkpoint(tmp_path / "run" / "model.pt")["step"]
    per_epoch = steps // 2
    assert [_value(s, "simclr_train_step", rank="0") for _, s in seen["scrapes"]] == [per_epoch, steps]
    assert [_value(s, "simclr_train_knn_accuracy_ratio", rank="0") for _, s in seen["scrapes"]] == [
        r["knn_accuracy"] for r, _ in seen["scrapes"]
    ]

    def value(name: str) -> float:
        return monitor.registry.get_sample_value(name, {"rank": "0"})

    assert value("simclr_train_step") == steps
    assert value("simclr_train_epoch") == 2
    loss = value("simclr_train_loss")
    assert math.isfinite(loss) and 0 < loss < 2 * math.log(2 * 16 - 1)  # near log(2N-1) early in training
    assert value("simclr_train_learning_rate") == 0.0  # cosine to zero at the last step
    assert value("simclr_train_images_total") == 16 * steps
    assert value("simclr_train_step_duration_seconds_count") == steps
    assert 0 <= value("simclr_train_data_wait_seconds_total") <= value("simclr_train_step_duration_seconds_sum")
    assert value("simclr_train_knn_accuracy_ratio") == results["knn_accuracy"]
    assert value("simclr_checkpoint_save_duration_seconds_count") == steps  # checkpoint_every=1
    assert value("simclr_checkpoint_save_failures_total") == 0
    assert start <= value("simclr_train_last_success_timestamp_seconds") <= time.time()
    _assert_nothing_listens(port)  # the endpoint stopped with the run


def test_cli_exits_2_naming_the_setting_when_the_metrics_port_is_taken(tiny_prepared, tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("pretrain", "--data", str(tiny_prepared), "--out", str(tmp_path / "run"), *TINY_PRETRAIN,
                         "--epochs", "1", "--metrics-port", str(port), timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"metrics port {port} (pretrain.metrics_port={port} + local rank 0) is already in use" in result.stderr


def test_a_failed_checkpoint_save_is_counted_and_stops_the_run(tiny_prepared, tmp_path, monkeypatch):
    seen: list = []

    class Recording(TrainingMonitor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(observers, "TrainingMonitor", Recording)
    monkeypatch.setattr(CheckpointManager, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pretrain(_tiny_config(metrics_port=free_port()), tiny_prepared, tmp_path / "run", DistEnv())
    (monitor,) = seen
    assert monitor.registry.get_sample_value("simclr_checkpoint_save_failures_total", {"rank": "0"}) == 1
    assert monitor.registry.get_sample_value("simclr_checkpoint_save_duration_seconds_count", {"rank": "0"}) == 0
    assert monitor.registry.get_sample_value("simclr_train_step", {"rank": "0"}) == 1


# ------------------------------------------------------------------------------ slow: real servers


def _require(binary: str) -> None:
    if not os.access(binary, os.X_OK):
        pytest.skip(f"{binary} is missing: {INSTALL_HINT}")


def _pretrain_process(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    args = [sys.executable, "-m", "simclr_core", "pretrain", "--data", str(data), "--out", str(out), *TINY_PRETRAIN, *extra]
    return _start(args, out.parent / "pretrain.log", env)


def _server(args: list[str], ready_url: str, log_path: Path) -> subprocess.Popen:
    """Start a server and poll ``ready_url`` until it answers."""
    process = _start(args, log_path)
    try:
        _wait_for(lambda: _get(ready_url, timeout=1) is not None, 60, f"{args[0]} to be ready", process)
    except BaseException:
        _stop(process)
        raise
    return process


@pytest.mark.slow
def test_prometheus_scrapes_the_loss_of_a_running_pretraining(tiny_prepared, tmp_path):
    _require(PROMETHEUS)
    trainer_port, prometheus_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: simclr\n    static_configs: [{{targets: ['127.0.0.1:{trainer_port}']}}]\n"
    )
    prometheus = _server(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        f"http://127.0.0.1:{prometheus_port}/-/ready", tmp_path / "prometheus.log",
    )
    trainer = None
    try:
        # Many epochs: the run is stopped once Prometheus holds several scrapes of it.
        trainer = _pretrain_process(tiny_prepared, tmp_path / "run", "--epochs", "1000", "--metrics-port", str(trainer_port))

        def query(expression: str) -> list[dict]:
            url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
            answer = json.loads(_get(url))
            assert answer["status"] == "success", answer
            return answer["data"]["result"]

        def scraped_three_times():
            result = query("count_over_time(simclr_train_loss[5m])")
            return result if result and float(result[0]["value"][1]) >= 3 else None

        _wait_for(scraped_three_times, 120, "three scrapes of simclr_train_loss", trainer, interval=0.5)
        (series,) = query("simclr_train_loss")
        assert series["metric"]["rank"] == "0" and series["metric"]["job"] == "simclr"
        assert math.isfinite(float(series["value"][1])) and float(series["value"][1]) > 0
        (steps,) = query("simclr_train_step")
        assert float(steps["value"][1]) >= 1
    finally:
        if trainer is not None:
            _stop(trainer)
        _stop(prometheus)


@pytest.mark.slow
def test_pushgateway_receives_the_metrics_of_a_short_pretraining(tiny_prepared, tmp_path):
    _require(PUSHGATEWAY)
    port = free_port()
    gateway = _server(
        [PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}", f"--persistence.file={tmp_path / 'push.db'}"],
        f"http://127.0.0.1:{port}/-/ready", tmp_path / "pushgateway.log",
    )
    try:
        trainer = _pretrain_process(tiny_prepared, tmp_path / "run", "--metrics-pushgateway", f"127.0.0.1:{port}")
        try:
            trainer.wait(timeout=300)
        finally:
            _stop(trainer)
        output = trainer.log_path.read_text()
        assert trainer.returncode == 0, output[-4000:]
        assert "could not push" not in output
        samples = _samples(_get(f"http://127.0.0.1:{port}/metrics"))
    finally:
        _stop(gateway)
    pushed = {"job": "simclr_pretrain", "rank": "0", "instance": ""}
    loss = _value(samples, "simclr_train_loss", **pushed)
    assert math.isfinite(loss) and loss > 0
    steps = load_checkpoint(tmp_path / "run" / "model.pt")["step"]
    assert _value(samples, "simclr_train_step", **pushed) == steps  # the final push, at the end of the run
    assert _value(samples, "simclr_train_step_duration_seconds_count", **pushed) == steps
    assert 0 <= _value(samples, "simclr_train_knn_accuracy_ratio", **pushed) <= 1


def test_epoch_end_is_pushed_after_its_checkpoint_is_saved(tiny_prepared, tmp_path, monkeypatch):
    from simclr_core.checkpoint import CheckpointManager
    from simclr_core.storage import LocalStore

    newest_at_push = []

    def record(self, results):
        newest_at_push.append((results["epoch"], CheckpointManager(LocalStore(tmp_path / "run")).list()[0]["step"]))

    monkeypatch.setattr(TrainingMonitor, "on_epoch", record)
    pretrain(_tiny_config(checkpoint_every=0), tiny_prepared, tmp_path / "run", DistEnv())
    assert newest_at_push == [(1, 3), (2, 6)]  # 3 steps an epoch: each epoch's checkpoint is already there
