"""The pretrain step's side of the shared volume: a per-run directory on the PVC.

A PyTorchJob's pods cannot read the step's input artifact, so the step copies the prepared
dataset onto the PVC that both mount, under ``pipeline-runs/<job>/data``; the job writes its
checkpoints beside it, under ``pipeline-runs/<job>/pretrain``.

Kubernetes applies a pod's ``fsGroup`` to a volume only where its driver supports it: many
ReadWriteMany drivers (NFS among them; CSI drivers with ``fsGroupPolicy: None`` or
``ReadWriteOnceWithFSType``) leave the volume's root as it was, often root-owned and 0755. The
step and the trainer pods run as the image's uid, so the step checks that it can write
before it copies anything, and says what to set when it cannot.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

from components.common import copy_tree
from components.launcher.core import LaunchError, Log

__all__ = ["RUNS_DIR", "stage_on_volume", "collect_from_volume", "check_writable"]

RUNS_DIR = "pipeline-runs"


def check_writable(directory: str, pvc_name: str) -> None:
    """Create ``directory`` if needed and write a probe file in it; a LaunchError that says
    what to set when this process may not."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-"):
            pass
    except PermissionError:
        raise LaunchError(_not_writable(directory, pvc_name), reason="VolumeNotWritable") from None


def _not_writable(directory: str, pvc_name: str) -> str:
    existing = directory
    while not os.path.exists(existing) and existing != os.path.dirname(existing):
        existing = os.path.dirname(existing)
    info = os.stat(existing)
    return (
        f"cannot write to {directory} on the PVC {pvc_name} as uid {os.getuid()} gid {os.getgid()}: "
        f"{existing} belongs to uid {info.st_uid} gid {info.st_gid} with mode {stat.filemode(info.st_mode)}. "
        "The volume's storage driver did not apply the pod's fsGroup (many ReadWriteMany drivers skip it). "
        f"Make the volume's root writable for uid {os.getuid()} once (README, 'PVC permissions': a one-off pod that runs "
        f"`chown {os.getuid()}:{os.getgid()}` on it), or use a storage class whose driver applies fsGroup"
    )


def stage_on_volume(dataset_dir: str, pvc_name: str, mount_path: str, job_name: str, log: Log = print) -> str:
    """Copy the prepared dataset at ``dataset_dir`` to ``mount_path/pipeline-runs/<job_name>/data``
    (once: a retried step finds it there) and return ``mount_path/pipeline-runs/<job_name>``."""
    if not pvc_name:
        raise LaunchError(
            "backends 'pytorchjob' and 'trainjob' need pvc_name: the job's pods read the data and write checkpoints there "
            "(backend 'local' needs none)", reason="InvalidSpec",
        )
    if not os.path.isdir(mount_path):
        raise LaunchError(
            f"the PVC {pvc_name} is not mounted at {mount_path}: compile the pipeline with its PVC mount "
            "(python -m pipelines.compile without --no-pvc) or use backend 'local'", reason="InvalidSpec",
        )
    stage = os.path.join(mount_path, RUNS_DIR, job_name)
    check_writable(os.path.join(mount_path, RUNS_DIR), pvc_name)
    data_dir = os.path.join(stage, "data")
    if os.path.isfile(os.path.join(data_dir, "manifest.json")):
        log(f"pretrain: the dataset is on the volume already ({data_dir}): resuming this run")
        return stage
    log(f"pretrain: copying the dataset to {data_dir}")
    copy_tree(dataset_dir, data_dir + ".partial")
    _verify_copy(data_dir + ".partial", log)
    os.replace(data_dir + ".partial", data_dir)
    return stage


def _verify_copy(copy: str, log: Log) -> None:
    """Check every sha256 of the copied dataset, once: the job's pods open it without hashing.
    A corrupt copy is removed (a retried step copies again) and fails the step, naming the file."""
    from simclr_core.data import PreparedDataset, SourceError

    try:
        hashed = PreparedDataset(copy).verify()
    except SourceError as error:
        shutil.rmtree(copy, ignore_errors=True)
        raise LaunchError(f"the copy of the dataset on the volume is not what prepare wrote: {error}", reason="DatasetCorrupt") from None
    log(f"pretrain: verified the copy ({hashed / 2**20:.1f} MiB, every sha256 matches)")


def collect_from_volume(stage: str, model_dir: str, keep: bool = False, log: Log = print) -> None:
    """Copy the finished run's ``model.pt`` and ``live/`` from ``stage/pretrain`` into
    ``model_dir`` (the step's Model artifact), then delete ``stage`` unless ``keep``.

    Only a successful step deletes: a failed run keeps its checkpoints for the UI's Retry,
    which reruns the step under the same run id and resumes from them.
    """
    run_dir = os.path.join(stage, "pretrain")
    os.makedirs(model_dir, exist_ok=True)
    shutil.copy2(os.path.join(run_dir, "model.pt"), os.path.join(model_dir, "model.pt"))
    copy_tree(os.path.join(run_dir, "live"), os.path.join(model_dir, "live"))
    if keep:
        log(f"pretrain: kept {stage} (keep_run_dir)")
        return
    shutil.rmtree(stage, ignore_errors=True)
    log(f"pretrain: removed {stage} (the model is in the artifact; keep_run_dir=true keeps it)")
