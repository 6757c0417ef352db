"""The data path at ImageNet's shape, on this machine, extrapolated to ImageNet-1k (1,281,167 images).

Generates (once; cached in ``--cache``) a synthetic ImageNet-shaped image folder: ``--images``
JPEGs (default 20,000) of 400-600 x 300-450 pixels (a fifth of them portrait), quality 85, in
``--classes`` class folders under train/ plus ``--test-images`` under test/. Their content is
smooth random colour at two scales plus pixel noise, tuned so that a file is about 100 KB, as an
ImageNet JPEG is (it is not a photograph: decode cost follows the file's size and pixel count,
which match). Then it measures:

- **prepare** (``python -m simclr_core prepare --source imagefolder --image-size 256``, the CLI
  itself, in a wrapper process that imports neither torch nor anything prepare does not) with 1
  worker and with every CPU: images/s, images/s per core, wall time, the time in its phases
  (listing + decoding into the scratch files; gathering, hashing and writing the splits; the
  fsyncs and rename of the commit), the wrapper's peak RSS above its imports and its largest
  worker's peak RSS (the forkserver is stopped at the end so that its workers' rusage reaches
  the wrapper). The JPEGs' page cache is dropped before each run. For comparison, one core's
  rate of PIL's plain decode of the same files (in memory) and of prepare's one-image unit
  (``_decode_image``: open, decode, RGB, centre crop resized to 256);
- **open** (``PreparedDataset(root)``, O(1): headers only) and **verify** (every sha256), with a
  cold and a warm page cache;
- **the pretraining data path at 224 px** from the 256 px images: ``Trainer.make_views`` itself
  (called on a stand-in for the trainer with the trainer's plan, augmentation and seed): the
  batch of B images read at the plan's sorted random indices from the memory map, with a cold
  page cache and a warm one; and the whole of ``make_views`` (read + both augmented views) on
  the CPU with one torch thread (the prefetch thread's default) and with every core;
- **staging** (``stage_dataset``: copy + sha256 + fsync from a cold source);
- **extrapolation** of these to 1,281,167 images (see :func:`extrapolate` for the assumptions).

Usage: python benchmarks/bench_data.py [--images 20000] [--cache DIR] [--dir DIR] [--no-write]
       python benchmarks/bench_data.py --tiny [--results PATH]    # 200 small-count images, seconds; writes only with --results
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from common import RESULTS, device_reads, drop_cache, write_results  # benchmarks/ is the script's directory

SECTION = "bench_data"
REPO = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167  # ImageNet-1k's training images
STORED = 256  # prepare.image_size: the side stored
CROP = 224  # pretrain.image_size: the side trained on
BYTES_PER_IMAGE = 3 * STORED * STORED  # 196,608
GENERATOR_VERSION = 1  # bump when the images change: the cache is keyed on it
QUALITY = 85

# The wrapper that runs the CLI's prepare: the CLI's imports first (so that the growth measured is
# prepare's own), timers around prepare's three phases (module attributes it looks up when called),
# then the CLI; at the end the forkserver is stopped so that its workers' rusage reaches this
# process (RUSAGE_CHILDREN counts waited-for descendants only). It must not import torch: a fork+exec
# child's ru_maxrss starts at its parent's RSS, and the forkserver is one.
CHILD = """
import json, re, resource, sys, time
import PIL.Image, PIL.JpegImagePlugin
import simclr_core.cli, simclr_core.data, simclr_core.data.writer as writer
status = lambda field: int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
phases = {"decode": 0.0, "write": 0.0, "commit": 0.0}
def timed(name, function):
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            phases[name] += time.perf_counter() - start
    return run
writer.load_source, writer._write_splits, writer._commit = (timed(n, getattr(writer, a)) for n, a in
    (("decode", "load_source"), ("write", "_write_splits"), ("commit", "_commit")))
