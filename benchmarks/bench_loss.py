"""NT-Xent forward + backward against the encoder step, and its memory, at large batches.

For global batch B in {256, 1024, 4096} (2B views, D = 128, one process, so the gather is
the identity; the gather's cost across processes is in bench_scaling):

- time of the blockwise NT-Xent (`simclr_core.method.loss`) forward + backward, and of the textbook
  form that materialises the full (2B, 2B) logits and calls cross_entropy, for comparison;
- peak memory each needs above its inputs (measured in a fresh process: ru_maxrss delta);
- the ResNet-18 (32 px, ImageNet stem) forward + backward on the same 2B views, so the loss
  shows as a share of the step.

Usage: python benchmarks/bench_loss.py [--batches 256,1024,4096] [--no-encoder] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from common import best_seconds, peak_rss_kib, reset_peak_rss_kib, write_results  # benchmarks/ is the script's directory

SECTION = "bench_loss"
DIM = 128


def textbook_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """The full-logits form (what most implementations do): 2B x 2B similarities, diagonal masked."""
    z = F.normalize(torch.cat([z_a, z_b]), dim=1)
    n = z_a.shape[0]
    logits = z @ z.T / temperature
    logits.fill_diagonal_(-1e9)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, targets)


def _measure(kind: str, batch: int, repeats: int) -> dict:
    """Run in a fresh process: seconds and peak MiB above the inputs for one loss fwd+bwd."""
    from simclr_core.method.loss import nt_xent

    torch.manual_seed(0)
    z_a = torch.randn(batch, DIM, requires_grad=True)
    z_b = torch.randn(batch, DIM, requires_grad=True)
    fn = {"blockwise": lambda: nt_xent(z_a, z_b, 0.1), "textbook": lambda: textbook_nt_xent(z_a, z_b, 0.1)}[kind]

    def step():
        z_a.grad = z_b.grad = None
        fn().backward()

    before = reset_peak_rss_kib()
    seconds = best_seconds(step, repeats)
    return {"seconds": seconds, "peak_mib": (peak_rss_kib() - before) / 1024}


def measure_in_subprocess(kind: str, batch: int, repeats: int) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import bench_loss; "
        f"print(json.dumps(bench_loss._measure({kind!r}, {batch}, {repeats})))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def encoder_seconds(batch: int) -> float:
    from simclr_core.method.models import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder("resnet18", cifar_stem=False).train()
    views = torch.randn(2 * batch, 3, 32, 32)

    def step():
        encoder.zero_grad(set_to_none=True)
        encoder(views).sum().backward()

    return best_seconds(step, 1)


def run(batches: list[int], repeats: int, with_encoder: bool) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for batch in batches:
        done = len(rows)
        blockwise = measure_in_subprocess("blockwise", batch, repeats)
        textbook = measure_in_subprocess("textbook", batch, repeats)
        note = f"textbook full-logits form: {textbook['seconds'] * 1e3:,.1f} ms, {textbook['peak_mib']:,.0f} MiB"
        rows.append((f"NT-Xent fwd+bwd, B={batch} ({2 * batch} views), blockwise", f"{blockwise['seconds'] * 1e3:,.1f} ms, "
                     f"{blockwise['peak_mib']:,.0f} MiB above inputs", note))
        if with_encoder:
            encoder = encoder_seconds(batch)
            rows.append((f"ResNet-18 fwd+bwd, {2 * batch} views at 32 px (ImageNet stem)", f"{encoder * 1e3:,.0f} ms",
                         f"the loss is {100 * blockwise['seconds'] / encoder:.2f}% of it"))
        for row in rows[done:]:
            print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="256,1024,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-encoder", action="store_true", help="skip the encoder step (minutes at B=4096 on a CPU)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    rows = run([int(b) for b in args.batches.split(",")], args.repeats, not args.no_encoder)
    if not args.no_write:
        write_results(SECTION, rows, "python benchmarks/bench_loss.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
