"""What every benchmark shares: timing, the machine's description, writing RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def best_seconds(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def mean_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Mean of ``repeats`` timed calls after ``warmup`` untimed ones (to compare with an epoch's average step)."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def spread(values: list[float], fmt: str = ",.1f") -> str:
    """"range LOW to HIGH" of repeated measurements."""
    return f"range {min(values):{fmt}} to {max(values):{fmt}}"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    from simclr_core.pretrain.model_setup import _cpu_has_native_bf16

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    bf16 = "native bf16 (precision auto = fp32 on CPU all the same)" if _cpu_has_native_bf16() else "no native bf16"
    return (
        f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} CPUs, {bf16}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {device}"
    )


def write_results(section: str, rows: list[tuple[str, str, str]], command: str, notes: str = "", results: Path = RESULTS) -> None:
    """Replace ``section`` of ``results`` (RESULTS.md) with a table of ``rows``, keeping the other sections."""
    header = (
        f"## {section}\n\n"
        f"- date: {datetime.date.today().isoformat()}\n"
        f"- machine: {machine()}\n"
        f"- command: `{command}`\n\n"
        + (f"{notes.strip()}\n\n" if notes else "")
        + "| measurement | value | note |\n|---|---|---|\n"
    )
    body = "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows)
    existing = results.read_text() if results.exists() else "# Benchmark results\n\nEach section is written by the script it names.\n\n"
    start = existing.find(f"## {section}\n")
    if start >= 0:
        end = existing.find("\n## ", start + 1)
        existing = existing[:start] + existing[end + 1 :] if end >= 0 else existing[:start]
    tmp = results.with_suffix(".md.tmp")
    tmp.write_text(existing.rstrip("\n") + "\n\n" + header + body + "\n")
    tmp.replace(results)


def reset_peak_rss_kib() -> int:
    """Reset this process's peak RSS (on Linux a child starts with its parent's) and return the RSS now, KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kib() -> int:
    """Peak RSS of this process since the last reset, KiB."""
    try:
        return _proc_status_kib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def drop_cache(paths) -> None:
    """Evict the files ``paths`` from the page cache (fsync first: only clean pages are dropped),
    without root and without touching other files' cached pages."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def device_reads() -> int:
    """Bytes this process has had read from the block device (/proc/self/io read_bytes): proof
    that a "cold" read went to the disk rather than the page cache."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0
