"""The ``simclr`` command: the one entry point that DVC, KFP and the container image call.

Stages: ``prepare``, ``pretrain``, ``linear-eval``, ``finetune``, ``transfer`` (and ``report``, ``summary``,
``verify``, ``env``).
Each reads its settings from the section of the same name in params.yaml (``--params``),
overridden by command-line options of the same names (``--batch-size`` for
``pretrain.batch_size``). Exit codes: 0 success, 2 bad usage or bad input (the message names
the field or file), 1 any other failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("simclr")


class UsageError(Exception):
    """Bad usage or bad input: reported without a traceback, exit code 2."""


def _device(args: argparse.Namespace):
    import torch

    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available")
    return torch.device(args.device)


def _check_out(out: str) -> None:
    """A local ``--out`` must be creatable: its nearest existing ancestor a directory, itself none but a directory."""
    from simclr_core.storage import is_remote

    if is_remote(out):
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} exists and is a file, not a directory; choose another --out")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {out} cannot be created: {parent} is a file, not a directory")
            return


@contextlib.contextmanager
def _staged_data(uri: str):
    """``staged_input`` for a prepared dataset. A download (gs://, s3://) is a copy: every sha256 is
    checked once, here; a local directory is opened by the stage itself, in O(1), without hashing."""
    from simclr_core.data import DatasetCorrupt, PreparedDataset
    from simclr_core.storage import is_remote, staged_input

    with staged_input(uri) as data:
        if is_remote(uri):
            try:
                PreparedDataset(data, verify=True)
            except DatasetCorrupt as error:
                raise DatasetCorrupt(f"the download of {uri} is corrupt: {error}") from None
        yield data


@contextlib.contextmanager
def _pretrain_data(uri: str, stage_dir: str):
    """``--data`` as pretraining reads it: with ``pretrain.stage_dir``, a node-local copy made once per
    pod and verified (simclr_core/staging.py); without, :func:`_staged_data`."""
    if not stage_dir:
        with _staged_data(uri) as data:
            yield data
        return
    from simclr_core.staging import stage_dataset

    staged = stage_dataset(uri, stage_dir)
    log.info("pretrain: training reads the staged copy %s of %s", staged, uri)
    yield staged


# ------------------------------------------------------------------------------ commands


def _cmd_env(args: argparse.Namespace) -> int:
    """Print what this process sees: versions, devices, and the distributed environment."""
    import torch

    from simclr_core import __version__
    from simclr_core.launch import destroy_distributed, init_distributed

    env = init_distributed(backend=args.backend, device=None if args.device == "auto" else args.device)
    try:
        report = {
            "simclr_core": __version__,
            "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(),
            "cuda_devices": torch.cuda.device_count(),
            "rank": env.rank,
            "world_size": env.world_size,
            "local_rank": env.local_rank,
            "backend": env.backend,
            "device": str(env.device),
            "master": f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}".strip(":"),
        }
        sys.stdout.write(json.dumps(report) + "\n")  # one write: launchers interleave ranks' lines
        sys.stdout.flush()
    finally:
        destroy_distributed()
    return EXIT_OK


def _cmd_prepare(args: argparse.Namespace) -> int:
    from simclr_core.config import PrepareConfig, config_from_args
    from simclr_core.data import prepare
    from simclr_core.runlock import run_lock
    from simclr_core.storage import is_remote, staged_input, staged_output

    config = config_from_args(PrepareConfig, args.section, args)
    with contextlib.ExitStack() as stack:
        stack.enter_context(run_lock(args.out, beside=True))  # before prepare() cleans up temporaries beside --out
        if is_remote(config.source_root):
            config = dataclasses.replace(config, source_root=str(stack.enter_context(staged_input(config.source_root))))
        out = stack.enter_context(staged_output(args.out, last=("manifest.json",)))  # the manifest goes up last
        manifest = prepare(config, out)
    splits = ", ".join(f"{name} {info['images']}" for name, info in manifest["splits"].items())
    log.info("prepared %s into %s: %s images of shape %s", config.source, args.out, splits, manifest["image_shape"])
    if "test" not in manifest["splits"]:
        log.warning("%s has no test split: linear-eval, finetune and report score the encoder on it; "
                    "give the image folder a test/ folder (class subfolders, as in train/)", args.out)
    if manifest["skipped"]:
        log.warning("skipped %d unreadable or non-image file(s); they are listed in %s/manifest.json", len(manifest["skipped"]), args.out)
    return EXIT_OK


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from simclr_core.config import PretrainConfig, config_from_args
    from simclr_core.launch import destroy_distributed, init_distributed, read_launch_env
    from simclr_core.data import PreparedDataset
    from simclr_core.pretrain import check_world_size, pretrain

    config = config_from_args(PretrainConfig, "pretrain", args)
    launch = read_launch_env()
    with _pretrain_data(args.data, config.stage_dir) as data:
        # before any rendezvous: a launch that cannot work fails here instead of hanging there
        check_world_size(config, launch.world_size, len(PreparedDataset(data).images("train")))
        env = init_distributed(device=None if args.device == "auto" else args.device, timeout_s=config.collective_timeout_s)
        if not env.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        try:
            pretrain(config, data, args.out, env)
        finally:
            destroy_distributed()
    return EXIT_OK


def _cmd_linear_eval(args: argparse.Namespace) -> int:
    from simclr_core.config import LinearEvalConfig, config_from_args
    from simclr_core.evaluate import linear_eval
    from simclr_core.storage import staged_output, write_json

    config = config_from_args(LinearEvalConfig, "linear_eval", args)
    with _staged_data(args.data) as data:
        results = linear_eval(args.model, data, config, _device(args))
    pretrained, baseline = results["pretrained"], results["random_init"]
    metrics = {
        "top1": pretrained["top1"],
        "top5": pretrained["top5"],
        "l2": pretrained["l2"],
        "random_init_top1": baseline["top1"],
        "random_init_top5": baseline["top5"],
        "random_init_l2": baseline["l2"],
    }
    if "knn_top1" in pretrained:
        metrics.update(knn_top1=pretrained["knn_top1"], random_init_knn_top1=baseline["knn_top1"])
    names = results["class_names"]
    confusion = [
        {"actual": names[a], "predicted": names[p]}
        for a, p in zip(pretrained["actual"].tolist(), pretrained["predicted"].tolist())
    ]
    with staged_output(args.out) as out:
        write_json(out / "confusion.json", confusion)
        write_json(out / "metrics.json", metrics)
    knn = f", kNN top-1 {100 * metrics['knn_top1']:.2f}% (random init {100 * metrics['random_init_knn_top1']:.2f}%)" if "knn_top1" in metrics else ""
    log.info(
        "linear eval: top-1 %.2f%% (random init %.2f%%), top-5 %.2f%%%s",
        100 * metrics["top1"], 100 * metrics["random_init_top1"], 100 * metrics["top5"], knn,
    )
    return EXIT_OK


def _fraction_key(fraction: str) -> str:
    return f"labels_{float(fraction) * 100:g}pct"


def _cmd_finetune(args: argparse.Namespace) -> int:
    from simclr_core.config import FinetuneConfig, config_from_args
    from simclr_core.evaluate import finetune
    from simclr_core.storage import staged_output, write_json

    config = config_from_args(FinetuneConfig, "finetune", args)
    with _staged_data(args.data) as data:
        results = finetune(args.model, data, config, _device(args), log=log.info)
    metrics = {}
    for fraction, pair in results.items():
        metrics[_fraction_key(fraction)] = {
            "top1": pair["pretrained"]["top1"],
            "top5": pair["pretrained"]["top5"],
            "scratch_top1": pair["scratch"]["top1"],
            "scratch_top5": pair["scratch"]["top5"],
        }
        log.info(
            "finetune on %s of the labels: top-1 %.2f%% (from scratch %.2f%%)",
            fraction, 100 * pair["pretrained"]["top1"], 100 * pair["scratch"]["top1"],
        )
    with staged_output(args.out) as out:
        write_json(out / "metrics.json", metrics)
    return EXIT_OK


def _cmd_transfer(args: argparse.Namespace) -> int:
    from simclr_core.config import TransferConfig, config_from_args
    from simclr_core.evaluate import transfer
    from simclr_core.storage import staged_output, write_json

    config = config_from_args(TransferConfig, "transfer", args)
    with _staged_data(args.data) as data:
        results = transfer(args.model, data, config, _device(args), log=log.info)
    metrics = {
        f"{name}_{key}": value for name, values in results.items() for key, value in values.items() if key in ("top1", "top5", "l2")
    }
    with staged_output(args.out) as out:
        write_json(out / "metrics.json", metrics)
    text = ", ".join(f"{name} {100 * values['top1']:.2f}%" for name, values in results.items())
    log.info("transfer top-1: %s", text)
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from simclr_core.report import pretrain_report
    from simclr_core.storage import staged_input, staged_output, write_json

    with staged_input(args.run) as run, _staged_data(args.data) as data, staged_output(args.out) as out:
        summary = pretrain_report(run, data, out / "report.html", _device(args))
        write_json(out / "metrics.json", summary)
    precision = summary["neighbour_precision"]
    shared = f"{100 * precision:.1f}%" if precision is not None else "n/a (fewer than 2 test images)"
    log.info("report: %s (%s of nearest neighbours share the query's class)", out / "report.html", shared)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    """Check every sha256 of a prepared dataset: exit 0 when all match, 1 naming the first file that is
    missing or differs, 2 when the directory is not a prepared dataset (a SourceError from opening it)."""
    import time

    from simclr_core.data import DatasetCorrupt, PreparedDataset
    from simclr_core.storage import staged_input

    with staged_input(args.dir) as data:
        dataset = PreparedDataset(data)
        start = time.monotonic()
        try:
            hashed = dataset.verify()
        except DatasetCorrupt as error:
            print(f"simclr verify: failed: {error}", file=sys.stderr)
            return EXIT_FAILURE
    log.info("verified %s: %d file(s), %.1f MiB, every sha256 matches (%.1f s)",
             args.dir, len(dataset.manifest["files"]), hashed / 2**20, time.monotonic() - start)
    return EXIT_OK


def _cmd_summary(args: argparse.Namespace) -> int:
    from simclr_core.summary import summary_lines

    sys.stdout.write("\n".join(summary_lines(args.runs)) + "\n")
    return EXIT_OK


# ------------------------------------------------------------------------------ parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params", default="params.yaml" if Path("params.yaml").is_file() else None, metavar="PATH",
        help="params.yaml whose section for this stage gives the settings (default: ./params.yaml if present)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when available")


def build_parser() -> argparse.ArgumentParser:
    from simclr_core import __version__

    parser = argparse.ArgumentParser(prog="simclr", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"simclr {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _add_stages(commands)
    _add_tools(commands)
    return parser


def _add_stage(commands, name: str, help_text: str, handler, config_cls=None) -> argparse.ArgumentParser:
    """A stage's subcommand: --params, --device, and one option per setting of ``config_cls``."""
    from simclr_core.config import add_config_arguments

    sub = commands.add_parser(name, help=help_text, description=help_text)
    _add_common(sub)
    if config_cls is not None:
        add_config_arguments(sub, config_cls)
    sub.set_defaults(handler=handler)
    return sub


def _add_stages(commands) -> None:
    """prepare, pretrain, linear-eval, finetune, transfer: the stages of dvc.yaml and the pipeline."""
    from simclr_core.config import FinetuneConfig, LinearEvalConfig, PrepareConfig, PretrainConfig, TransferConfig

    sub = _add_stage(commands, "prepare", "read a source and write a prepared dataset directory", _cmd_prepare, PrepareConfig)
    sub.add_argument("--out", required=True, help="the prepared dataset directory to write")
    sub.add_argument("--section", default="prepare", help="params.yaml section to read (default: prepare; transfer_data for the transfer dataset)")

    sub = _add_stage(commands, "pretrain", "SimCLR pretraining (one process, or under torchrun / a PyTorchJob)", _cmd_pretrain, PretrainConfig)
    sub.add_argument("--data", required=True, help="prepared dataset directory")
    sub.add_argument("--out", required=True, help="run directory: checkpoints/, live/ metrics, model.pt")

    for name, help_text, handler, cls, data_help in (
        ("linear-eval", "linear evaluation of the frozen encoder, with the random-init baseline", _cmd_linear_eval, LinearEvalConfig, "prepared dataset directory"),
        ("finetune", "semi-supervised fine-tuning on the label subsets, with the from-scratch baseline", _cmd_finetune, FinetuneConfig, "prepared dataset directory"),
        ("transfer", "linear and fine-tuned evaluation on another dataset, with random-init baselines", _cmd_transfer, TransferConfig, "prepared directory of the transfer dataset"),
    ):
        sub = _add_stage(commands, name, help_text, handler, cls)
        sub.add_argument("--model", required=True, help="model.pt written by `simclr pretrain` (or a checkpoint)")
        sub.add_argument("--data", required=True, help=data_help)
        sub.add_argument("--out", required=True, help="directory for metrics.json")


def _add_tools(commands) -> None:
    """report, summary, verify, env: the commands around the stages."""
    sub = commands.add_parser(
        "report", help="an HTML report of a pretraining run: curves and nearest neighbours",
        description="Write report.html (per-epoch curves, nearest-neighbour pictures of the test split) and metrics.json.",
    )
    sub.add_argument("--run", required=True, help="the run directory `simclr pretrain --out` wrote (model.pt, live/)")
    sub.add_argument("--data", required=True, help="prepared dataset directory (its test split is pictured)")
    sub.add_argument("--out", required=True, help="directory for report.html and metrics.json")
    sub.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when available")
    sub.set_defaults(handler=_cmd_report)

    sub = commands.add_parser(
        "summary", help="one line per stage of a finished `dvc repro`: each figure beside its baseline",
        description="Read the metrics.json files dvc.yaml's stages wrote under RUNS and print each stage's figure and baseline.",
    )
    sub.add_argument("--runs", default="runs", help="the directory holding the stages' outputs (default: runs)")
    sub.set_defaults(handler=_cmd_summary)

    sub = commands.add_parser(
        "verify", help="check every sha256 of a prepared dataset (opening one checks only its structure)",
        description="Hash every file the manifest of DIR lists and compare it with its sha256. Exit 0 when all match, "
        "1 naming the first file that is missing or differs, 2 when DIR is not a prepared dataset.",
    )
    sub.add_argument("dir", metavar="DIR", help="prepared dataset directory (a local path, gs:// or s3://)")
    sub.set_defaults(handler=_cmd_verify)

    env = commands.add_parser(
        "env",
        help="print versions, devices and the torch.distributed environment this process sees",
        description="Initialise torch.distributed from the environment (torchrun, Kubeflow Training "
        "Operator) exactly as training does, print one JSON line, and exit.",
    )
    env.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="default: nccl with CUDA, else gloo")
    env.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when available")
    env.set_defaults(handler=_cmd_env)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with 2 on bad usage
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)

    from simclr_core.config import ConfigError
    from simclr_core.data import SourceError
    from simclr_core.errors import CheckpointError, TrainingError  # not from their modules: those load torch
    from simclr_core.storage import StorageError, StorageUnavailable

    try:
        if getattr(args, "out", None):
            _check_out(args.out)
        return args.handler(args)
    except (UsageError, ConfigError, SourceError, CheckpointError, StorageError) as error:
        print(f"simclr {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (TrainingError, StorageUnavailable) as error:
        print(f"simclr {args.command}: failed: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as error:  # a full disk, a read-only volume: the message names the file
        log.debug("I/O failure", exc_info=True)
        print(f"simclr {args.command}: failed: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
