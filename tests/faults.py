"""Run the `simclr` CLI with one fault injected, for the fault-injection tests.

    python -m tests.faults FAULT STEP -- pretrain --data ... --out ...

FAULT is one of
  kill-before-step        SIGKILL after STEP optimizer steps, before the next one
  kill-after-checkpoint   SIGKILL right after the checkpoint of STEP is committed
  kill-during-checkpoint  SIGKILL half-way through writing the checkpoint file of STEP
  kill-before-pointer     SIGKILL after the checkpoint of STEP is stored, before latest.json
  nan-at-step             the loss of step STEP (1-based) becomes NaN

The process kills itself with a real SIGKILL (no cleanup, no atexit, no finally), as a
preempted node or the OOM killer would. With ``FAULT_RANK`` set, only that rank is faulted;
with ``FAULT_ATTEMPT`` set, only in that attempt of a torchrun with ``--max-restarts``
(torchrun's ``TORCHELASTIC_RESTART_COUNT``).
The production code has no test hooks: the faults are patched in from here.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install(fault: str, at_step: int) -> None:
    from simclr_core import checkpoint as checkpoint_module
    from simclr_core.method.loss import NTXentLoss
    from simclr_core.method.optim import LARS

    if fault == "kill-before-step":
        original_step = LARS.step
        done = {"steps": 0}

        def step(self, closure=None):
            if done["steps"] == at_step:
                _die()
            done["steps"] += 1
            return original_step(self, closure)

        LARS.step = step
    elif fault == "nan-at-step":
        original_forward = NTXentLoss.forward
        calls = {"n": 0}

        def forward(self, *args, **kwargs):
            calls["n"] += 1
            loss = original_forward(self, *args, **kwargs)
            return loss * float("nan") if calls["n"] == at_step else loss

        NTXentLoss.forward = forward
    elif fault in ("kill-after-checkpoint", "kill-during-checkpoint", "kill-before-pointer"):
        manager = checkpoint_module.CheckpointManager
        original_save, original_write = manager.save, None
        saving = {"step": None}

        def save(self, state, step, *args, **kwargs):
            saving["step"] = step
            if step == at_step and fault == "kill-before-pointer":
                store_write = self.store.write_bytes

                def write_bytes(key, data):
                    if key == checkpoint_module.LATEST:
                        _die()
                    return store_write(key, data)

                self.store.write_bytes = write_bytes
            meta = original_save(self, state, step, *args, **kwargs)
            if step == at_step and fault == "kill-after-checkpoint":
                _die()
            return meta

        manager.save = save
        if fault == "kill-during-checkpoint":
            original_write = checkpoint_module.torch_save

            def torch_save(obj, stream):
                if saving["step"] != at_step or not hasattr(stream, "fileno"):
                    return original_write(obj, stream)
                import io

                buffer = io.BytesIO()
                original_write(obj, buffer)
                data = buffer.getvalue()
                stream.write(data[: len(data) // 2])
                stream.flush()
                os.fsync(stream.fileno())
                _die()

            checkpoint_module.torch_save = torch_save
    else:
        raise SystemExit(f"unknown fault {fault!r}")


def main(argv: list[str]) -> int:
    fault, at_step, separator, *cli_args = argv
    if separator != "--":
        raise SystemExit("usage: python -m tests.faults FAULT STEP -- SIMCLR_ARGS...")
    wanted_rank, wanted_attempt = os.environ.get("FAULT_RANK"), os.environ.get("FAULT_ATTEMPT")
    rank_matches = wanted_rank is None or wanted_rank == os.environ.get("RANK", "0")
    attempt_matches = wanted_attempt is None or wanted_attempt == os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if rank_matches and attempt_matches:
        _install(fault, int(at_step))
    from simclr_core.cli import main as simclr_main

    return simclr_main(cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
