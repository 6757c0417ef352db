"""Linear evaluation (:func:`linear_eval`): the encoder is frozen (BN in eval mode); an
L2-regularised multinomial logistic regression is fitted by L-BFGS on the standardised features
h of the training images plus ``augment_copies`` crop + flip copies of them; the L2 weight is
chosen on the val split, then the test split is scored (top-1, top-5, confusion matrix). The
same protocol on a randomly initialised encoder is the baseline. (We chose L-BFGS over SGD:
deterministic, no learning rate to tune, seconds on a CPU.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from simclr_core.config import LinearEvalConfig
from simclr_core.data import PreparedDataset
from simclr_core.evaluate.common import labelled, load_pretrained, random_init_model, topk_accuracy
from simclr_core.features import extract
from simclr_core.knn import knn_accuracy
from simclr_core.method.augment import AugmentConfig, BatchedAugment, batched_test_transform
from simclr_core.method.models import SimCLRModel
from simclr_core.method.random_streams import RandomStream, seeded_generator
from simclr_core.pretrain.model_setup import eval_uses_bf16

__all__ = ["LogisticRegression", "fit_logistic_regression", "linear_protocol", "linear_eval"]


class LogisticRegression(nn.Module):
    """Standardisation (fixed, from the training features) followed by a linear layer."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.numel(), num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.standardize(features))


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, max_iter: int,
    start: LogisticRegression | None = None,
) -> LogisticRegression:
    """Minimise mean cross-entropy + (l2 / 2) * ||W||^2 by L-BFGS; features (N, D), labels (N,).

    ``start`` (a fit on the same features) gives the initial weights: a warm start along an
    L2 path converges in a fraction of the iterations.
    """
    mean = features.mean(dim=0)
    std = features.std(dim=0).clamp(min=1e-6)
    model = LogisticRegression(mean, std, num_classes)
    if start is not None:
        model.linear.load_state_dict(start.linear.state_dict())
    inputs = model.standardize(features)  # once, not in every closure call
    optimizer = torch.optim.LBFGS(
        model.linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-6, tolerance_change=1e-9,
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model.linear(inputs), labels) + 0.5 * l2 * model.linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def _select_and_fit(
    train_x, train_y, val_x, val_y, num_classes: int, l2_grid: list[float], max_iter: int
) -> tuple[LogisticRegression, float, dict[str, float]]:
    """Fit along the L2 grid from the strongest weight down (warm starts); keep the best on val."""
    scores: dict[str, float] = {}
    best = None
    previous = None
    for l2 in sorted(l2_grid, reverse=True):
        classifier = fit_logistic_regression(train_x, train_y, num_classes, l2, max_iter, start=previous)
        previous = classifier
        with torch.no_grad():
            accuracy = topk_accuracy(classifier(val_x), val_y, 1) if len(val_y) else 0.0
        scores[f"{l2:g}"] = accuracy
        if best is None or accuracy > best[2]:
            best = (classifier, l2, accuracy)
    return best[0], best[1], scores


def linear_protocol(
    model: SimCLRModel, image_size: int, dataset: PreparedDataset, l2_grid: list[float], max_iter: int,
    augment_copies: int, batch_size: int, seed: int, device: torch.device, knn_k: int = 0, knn_temperature: float = 0.1,
) -> dict[str, Any]:
    """Frozen-feature logistic regression; returns accuracies, the chosen L2 and test predictions.

    With ``knn_k`` > 0, also ``knn_top1``: the test images' weighted kNN accuracy (:mod:`simclr_core.knn`)
    among the clean features of the labelled training images, computed on ``device``.
    """
    model.eval()
    encoder = model.encoder
    test_transform = lambda x: batched_test_transform(x, image_size)  # noqa: E731
    train_images, train_y = labelled(dataset, "train")
    val_images, val_y = labelled(dataset, "val")
    test_images, test_y = labelled(dataset, "test")
    bf16 = eval_uses_bf16(device)
    train_x = [extract(encoder, train_images, test_transform, device, batch_size, bf16)]
    labels = [train_y]
    crop_flip = BatchedAugment(AugmentConfig.crop_flip_only(image_size))
    for copy in range(augment_copies):
        generator = seeded_generator(seed, RandomStream.LINEAR_EVAL_COPY, copy)
        train_x.append(extract(encoder, train_images, lambda x: crop_flip(x, generator), device, batch_size, bf16))
        labels.append(train_y)
    val_x = extract(encoder, val_images, test_transform, device, batch_size, bf16)
    test_x = extract(encoder, test_images, test_transform, device, batch_size, bf16)
    classifier, l2, scores = _select_and_fit(torch.cat(train_x), torch.cat(labels), val_x, val_y, dataset.num_classes, l2_grid, max_iter)
    with torch.no_grad():
        logits = classifier(test_x)
    results = {
        "top1": topk_accuracy(logits, test_y, 1),
        "top5": topk_accuracy(logits, test_y, 5),
        "l2": l2,
        "val_top1_by_l2": scores,
        "predicted": logits.argmax(dim=1),
        "actual": test_y,
    }
    if knn_k:  # the bank goes to the device a chunk at a time (simclr_core.knn)
        results["knn_top1"] = knn_accuracy(train_x[0], train_y, test_x, test_y, dataset.num_classes, knn_k, knn_temperature, device=device)
    return results


def linear_eval(model_path: str | Path, data_dir: str | Path, config: LinearEvalConfig, device: torch.device) -> dict[str, Any]:
    """Linear evaluation of the pretrained encoder and of a random-init encoder (the baseline)."""
    dataset = PreparedDataset(data_dir)
    model, model_config = load_pretrained(model_path, device)
    image_size = model_config["image_size"]
    args = (image_size, dataset, config.l2_grid, config.max_iter, config.augment_copies, config.batch_size, config.seed, device,
            config.knn_k, config.knn_temperature)
    pretrained = linear_protocol(model, *args)
    baseline = linear_protocol(random_init_model(model_config, config.seed, device), *args)
    return {
        "pretrained": pretrained,
        "random_init": baseline,
        "class_names": dataset.class_names,
    }
