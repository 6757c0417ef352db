"""LARS, its parameter groups, SimCLR's learning-rate scaling and warmup + cosine schedule.

LARS follows the official SimCLR code (``lars_optimizer.py``), with the learning rate inside
the momentum buffer. For every parameter w with gradient g, per step::

    if adapted:  g <- g + weight_decay * w
                 trust = eta * ||w|| / ||g||   if ||w|| > 0 and ||g|| > 0, else 1
    else:        trust = 1                      (BN parameters and biases)
    v <- momentum * v + lr * trust * g
    w <- w - v                                  (Nesterov: w <- w - (momentum * v + lr * trust * g))

BatchNorm parameters and biases are excluded from weight decay and from the trust ratio;
:func:`lars_param_groups` builds the two groups from a model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = [
    "LARS",
    "lars_param_groups",
    "scale_learning_rate",
    "warmup_cosine",
    "warmup_cosine_scheduler",
]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling with SimCLR's update rule (see the module docstring).

    Args:
        params: parameters or parameter groups. A group with ``lars_exclude=True`` gets
            neither weight decay nor trust scaling (use :func:`lars_param_groups`).
        lr: learning rate (already scaled for the batch size).
        momentum: momentum m (0.9 in SimCLR).
        weight_decay: weight decay added to the gradient of adapted parameters (1e-6).
        eta: trust coefficient (0.001).
        nesterov: Nesterov momentum (off in SimCLR).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 0.001,
        nesterov: bool = False,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if eta <= 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov, lars_exclude=False
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params)
        return loss

    def _update_group(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, momentum, eta = group["lr"], group["momentum"], group["eta"]
        exclude = group["lars_exclude"]
        weight_decay = 0.0 if exclude else group["weight_decay"]
        grads = [p.grad for p in params]
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        if exclude:
            scaled = torch._foreach_mul(grads, lr)
        else:
            weight_norms = torch._foreach_norm(params)
            grad_norms = torch._foreach_norm(grads)
            factors = []
            for w_norm, g_norm in zip(weight_norms, grad_norms):
                usable = (w_norm > 0) & (g_norm > 0)
                trust = torch.where(usable, eta * w_norm / g_norm.clamp(min=torch.finfo(g_norm.dtype).tiny), 1.0)
                factors.append(trust * lr)
            scaled = torch._foreach_mul(grads, factors)
        buffers = []
        for p, update in zip(params, scaled):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffers.append(state["momentum_buffer"])
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, scaled)
        if group["nesterov"]:
            steps = torch._foreach_add(scaled, buffers, alpha=momentum)
            torch._foreach_sub_(params, steps)
        else:
            torch._foreach_sub_(params, buffers)


def _is_excluded(module: nn.Module, param_name: str, param: torch.Tensor) -> bool:
    """BatchNorm/GroupNorm/LayerNorm parameters and every bias skip decay and adaptation."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return isinstance(module, norm_types) or param_name == "bias" or param.dim() <= 1


def lars_param_groups(model: nn.Module, weight_decay: float = 1e-6) -> list[dict]:
    """Split ``model``'s trainable parameters into the two LARS groups.

    Returns:
        ``[{"params": adapted, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True}]`` where
        ``excluded`` holds the normalisation layers' parameters and all biases.
    """
    adapted: list[torch.Tensor] = []
    excluded: list[torch.Tensor] = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (excluded if _is_excluded(module, name, param) else adapted).append(param)
    return [
        {"params": adapted, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]


def scale_learning_rate(base_lr: float, batch_size: int, scaling: str = "linear") -> float:
    """SimCLR's learning-rate scaling with the global batch size B.

    ``linear``: base_lr * B / 256 (base_lr 0.3 in the paper);
    ``sqrt``: base_lr * sqrt(B) (base_lr 0.075 in the paper, better for small B or long runs).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if scaling == "linear":
        return base_lr * batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    raise ValueError(f"lr scaling must be 'linear' or 'sqrt', got {scaling!r}")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier at ``step`` (0-based optimizer steps), as in the official code.

    Linear warmup ``step / warmup_steps`` for step < warmup_steps, then a cosine from 1 to 0
    over the remaining ``total_steps - warmup_steps`` steps; 0 from total_steps on.
    """
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
    if step < warmup_steps:
        return step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0 if step < total_steps else 0.0
    progress = min(step - warmup_steps, decay_steps) / decay_steps
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR applying :func:`warmup_cosine` to every group's initial lr.

    Call ``scheduler.step()`` after every optimizer step; its state_dict holds the step
    count, so a resumed run continues the schedule where it stopped.
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps)
    )
