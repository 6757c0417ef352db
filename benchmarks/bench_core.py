"""Speed of the method's parts on this machine; writes its figures to benchmarks/RESULTS.md.

Measures, with the threads torch uses by default:
- batched augmentation throughput (images/s) at 32 px and 96 px, and the per-sample
  torchvision pipeline for comparison;
- how fast a ResNet-18 consumes images (forward + backward, images/s) at the same sizes;
- NT-Xent forward + backward at B = 512 views (256 pairs), D = 128, as a fraction of a
  ResNet-18 forward + backward on the same 512 views.

Targets (issue 2): augmentation >= 3x the encoder's consumption; loss < 2% of the step.

Usage: python benchmarks/bench_core.py [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import sys

import torch

from simclr_core.method.augment import AugmentConfig, BatchedAugment, sample_transform
from simclr_core.method.loss import NTXentLoss
from simclr_core.method.models import build_encoder

from common import RESULTS, best_seconds, write_results  # benchmarks/ is the script's directory

SECTION = "bench_core"


def augmentation_rate(size: int, source: int, batch: int, repeats: int) -> tuple[float, float]:
    """(batched, per-sample) images/s for uint8 (batch, 3, source, source) inputs."""
    config = AugmentConfig.for_image_size(size)
    images = torch.randint(0, 256, (batch, 3, source, source), dtype=torch.uint8)
    batched = BatchedAugment(config)
    generator = torch.Generator().manual_seed(0)
    batched_s = best_seconds(lambda: batched(images, generator), repeats)
    per_sample = sample_transform(config)
    few = images[:128]
    per_sample_s = best_seconds(lambda: [per_sample(image) for image in few], max(1, repeats - 1))
    return batch / batched_s, len(few) / per_sample_s


def encoder_step_seconds(size: int, cifar_stem: bool, batch: int, repeats: int) -> float:
    """Seconds for one ResNet-18 forward + backward on (batch, 3, size, size)."""
    encoder = build_encoder("resnet18", cifar_stem=cifar_stem)
    views = torch.rand(batch, 3, size, size)

    def step():
        encoder.zero_grad(set_to_none=True)
        encoder(views).sum().backward()

    return best_seconds(step, repeats)


def loss_step_seconds(pairs: int, dim: int, repeats: int) -> float:
    loss_fn = NTXentLoss(temperature=0.1)
    z = torch.randn(2 * pairs, dim, requires_grad=True)

    def step():
        z.grad = None
        loss_fn(z[:pairs], z[pairs:]).backward()

    return best_seconds(step, max(repeats, 5))


def run(repeats: int) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    encoder_seconds: dict[tuple[int, bool], float] = {}
    # (output size, source size, stem, augmentation batch, encoder batch)
    for size, source, cifar_stem, batch, encoder_batch in ((32, 32, True, 512, 512), (96, 96, False, 256, 64)):
        batched, per_sample = augmentation_rate(size, source, batch, repeats)
        seconds = encoder_step_seconds(size, cifar_stem, encoder_batch, repeats)
        encoder_seconds[(size, cifar_stem)] = seconds
        consume = encoder_batch / seconds
        stem = "CIFAR" if cifar_stem else "ImageNet"
        rows.append((f"batched augmentation, {size} px", f"{batched:,.0f} images/s", f"{batched / consume:.1f}x what ResNet-18 ({stem} stem) consumes (target >= 3x)"))
        rows.append((f"per-sample augmentation (torchvision v2), {size} px", f"{per_sample:,.0f} images/s", "one process, for comparison"))
        rows.append((f"ResNet-18 fwd+bwd, {size} px, {stem} stem, batch {encoder_batch}", f"{consume:,.1f} images/s", "what the trainer consumes"))
        for row in rows[-3:]:
            print(row, flush=True)

    loss_s = loss_step_seconds(256, 128, repeats)
    encoder_seconds[(32, False)] = encoder_step_seconds(32, False, 512, repeats)
    for cifar_stem in (False, True):
        encoder_s = encoder_seconds[(32, cifar_stem)]
        stem = "CIFAR" if cifar_stem else "ImageNet"
        rows.append(
            (
                f"NT-Xent fwd+bwd, 512 views, D=128 vs ResNet-18 fwd+bwd of 512 views at 32 px ({stem} stem)",
                f"{loss_s * 1e3:.2f} ms vs {encoder_s * 1e3:,.0f} ms",
                f"{100 * loss_s / encoder_s:.2f}% of the step (target < 2%)",
            )
        )
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement (best is kept)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    rows = run(args.repeats)
    if not args.no_write:
        write_results(SECTION, rows, "python benchmarks/bench_core.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
