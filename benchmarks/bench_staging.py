"""Node-local staging (simclr_core/staging.py): what it costs and what it buys, on this machine.

Writes a prepared dataset of ``--gib`` GiB (random uint8 images, 3 x 32 x 32, with a manifest of
sha256 sums) and measures:

- **staging throughput**: ``stage_dataset`` from the source, its page cache dropped first
  (``posix_fadvise(DONTNEED)`` on each file, after an fsync: a cold read, as from a volume whose
  data this node has not read), copying, hashing and fsyncing into a stage directory; and the
  second call (the copy found complete: what every other process of a pod and every restart pays);
- **pretraining's read pattern**: batches of ``--batch`` images at the sorted random indices
  the trainer draws (a fresh permutation per epoch, ``np.sort`` of each batch, fancy indexing on
  the memory map), from
    * the source with a cold page cache (every read goes to this machine's disk),
    * a simulated network volume: the same cold reads, each image a separate request that also
      waits ``--rtt-ms`` (an NFS/Filestore round trip; a memory-mapped read faults page by page,
      one request per image at this size), and
    * the staged copy as staging leaves it (its pages in the page cache, as they were written),
      and with its cache dropped too (the node's own disk, cold).

There is no network filesystem here; the network volume is a model (cold local reads plus a
fixed wait per request), named as such in RESULTS.md. The source and the stage share this
machine's one disk, so cold-source and cold-stage reads measure the same device.

Usage: python benchmarks/bench_staging.py [--gib 1.0] [--batch 256] [--batches 200] [--rtt-ms 0.5]
       [--rtt-batches 20] [--dir DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import device_reads, drop_cache, write_results  # benchmarks/ is the script's directory

SECTION = "bench_staging"
SHAPE = (3, 32, 32)
CHUNK_IMAGES = 32768  # written in chunks of ~100 MB


def make_dataset(root: Path, gib: float, seed: int = 0) -> int:
    """A prepared dataset of ``gib`` GiB of random train images at ``root``; returns the image count."""
    root.mkdir(parents=True)
    count = int(gib * 2**30) // int(np.prod(SHAPE))
    rng = np.random.default_rng(seed)
    images = np.lib.format.open_memmap(root / "train_images.npy", mode="w+", dtype=np.uint8, shape=(count, *SHAPE))
    for start in range(0, count, CHUNK_IMAGES):
        stop = min(count, start + CHUNK_IMAGES)
        images[start:stop] = rng.integers(0, 256, (stop - start, *SHAPE), dtype=np.uint8)
    images.flush()
    del images
    np.save(root / "train_labels.npy", (np.arange(count) % 10).astype(np.int64))
    (root / "subsets.json").write_text(json.dumps({"0.01": list(range(0, count, 100))}))
    files = {name: _sha256(root / name) for name in ("train_images.npy", "train_labels.npy", "subsets.json")}
    manifest = {"format_version": 1, "class_names": [str(k) for k in range(10)], "image_shape": list(SHAPE),
                "splits": {"train": {"images": count}}, "files": files}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return count


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_in(directory: Path) -> list[Path]:
    return [path for path in directory.iterdir() if path.is_file()]


def batches(count: int, batch: int, steps: int, seed: int = 0) -> list[np.ndarray]:
    """The trainer's pattern (simclr_core/pretrain/plan.py): a permutation, each batch sorted."""
    order = np.random.default_rng(seed).permutation(count)
    return [np.sort(order[k * batch:(k + 1) * batch]) for k in range(steps)]


def read_batches(path: Path, indices: list[np.ndarray]) -> tuple[float, int]:
    """Seconds to gather every batch from the memory map at ``path`` (as the trainer does), and
    the bytes read from the device meanwhile."""
    images = np.load(path, mmap_mode="r")
    before, start = device_reads(), time.perf_counter()
    for index in indices:
        np.ascontiguousarray(images[index])
    return time.perf_counter() - start, device_reads() - before


def read_batches_remote(path: Path, indices: list[np.ndarray], rtt_s: float) -> tuple[float, int]:
    """The simulated network volume: one request per image (a pread of its bytes) plus ``rtt_s``."""
    images = np.load(path, mmap_mode="r")
    offset, size = images.offset, int(np.prod(SHAPE))
    del images
    fd = os.open(path, os.O_RDONLY)
    try:
        before, start = device_reads(), time.perf_counter()
        for index in indices:
            for i in index:
                os.pread(fd, size, offset + int(i) * size)
                time.sleep(rtt_s)
        return time.perf_counter() - start, device_reads() - before
    finally:
        os.close(fd)


