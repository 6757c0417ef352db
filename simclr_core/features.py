"""Frozen-encoder features of a prepared split, in batches."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = ["extract"]


@torch.no_grad()
def extract(
    encoder_fn: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    transform: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    batch_size: int = 1024,
    bf16: bool = False,
) -> torch.Tensor:
    """Features (N, D) float32 on the CPU of uint8 (N, C, H, W) ``images`` after ``transform``.

    ``bf16``: ``encoder_fn`` runs under bf16 autocast (the transform does not: its crop and
    resize are matrix products that autocast would round to bf16 too).
    """
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[start : start + batch_size])).to(device)  # copy out of the memmap
        inputs = transform(batch)
        if inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)  # the layout the models are kept in
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            chunks.append(encoder_fn(inputs).float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0)
