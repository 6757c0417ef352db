"""Apply plausible bugs to the code, one at a time, and report which tests catch each.

    .venv/bin/python scripts/mutation_check.py            # every mutation (about 5 minutes on 2 cores)
    .venv/bin/python scripts/mutation_check.py --list
    .venv/bin/python scripts/mutation_check.py lars-adapts-bn weights-only-off

Each mutation replaces one exact piece of a source file (it must occur exactly once, so a
refactor that moves the code makes the script say so instead of testing nothing), runs the
tests that should catch it, and restores the file, whatever happens. Exit code 0 when every
mutation was caught, 1 when one survived, 2 when one no longer applies. Not part of the
default test run: it reruns slow multi-process tests several times.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation("eval-ignores-weights", "evaluation never loads the pretrained weights", "simclr_core/evaluate/common.py",
             "    model.load_state_dict(weights)\n", "    pass  # mutation\n",
             ("tests/test_evaluation_weights.py", "tests/test_stages.py", "-k", "weights or beats")),
    Mutation("crop-flip-only-pretraining", "pretraining with the crop + flip only policy", "simclr_core/pretrain/model_setup.py",
             "    return dataclasses.replace(policy, crop_scale=(config.crop_min_scale, 1.0))\n",
             "    return AugmentConfig.crop_flip_only(image_size)  # mutation\n",
             ("tests/test_trainer_policy.py",)),
    Mutation("jitter-p-0.5", "colour jitter applied with p = 0.5", "simclr_core/method/augment.py",
             "    jitter_p: float = 0.8\n", "    jitter_p: float = 0.5  # mutation\n",
             ("tests/test_trainer_policy.py", "tests/test_augment.py")),
    Mutation("gather-without-grad-allreduce", "NT-Xent's gather without its gradient all-reduce", "simclr_core/method/distributed.py",
             "        dist.all_reduce(grad_gathered, op=dist.ReduceOp.SUM)\n", "        pass  # mutation\n",
             ("tests/test_loss.py",)),
    Mutation("local-bn", "batch norm on each rank's local statistics (no global BN on gloo)", "simclr_core/method/distributed.py",
             "    return _replace_bn(module)\n", "    return module  # mutation\n",
             ("tests/test_global_bn.py", "tests/test_two_node.py")),
    Mutation("lars-adapts-bn", "LARS adapts (and decays) BN parameters and biases", "simclr_core/method/optim.py",
             '    return isinstance(module, norm_types) or param_name == "bias" or param.dim() <= 1\n',
             "    return False  # mutation\n",
             ("tests/test_optim.py",)),
    Mutation("lars-without-weight-decay", "LARS's multi-tensor step forgets g + wd * w", "simclr_core/method/optim.py",
             "        torch._foreach_add_(decayed, params, alpha=weight_decay)", "        pass  # mutation",
             ("tests/test_optim.py",)),
    Mutation("nan-checked-after-the-checkpoint", "a checkpoint written before the losses since the last check are read",
             "simclr_core/pretrain/trainer.py",
             "        if epoch_end or checkpoint_due or self.step % self.check_every == 0",
             "        if self.step % self.check_every == 0 or False",
             ("tests/test_trainer_sync.py",)),
    Mutation("resume-without-optimizer", "resume without the optimizer's state", "simclr_core/pretrain/trainer.py",
             '        self.optimizer.load_state_dict(state["optimizer"])\n', "        pass  # mutation\n",
             ("tests/test_pretrain_resume.py",)),
    Mutation("stale-shard-after-epoch-1", "ranks other than 0 keep the first epoch's shuffle", "simclr_core/pretrain/plan.py",
             "generator=seeded_generator(self.seed, RandomStream.PRETRAIN_ORDER, epoch)).numpy()",
             "generator=seeded_generator(self.seed, RandomStream.PRETRAIN_ORDER, epoch if rank == 0 else 0)).numpy()",
             ("tests/test_pretrain_resume.py", "-k", "processes")),
    Mutation("weights-only-off", "checkpoints loaded with weights_only=False", "simclr_core/checkpoint.py",
             "map_location=map_location, weights_only=True)", "map_location=map_location, weights_only=False)",
             ("tests/test_checkpoint.py",)),
)


def run(mutation: Mutation) -> tuple[str, float, str]:
    """Apply ``mutation``, run its tests, restore the file; (verdict, seconds, last output line)."""
    path = ROOT / mutation.path
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return "NO LONGER APPLIES", 0.0, f"{mutation.path} holds the mutated text {original.count(mutation.old)} times, not once"
    start = time.monotonic()
    try:
        path.write_text(original.replace(mutation.old, mutation.new))
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
    finally:
        path.write_text(original)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    verdict = "caught" if result.returncode != 0 else "SURVIVED"
    return verdict, time.monotonic() - start, lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    if args.list:
        for mutation in MUTATIONS:
            print(f"{mutation.name:32} {mutation.what}  [{' '.join(mutation.tests)}]")
        return 0
    unknown = [name for name in args.names if name not in known]
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}; --list shows them")
    worst = 0
    for mutation in [known[name] for name in args.names] or MUTATIONS:
        verdict, seconds, last = run(mutation)
        print(f"{verdict:17} {mutation.name:32} {seconds:6.1f} s  {last}", flush=True)
        worst = max(worst, {"caught": 0, "SURVIVED": 1, "NO LONGER APPLIES": 2}[verdict])
    return worst


if __name__ == "__main__":
    sys.exit(main())
