"""NT-Xent, the normalised temperature-scaled cross-entropy loss of SimCLR.

For a batch of N images with two views each, z_a[i] and z_b[i] are the projections of the
two views of image i. Every one of the 2N rows is a query: its positive is the other view of
the same image, its negatives are all 2N_global - 2 other views in the global batch (every
rank's rows, gathered with a gradient path back to the rank that owns them). With
similarity sim(u, v) = u.v / (|u| |v|) and temperature t, the loss of row k is

    l_k = -log( exp(sim(z_k, z_pos(k)) / t) / sum_{j != k} exp(sim(z_k, z_j) / t) )

and the loss returned on each rank is the mean of l_k over that rank's own 2N rows. The
mean of the per-rank losses over ranks equals the single-process loss on the concatenated
global batch. Gradients follow the DistributedDataParallel convention: each rank's
``z`` receives the gradient of the SUM of all ranks' losses, so after DDP averages the
parameter gradients over W ranks they equal the single-process gradient exactly.

The logits are computed in float32 even under autocast (bf16 similarities of unit vectors
divided by t = 0.1 lose too much precision for the softmax).

Memory: the (2N, 2N_global) logits are never held whole. The loss is computed by blocks of
at most ``block_rows`` query rows (forward: a log-sum-exp per row; backward: each block's
logits recomputed and turned into gradients at once), so the loss needs
O(block_rows * 2N_global) floats instead of several copies of the full logits: at a global
batch of 4096, about 140 MiB instead of 815 MiB (benchmarks/bench_loss.py). When all rows fit
in one block (up to B = 1024), the forward's softmax is kept for the backward pass; beyond,
each block's logits are recomputed there (one extra block matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simclr_core.method.distributed import all_gather_with_grad, get_rank, get_world_size

__all__ = ["NTXentLoss", "nt_xent"]

_MASKED = -1e9  # logit given to a row's similarity with itself (float32-safe, not -inf)
BLOCK_ELEMENTS = 1 << 22  # logits held at once: 4M float32 = 16 MiB


class _BlockwiseCrossEntropy(torch.autograd.Function):
    """mean_k [ logsumexp_{j != self(k)} (q_k . k_j / t) - q_k . k_pos(k) / t ], block by block.

    queries: (R, D) float32; keys: (K, D) float32; positive_col, self_col: (R,) int64 columns
    of each row's positive and of itself in ``keys``. Returns a scalar float32.
    """

    @staticmethod
    def forward(ctx, queries, keys, positive_col, self_col, inv_temperature: float, block_rows: int):
        rows = queries.shape[0]
        positive = (queries * keys[positive_col]).sum(1) * inv_temperature  # (R,)
        lse = torch.empty(rows, dtype=queries.dtype, device=queries.device)  # (R,)
        softmax = None  # kept for the backward pass when all rows fit in one block
        for start in range(0, rows, block_rows):
            stop = min(rows, start + block_rows)
            logits = _block_logits(queries, keys, self_col, start, stop, inv_temperature)  # (b, K)
            lse[start:stop] = torch.logsumexp(logits, dim=1)
            if stop - start == rows:
                softmax = logits.sub_(lse[:, None]).exp_()
        ctx.save_for_backward(queries, keys, positive_col, self_col, lse, softmax)
        ctx.inv_temperature, ctx.block_rows = inv_temperature, block_rows
        return (lse - positive).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        queries, keys, positive_col, self_col, lse, softmax = ctx.saved_tensors
        inv_t, rows = ctx.inv_temperature, queries.shape[0]
        grad_queries = torch.empty_like(queries)
        grad_keys = torch.zeros_like(keys)
        for start in range(0, rows, ctx.block_rows):
            stop = min(rows, start + ctx.block_rows)
            # d loss / d logits = (softmax - one_hot(positive)) / R; then the chain rule through q.k/t
            if softmax is not None:
                weights = softmax.clone()
            else:
                logits = _block_logits(queries, keys, self_col, start, stop, inv_t)  # (b, K)
                weights = logits.sub_(lse[start:stop, None]).exp_()
            weights[torch.arange(stop - start, device=weights.device), positive_col[start:stop]] -= 1.0
            weights.mul_(grad_loss * inv_t / rows)
            grad_queries[start:stop] = weights @ keys
            grad_keys.addmm_(weights.T, queries[start:stop])
        return grad_queries, grad_keys, None, None, None, None


def _block_logits(queries, keys, self_col, start: int, stop: int, inv_temperature: float) -> torch.Tensor:
    """(stop - start, K) logits of query rows [start, stop), each row's self-similarity masked."""
    logits = (queries[start:stop] * inv_temperature) @ keys.T
    logits[torch.arange(stop - start, device=logits.device), self_col[start:stop]] = _MASKED
    return logits


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, gather: bool = True) -> torch.Tensor:
    """NT-Xent loss of this rank's rows; see the module docstring.

    Args:
        z_a: (N, D) projections of the first view of this rank's N images.
        z_b: (N, D) projections of the second view of the same images, in the same order.
        temperature: t > 0; the logits are cosine similarities divided by t.
        gather: use every rank's rows as negatives (SimCLR's global batch). With False,
            or with no process group, only this rank's 2N rows take part.

    Returns:
        scalar tensor, float32 (float64 for float64 input): mean over this rank's 2N rows.
    """
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(f"z_a and z_b must both be (N, D); got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = z_a.shape[0]
    device_type = z_a.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        compute = torch.promote_types(torch.float32, z_a.dtype)  # float32, or float64 for float64 input
        local_a = F.normalize(z_a.to(compute), dim=1)  # (N, D)
        local_b = F.normalize(z_b.to(compute), dim=1)  # (N, D)
        distributed = gather and get_world_size() > 1
        if distributed:
            global_a = all_gather_with_grad(local_a)  # (W*N, D)
            global_b = all_gather_with_grad(local_b)  # (W*N, D)
            offset = get_rank() * batch
        else:
            global_a, global_b = local_a, local_b
            offset = 0
        own_index = torch.arange(batch, device=z_a.device) + offset  # (N,) row i's column in the global batch
        keys = torch.cat([global_b, global_a])  # (2*W*N, D): the b block first, then the a block
        queries = torch.cat([local_a, local_b])  # (2N, D)
        global_n = global_a.shape[0]
        # a-query i: positive b_i at column own_index[i], itself at global_n + own_index[i];
        # b-query i: positive a_i at column global_n + own_index[i], itself at own_index[i].
        positive_col = torch.cat([own_index, own_index + global_n])
        self_col = torch.cat([own_index + global_n, own_index])
        block_rows = max(1, BLOCK_ELEMENTS // keys.shape[0])
        return _BlockwiseCrossEntropy.apply(queries, keys, positive_col, self_col, 1.0 / temperature, block_rows)


class NTXentLoss(nn.Module):
    """NT-Xent as a module: ``loss(z_a, z_b)`` with z_a, z_b of shape (N_local, D).

    Args:
        temperature: softmax temperature t (0.1 for ImageNet-scale runs, 0.5 for CIFAR-sized).
        gather: gather projections from all ranks so every row sees 2*N_global - 2 negatives.
    """

    def __init__(self, temperature: float = 0.1, gather: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather = gather

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        return nt_xent(z_a, z_b, self.temperature, self.gather)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather={self.gather}"
