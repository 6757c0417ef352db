"""torch.distributed for the method: where a process sits, a gradient-preserving all-gather, global BatchNorm.

Global BN: SimCLR computes BatchNorm statistics over the whole global batch of 2N views.
torch's :class:`~torch.nn.SyncBatchNorm` does that on CUDA but refuses CPU tensors, so
:class:`GlobalBatchNorm` does it on any backend (gloo included) with torch's fused
batch-norm kernels and one small collective per layer forward and one backward.
:func:`convert_to_global_bn` picks the right one.

Starting the process group from the launch environment is :mod:`simclr_core.launch`'s job.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistEnv",
    "get_world_size",
    "get_rank",
    "all_gather_with_grad",
    "GlobalBatchNorm",
    "convert_to_global_bn",
]


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, 0 .. world_size - 1.
        world_size: number of processes in the job (1 without torch.distributed).
        local_rank: rank on this node; selects the CUDA device.
        backend: "nccl", "gloo", or None for a single process.
        device: the device this process computes on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def get_world_size() -> int:
    """World size of the default process group, 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def get_rank() -> int:
    """Rank in the default process group, 0 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each slice's gradient back to the rank that owns it.

    Forward: (N, ...) per rank -> (W, N, ...) on every rank.
    Backward: every rank holds d(its loss)/d(all slices); these are summed over ranks
    (all_reduce) and each rank keeps its own slice, i.e. the gradient of the SUM of the
    per-rank losses. Uses all_reduce rather than reduce_scatter because gloo has no
    reduce_scatter.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size()
        # The concatenated (W*N, ...) form is the one every backend accepts (gloo included).
        gathered = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_single(gathered, tensor.contiguous())
        return gathered.view(world_size, *tensor.shape)

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor) -> torch.Tensor:
        grad_gathered = grad_gathered.contiguous()
        dist.all_reduce(grad_gathered, op=dist.ReduceOp.SUM)
        return grad_gathered[dist.get_rank()]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Gather ``tensor`` from every rank, keeping a gradient path to each owner.

    Args:
        tensor: (N, ...) on this rank; N must be the same on every rank.

    Returns:
        (W * N, ...): rank 0's rows first, then rank 1's, ... With no process group it
        returns ``tensor`` itself. Gradients flowing into the result reach each owner's
        ``tensor`` summed over all ranks' losses (the convention DistributedDataParallel's
        gradient averaging expects: see :class:`simclr_core.method.loss.NTXentLoss`).
    """
    if get_world_size() == 1:
        return tensor
    gathered = _AllGatherWithGrad.apply(tensor)
    return gathered.reshape(-1, *tensor.shape[1:])


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the batch of every rank, on any backend.

    Accepts (N, C) or (N, C, *) inputs like BatchNorm1d/2d/3d. In training mode each rank
    computes its per-channel count, mean and centred sum of squares, all ranks exchange them
    (one collective forward, one backward: :class:`_GlobalBatchNormFunction`) and combine them
    exactly (Chan et al.'s parallel variance), so outputs, running statistics and gradients
    equal a plain BatchNorm applied to the concatenation of all ranks' batches. In eval mode
    (or with no process group) it is an ordinary BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or get_world_size() == 1:
            return super().forward(input)
        return self._forward_global(input)

    def _forward_global(self, x: torch.Tensor) -> torch.Tensor:
        out, mean, var, total = _GlobalBatchNormFunction.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean, var * (total / (total - 1).clamp(min=1)))
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as in nn.BatchNorm
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


