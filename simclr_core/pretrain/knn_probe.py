"""The epoch-end check of pretraining: weighted kNN accuracy of the encoder's features on the val split."""

from __future__ import annotations

import numpy as np
import torch

from simclr_core.config import PretrainConfig
from simclr_core.data import PreparedDataset
from simclr_core.features import extract
from simclr_core.knn import knn_accuracy
from simclr_core.method.augment import batched_test_transform
from simclr_core.method.models import SimCLRModel
from simclr_core.pretrain.model_setup import eval_uses_bf16

__all__ = ["KnnProbe"]


class KnnProbe:
    """Labelled training images as the memory bank, labelled val images as the queries.

    Args:
        bank_images: (M, C, H, W) uint8; bank_labels: (M,) int64.
        query_images: (Q, C, H, W) uint8; query_labels: (Q,) int64.
        num_classes: number of classes; k, temperature: the weighted vote's (pretrain.knn_*).
    """

    def __init__(
        self, bank_images: np.ndarray, bank_labels: torch.Tensor, query_images: np.ndarray, query_labels: torch.Tensor,
        num_classes: int, k: int, temperature: float,
    ) -> None:
        self.bank_images, self.bank_labels = bank_images, bank_labels
        self.query_images, self.query_labels = query_images, query_labels
        self.num_classes, self.k, self.temperature = num_classes, k, temperature

    @classmethod
    def from_dataset(cls, dataset: PreparedDataset, config: PretrainConfig) -> KnnProbe | None:
        """The probe of ``dataset``, or None when it has no val split or no labels to check against.

        With ``config.knn_bank_size`` set, the bank is that many labelled training images spread evenly
        over the split.
        """
        if not dataset.has_split("val"):
            return None
        train_labels = dataset.labels("train")
        labelled = np.flatnonzero(train_labels >= 0)
        val_labels = dataset.labels("val")
        queries = np.flatnonzero(val_labels >= 0)
        if len(labelled) == 0 or len(queries) == 0:
            return None
        if config.knn_bank_size:
            labelled = labelled[np.linspace(0, len(labelled) - 1, min(config.knn_bank_size, len(labelled))).astype(int)]
        return cls(
            dataset.images("train")[labelled], torch.from_numpy(train_labels[labelled]),
            dataset.images("val")[queries], torch.from_numpy(val_labels[queries]), dataset.num_classes,
            config.knn_k, config.knn_temperature,
        )

    def accuracy(self, model: SimCLRModel, image_size: int, device: torch.device) -> float:
        """Top-1 accuracy (0..1) of the queries, from ``model.encoder``'s features in eval mode
        (``model`` is left in the mode it was in)."""
        was_training = model.training
        model.eval()
        test_transform = lambda x: batched_test_transform(x, image_size)  # noqa: E731
        bf16 = eval_uses_bf16(device)  # on CUDA: the epoch's kNN pass at the GPU's bf16 speed
        bank = extract(model.encoder, self.bank_images, test_transform, device, bf16=bf16)
        queries = extract(model.encoder, self.query_images, test_transform, device, bf16=bf16)
        model.train(was_training)
        return knn_accuracy(bank, self.bank_labels, queries, self.query_labels, self.num_classes, self.k, self.temperature)
