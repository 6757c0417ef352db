"""Semi-supervised fine-tuning (:func:`finetune`): the whole network (encoder, the first
``head_layers`` projection-head blocks, a new linear classifier) is trained on a label subset
with crop + flip only, SGD with Nesterov momentum 0.9 and a cosine schedule; the same recipe
from a random initialisation is the baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simclr_core.config import ConfigError, FinetuneConfig
from simclr_core.data import PreparedDataset
from simclr_core.evaluate.common import labelled, load_pretrained, random_init_model, topk_accuracy
from simclr_core.features import extract
from simclr_core.method.augment import AugmentConfig, BatchedAugment, batched_test_transform
from simclr_core.method.models import SimCLRModel
from simclr_core.method.optim import warmup_cosine
from simclr_core.method.random_streams import RandomStream, seeded_generator
from simclr_core.pretrain.model_setup import eval_uses_bf16
from simclr_core.pretrain.observers import progress_bar

__all__ = ["Classifier", "train_classifier", "score_classifier", "finetune_pair", "finetune"]


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


def finetune_pair(
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
    test_images, test_labels = labelled(dataset, "test")
    train_images = dataset.images("train")
    train_labels = dataset.labels("train")
    results = {}
    for fraction in config.label_fractions:
        index = dataset.subset(fraction)
        images = train_images[index]
        labels = torch.from_numpy(train_labels[index])
        log(f"finetune: {fraction:g} of the labels ({len(index)} images), {config.epochs} epochs, pretrained and from scratch")
        results[f"{fraction:g}"] = finetune_pair(
            model_path, model_config, images, labels, test_images, test_labels, dataset.num_classes, config.head_layers,
            config.epochs, config.batch_size, config.lr, config.weight_decay, config.min_steps, config.seed, device,
            name=f"finetune {fraction:g} of the labels",
        )
    return results
