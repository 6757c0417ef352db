"""`simclr report`: the pretraining run's HTML report (curves, nearest neighbours)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import torch

from simclr_core.report import nearest_neighbours, read_curves
from tests.conftest import run_cli


def test_nearest_neighbours_match_a_brute_force_cosine_search():
    features = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    queries = np.array([3, 17, 40])
    found = nearest_neighbours(features, queries, k=4)
    unit = features / features.norm(dim=1, keepdim=True)
    for query, row in zip(queries, found):
        similarity = [(float(unit[query] @ unit[j]), j) for j in range(50) if j != query]
        expected = [j for _, j in sorted(similarity, reverse=True)[:4]]
        assert row.tolist() == expected


def test_curves_are_read_from_the_dvclive_files(tiny_pretrained):
    curves = read_curves(tiny_pretrained)
    assert {"loss", "lr", "knn_accuracy"} <= set(curves)
    assert "epoch" not in curves  # the x axis is not a curve of its own
    epochs, losses = curves["loss"]
    assert epochs == [1.0, 2.0] and all(value > 0 for value in losses)


def test_report_writes_html_with_pictures_and_a_precision(tiny_pretrained, tiny_prepared, tmp_path):
    result = run_cli("report", "--run", str(tiny_pretrained), "--data", str(tiny_prepared), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "report.html").read_text()
    images = [chunk.split('"', 1)[0] for chunk in page.split("data:image/png;base64,")[1:]]
    assert len(images) == 2  # curves + neighbours
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    from PIL import Image

    curves = Image.open(io.BytesIO(base64.b64decode(images[0])))
    assert curves.width <= 1000  # fits a 1280 px window beside a scroll bar
    precision = json.loads((tmp_path / "metrics.json").read_text())["neighbour_precision"]
    assert 0.0 <= precision <= 1.0


def test_report_of_a_directory_without_a_model_exits_2(tiny_prepared, tmp_path):
    result = run_cli("report", "--run", str(tmp_path), "--data", str(tiny_prepared), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "model.pt does not exist" in result.stderr
