"""Evaluations of a pretrained encoder: linear, semi-supervised fine-tuning, transfer.

- **Linear evaluation** (:func:`linear_eval`): the encoder is frozen (BN in eval mode); an
  L2-regularised multinomial logistic regression is fitted by L-BFGS on the standardised
  features h of the training images plus ``augment_copies`` crop + flip copies of them; the
  L2 weight is chosen on the val split, then the test split is scored (top-1, top-5,
  confusion matrix). The same protocol on a randomly initialised encoder is the baseline.
  (We chose L-BFGS over SGD: deterministic, no learning rate to tune, seconds on a CPU.)
- **Fine-tuning** (:func:`finetune`): the whole network (encoder, the first ``head_layers``
  projection-head blocks, a new linear classifier) is trained on a label subset with crop +
  flip only, SGD with Nesterov momentum 0.9 and a cosine schedule; the same recipe from a
  random initialisation is the baseline.
- **Transfer** (:func:`transfer`): both of the above on another prepared dataset.

Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simclr_core.checkpoint import CheckpointError, load_checkpoint
from simclr_core.config import ConfigError, FinetuneConfig, LinearEvalConfig, TransferConfig
from simclr_core.data import PreparedDataset
from simclr_core.features import extract
from simclr_core.method.augment import AugmentConfig, BatchedAugment, batched_test_transform
from simclr_core.method.models import SimCLRModel
from simclr_core.method.optim import warmup_cosine
from simclr_core.method.random_streams import RandomStream, seeded_generator
from simclr_core.pretrain.model_setup import build_model, eval_uses_bf16
from simclr_core.pretrain.observers import progress_bar

__all__ = ["load_pretrained", "fit_logistic_regression", "linear_eval", "finetune", "transfer", "topk_accuracy"]


def load_pretrained(path: str | Path, device: torch.device) -> tuple[SimCLRModel, dict[str, Any]]:
    """The model saved by pretraining (``model.pt`` or a training checkpoint), and its model settings.

    Raises CheckpointError, naming the file, when it is not a pretraining checkpoint or its
    weights do not fit the model its ``model_config`` describes (another architecture or width,
    missing or extra weights).
    """
    state = load_checkpoint(path, map_location="cpu")
    weights, model_config = state.get("model"), state.get("model_config")
    if not isinstance(weights, dict) or not isinstance(model_config, dict):
        raise CheckpointError(
            f"{path} is not a simclr pretraining checkpoint: it needs 'model' (weights) and 'model_config' entries, "
            f"it has {sorted(map(str, state))[:8]}; use the model.pt that `simclr pretrain` writes"
        )
    image_size = model_config.get("image_size")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise CheckpointError(f"{path}: model_config.image_size must be a positive integer, got {image_size!r}")
    try:
        model = build_model(model_config)
    except ConfigError as error:
        raise CheckpointError(f"{path}: its model_config cannot be built: {error}") from None
    problems = _weight_mismatches(model.state_dict(), weights)
    if problems:
        raise CheckpointError(
            f"{path}: its weights do not fit its model_config ({_describe_model(model_config)}): {'; '.join(problems)}. "
            "It was written for another architecture or width, or edited; use the model.pt of the `simclr pretrain` run"
        )
    model.load_state_dict(weights)
    return model.to(device, memory_format=torch.channels_last), model_config  # faster on CPU and GPU (pretrain/model_setup.py)


def _describe_model(model_config: dict[str, Any]) -> str:
    keys = ("arch", "width_multiplier", "cifar_stem", "proj_layers", "proj_hidden_dim", "proj_out_dim")
    return ", ".join(f"{key} {model_config[key]}" for key in keys if key in model_config)


def _weight_mismatches(expected: dict[str, torch.Tensor], weights: dict[str, Any], shown: int = 3) -> list[str]:
    """What keeps ``weights`` from loading into a model whose state dict is ``expected`` (empty when it loads)."""
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    wrong = [
        f"{key}: checkpoint {tuple(weights[key].shape) if torch.is_tensor(weights[key]) else type(weights[key]).__name__}, "
        f"model {tuple(expected[key].shape)}"
        for key in expected
        if key in weights and (not torch.is_tensor(weights[key]) or weights[key].shape != expected[key].shape)
    ]
    problems = []
    for label, keys in (("missing weight(s)", missing), ("unexpected weight(s)", unexpected), ("size mismatch(es)", wrong)):
        if keys:
            more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
            problems.append(f"{len(keys)} {label}: {', '.join(map(str, keys[:shown]))}{more}")
    return problems


def random_init_model(model_config: dict[str, Any], seed: int, device: torch.device) -> SimCLRModel:
    torch.manual_seed(seed)
    return build_model(model_config).to(device, memory_format=torch.channels_last)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits; logits (N, C), labels (N,)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1).float().mean().item()


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


def _labelled(dataset: PreparedDataset, split: str) -> tuple[np.ndarray, torch.Tensor]:
    labels = dataset.labels(split)
    keep = np.flatnonzero(labels >= 0)
    if len(keep) == 0:
        raise ConfigError(f"split '{split}' of {dataset.root} has no labels; evaluation needs a labelled dataset")
    images = dataset.images(split)
    if len(keep) < len(labels):
        images = images[keep]
    return images, torch.from_numpy(labels[keep])


def _linear_protocol(
    model: SimCLRModel, image_size: int, dataset: PreparedDataset, l2_grid: list[float], max_iter: int,
    augment_copies: int, batch_size: int, seed: int, device: torch.device,
) -> dict[str, Any]:
    """Frozen-feature logistic regression; returns accuracies, the chosen L2 and test predictions."""
    model.eval()
    encoder = model.encoder
    test_transform = lambda x: batched_test_transform(x, image_size)  # noqa: E731
    train_images, train_y = _labelled(dataset, "train")
    val_images, val_y = _labelled(dataset, "val")
    test_images, test_y = _labelled(dataset, "test")
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
    return {
        "top1": topk_accuracy(logits, test_y, 1),
        "top5": topk_accuracy(logits, test_y, 5),
        "l2": l2,
        "val_top1_by_l2": scores,
        "predicted": logits.argmax(dim=1),
        "actual": test_y,
    }


def linear_eval(model_path: str | Path, data_dir: str | Path, config: LinearEvalConfig, device: torch.device) -> dict[str, Any]:
    """Linear evaluation of the pretrained encoder and of a random-init encoder (the baseline)."""
    dataset = PreparedDataset(data_dir)
    model, model_config = load_pretrained(model_path, device)
    image_size = model_config["image_size"]
    args = (image_size, dataset, config.l2_grid, config.max_iter, config.augment_copies, config.batch_size, config.seed, device)
    pretrained = _linear_protocol(model, *args)
    baseline = _linear_protocol(random_init_model(model_config, config.seed, device), *args)
    return {
        "pretrained": pretrained,
        "random_init": baseline,
        "class_names": dataset.class_names,
    }


# ------------------------------------------------------------------------------ fine-tuning


class Classifier(nn.Module):
    """Encoder, the first ``head_layers`` projection-head blocks, and a linear classifier."""

    def __init__(self, model: SimCLRModel, head_layers: int, num_classes: int) -> None:
        super().__init__()
        if head_layers >= len(model.head.layers):
            raise ConfigError(
                f"finetune.head_layers={head_layers} must be below the projection head's depth ({len(model.head.layers)})"
            )
        self.encoder = model.encoder
        self.head = nn.Sequential(*model.head.layers[:head_layers])
        self.classifier = nn.Linear(model.head.feature_dim(head_layers), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.encoder(x)))


def train_classifier(
    network: Classifier, images: np.ndarray, labels: torch.Tensor, image_size: int, epochs: int, batch_size: int,
    lr: float, weight_decay: float, min_steps: int, seed: int, device: torch.device, desc: str | None = None,
) -> Classifier:
    """Fine-tune all of ``network`` with crop + flip, SGD (Nesterov, momentum 0.9) and a cosine schedule.

    ``desc`` names the run on its progress bar (images/s and the time left, on stderr). The
    forward pass runs under bf16 autocast where :func:`eval_uses_bf16` says so (on CUDA); the
    weights, SGD and the cross-entropy stay float32.
    """
    n = len(labels)
    if n < 2:  # BatchNorm in training mode cannot normalise a batch of one
        raise ConfigError(f"fine-tuning needs at least 2 labelled images, this label subset has {n}; use a larger label fraction")
    batch_size = max(2, min(batch_size, n))
    steps_per_epoch = max(1, n // batch_size)
    total_steps = max(min_steps, epochs * steps_per_epoch)
    optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps, 0))
    augment = BatchedAugment(AugmentConfig.crop_flip_only(image_size))
    labels = labels.to(device)
    bf16 = eval_uses_bf16(device)
    network.train()
    bar = progress_bar(total_steps, 0, batch_size, desc=desc)
    for step in range(total_steps):
        epoch, position = divmod(step, steps_per_epoch)
        order = torch.randperm(n, generator=seeded_generator(seed, RandomStream.CLASSIFIER_ORDER, epoch))
        index = order[position * batch_size : (position + 1) * batch_size].sort().values
        batch = torch.from_numpy(np.ascontiguousarray(images[index.numpy()])).to(device)
        views = augment(batch, seeded_generator(seed, RandomStream.CLASSIFIER_VIEWS, step)).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = network(views)
        loss = F.cross_entropy(logits.float(), labels[index.to(device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.update()
    bar.close()
    return network


@torch.no_grad()
def score_classifier(network: nn.Module, images: np.ndarray, labels: torch.Tensor, image_size: int, device: torch.device) -> dict[str, float]:
    network.eval()
    logits = extract(network, images, lambda x: batched_test_transform(x, image_size), device, bf16=eval_uses_bf16(device))
    return {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5)}


def _finetune_pair(
    model_path, model_config, images, labels, test_images, test_labels, num_classes, head_layers, epochs, batch_size,
    lr, weight_decay, min_steps, seed, device, name: str = "finetune",
) -> dict[str, dict[str, float]]:
    """Fine-tuned from the pretrained weights and, as the baseline, from a random initialisation."""
    results = {}
    for init in ("pretrained", "scratch"):
        if init == "pretrained":
            model, _ = load_pretrained(model_path, device)
        else:
            model = random_init_model(model_config, seed, device)
        torch.manual_seed(seed)
        network = Classifier(model, head_layers, num_classes).to(device)  # model is channels_last already
        train_classifier(
            network, images, labels, model_config["image_size"], epochs, batch_size, lr, weight_decay, min_steps, seed, device,
            desc=f"{name}, {init}",
        )
        results[init] = score_classifier(network, test_images, test_labels, model_config["image_size"], device)
    return results


def finetune(model_path: str | Path, data_dir: str | Path, config: FinetuneConfig, device: torch.device, log=print) -> dict[str, Any]:
    """Semi-supervised fine-tuning on each label fraction; returns {fraction: {pretrained, scratch}}."""
    dataset = PreparedDataset(data_dir)
    _, model_config = load_pretrained(model_path, device)
    test_images, test_labels = _labelled(dataset, "test")
    train_images = dataset.images("train")
    train_labels = dataset.labels("train")
    results = {}
    for fraction in config.label_fractions:
        index = dataset.subset(fraction)
        images = train_images[index]
        labels = torch.from_numpy(train_labels[index])
        log(f"finetune: {fraction:g} of the labels ({len(index)} images), {config.epochs} epochs, pretrained and from scratch")
        results[f"{fraction:g}"] = _finetune_pair(
            model_path, model_config, images, labels, test_images, test_labels, dataset.num_classes, config.head_layers,
            config.epochs, config.batch_size, config.lr, config.weight_decay, config.min_steps, config.seed, device,
            name=f"finetune {fraction:g} of the labels",
        )
    return results


def transfer(model_path: str | Path, data_dir: str | Path, config: TransferConfig, device: torch.device, log=print) -> dict[str, Any]:
    """Linear (L2 chosen on val) and fine-tuned evaluation on another dataset, with random-init baselines."""
    dataset = PreparedDataset(data_dir)
    model, model_config = load_pretrained(model_path, device)
    image_size = model_config["image_size"]
    log(f"transfer: linear evaluation on {dataset.manifest['source']} ({dataset.manifest['splits']['train']['images']} training images)")
    args = (image_size, dataset, config.l2_grid, config.max_iter, 0, config.batch_size, config.seed, device)
    linear = _linear_protocol(model, *args)
    linear_baseline = _linear_protocol(random_init_model(model_config, config.seed, device), *args)
    results: dict[str, Any] = {
        "linear": {k: linear[k] for k in ("top1", "top5", "l2")},
        "linear_random_init": {k: linear_baseline[k] for k in ("top1", "top5", "l2")},
    }
    if config.finetune_epochs:
        log(f"transfer: fine-tuning for {config.finetune_epochs} epochs, pretrained and from scratch")
        images, labels = _labelled(dataset, "train")
        test_images, test_labels = _labelled(dataset, "test")
        pair = _finetune_pair(
            model_path, model_config, images, labels, test_images, test_labels, dataset.num_classes, 0,
            config.finetune_epochs, config.batch_size, config.finetune_lr, 0.0, 0, config.seed, device,
            name="transfer fine-tune",
        )
        results["finetune"] = pair["pretrained"]
        results["finetune_random_init"] = pair["scratch"]
    return results