def measure(args: argparse.Namespace, work: Path) -> tuple[list[tuple[str, str, str]], dict]:
    from simclr_core.staging import stage_dataset

    source = work / "source"
    start = time.perf_counter()
    count = make_dataset(source, args.gib)
    made = time.perf_counter() - start
    size = sum(p.stat().st_size for p in source.iterdir())
    drop_cache(_files_in(source))
    start = time.perf_counter()
    staged = stage_dataset(source, work / "stage", progress=False)
    staging_s = time.perf_counter() - start
    start = time.perf_counter()
    stage_dataset(source, work / "stage", progress=False)
    again_s = time.perf_counter() - start

    indices = batches(count, args.batch, args.batches)
    warm_stage = read_batches(staged / "train_images.npy", indices)  # as staging leaves it: written pages cached
    drop_cache(_files_in(source))
    cold_source = read_batches(source / "train_images.npy", indices)
    drop_cache(_files_in(staged))
    cold_stage = read_batches(staged / "train_images.npy", indices)
    drop_cache(_files_in(source))
    remote = read_batches_remote(source / "train_images.npy", indices[: args.rtt_batches], args.rtt_ms / 1000)

    per = lambda result, n: (1000 * result[0] / n, args.batch * n / result[0], result[1])  # noqa: E731  (ms/batch, images/s, device bytes)
    figures = {
        "dataset_bytes": size, "images": count, "write_s": made, "staging_s": staging_s, "again_s": again_s,
        "cold_source": per(cold_source, args.batches), "remote": per(remote, args.rtt_batches),
        "warm_stage": per(warm_stage, args.batches), "cold_stage": per(cold_stage, args.batches),
    }
    mib = size / 2**20
    rows = [
        ("dataset", f"{mib:,.0f} MiB, {count:,} images 3x32x32", "random uint8; manifest with sha256 sums"),
        ("staging (cold source, copy + sha256 + fsync)", f"{staging_s:.1f} s = {mib / staging_s:,.0f} MiB/s", "once per pod"),
        ("staging again (copy found complete)", f"{1000 * again_s:.1f} ms", "reads the two manifests and the sizes"),
    ]
    for key, label, note in (
        ("cold_source", "read, source, cold page cache", "this machine's disk, its page cache dropped first"),
        ("remote", f"read, simulated network volume ({args.rtt_ms:g} ms per request)", f"model: cold reads + a wait per image; {args.rtt_batches} batches"),
        ("warm_stage", "read, staged copy as staging leaves it", "pages cached from the copy"),
        ("cold_stage", "read, staged copy, cold page cache", "the node's disk (here the same disk as the source)"),
    ):
        ms, rate, device = figures[key]
        rows.append((f"{label}, B={args.batch}", f"{ms:,.1f} ms/batch = {rate:,.0f} images/s", f"{note}; {device / 2**20:,.0f} MiB from the device"))
    return rows, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="dataset size in GiB (default 1.0)")
    parser.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--batches", type=int, default=200, help="batches read per local measurement (default 200)")
    parser.add_argument("--rtt-ms", type=float, default=0.5, help="simulated network volume: wait per request, ms (default 0.5)")
    parser.add_argument("--rtt-batches", type=int, default=20, help="batches read from the simulated volume (default 20)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: TMPDIR); needs 2 x --gib free")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-staging-", dir=args.dir))
    try:
        rows, figures = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        print(" | ".join(row))
    print(json.dumps(figures))
    if not args.no_write:
        notes = (
            "No network filesystem here: the source and the stage directory are on this machine's one disk. A cold "
            "read is forced with posix_fadvise(POSIX_FADV_DONTNEED) on each file after an fsync (no root, no global "
            "drop_caches). The network volume is a model: cold preads of each image plus a fixed wait per request, "
            "since a memory-mapped gather faults image by image. That is what a dataset much larger than the client's "
            "page cache sees; one that fits is read over the network about once (read-ahead, then the cache) either way, "
            "and staging buys little beyond the first epoch. On this machine the kernel's read-ahead pulls the whole "
            "file even for the cold local reads (the device column), so those measure a fast disk, not random I/O."
        )
        write_results(SECTION, rows, "python benchmarks/bench_staging.py " + " ".join(argv if argv is not None else sys.argv[1:]), notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