base = status("VmRSS")
code = simclr_core.cli.main(sys.argv[1:])
import multiprocessing.forkserver
multiprocessing.forkserver._forkserver._stop()
print("BENCH_DATA_CHILD " + json.dumps({
    "own_peak_bytes": status("VmHWM"), "own_growth_bytes": status("VmHWM") - base, "import_rss_bytes": base,
    "worker_peak_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    "torch_loaded": "torch" in sys.modules, "phases": phases}), file=sys.stderr)
sys.exit(code)
"""


# ---------------------------------------------------------------------------------------- the folder


def _image(seed: int, index: int, width: int, height: int) -> np.ndarray:
    """Smooth random colour at two scales plus pixel noise: ~100 KB as a quality-85 JPEG at 500 x 375."""
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    coarse = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    fine = rng.integers(0, 256, (max(2, height // 6), max(2, width // 6), 3), dtype=np.uint8)
    x = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    x += (np.asarray(Image.fromarray(fine).resize((width, height), Image.BILINEAR), np.int16) - 128) * 160 >> 8
    x += rng.integers(-128, 128, (height, width, 3), dtype=np.int16) * 112 >> 8
    return np.clip(x, 0, 255).astype(np.uint8)


def _plan(images: int, test_images: int, classes: int, seed: int, scale: float) -> list[tuple[str, int, int, int]]:
    """(relative path, index, width, height) of every file: train/ then test/, round-robin over the classes."""
    rng = np.random.default_rng([seed, 1])
    files = []
    for split, count in (("train", images), ("test", test_images)):
        for k in range(count):
            width, height = int(rng.integers(400, 601)), int(rng.integers(300, 451))
            if rng.random() < 0.2:
                width, height = height, width  # portrait
            width, height = max(8, round(width * scale)), max(8, round(height * scale))
            files.append((f"{split}/c{k % classes:03d}/{split}_{k:06d}.jpg", len(files), width, height))
    return files


def _write_files(root: str, seed: int, files: list[tuple[str, int, int, int]]) -> int:
    from PIL import Image

    written = 0
    for relative, index, width, height in files:
        path = Path(root) / relative
        Image.fromarray(_image(seed, index, width, height)).save(path.with_suffix(".tmp"), "JPEG", quality=QUALITY)
        os.replace(path.with_suffix(".tmp"), path)
        written += path.stat().st_size
    return written


def make_folder(cache: Path, images: int, test_images: int, classes: int, seed: int = 0, scale: float = 1.0,
                workers: int | None = None) -> tuple[Path, dict]:
    """The synthetic folder under ``cache`` (generated in parallel unless already there); (its root, its description)."""
    key = f"v{GENERATOR_VERSION}-n{images}-t{test_images}-c{classes}-s{seed}-x{scale:g}"
    root = cache / f"imagenet-like-{key}"
    done = root / "generated.json"
    if done.is_file():
        return root, {**json.loads(done.read_text()), "cached": True}
    shutil.rmtree(root, ignore_errors=True)
    files = _plan(images, test_images, classes, seed, scale)
    for folder in {str(Path(f[0]).parent) for f in files}:
        (root / folder).mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    chunks = [files[k::4 * workers] for k in range(4 * workers)]
    import multiprocessing

    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
        total = sum(pool.map(_write_files, [str(root)] * len(chunks), [seed] * len(chunks), chunks))
    pixels = [w * h for _, _, w, h in files]
    description = {
        "files": len(files), "train_files": images, "test_files": test_images, "classes": classes, "bytes": total,
        "mean_file_bytes": total / len(files), "mean_pixels": float(np.mean(pixels)), "generate_s": time.perf_counter() - start,
    }
    done.write_text(json.dumps(description))  # written last: a folder without it is generated again
    return root, {**description, "cached": False}


# ------------------------------------------------------------------------------------------- helpers


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def cpu_seconds() -> tuple[float, float]:
    """(CPU-seconds every process on this machine has used, this process and its waited-for children's), now."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system + own.children_user + own.children_system


def available_cpus() -> int:
    from simclr_core.data.pool import available_cpus as cpus

    return cpus()


# ------------------------------------------------------------------------------------------- prepare


def run_prepare(folder: Path, out: Path, workers: int) -> dict:
    """The CLI's prepare of ``folder`` at 256 px with ``workers`` processes, in the wrapper; its figures."""
    drop_cache(p for p in _files(folder) if p.suffix == ".jpg")
    argv = [sys.executable, "-c", CHILD, "prepare", "--source", "imagefolder", "--source-root", str(folder),
            "--image-size", str(STORED), "--workers", str(workers), "--max-dataset-mib", str(10**7), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    run = subprocess.run(argv, cwd=out.parent, env=env, capture_output=True, text=True)  # cwd: no params.yaml there
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"prepare with {workers} worker(s) failed ({run.returncode}):\n{run.stderr[-3000:]}")
    child = json.loads(next(line for line in run.stderr.splitlines() if line.startswith("BENCH_DATA_CHILD "))[17:])
    manifest = json.loads((out / "manifest.json").read_text())
    images = sum(split["images"] for split in manifest["splits"].values())
    return {"workers": workers, "images": images, "wall_s": wall, "images_per_s": images / wall,
            "images_per_s_per_core": images / wall / workers, **child}


def decode_rates(folder: Path, sample: int) -> dict:
    """One core's rate (images/s) on ``sample`` of the JPEGs, read into memory first: PIL's plain full
    decode (and RGB), the centre-square bicubic resize to 256 alone, and prepare's one-image unit
    (``_decode_image``, from the file: open, decode, EXIF, RGB, crop+resize)."""
    import io

    from PIL import Image

    from simclr_core.data.images import _decode_image

    paths = [p for p in _files(folder / "train") if p.suffix == ".jpg"]
    paths = paths[:: max(1, len(paths) // sample)][:sample]
    blobs = [p.read_bytes() for p in paths]  # also warms the page cache for _decode_image
    seconds = {"pil": 0.0, "resize": 0.0, "unit": 0.0}
    for path, blob in zip(paths, blobs):  # interleaved, image by image: the VM's speed drifts, and the resize gets a hot image as in the unit
        start = time.perf_counter()
        with Image.open(io.BytesIO(blob)) as image:
            image.load()
            image = image.convert("RGB")
        middle = time.perf_counter()
        side = min(image.size)  # the unit's resize alone: the centre square, bicubic, to 256
        left, top = (image.width - side) / 2, (image.height - side) / 2
        image.resize((STORED, STORED), Image.BICUBIC, box=(left, top, left + side, top + side))
        end = time.perf_counter()
        _decode_image(path, STORED, 50_000_000)
        seconds["pil"] += middle - start
        seconds["resize"] += end - middle
        seconds["unit"] += time.perf_counter() - end
    n = len(paths)
    return {"sample": n, "pil_decode_per_s": n / seconds["pil"], "resize_per_s": n / seconds["resize"], "decode_image_per_s": n / seconds["unit"]}


# ------------------------------------------------------------------------------- open, verify, staging


def open_and_verify(root: Path, opens: int) -> dict:
    from simclr_core.data import PreparedDataset

    times = []
    for _ in range(opens):
        start = time.perf_counter()
        PreparedDataset(root)
        times.append(time.perf_counter() - start)
    files = [root / name for name in json.loads((root / "manifest.json").read_text())["files"]]
    drop_cache(files)
    start = time.perf_counter()
    hashed = PreparedDataset(root).verify()
    cold = time.perf_counter() - start
    start = time.perf_counter()
    PreparedDataset(root).verify()
    warm = time.perf_counter() - start
    return {"open_ms": 1000 * statistics.median(times), "open_ms_max": 1000 * max(times), "verified_bytes": hashed,
            "verify_cold_s": cold, "verify_cold_mb_s": hashed / cold / 1e6, "verify_warm_mb_s": hashed / warm / 1e6}


def staging(root: Path, stage_dir: Path) -> dict:
    from simclr_core.staging import stage_dataset

    drop_cache(_files(root))
    size = sum(p.stat().st_size for p in _files(root))
    start = time.perf_counter()
    staged = stage_dataset(root, stage_dir, progress=False)
    seconds = time.perf_counter() - start
    shutil.rmtree(staged, ignore_errors=True)
    return {"staged_bytes": size, "staging_s": seconds, "staging_mb_s": size / seconds / 1e6}


# ------------------------------------------------------------------------------------ the data path


def data_path(root: Path, batch: int, batches: int, view_batch: int, view_batches: int) -> dict:
    """The trainer's own ``make_views`` at 224 px on the 256 px images (see the module's docstring)."""
    import torch

    from simclr_core.config import PretrainConfig
    from simclr_core.data import PreparedDataset
    from simclr_core.method.augment import BatchedAugment
    from simclr_core.pretrain.model_setup import augment_config_for
    from simclr_core.pretrain.plan import make_plan
    from simclr_core.pretrain.trainer import Trainer

    path = root / "train_images.npy"
    dataset = PreparedDataset(root)
    images, batch_reader = dataset.images("train"), dataset.batch_reader("train")
    count = len(images)

    def trainer(b: int):
        """A stand-in with what make_views reads of the trainer: its config, plan, reader, augmentation, rows."""
        config = PretrainConfig(image_size=CROP, batch_size=b, epochs=1)
        plan = make_plan(config, count, 1)
        return SimpleNamespace(config=config, plan=plan, train_images=images, read_batch=batch_reader,
                               env=SimpleNamespace(rank=0, device=torch.device("cpu")),
                               augment=BatchedAugment(augment_config_for(config, CROP)), own_rows=plan.view_rows(0))

    reader = trainer(batch)
    batches = max(1, min(batches, reader.plan.steps_per_epoch))

    def read(gather) -> tuple[float, int]:  # make_views' first line: the batch's rows, read
        before, start = device_reads(), time.perf_counter()
        for step in range(batches):
            torch.from_numpy(gather(reader.plan.local_indices(step, 0)))
        return time.perf_counter() - start, device_reads() - before

    # The trainer's reader (PreparedDataset.batch_reader) first, then the memory map's gather for
    # comparison: pages the map has touched stay mapped, and a mapped page cannot be evicted.
    drop_cache([path])
    cold, cold_device = read(reader.read_batch)
    warm, _ = read(reader.read_batch)
    drop_cache([path])
    cold_map, cold_map_device = read(lambda index: np.asarray(images[index]))
    maker = trainer(view_batch)
    view_batches = max(1, min(view_batches, maker.plan.steps_per_epoch))
    threads = torch.get_num_threads()
    views = {}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        try:
            out = Trainer.make_views(maker, 0)  # warm-up (and the shape check)
            start = time.perf_counter()
            for step in range(view_batches):
                Trainer.make_views(maker, step)
            views[n] = view_batch * view_batches / (time.perf_counter() - start)
        finally:
            torch.set_num_threads(threads)
    assert tuple(out.shape) == (2 * view_batch, 3, CROP, CROP), out.shape
    return {
        "train_images": count, "batch": batch, "batches": batches, "read_cold_per_s": batch * batches / cold,
        "read_cold_device_bytes": cold_device, "read_warm_per_s": batch * batches / warm,
        "read_cold_map_per_s": batch * batches / cold_map, "read_cold_map_device_bytes": cold_map_device,
        "view_batch": view_batch, "view_batches": view_batches, "views_1_thread_per_s": views[1],
        "views_all_threads_per_s": views[threads], "threads": threads,
    }


# ----------------------------------------------------------------------------------- extrapolation


def extrapolate(figures: dict, images: int = IMAGENET_TRAIN, cores: tuple[int, ...] = (16, 64)) -> dict:
    """ImageNet-1k's ``images`` from the figures measured here. Assumptions: prepare is linear in the
    images; one core decodes at the 1-worker run's rate and each core of a k-core machine at the
    all-CPU run's per-core rate (k x that rate: linear in cores, which the serial part bounds: the
    writer's gather + sha256 + write, measured as the all-CPU run's write phase per image); 256 px
    rows of 196,608 bytes (the scratch files hold a second copy while prepare runs); staging and
    verify at the rates measured (MB/s, cold source); open is O(1). The ``_amdahl`` figures keep the
    all-CPU run's serial part (its wall time less the decode phase) as it is and divide only the decode
    phase's core-seconds among the cores."""
    one, full = figures["prepare_1"], figures["prepare_all"]
    dataset = images * BYTES_PER_IMAGE
    out = {
        "images": images,
        "prepare_hours_1_core": images / one["images_per_s"] / 3600,
        "prepare_hours_this_machine": images / full["images_per_s"] / 3600,
        "this_machine_cores": full["workers"],
        "per_core_rate": full["images_per_s_per_core"],
        "serial_write_hours": images * full["phases"]["write"] / full["images"] / 3600,
        "dataset_bytes": dataset,
        "peak_disk_bytes": 2 * dataset,
        "staging_minutes": dataset / (figures["staging_mb_s"] * 1e6) / 60,
        "verify_minutes": dataset / (figures["verify_cold_mb_s"] * 1e6) / 60,
        "open_ms": figures["open_ms"],
        "epoch_read_cold_minutes": images / figures["read_cold_per_s"] / 60,
        "epoch_views_cpu_hours": images / figures["views_all_threads_per_s"] / 3600,
    }
    serial = full["wall_s"] - full["phases"]["decode"]  # the writer's phases and the process's start: one core whatever the workers
    for k in cores:
        out[f"prepare_hours_{k}_cores"] = images / (k * full["images_per_s_per_core"]) / 3600
        out[f"prepare_hours_{k}_cores_amdahl"] = images / full["images"] * (serial + full["phases"]["decode"] * full["workers"] / k) / 3600
    return out


# ---------------------------------------------------------------------------------------------- main


def measure(args: argparse.Namespace, work: Path) -> dict:
    folder, generated = make_folder(Path(args.cache), args.images, args.test_images, args.classes, scale=args.scale)
    how = "cached" if generated["cached"] else f"generated in {generated['generate_s']:.0f} s"
    print(f"folder: {folder} ({generated['files']} files, {generated['mean_file_bytes'] / 1e3:.0f} KB each, {how})", flush=True)
    figures: dict = {"generated": generated, "load_before": os.getloadavg()}
    machine_start, own_start, start = *cpu_seconds(), time.perf_counter()
    cpus = available_cpus()
    figures["prepare_1"] = run_prepare(folder, work / "prepared-1", 1)
    shutil.rmtree(work / "prepared-1")
    print(f"prepare, 1 worker: {figures['prepare_1']['images_per_s']:.0f} images/s", flush=True)
    figures["prepare_all"] = run_prepare(folder, work / "prepared", cpus)
    print(f"prepare, {cpus} workers: {figures['prepare_all']['images_per_s']:.0f} images/s", flush=True)
    figures["decode"] = decode_rates(folder, args.decode_sample)
    root = work / "prepared"
    figures["dataset_bytes"] = sum(p.stat().st_size for p in _files(root))
    figures.update(open_and_verify(root, args.opens))
    figures.update(data_path(root, args.batch, args.batches, args.view_batch, args.view_batches))
    figures.update(staging(root, work / "stage"))
    machine_end, own_end = cpu_seconds()
    wall = time.perf_counter() - start
    figures["other_cpu_s"] = max(0.0, (machine_end - machine_start) - (own_end - own_start))
    figures["other_cpu_share"] = figures["other_cpu_s"] / (wall * (os.cpu_count() or 1))
    figures["run_s"] = wall
    figures["extrapolation"] = extrapolate(figures)
    return figures


def rows_of(figures: dict) -> list[tuple[str, str, str]]:
    g, one, full, dec, ex = figures["generated"], figures["prepare_1"], figures["prepare_all"], figures["decode"], figures["extrapolation"]
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    gb = lambda b: f"{b / 1e9:,.1f} GB"  # noqa: E731
    rows = [("synthetic folder", f"{g['train_files']:,} train + {g['test_files']:,} test JPEGs, {g['classes']} classes",
             f"mean {g['mean_file_bytes'] / 1e3:,.0f} KB, {g['mean_pixels'] / 1e3:,.0f} kpixels a file; quality {QUALITY}")]
    for run in (one, full):
        phases = run["phases"]
        rows.append((
            f"prepare at {STORED} px, {run['workers']} worker(s)",
            f"{run['images_per_s']:,.1f} images/s = {run['images_per_s_per_core']:,.1f} per core; {run['wall_s']:,.1f} s",
            f"{run['images']:,} images; decode {phases['decode']:,.1f} s, write {phases['write']:,.1f} s, commit {phases['commit']:,.1f} s; "
            f"cold JPEG cache",
        ))
        rows.append((
            f"prepare peak RSS, {run['workers']} worker(s)",
            f"+{mib(run['own_growth_bytes'])} above imports ({mib(run['own_peak_bytes'])} in all); largest worker {mib(run['worker_peak_bytes'])}"
            if run["workers"] > 1 else f"+{mib(run['own_growth_bytes'])} above imports ({mib(run['own_peak_bytes'])} in all)",
            f"the CLI's process{'; workers: forkserver children' if run['workers'] > 1 else ', decoding in-process'}; torch loaded: {run['torch_loaded']}",
        ))
    rows += [
        ("one core's decode, for comparison", f"PIL plain decode {dec['pil_decode_per_s']:,.0f} images/s; bicubic resize to {STORED} alone "
         f"{dec['resize_per_s']:,.0f}; prepare's one-image unit {dec['decode_image_per_s']:,.0f}",
         f"{dec['sample']} of the JPEGs, warm cache. Per image: decode {1000 / dec['pil_decode_per_s']:.2f} ms, resize "
         f"{1000 / dec['resize_per_s']:.2f} ms, the unit {1000 / dec['decode_image_per_s']:.2f} ms; prepare with 1 worker "
         f"{1000 / one['images_per_s']:.2f} ms ({one['images_per_s'] / dec['pil_decode_per_s']:.0%} of PIL's decode rate, "
         f"{one['images_per_s'] / dec['decode_image_per_s']:.0%} of the unit's)"),
        ("prepared dataset", f"{mib(figures['dataset_bytes'])}", f"{BYTES_PER_IMAGE:,} bytes an image at {STORED} px"),
        ("open (PreparedDataset, O(1))", f"{figures['open_ms']:,.2f} ms", f"median; max {figures['open_ms_max']:,.2f} ms"),
        ("verify (every sha256)", f"{figures['verify_cold_mb_s']:,.0f} MB/s cold, {figures['verify_warm_mb_s']:,.0f} MB/s warm",
         f"{gb(figures['verified_bytes'])} in {figures['verify_cold_s']:,.1f} s (cold)"),
        (f"data path: read B={figures['batch']} at the plan's sorted random indices (the trainer's reader)",
         f"{figures['read_cold_per_s']:,.0f} images/s cold, {figures['read_warm_per_s']:,.0f} warm",
         f"{figures['batches']} batches; {mib(figures['read_cold_device_bytes'])} from the device when cold"),
        ("data path: the same batches gathered from the memory map (the trainer's read until now)", f"{figures['read_cold_map_per_s']:,.0f} images/s cold",
         f"{mib(figures['read_cold_map_device_bytes'])} from the device: the map's read-around"),
        (f"data path: make_views at {CROP} px (read + 2 views), CPU", f"{figures['views_1_thread_per_s']:,.1f} images/s (1 thread), {figures['views_all_threads_per_s']:,.1f} ({figures['threads']} threads)",
         f"B={figures['view_batch']}, {figures['view_batches']} batches; on a GPU the views are made on the device"),
        ("staging (copy + sha256 + fsync, cold source)", f"{figures['staging_mb_s']:,.0f} MB/s", f"{gb(figures['staged_bytes'])} in {figures['staging_s']:,.1f} s"),
        ("**1.28M images: prepare**", f"**{ex['prepare_hours_1_core']:,.1f} h on 1 core; {ex['prepare_hours_this_machine']:,.1f} h on {ex['this_machine_cores']} cores; "
         + "; ".join(f"{ex[f'prepare_hours_{k}_cores']:,.2f} h on {k} cores" for k in (16, 64)) + "**",
         f"linear in images and cores at {ex['per_core_rate']:,.1f} images/s per core (the all-CPU run)"),
        ("1.28M images: prepare, the serial part kept", "; ".join(f"{ex[f'prepare_hours_{k}_cores_amdahl']:,.2f} h on {k} cores" for k in (16, 64)),
         f"the writer (gather + sha256 + write + commit) runs on one core after the decode: {ex['serial_write_hours']:,.2f} h of write phase alone"),
        ("1.28M images: disk", f"{gb(ex['dataset_bytes'])}; {gb(ex['peak_disk_bytes'])} while prepare runs", "196,608 bytes an image; the scratch files hold a second copy until the splits are written"),
        ("1.28M images: staging, verify, open", f"staging {ex['staging_minutes']:,.0f} min; verify {ex['verify_minutes']:,.0f} min; open {ex['open_ms']:,.2f} ms",
         "at the rates measured here (one disk); open is constant"),
        ("1.28M images: one epoch's data path", f"reads {ex['epoch_read_cold_minutes']:,.1f} min (cold); views on this CPU {ex['epoch_views_cpu_hours']:,.1f} h",
         "the views run on the device on a GPU"),
    ]
    return rows


def notes_of(figures: dict) -> str:
    before, other, share = figures["load_before"][0], figures["other_cpu_s"], figures["other_cpu_share"]
    busy = before > 1.5 or share > 0.05
    return (
        "A synthetic folder shaped like ImageNet (JPEGs of 400-600 x 300-450 pixels, a fifth portrait, quality 85, about 100 KB "
        "each: smooth random colour plus pixel noise, not photographs; decode cost follows the pixels and bytes). prepare runs as "
        "the CLI in a wrapper process without torch; its peak RSS is the wrapper's own high-water mark above its imports, the "
        "workers' the largest of the forkserver's children (stopped at the end so that their rusage is counted). The JPEGs' page "
        "cache is dropped before each prepare, the dataset's before verify, the cold read and staging (posix_fadvise DONTNEED after "
        "an fsync, as bench_staging.py). The data path is the trainer's own `make_views` on a stand-in with the trainer's plan, "
        "augmentation (paper policy at 224 px: crop, flip, jitter, grayscale, blur) and seed; on a GPU the trainer moves the uint8 "
        "batch to the device and makes the views there, so the CPU's share of a step is the read (and the pinned copy), and the "
        "CPU views figure is what a CPU-only run gets, not a GPU run's limit (bench_gpu.py measures that). "
        f"Other processes: load average (1 min) {before:.2f} when the run started; during its {figures['run_s']:,.0f} s they used "
        f"{other:,.0f} CPU-seconds, {share:.1%} of the machine (/proc/stat less this run's own)"
        + (": the CPU-bound rates above are low by up to that share." if busy else ".")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000, help="train JPEGs (default 20,000)")
    parser.add_argument("--test-images", type=int, default=500, help="test JPEGs (default 500)")
    parser.add_argument("--classes", type=int, default=100, help="class folders (default 100)")
    parser.add_argument("--scale", type=float, default=1.0, help="scale the image sizes (default 1)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "bench-data-cache"), help="where the generated folder is kept between runs")
    parser.add_argument("--dir", default=None, help="scratch directory for the prepared datasets (default: TMPDIR)")
    parser.add_argument("--batch", type=int, default=256, help="read batch B (default 256)")
    parser.add_argument("--batches", type=int, default=20, help="batches read per read measurement (default 20)")
    parser.add_argument("--view-batch", type=int, default=64, help="B of the make_views measurement (default 64)")
    parser.add_argument("--view-batches", type=int, default=3, help="make_views calls timed per thread count (default 3)")
    parser.add_argument("--decode-sample", type=int, default=400, help="JPEGs decoded alone for comparison (default 400)")
    parser.add_argument("--opens", type=int, default=50, help="opens timed (default 50)")
    parser.add_argument("--generate-only", action="store_true", help="generate (or find) the folder in --cache and stop")
    parser.add_argument("--tiny", action="store_true", help="200 images, small batches: seconds (tests); writes only with --results")
    parser.add_argument("--results", default=None, help="the RESULTS.md to write (default benchmarks/RESULTS.md; --tiny writes only here)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.test_images, args.classes = 200, 20, 10
        args.batch, args.batches, args.view_batch, args.view_batches, args.decode_sample, args.opens = 16, 4, 4, 1, 40, 5
    if args.generate_only:
        folder, generated = make_folder(Path(args.cache), args.images, args.test_images, args.classes, scale=args.scale)
        print(folder, json.dumps(generated))
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.dir))
    try:
        figures = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = rows_of(figures)
    for row in rows:
        print(" | ".join(row))
    print(json.dumps(figures))
    if not args.no_write and (args.results or not args.tiny):
        section = SECTION + (" (tiny)" if args.tiny else "")
        command = "python benchmarks/bench_data.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results(section, rows, command.strip(), notes_of(figures), Path(args.results) if args.results else RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
