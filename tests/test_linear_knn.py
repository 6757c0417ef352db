"""Linear eval's kNN figure: each test image's weighted vote among the training images' features."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from simclr_core import evaluate
from simclr_core.data import PreparedDataset
from simclr_core.features import extract
from simclr_core.method.augment import batched_test_transform
from tests.conftest import run_cli

CPU = torch.device("cpu")


def _brute_force_knn_top1(bank, bank_labels, queries, query_labels, num_classes: int, k: int, temperature: float) -> float:
    """One query at a time: cosine similarity to every bank row, the k largest vote exp(s / t)."""
    bank = F.normalize(bank, dim=1)
    right = 0
    for query, label in zip(F.normalize(queries, dim=1), query_labels.tolist()):
        similarity = bank @ query
        order = sorted(range(len(similarity)), key=lambda i: -float(similarity[i]))[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(bank_labels[i])] += float(torch.exp(similarity[i] / temperature))
        right += max(range(num_classes), key=votes.__getitem__) == label
    return right / len(query_labels)


def test_knn_top1_is_the_weighted_vote_of_test_features_among_training_features(tiny_prepared):
    dataset = PreparedDataset(tiny_prepared)
    size = dataset.image_shape[-1]
    model = evaluate.random_init_model(
        {"arch": "resnet18", "image_size": size, "cifar_stem": False, "width_multiplier": 0.125,
         "proj_layers": 2, "proj_hidden_dim": None, "proj_out_dim": 16}, 0, CPU,
    ).eval()
    results = evaluate.linear_protocol(model, size, dataset, [1e-3], 5, 0, 64, 0, CPU, knn_k=7, knn_temperature=0.5)

    transform = lambda x: batched_test_transform(x, size)  # noqa: E731
    train_images, train_labels = evaluate.labelled(dataset, "train")
    test_images, test_labels = evaluate.labelled(dataset, "test")
    bank, queries = extract(model.encoder, train_images, transform, CPU), extract(model.encoder, test_images, transform, CPU)
    expected = _brute_force_knn_top1(bank, train_labels, queries, test_labels, dataset.num_classes, 7, 0.5)
    assert results["knn_top1"] == expected

    assert "knn_top1" not in evaluate.linear_protocol(model, size, dataset, [1e-3], 5, 0, 64, 0, CPU)  # knn_k 0: none


def test_linear_eval_writes_the_knn_figures_beside_top1(tiny_pretrained, tiny_prepared, tmp_path):
    out = tmp_path / "linear"
    result = run_cli("linear-eval", "--model", str(tiny_pretrained / "model.pt"), "--data", str(tiny_prepared), "--out", str(out),
                     "--max-iter", "5", "--knn-k", "5", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["knn_top1"] <= 1 and 0 <= metrics["random_init_knn_top1"] <= 1
    assert f"kNN top-1 {100 * metrics['knn_top1']:.2f}%" in result.stderr
