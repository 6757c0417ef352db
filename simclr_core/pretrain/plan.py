"""The run's plan: its sizes, and which images each process trains on at each step.

Epoch e visits the training images in the order ``randperm(N)`` drawn from
:attr:`RandomStream.PRETRAIN_ORDER` at e, cut into global batches of B (the remainder is
dropped); rank r takes rows [r*B/W, (r+1)*B/W) of each. So the global batch of a step is a
pure function of the settings, the dataset's size and the step, whatever the world size W.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from simclr_core.config import ConfigError, PretrainConfig
from simclr_core.method.optim import scale_learning_rate
from simclr_core.method.random_streams import RandomStream, seeded_generator

__all__ = ["Plan", "make_plan", "check_world_size"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes derived from the settings, the dataset and the world size, and the rows of every step."""

    seed: int
    batch_size: int  # global, over all processes
    num_images: int  # in the training split
    local_batch: int  # this process's images per step: batch_size / world size
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float  # the peak learning rate, scaled from base_lr by the global batch

    def epoch_of(self, steps_done: int) -> int:
        """The epoch, counting from 1, of the step that made ``steps_done`` (>= 1) steps done."""
        return (steps_done - 1) // self.steps_per_epoch + 1

    def local_indices(self, step: int, rank: int) -> np.ndarray:
        """(local_batch,) int64: the training images rank ``rank`` trains on at ``step`` (from 0), ascending."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_images, generator=seeded_generator(self.seed, RandomStream.PRETRAIN_ORDER, epoch)).numpy()
        global_batch = np.sort(order[position * self.batch_size : (position + 1) * self.batch_size])  # sorted: memmap reads in order
        return global_batch[rank * self.local_batch : (rank + 1) * self.local_batch]

    def view_rows(self, rank: int) -> torch.Tensor:
        """(2 * local_batch,) int64: rank ``rank``'s rows among a step's 2B global views
        (all first views, then all second views)."""
        rows = torch.arange(self.local_batch) + rank * self.local_batch
        return torch.cat([rows, rows + self.batch_size])


def check_world_size(config: PretrainConfig, world_size: int, num_images: int | None = None) -> None:
    """The global batch must split evenly over the processes and fit in the training split.

    Called by the CLI before any rendezvous, so a bad launch fails at once instead of hanging.
    """
    if config.batch_size < world_size or config.batch_size % world_size:
        raise ConfigError(
            f"pretrain.batch_size={config.batch_size} must be a multiple of the number of processes ({world_size})"
        )
    if num_images is not None and num_images < config.batch_size:
        more = f"; {world_size} processes cannot each get an image" if world_size > num_images else ""
        raise ConfigError(f"pretrain.batch_size={config.batch_size} is larger than the training split ({num_images} images){more}")


def make_plan(config: PretrainConfig, num_images: int, world_size: int) -> Plan:
    """The plan of ``config`` on ``num_images`` training images and ``world_size`` processes."""
    check_world_size(config, world_size, num_images)
    steps_per_epoch = num_images // config.batch_size
    total = steps_per_epoch * config.epochs
    return Plan(
        seed=config.seed,
        batch_size=config.batch_size,
        num_images=num_images,
        local_batch=config.batch_size // world_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=min(total, round(config.warmup_epochs * steps_per_epoch)),
        lr=scale_learning_rate(config.base_lr, config.batch_size, config.lr_scaling),
    )
