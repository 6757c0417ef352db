"""Global BatchNorm on two gloo ranks equals a plain BatchNorm on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from simclr_core.method.distributed import DistEnv, GlobalBatchNorm, convert_to_global_bn
from tests.multiproc import run_workers

WORLD = 2


def _make_net(kind: str, channels: int) -> nn.Module:
    """kind: "2d", "1d", "2d-plain" (no affine parameters), "2d-channels-last" or "2d-double" (float64)."""
    torch.manual_seed(3)
    affine = kind != "2d-plain"
    if kind.startswith("2d"):
        bn = nn.BatchNorm2d(channels, momentum=0.3, affine=affine)
    else:
        bn = nn.BatchNorm1d(channels, momentum=None)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(bn).double() if kind == "2d-double" else nn.Sequential(bn)


def _inputs(kind: str, sizes: list[int], channels: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global input (sum(sizes), C[, H, W]) with per-rank offsets, and the upstream gradient."""
    generator = torch.Generator().manual_seed(100 + step)
    shape = (sum(sizes), channels) + ((3, 4) if kind.startswith("2d") else ())
    x = torch.randn(*shape, generator=generator) * 2.0 + 5.0
    x[: sizes[0]] += 3.0  # rank 0's rows are unlike rank 1's
    upstream = torch.randn(*shape, generator=generator)
    if kind == "2d-channels-last":
        x, upstream = x.to(memory_format=torch.channels_last), upstream.to(memory_format=torch.channels_last)
    if kind == "2d-double":
        x, upstream = x.double(), upstream.double()
    return x, upstream


def _bn_worker(env: DistEnv, kind: str, sizes: list[int], channels: int, steps: int):
    net = convert_to_global_bn(_make_net(kind, channels), env)
    assert isinstance(net[0], GlobalBatchNorm)
    start = sum(sizes[: env.rank])
    rows = slice(start, start + sizes[env.rank])
    outputs = []
    for step in range(steps):
        x_all, upstream_all = _inputs(kind, sizes, channels, step)
        x = x_all[rows].clone().requires_grad_()
        net.zero_grad()
        out = net(x)
        (out * upstream_all[rows]).sum().backward()
        grads = {"w_grad": net[0].weight.grad.clone(), "b_grad": net[0].bias.grad.clone()} if net[0].affine else {}
        outputs.append({"out": out.detach(), "x_grad": x.grad, **grads})
    net.eval()
    x_eval, _ = _inputs(kind, sizes, channels, 99)
    return {
        "steps": outputs,
        "running_mean": net[0].running_mean,
        "running_var": net[0].running_var,
        "tracked": int(net[0].num_batches_tracked),
        "eval_out": net(x_eval[rows]).detach(),
    }


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "kind,sizes,channels",
    [("2d", [4, 4], 3), ("1d", [3, 5], 6), ("2d-plain", [2, 6], 3), ("2d-channels-last", [4, 4], 5), ("2d-double", [3, 5], 4)],
    ids=["bn2d-equal-batches", "bn1d-unequal-batches", "bn2d-no-affine", "bn2d-channels-last", "bn2d-float64"],
)
def test_global_bn_equals_plain_bn_on_concatenated_batch(kind, sizes, channels):
    steps = 3
    # float64 must be computed in float64: float32 statistics would miss this tolerance by 1e4
    tol = {"atol": 1e-10, "rtol": 1e-10} if kind == "2d-double" else {"atol": 1e-5, "rtol": 1e-5}
    results = run_workers(_bn_worker, WORLD, kind, sizes, channels, steps)

    reference = _make_net(kind, channels)
    for step in range(steps):
        x_all, upstream_all = _inputs(kind, sizes, channels, step)
        x_all.requires_grad_()
        reference.zero_grad()
        out = reference(x_all)
        (out * upstream_all).sum().backward()
        offsets = [0, sizes[0]]
        for rank, result in enumerate(results):
            rows = slice(offsets[rank], offsets[rank] + sizes[rank])
            got = result["steps"][step]
            torch.testing.assert_close(got["out"], out.detach()[rows], **tol)
            torch.testing.assert_close(got["x_grad"], x_all.grad[rows], **tol)
        if not reference[0].affine:
            continue
        # Each rank holds the gradient of its own rows' loss; their sum is the global one
        # (DistributedDataParallel all-reduces exactly these).
        w_grad = sum(r["steps"][step]["w_grad"] for r in results)
        b_grad = sum(r["steps"][step]["b_grad"] for r in results)
        torch.testing.assert_close(w_grad, reference[0].weight.grad, **tol)
        torch.testing.assert_close(b_grad, reference[0].bias.grad, **tol)

    reference.eval()
    x_eval, _ = _inputs(kind, sizes, channels, 99)
    expected_eval = reference(x_eval)
    offsets = [0, sizes[0]]
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["running_mean"], reference[0].running_mean, **tol)
        torch.testing.assert_close(result["running_var"], reference[0].running_var, **tol)
        assert result["tracked"] == steps
        rows = slice(offsets[rank], offsets[rank] + sizes[rank])
        torch.testing.assert_close(result["eval_out"], expected_eval.detach()[rows], **tol)


def test_single_process_conversion_leaves_model_unchanged():
    net = _make_net("2d", 3)
    assert convert_to_global_bn(net, DistEnv()) is net
    assert type(net[0]) is nn.BatchNorm2d


def test_gloo_conversion_keeps_parameters_buffers_and_mode():
    net = _make_net("2d", 3)
    net[0].running_mean.fill_(0.25)
    net.eval()
    converted = convert_to_global_bn(net, DistEnv(rank=0, world_size=2, backend="gloo"))
    bn = converted[0]
    assert isinstance(bn, GlobalBatchNorm)
    assert not bn.training
    torch.testing.assert_close(bn.weight, _make_net("2d", 3)[0].weight)
    assert torch.all(bn.running_mean == 0.25)


def test_nccl_conversion_uses_torch_sync_batchnorm():
    converted = convert_to_global_bn(_make_net("2d", 3), DistEnv(rank=0, world_size=2, backend="nccl"))
    assert isinstance(converted[0], nn.SyncBatchNorm)


def test_global_bn_without_process_group_is_plain_bn():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4)
    global_bn = GlobalBatchNorm(4)
    x = torch.randn(8, 4, 5, 5)
    torch.testing.assert_close(global_bn(x), plain(x))
    torch.testing.assert_close(global_bn.running_var, plain.running_var)
