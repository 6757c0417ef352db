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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simclr_core.distributed import all_gather_with_grad, get_rank, get_world_size

__all__ = ["NTXentLoss", "nt_xent"]

_MASKED = -1e9  # logit given to a row's similarity with itself (float32-safe, not -inf)


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, gather: bool = True) -> torch.Tensor:
    """NT-Xent loss of this rank's rows; see the module docstring.

    Args:
        z_a: (N, D) projections of the first view of this rank's N images.
        z_b: (N, D) projections of the second view of the same images, in the same order.
        temperature: t > 0; the logits are cosine similarities divided by t.
        gather: use every rank's rows as negatives (SimCLR's global batch). With False,
            or with no process group, only this rank's 2N rows take part.

    Returns:
        scalar float32 tensor: mean over this rank's 2N rows.
    """
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(f"z_a and z_b must both be (N, D); got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = z_a.shape[0]
    device_type = z_a.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        local_a = F.normalize(z_a.float(), dim=1)  # (N, D)
        local_b = F.normalize(z_b.float(), dim=1)  # (N, D)
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
        logits = queries @ keys.T / temperature  # (2N, 2*W*N)
        global_n = global_a.shape[0]
        rows = torch.arange(2 * batch, device=z_a.device)
        # a-query i: positive b_i at column own_index[i], itself at global_n + own_index[i];
        # b-query i: positive a_i at column global_n + own_index[i], itself at own_index[i].
        positive_col = torch.cat([own_index, own_index + global_n])
        self_col = torch.cat([own_index + global_n, own_index])
        logits = logits.index_put((rows, self_col), torch.tensor(_MASKED, device=z_a.device))
        return F.cross_entropy(logits, positive_col)


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
