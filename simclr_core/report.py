"""A human-readable report of a pretraining run: one self-contained HTML file.

It shows the per-epoch curves DVCLive wrote (loss, learning rate, images/s, kNN accuracy)
and what the encoder learned: for a few test images, their nearest neighbours among other
test images by cosine similarity of the encoder features h. Pictures are PNGs drawn with
matplotlib and embedded as base64, so the file opens anywhere (the Kubeflow UI's HTML
visualisation, a browser, `dvc plots`-free).
"""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from simclr_core.data import PreparedDataset
from simclr_core.evaluate import load_pretrained
from simclr_core.features import extract
from simclr_core.method.augment import batched_test_transform
from simclr_core.pretrain.trainer import MODEL_NAME
from simclr_core.storage import write_text

__all__ = ["read_curves", "nearest_neighbours", "pretrain_report"]


_NOT_CURVES = {"epoch", "step"}  # the x axis itself, logged beside the metrics
CURVE_COLUMNS = 3  # panels per row: three at 3.2 in and 90 dpi are 864 px, inside a laptop's window


def read_curves(run_dir: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """Per-epoch series DVCLive wrote under ``run_dir/live/plots/metrics``: name -> (steps, values)."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for path in sorted((Path(run_dir) / "live" / "plots" / "metrics").rglob("*.tsv")):
        with path.open() as stream:
            rows = list(csv.DictReader(stream, delimiter="\t"))
        name = path.stem
        if name in _NOT_CURVES:
            continue
        if rows and name in rows[0]:
            curves[name] = ([float(row["step"]) + 1 for row in rows], [float(row[name]) for row in rows])  # epochs from 1
    return curves


def nearest_neighbours(features: torch.Tensor, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices (Q, k) of the k most cosine-similar rows of ``features`` (N, D) to each query row, itself excluded."""
    normalised = F.normalize(features, dim=1)
    similarity = normalised[torch.from_numpy(queries)] @ normalised.T  # (Q, N)
    similarity[torch.arange(len(queries)), torch.from_numpy(queries)] = -float("inf")
    return similarity.topk(k, dim=1).indices.numpy()


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _curves_png(curves: dict[str, tuple[list[float], list[float]]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = min(CURVE_COLUMNS, len(curves))
    rows = -(-len(curves) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for axis, (name, (epochs, values)) in zip(axes.flat, curves.items()):
        axis.plot(epochs, values, marker="o")
        axis.set_title(name.replace("_", " "))
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(curves):]:
        axis.set_visible(False)
    figure.tight_layout()
    try:
        return _png(figure)
    finally:
        plt.close(figure)


def _image(array: np.ndarray) -> np.ndarray:
    """uint8 (C, H, W) -> (H, W) or (H, W, 3) for imshow."""
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def _neighbours_png(images: np.ndarray, labels: np.ndarray, class_names: list[str], queries: np.ndarray, neighbours: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows, columns = len(queries), neighbours.shape[1] + 1
    figure, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.3 * rows), squeeze=False)
    for row, (query, found) in enumerate(zip(queries, neighbours)):
        for column, index in enumerate([query, *found]):
            axis = axes[row][column]
            axis.imshow(_image(images[index]), cmap="gray")
            axis.set_xticks([])
            axis.set_yticks([])
            same = labels[index] == labels[query]
            axis.set_title(class_names[labels[index]][:10], fontsize=7, color="black" if column == 0 or same else "red")
    axes[0][0].set_title("query\n" + axes[0][0].get_title(), fontsize=7)
    figure.tight_layout()
    try:
        return _png(figure)
    finally:
        plt.close(figure)


def pretrain_report(
    run_dir: str | Path, data_dir: str | Path, out_path: str | Path, device: torch.device,
    num_queries: int = 8, k: int = 6, max_images: int = 2000, seed: int = 0,
) -> dict[str, float | None]:
    """Write the HTML report of the run in ``run_dir`` (its model.pt) on ``data_dir``'s test split.

    Returns {"neighbour_precision": fraction of the k neighbours that share the query's label,
    over ``num_queries`` seeded test queries among the first ``max_images`` labelled test images;
    None with fewer than two labelled test images}.
    """
    run_dir = Path(run_dir)
    dataset = PreparedDataset(data_dir)
    model, model_config = load_pretrained(run_dir / MODEL_NAME, device)
    model.eval()
    labels_all = dataset.labels("test")
    keep = np.flatnonzero(labels_all >= 0)[:max_images]
    images, labels = np.asarray(dataset.images("test")[keep]), labels_all[keep]
    features = extract(model.encoder, images, lambda x: batched_test_transform(x, model_config["image_size"]), device)
    queries = np.sort(np.random.default_rng(seed).choice(len(images), size=min(num_queries, len(images)), replace=False))
    neighbours = nearest_neighbours(features, queries, min(k, len(images) - 1))
    # undefined (None) with fewer than two labelled test images: no image has a neighbour
    precision = float((labels[neighbours] == labels[queries][:, None]).mean()) if neighbours.size else None
    shared = f"{100 * precision:.1f}% of the neighbours share the query's class." if precision is not None else ""

    curves = read_curves(run_dir)
    sections = [f"<h1>SimCLR pretraining: {html.escape(str(run_dir))}</h1>"]
    if curves:
        final = ", ".join(f"{name} {values[-1]:.4g}" for name, (_, values) in curves.items())
        sections += ["<h2>Per epoch</h2>", f"<p>Last epoch: {html.escape(final)}</p>", f'<img src="data:image/png;base64,{_curves_png(curves)}">']
    sections += [
        "<h2>Nearest neighbours in the encoder's feature space</h2>",
        f"<p>Each row: a test image, then its {neighbours.shape[1]} nearest test images by cosine similarity of h "
        f"(red title: another class). {shared}</p>",
        f'<img src="data:image/png;base64,{_neighbours_png(images, labels, dataset.class_names, queries, neighbours)}">',
    ]
    page = "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>SimCLR pretraining report</title><style>img {max-width: 100%}</style></head>\n<body>\n"
    write_text(out_path, page + "\n".join(sections) + "\n</body></html>\n")
    return {"neighbour_precision": precision}
