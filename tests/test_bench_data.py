"""benchmarks/bench_data.py --tiny: every figure is there and sane, the 1.28M-image extrapolation
follows from the measured rates (recomputed here), and its RESULTS.md section leaves the others alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env

IMAGENET = 1_281_167
ROW_BYTES = 3 * 256 * 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench-data")
    results = work / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## bench_other\n\n| measurement | value | note |\n|---|---|---|\n| x | 1 | y |\n")
    run = subprocess.run(
        [sys.executable, "benchmarks/bench_data.py", "--tiny", "--cache", str(work / "cache"), "--dir", str(work),
         "--results", str(results)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    return figures, results.read_text(), work


def test_prepare_figures_are_measured_and_consistent(tiny):
    figures, _, _ = tiny
    assert figures["generated"]["files"] == 220 and 50_000 < figures["generated"]["mean_file_bytes"] < 200_000  # ImageNet-sized JPEGs
    for key, workers in (("prepare_1", 1), ("prepare_all", figures["prepare_all"]["workers"])):
        run = figures[key]
        assert run["workers"] == workers >= 1
        assert run["images"] == 220  # 200 train (190 train + 10 val) + 20 test, none skipped
        assert run["wall_s"] > 0 and run["images_per_s"] == pytest.approx(run["images"] / run["wall_s"])
        assert run["images_per_s_per_core"] == pytest.approx(run["images_per_s"] / workers)
        assert run["torch_loaded"] is False  # prepare never imports torch
        assert 0 < run["import_rss_bytes"] < run["own_peak_bytes"] and run["own_growth_bytes"] >= 0
        assert all(seconds > 0 for seconds in run["phases"].values())
        assert sum(run["phases"].values()) < run["wall_s"]
    if figures["prepare_all"]["workers"] > 1:  # the forkserver's children were counted
        assert figures["prepare_all"]["worker_peak_bytes"] > 10 * 2**20
    assert figures["prepare_1"]["worker_peak_bytes"] == 0  # no pool with one worker
    assert all(figures["decode"][key] > 0 for key in ("pil_decode_per_s", "resize_per_s", "decode_image_per_s"))


def test_open_verify_data_path_and_staging_are_positive(tiny):
    figures, _, _ = tiny
    assert figures["dataset_bytes"] > 220 * ROW_BYTES  # images plus labels, subsets, manifest
    assert 0 < figures["open_ms"] <= figures["open_ms_max"]
    assert figures["verified_bytes"] > 220 * ROW_BYTES
    for key in ("verify_cold_mb_s", "verify_warm_mb_s", "read_cold_per_s", "read_warm_per_s", "read_cold_map_per_s", "views_1_thread_per_s",
                "views_all_threads_per_s", "staging_mb_s"):
        assert figures[key] > 0, key
    assert figures["train_images"] == 190 and figures["batches"] >= 1
    assert figures["staged_bytes"] == figures["dataset_bytes"]


def test_the_extrapolation_follows_from_the_measured_rates(tiny):
    figures, _, _ = tiny
    ex, one, full = figures["extrapolation"], figures["prepare_1"], figures["prepare_all"]
    assert ex["images"] == IMAGENET
    assert ex["prepare_hours_1_core"] == pytest.approx(IMAGENET / one["images_per_s"] / 3600)
    assert ex["prepare_hours_this_machine"] == pytest.approx(IMAGENET / full["images_per_s"] / 3600)
    per_core = full["images"] / full["wall_s"] / full["workers"]
    serial_per_image = (full["wall_s"] - full["phases"]["decode"]) / full["images"]
    decode_core_s_per_image = full["phases"]["decode"] * full["workers"] / full["images"]
    for cores in (16, 64):
        assert ex[f"prepare_hours_{cores}_cores"] == pytest.approx(IMAGENET / (cores * per_core) / 3600)
        amdahl = IMAGENET * (serial_per_image + decode_core_s_per_image / cores) / 3600
        assert ex[f"prepare_hours_{cores}_cores_amdahl"] == pytest.approx(amdahl)
        assert ex[f"prepare_hours_{cores}_cores_amdahl"] > IMAGENET * serial_per_image / 3600  # the serial part is a floor
    assert ex["serial_write_hours"] == pytest.approx(IMAGENET * full["phases"]["write"] / full["images"] / 3600)
    assert ex["dataset_bytes"] == IMAGENET * 196_608 == 251_887_681_536 and ex["peak_disk_bytes"] == 2 * ex["dataset_bytes"]
    assert ex["staging_minutes"] == pytest.approx(251_887_681_536 / (figures["staging_mb_s"] * 1e6) / 60)
    assert ex["verify_minutes"] == pytest.approx(251_887_681_536 / (figures["verify_cold_mb_s"] * 1e6) / 60)
    assert ex["open_ms"] == figures["open_ms"]
    assert ex["epoch_read_cold_minutes"] == pytest.approx(IMAGENET / figures["read_cold_per_s"] / 60)
    assert ex["epoch_views_cpu_hours"] == pytest.approx(IMAGENET / figures["views_all_threads_per_s"] / 3600)


def test_results_section_is_written_and_the_others_kept(tiny):
    figures, text, work = tiny
    assert "## bench_other\n" in text and "| x | 1 | y |" in text
    section = text[text.index("## bench_data (tiny)\n"):]
    assert "- command: `python benchmarks/bench_data.py --tiny --cache" in section
    assert "Other processes: load average (1 min)" in section
    assert 0 <= figures["other_cpu_share"] <= 1 and figures["run_s"] > 0
    row = next(line for line in section.splitlines() if line.startswith("| **1.28M images: prepare** |"))
    hours = float(re.search(r"\*\*([\d,.]+) h on 1 core", row).group(1).replace(",", ""))
    assert hours == pytest.approx(figures["extrapolation"]["prepare_hours_1_core"], abs=0.051)
    assert "| 1.28M images: disk | 251.9 GB; 503.8 GB while prepare runs |" in section
    assert not list(work.glob("bench-data-*"))  # the prepared datasets and the stage went with the scratch directory