class _GlobalBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm over every rank's batch, on torch's fused CPU/GPU kernels.

    Forward: each rank's per-channel count, mean and biased variance (one pass of the native
    statistics kernel) are all-gathered and combined exactly (Chan et al.'s parallel
    variance); the normalisation is one pass of the native kernel with the global mean and
    variance. Backward: the native training-mode kernel, given the global mean and invstd,
    returns the local sums ``sum(dy)``, ``sum(dy * xhat)`` (= the parameter gradients) and
    ``dx`` with those sums' local means subtracted; one all_reduce of the two (C,) sums gives
    the global ones, and two in-place passes swap the local means for the global:
    ``dx = gamma * invstd * (dy - sum(dy) / M - xhat * sum(dy * xhat) / M)`` (M = global
    count). One collective forward and one backward per layer, as with torch's SyncBatchNorm.
    Shapes: x (N, C, *) on this rank; weight, bias (C,) or None; returns the output
    (N, C, *), the global mean and biased variance (C,) and the global count (scalar).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        channels = x.shape[1]
        # statistics in float32, or in the input's dtype where that is wider (float64)
        compute = torch.promote_types(torch.float32, x.dtype)
        xc = x.to(compute)
        weight_c = weight.to(compute) if weight is not None else None
        bias_c = bias.to(compute) if bias is not None else None
        count = xc.new_full((1,), x.numel() / channels)
        local_mean, local_var = torch.batch_norm_update_stats(xc, None, None, 0.0)  # (C,), (C,) biased
        stats = torch.cat([count, local_mean, local_var * count])  # (1 + 2C,)
        gathered = stats.new_empty(dist.get_world_size() * stats.numel())
        dist.all_gather_into_tensor(gathered, stats)
        gathered = gathered.view(-1, stats.numel())
        counts, means, m2s = gathered[:, :1], gathered[:, 1 : 1 + channels], gathered[:, 1 + channels :]
        total = counts.sum()
        mean = (counts * means).sum(dim=0) / total  # (C,)
        var = (m2s + counts * (means - mean).square()).sum(dim=0) / total  # (C,), biased
        out = torch.batch_norm(xc, weight_c, bias_c, mean, var, False, 0.0, eps, False)
        ctx.save_for_backward(xc, weight_c, mean, var)
        ctx.eps, ctx.total, ctx.local_count, ctx.input_dtype = eps, total, count, x.dtype
        ctx.param_dtype = weight.dtype if weight is not None else None
        ctx.mark_non_differentiable(mean, var, total)
        return out.to(x.dtype), mean, var, total

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var, _grad_total):
        xc, weight, mean, var = ctx.saved_tensors
        grad_out = grad_out.to(xc.dtype).contiguous(memory_format=_memory_format(xc))
        invstd = torch.rsqrt(var + ctx.eps)
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_out, xc, weight, None, None, mean, invstd, True, ctx.eps, [True, True, True]
        )  # grad_weight = sum(dy * xhat), grad_bias = sum(dy), both local; grad_x uses their local means
        sums = torch.cat([grad_bias, grad_weight])  # (2C,)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        global_sum_dy, global_sum_dy_xhat = sums.chunk(2)
        gamma = weight if weight is not None else torch.ones_like(var)
        # grad_x += gamma * invstd * (a + xhat * b): local means out, global means in
        a = grad_bias / ctx.local_count - global_sum_dy / ctx.total
        b = grad_weight / ctx.local_count - global_sum_dy_xhat / ctx.total
        slope = gamma * invstd.square() * b  # per unit of x
        offset = gamma * invstd * a - slope * mean
        grad_x.addcmul_(xc, _per_channel(slope, xc.dim())).add_(_per_channel(offset, xc.dim()))
        has_params = ctx.param_dtype is not None
        return (
            grad_x.to(ctx.input_dtype),
            grad_weight.to(ctx.param_dtype) if has_params else None,
            grad_bias.to(ctx.param_dtype) if has_params else None,
            None,
        )


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _per_channel(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) broadcastable against an ndim-dimensional (N, C, ...) tensor."""
    return values.reshape(1, -1, *([1] * (ndim - 2)))


def convert_to_global_bn(module: nn.Module, env: DistEnv | None = None) -> nn.Module:
    """Make every BatchNorm in ``module`` compute its statistics over the global batch.

    Single process: returns ``module`` unchanged (local BN already is global).
    NCCL/CUDA: torch's :class:`~torch.nn.SyncBatchNorm`.
    Any other backend (gloo on CPU): :class:`GlobalBatchNorm`.
    Parameters, buffers and train/eval state are carried over.
    """
    backend = env.backend if env is not None else (dist.get_backend() if get_world_size() > 1 else None)
    world_size = env.world_size if env is not None else get_world_size()
    if world_size == 1:
        return module
    if backend == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _replace_bn(module)


def _replace_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        converted.to(device=_module_device(module))
        floats = [t.dtype for t in (module.weight, module.running_mean) if t is not None]
        if floats:  # a float64 (or half) BatchNorm stays one
            converted.to(dtype=floats[0])
        with torch.no_grad():
            if module.affine:
                converted.weight.copy_(module.weight)
                converted.bias.copy_(module.bias)
                converted.weight.requires_grad_(module.weight.requires_grad)
                converted.bias.requires_grad_(module.bias.requires_grad)
            if module.track_running_stats:
                converted.running_mean.copy_(module.running_mean)
                converted.running_var.copy_(module.running_var)
                converted.num_batches_tracked.copy_(module.num_batches_tracked)
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _replace_bn(child))
    return module


def _module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")
