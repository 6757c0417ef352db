"""The ``simclr`` command: the one entry point that DVC, KFP and the container image call.

Exit codes: 0 success, 2 bad usage or bad input (the message names the field or file),
1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage or bad input: reported without a traceback, exit code 2."""


def _cmd_env(args: argparse.Namespace) -> int:
    """Print what this process sees: versions, devices, and the distributed environment."""
    import torch

    from simclr_core import __version__
    from simclr_core.distributed import init_distributed, destroy_distributed

    try:
        env = init_distributed(backend=args.backend, device=args.device)
    except ValueError as error:
        raise UsageError(str(error)) from None
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


def build_parser() -> argparse.ArgumentParser:
    from simclr_core import __version__

    parser = argparse.ArgumentParser(prog="simclr", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"simclr {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    env = commands.add_parser(
        "env",
        help="print versions, devices and the torch.distributed environment this process sees",
        description="Initialise torch.distributed from the environment (torchrun, Kubeflow Training "
        "Operator) exactly as training does, print one JSON line, and exit.",
    )
    env.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="default: nccl with CUDA, else gloo")
    env.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    env.set_defaults(handler=_cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with 2 on bad usage
    try:
        return args.handler(args)
    except UsageError as error:
        print(f"simclr {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
