"""NT-Xent against a reference formula, in one process and across two gloo ranks."""

from __future__ import annotations

import pytest
import torch

from simclr_core.method import loss as loss_module
from simclr_core.method.loss import NTXentLoss, nt_xent
from tests.multiproc import run_workers


def reference_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """The paper's definition written out: 2N x 2N cosine similarities, diagonal removed,
    cross-entropy towards the other view, mean over all 2N rows (float64)."""
    z = torch.cat([z_a, z_b]).double()
    n = z_a.shape[0]
    z = z / z.norm(dim=1, keepdim=True)
    sim = z @ z.T / temperature  # (2N, 2N)
    losses = []
    for k in range(2 * n):
        positive = (k + n) % (2 * n)
        others = [j for j in range(2 * n) if j != k]
        log_denominator = torch.logsumexp(sim[k, others], dim=0)
        losses.append(log_denominator - sim[k, positive])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("block_elements", [None, 1, 7 * 66], ids=["one-block", "row-by-row", "uneven-blocks"])
@pytest.mark.parametrize("n,d,temperature", [(1, 3, 0.5), (4, 8, 0.1), (16, 128, 0.5), (33, 17, 0.07), (8, 2, 1.0)])
def test_matches_reference_formula_values_and_gradients(n, d, temperature, block_elements, monkeypatch):
    if block_elements is not None:  # the logits in blocks of a few rows: the same loss and gradients
        monkeypatch.setattr(loss_module, "BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(n * 1000 + d)
    z_a = torch.randn(n, d, requires_grad=True)
    z_b = torch.randn(n, d, requires_grad=True)
    ref_a = z_a.detach().double().requires_grad_()
    ref_b = z_b.detach().double().requires_grad_()

    loss = NTXentLoss(temperature)(z_a, z_b)
    expected = reference_nt_xent(ref_a, ref_b, temperature)
    loss.backward()
    expected.backward()

    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5, rel=1e-5)
    torch.testing.assert_close(z_a.grad.double(), ref_a.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_b.grad.double(), ref_b.grad, atol=1e-5, rtol=1e-5)


def test_perfectly_separated_views_give_low_loss_and_swapped_give_high():
    eye = torch.eye(8)
    aligned = nt_xent(eye, eye, temperature=0.1)
    shuffled = nt_xent(eye, eye.roll(1, dims=0), temperature=0.1)
    assert aligned.item() < 0.01
    assert shuffled.item() > 5.0


