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
        """One step of the group's parameters, in place, as multi-tensor (``torch._foreach_*``) ops.

        On a GPU a foreach op over tensors of equal shapes is a few kernel launches for the whole
        group instead of one per parameter (ResNet-50 has 161); the norms are one such op. The
        trust-scaled update multiplies by 0-d tensors (the trust ratios stay on the device:
        nothing here waits for it), which torch runs as one kernel per tensor. The step is
        memory-bound (a few flops per element), so it makes few passes over the parameters, and
        the decayed gradient g + wd * w goes into a buffer kept between steps (fresh step-sized
        temporaries cost more than the math on a CPU). tests/test_optim.py holds the rule's
        per-tensor form as the reference.
        """
        lr, momentum = group["lr"], group["momentum"]
        grads = [p.grad for p in params]
        buffers = [self._momentum_buffer(p) for p in params]
        if group["lars_exclude"]:
            direction, factors = grads, None  # v <- m v + lr g
        else:
            direction = self._decayed_grads(params, grads, group["weight_decay"])
            factors = self._trust_ratios(params, direction, group["eta"], lr)  # v <- m v + lr trust g
        torch._foreach_mul_(buffers, momentum)
        _add_scaled(buffers, direction, lr, factors, sign=1.0)
        if group["nesterov"]:  # w <- w - (m v + lr trust g)
            torch._foreach_add_(params, buffers, alpha=-momentum)
            _add_scaled(params, direction, lr, factors, sign=-1.0)
        else:  # w <- w - v
            torch._foreach_sub_(params, buffers)

    def _momentum_buffer(self, param: torch.Tensor) -> torch.Tensor:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        return state["momentum_buffer"]

    def _decayed_grads(self, params: list[torch.Tensor], grads: list[torch.Tensor], weight_decay: float) -> list[torch.Tensor]:
        """g + weight_decay * w for every parameter, written into a buffer reused every step
        (scratch, not state: it is not in ``state_dict()``, so checkpoints do not grow; and
        ``p.grad`` keeps what backward wrote)."""
        if weight_decay == 0:
            return grads
        scratch = self.__dict__.setdefault("_decayed_grad_scratch", {})
        for param in params:
            if param not in scratch:
                scratch[param] = torch.empty_like(param)
        decayed = [scratch[param] for param in params]
        torch._foreach_copy_(decayed, grads)
        torch._foreach_add_(decayed, params, alpha=weight_decay)  # the same a + alpha * b as torch.add's
        return decayed

    @staticmethod
    def _trust_ratios(params: list[torch.Tensor], grads: list[torch.Tensor], eta: float, lr: float) -> list[torch.Tensor]:
        """lr * trust for every parameter, as 0-d tensors (no host sync): trust = eta ||w|| / ||g||
        where both norms are positive, else 1."""
        weight_norms = torch.stack(torch._foreach_norm(params))
        grad_norms = torch.stack(torch._foreach_norm(grads))
        usable = (weight_norms > 0) & (grad_norms > 0)
        trust = torch.where(usable, eta * weight_norms / grad_norms.clamp(min=torch.finfo(grad_norms.dtype).tiny), 1.0)
        return list((lr * trust).unbind())


def _add_scaled(
    targets: list[torch.Tensor], direction: list[torch.Tensor], lr: float, factors: list[torch.Tensor] | None, sign: float
) -> None:
    """targets += sign * lr * direction (factors None), or += sign * factors * direction."""
    if factors is None:
        torch._foreach_add_(targets, direction, alpha=sign * lr)
    else:
        torch._foreach_addcmul_(targets, direction, factors, value=sign)


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
