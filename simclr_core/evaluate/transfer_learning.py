"""Transfer (:func:`transfer`): linear evaluation and fine-tuning on another prepared dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from simclr_core.config import TransferConfig
from simclr_core.data import PreparedDataset
from simclr_core.evaluate.common import labelled, load_pretrained, random_init_model
from simclr_core.evaluate.semi_supervised import finetune_pair
from simclr_core.evaluate.linear import linear_protocol

__all__ = ["transfer"]


def transfer(model_path: str | Path, data_dir: str | Path, config: TransferConfig, device: torch.device, log=print) -> dict[str, Any]:
    """Linear (L2 chosen on val) and fine-tuned evaluation on another dataset, with random-init baselines."""
    dataset = PreparedDataset(data_dir)
    model, model_config = load_pretrained(model_path, device)
    image_size = model_config["image_size"]
    log(f"transfer: linear evaluation on {dataset.manifest['source']} ({dataset.manifest['splits']['train']['images']} training images)")
    args = (image_size, dataset, config.l2_grid, config.max_iter, 0, config.batch_size, config.seed, device)
    linear = linear_protocol(model, *args)
    linear_baseline = linear_protocol(random_init_model(model_config, config.seed, device), *args)
    results: dict[str, Any] = {
        "linear": {k: linear[k] for k in ("top1", "top5", "l2")},
        "linear_random_init": {k: linear_baseline[k] for k in ("top1", "top5", "l2")},
    }
    if config.finetune_epochs:
        log(f"transfer: fine-tuning for {config.finetune_epochs} epochs, pretrained and from scratch")
        images, labels = labelled(dataset, "train")
        test_images, test_labels = labelled(dataset, "test")
        pair = finetune_pair(
            model_path, model_config, images, labels, test_images, test_labels, dataset.num_classes, 0,
            config.finetune_epochs, config.batch_size, config.finetune_lr, 0.0, 0, config.seed, device,
            name="transfer fine-tune",
        )
        results["finetune"] = pair["pretrained"]
        results["finetune_random_init"] = pair["scratch"]
    return results