def test_logits_are_float32_under_autocast():
    torch.manual_seed(0)
    z_a = torch.randn(8, 16).bfloat16()
    z_b = torch.randn(8, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent(z_a, z_b, 0.1)
    expected = reference_nt_xent(z_a.float(), z_b.float(), 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("block_elements", [None, 5 * 24], ids=["one-block", "uneven-blocks"])
def test_float64_input_is_computed_in_float64(block_elements, monkeypatch):
    """The wider of float32 and the input's dtype: float64 values and gradients to 1e-12,
    which float32 logits (about 1e-7 relative) cannot reach."""
    if block_elements is not None:
        monkeypatch.setattr(loss_module, "BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(5)
    z_a = torch.randn(12, 32, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(12, 32, dtype=torch.float64, requires_grad=True)
    ref_a, ref_b = (z.detach().clone().requires_grad_() for z in (z_a, z_b))
    loss = nt_xent(z_a, z_b, 0.07)
    expected = reference_nt_xent(ref_a, ref_b, 0.07)
    loss.backward()
    expected.backward()
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12, rel=1e-12)
    torch.testing.assert_close(z_a.grad, ref_a.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(z_b.grad, ref_b.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("bad", [(torch.zeros(4, 8), torch.zeros(5, 8)), (torch.zeros(4), torch.zeros(4))])
def test_rejects_mismatched_shapes(bad):
    with pytest.raises(ValueError, match="z_a and z_b"):
        nt_xent(*bad, temperature=0.1)


def test_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0.0)


# ------------------------------------------------------------------ two gloo processes

WORLD = 2
N_LOCAL, DIM, TEMPERATURE = 6, 5, 0.2


def _global_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W*N, D) z_a and z_b; rank r owns rows r*N .. (r+1)*N - 1. Ranks' rows differ in scale
    and offset so that each rank's content is unlike the others'."""
    generator = torch.Generator().manual_seed(seed)
    z_a = torch.randn(WORLD * N_LOCAL, DIM, generator=generator)
    z_b = z_a + 0.3 * torch.randn(WORLD * N_LOCAL, DIM, generator=generator)
    skew = torch.arange(WORLD).repeat_interleave(N_LOCAL).float().unsqueeze(1)
    return z_a * (1 + 3 * skew) + skew, z_b * (1 + 3 * skew) - skew


def _loss_worker(env, seed: int, gather: bool):
    z_a_all, z_b_all = _global_batch(seed)
    rows = slice(env.rank * N_LOCAL, (env.rank + 1) * N_LOCAL)
    z_a = z_a_all[rows].clone().requires_grad_()
    z_b = z_b_all[rows].clone().requires_grad_()
    # A parameter through which both views pass, wrapped in DDP as training wraps the model.
    projection = torch.nn.Linear(DIM, DIM)
    torch.nn.init.eye_(projection.weight)
    torch.nn.init.zeros_(projection.bias)
    ddp = torch.nn.parallel.DistributedDataParallel(projection)
    loss = NTXentLoss(TEMPERATURE, gather=gather)(ddp(z_a), ddp(z_b))
    loss.backward()
    return {
        "loss": loss.detach(),
        "grad_a": z_a.grad,
        "grad_b": z_b.grad,
        "weight_grad": projection.weight.grad,
    }


@pytest.mark.multiproc
def test_gathered_loss_and_gradients_equal_single_process_global_batch():
    results = run_workers(_loss_worker, WORLD, 7, True)

    z_a_all, z_b_all = _global_batch(7)
    z_a_all.requires_grad_()
    z_b_all.requires_grad_()
    projection = torch.nn.Linear(DIM, DIM)
    torch.nn.init.eye_(projection.weight)
    torch.nn.init.zeros_(projection.bias)
    single = nt_xent(projection(z_a_all), projection(z_b_all), TEMPERATURE, gather=False)
    single.backward()

    # The global loss is the mean of the per-rank losses (equal rows per rank).
    mean_loss = torch.stack([r["loss"] for r in results]).mean()
    assert mean_loss.item() == pytest.approx(single.item(), abs=1e-5)
    assert results[0]["loss"].item() != pytest.approx(results[1]["loss"].item(), abs=1e-3)
    for rank, result in enumerate(results):
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        # Each rank's z holds the gradient of the sum of the W rank losses = W * d(global mean)/dz.
        torch.testing.assert_close(result["grad_a"] / WORLD, z_a_all.grad[rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result["grad_b"] / WORLD, z_b_all.grad[rows], atol=1e-5, rtol=1e-5)
        # After DDP's averaging the parameter gradient is exactly the single-process one.
        torch.testing.assert_close(result["weight_grad"], projection.weight.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.multiproc
def test_without_gather_each_rank_uses_only_its_own_negatives():
    results = run_workers(_loss_worker, WORLD, 11, False)
    z_a_all, z_b_all = _global_batch(11)
    for rank, result in enumerate(results):
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        local_a = z_a_all[rows].double().requires_grad_()
        local_b = z_b_all[rows].double().requires_grad_()
        expected = reference_nt_xent(local_a, local_b, TEMPERATURE)
        expected.backward()
        assert result["loss"].item() == pytest.approx(expected.item(), abs=1e-5)
        # DDP averages parameter gradients, but z's own gradient is local-only.
        torch.testing.assert_close(result["grad_a"].double(), local_a.grad, atol=1e-5, rtol=1e-5)
