"""Weighted kNN classification on frozen features (Wu et al., 2018), SimCLR's cheap monitor.

Each query votes with its k nearest memory-bank features by cosine similarity s, weighted
by exp(s / t) (k = 200, t = 0.1 by default); the predicted class has the largest total vote.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_predict", "knn_accuracy"]


@torch.no_grad()
def knn_predict(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024
) -> torch.Tensor:
    """Predicted labels (Q,) of ``queries`` (Q, D) from ``bank`` (M, D) with labels (M,)."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, queries.shape[0], chunk):
        query = F.normalize(queries[start : start + chunk].float(), dim=1)
        similarity, index = (query @ bank.T).topk(k, dim=1)  # (q, k)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, device=query.device)
        votes.scatter_add_(1, bank_labels[index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes: int, k: int = 200, temperature: float = 0.1) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of :func:`knn_predict`."""
    predicted = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    return (predicted == query_labels).float().mean().item()
