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
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int, k: int = 200, temperature: float = 0.1,
    chunk: int = 1024, bank_chunk: int = 65536, device: torch.device | None = None,
) -> torch.Tensor:
    """Predicted labels (Q,) of ``queries`` (Q, D) from ``bank`` (M, D) with labels (M,), on ``device``
    (default: the queries').

    The bank is read once, ``bank_chunk`` rows at a time, each normalised and moved to ``device`` on
    its own; every chunk's k best neighbours of each ``chunk`` of queries merge into that chunk's
    running top-k. Memory stays at ``chunk`` x ``bank_chunk`` similarities plus Q x k kept, whatever M
    (ImageNet's 1.28M x 2048 bank stays where it is).
    """
    device = device or queries.device
    k = min(k, bank.shape[0])
    query_chunks = F.normalize(queries.to(device).float(), dim=1).split(chunk)
    kept: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(query_chunks)  # (similarities, labels), each (q, k)
    for start in range(0, bank.shape[0], bank_chunk):
        rows = F.normalize(bank[start : start + bank_chunk].to(device).float(), dim=1)
        labels = bank_labels[start : start + bank_chunk].to(device)
        for number, query in enumerate(query_chunks):
            similarity, index = (query @ rows.T).topk(min(k, rows.shape[0]), dim=1)  # this bank chunk's best
            kept[number] = _merged(kept[number], similarity, labels[index], k)
    predictions = []
    for query, (similarity, labels) in zip(query_chunks, kept):
        votes = torch.zeros(query.shape[0], num_classes, device=device)
        votes.scatter_add_(1, labels, (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1).to(queries.device))
    return torch.cat(predictions)


def _merged(
    kept: tuple[torch.Tensor, torch.Tensor] | None, similarity: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of the neighbours ``kept`` so far and a new chunk's (``similarity``, ``labels``), each (q, n)."""
    if kept is None:
        return similarity, labels
    similarity, labels = torch.cat([kept[0], similarity], dim=1), torch.cat([kept[1], labels], dim=1)
    similarity, index = similarity.topk(min(k, similarity.shape[1]), dim=1)
    return similarity, labels.gather(1, index)


def knn_accuracy(
    bank, bank_labels, queries, query_labels, num_classes: int, k: int = 200, temperature: float = 0.1, device: torch.device | None = None,
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of :func:`knn_predict` (on ``device``, default the queries')."""
    predicted = knn_predict(bank, bank_labels, queries, num_classes, k, temperature, device=device)
    return (predicted == query_labels.to(predicted.device)).float().mean().item()
