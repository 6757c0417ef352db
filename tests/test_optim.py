"""LARS against the update rule computed by hand; LR scaling and warmup + cosine values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from simclr_core.method.optim import LARS, lars_param_groups, scale_learning_rate, warmup_cosine, warmup_cosine_scheduler

ETA, MOMENTUM, WD, LR = 0.001, 0.9, 1e-2, 0.5  # large WD so its effect is visible


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3, bias=False), nn.BatchNorm1d(3))
    with torch.no_grad():
        model[4].weight.zero_()  # a zero-init gamma, as in every residual block
    return model


def _hand_lars_step(weight: torch.Tensor, grad: torch.Tensor, velocity: torch.Tensor, adapted: bool, lr: float):
    """The official rule, one parameter, in float64: returns (new weight, new velocity)."""
    w, g, v = weight.double(), grad.double(), velocity.double()
    if adapted:
        g = g + WD * w
        w_norm, g_norm = w.norm().item(), g.norm().item()
        trust = ETA * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
    else:
        trust = 1.0
    v = MOMENTUM * v + lr * trust * g
    return w - v, v


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=generator)
    target = torch.randn(16, 3, generator=generator)
    return ((model(x) - target) ** 2).mean()


@pytest.mark.parametrize("steps", [1, 4])
def test_lars_matches_update_rule_by_hand(steps):
    model = _small_model()
    # The reference decides by itself what is adapted: the weights of linear and convolution
    # layers; BN parameters and biases are not (not taken from lars_param_groups, the code under test).
    adapted_names = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}
    assert adapted_names == {"0.weight", "3.weight"}
    optimizer = LARS(lars_param_groups(model, weight_decay=WD), lr=LR, momentum=MOMENTUM, eta=ETA)
    expected = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    velocity = {name: torch.zeros_like(w) for name, w in expected.items()}

    for step in range(steps):
        optimizer.zero_grad()
        _loss(model, step).backward()
        for name, param in model.named_parameters():
            # The hand rule starts from the parameters LARS produced so far (checked below),
            # so each step's check is independent of accumulated float differences.
            expected[name], velocity[name] = _hand_lars_step(
                param.detach(), param.grad, velocity[name], name in adapted_names, LR
            )
        optimizer.step()
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.detach().double(), expected[name], atol=1e-7, rtol=1e-6, msg=name)


def test_param_groups_exclude_batchnorm_and_biases():
    model = _small_model()
    adapted, excluded = lars_param_groups(model, weight_decay=1e-6)
    assert adapted["weight_decay"] == 1e-6 and not adapted["lars_exclude"]
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"]
    assert {id(p) for p in adapted["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in excluded["params"]} == {
        id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[4].weight), id(model[4].bias)
    }


def test_excluded_parameters_get_no_decay_and_no_trust_scaling():
    bias = nn.Parameter(torch.tensor([2.0, -1.0]))
    optimizer = LARS([{"params": [bias], "weight_decay": 0.0, "lars_exclude": True}], lr=0.1, weight_decay=0.5)
    bias.grad = torch.tensor([1.0, 1.0])
    optimizer.step()
    # plain momentum SGD step: w - lr * g (no trust ratio, no decay)
    torch.testing.assert_close(bias.detach(), torch.tensor([1.9, -1.1]))


def test_adapted_parameter_step_has_trust_ratio_length():
    weight = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    optimizer = LARS([weight], lr=1.0, weight_decay=0.0, eta=0.001)
    weight.grad = torch.tensor([[30.0, 40.0]])  # norm 50
    optimizer.step()
    # trust = 0.001 * 5 / 50 = 1e-4; the step is lr * trust * g = [0.003, 0.004]
    torch.testing.assert_close(weight.detach(), torch.tensor([[2.997, 3.996]]))


def test_zero_norm_weights_still_update():
    gamma = nn.Parameter(torch.zeros(3))
    weight = nn.Parameter(torch.zeros(2, 2))
    optimizer = LARS(
        [{"params": [gamma], "lars_exclude": True, "weight_decay": 0.0}, {"params": [weight]}], lr=0.1, weight_decay=1e-6
    )
    gamma.grad = torch.ones(3)
    weight.grad = torch.ones(2, 2)
    optimizer.step()
    torch.testing.assert_close(gamma.detach(), torch.full((3,), -0.1))
    torch.testing.assert_close(weight.detach(), torch.full((2, 2), -0.1))  # trust falls back to 1


def test_nesterov_uses_lookahead_momentum():
    weight = nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS([{"params": [weight], "lars_exclude": True}], lr=0.1, momentum=0.5, nesterov=True)
    for _ in range(2):
        weight.grad = torch.tensor([1.0])
        optimizer.step()
    # v1 = 0.1, w1 = 1 - (0.5*0.1 + 0.1) = 0.85; v2 = 0.05 + 0.1 = 0.15, w2 = 0.85 - (0.075 + 0.1) = 0.675
    torch.testing.assert_close(weight.detach(), torch.tensor([0.675]))


def test_state_dict_round_trip_continues_identically():
    def run(resume_after: int | None):
        model = _small_model()
        optimizer = LARS(lars_param_groups(model), lr=0.3)
        for step in range(4):
            if resume_after is not None and step == resume_after:
                state = optimizer.state_dict()
                optimizer = LARS(lars_param_groups(model), lr=0.3)
                optimizer.load_state_dict(state)
            optimizer.zero_grad()
            _loss(model, step).backward()
            optimizer.step()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(None), run(2)):
        assert torch.equal(a, b)


class PerTensorLARS(torch.optim.Optimizer):
    """The rule one parameter at a time, in float32, with plain tensor ops: the form LARS had before
    its multi-tensor (``torch._foreach_*``) update, kept as the reference for it."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6, eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for param in (p for p in group["params"] if p.grad is not None):
                velocity = self.state[param].setdefault("momentum_buffer", torch.zeros_like(param))
                direction, scale = param.grad, torch.tensor(group["lr"])
                if not group["lars_exclude"]:
                    direction = param.grad + group["weight_decay"] * param
                    w_norm, g_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(direction)
                    trust = group["eta"] * w_norm / g_norm if w_norm > 0 and g_norm > 0 else torch.tensor(1.0)
                    scale = group["lr"] * trust
                velocity.mul_(group["momentum"]).add_(scale * direction)
                param.sub_(velocity)


def _assert_same_parameters(multi: list[torch.Tensor], single: list[torch.Tensor]) -> None:
    for index, (a, b) in enumerate(zip(multi, single)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=f"parameter {index}")


def test_multi_tensor_lars_matches_the_per_tensor_rule_on_a_model():
    """BN parameters and biases (a zero-init gamma among them) and adapted weights, 6 steps: the
    foreach update equals the per-tensor one to float32 rounding (rtol 1e-6). On a CPU torch runs
    foreach ops tensor by tensor, and the two came out bit-identical on the development machine;
    only closeness is asserted, since a GPU's fused foreach kernels may round differently."""
    models = [_small_model(), _small_model()]
    multi = LARS(lars_param_groups(models[0], weight_decay=WD), lr=LR, momentum=MOMENTUM, eta=ETA)
    single = PerTensorLARS(lars_param_groups(models[1], weight_decay=WD), lr=LR, momentum=MOMENTUM, eta=ETA)
    for step in range(6):
        for model, optimizer in zip(models, (multi, single)):
            optimizer.zero_grad()
            _loss(model, step).backward()
            optimizer.step()
        _assert_same_parameters([p.detach() for p in models[0].parameters()], [p.detach() for p in models[1].parameters()])
    moved = (models[0][0].weight - _small_model()[0].weight).abs().max()
    assert moved > 1e-4  # the steps did move the weights the comparison is about


def _zero_norm_params() -> list[nn.Parameter]:
    """Adapted: random; zero weight; zero gradient; both zero. Excluded: a zero gamma, a bias."""
    generator = torch.Generator().manual_seed(3)
    random = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    return [nn.Parameter(random(4, 3)), nn.Parameter(torch.zeros(5, 2)), nn.Parameter(random(3, 3)),
            nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(3)), nn.Parameter(random(3))]


def _zero_norm_groups(params: list[nn.Parameter]) -> list[dict]:
    # the zero-gradient weights in a group without decay, so that g + wd * w stays zero too
    return [
        {"params": params[:2], "weight_decay": WD},
        {"params": params[2:4], "weight_decay": 0.0},
        {"params": params[4:], "weight_decay": 0.0, "lars_exclude": True},
    ]


def test_multi_tensor_lars_matches_the_per_tensor_rule_where_norms_are_zero():
    """||w|| = 0 or ||g + wd w|| = 0 gives trust 1 in both forms (no 0/0), over 3 steps."""
    pair = _zero_norm_params(), _zero_norm_params()
    multi = LARS(_zero_norm_groups(pair[0]), lr=LR, momentum=MOMENTUM, eta=ETA)
    single = PerTensorLARS(_zero_norm_groups(pair[1]), lr=LR, momentum=MOMENTUM, eta=ETA)
    for step in range(3):
        generator = torch.Generator().manual_seed(10 + step)
        for params in pair:
            for index, param in enumerate(params):
                zero_grad = index in (2, 3)
                param.grad = torch.zeros_like(param) if zero_grad else torch.randn(param.shape, generator=generator)
            generator.manual_seed(10 + step)  # the same gradients for the second form
        multi.step()
        single.step()
        _assert_same_parameters([p.detach() for p in pair[0]], [p.detach() for p in pair[1]])
    assert all(torch.isfinite(p).all() for p in pair[0])
    assert torch.equal(pair[0][3].detach(), torch.zeros(2, 2))  # no weight, no gradient: it stays at zero
    assert pair[0][1].detach().abs().min() > 0  # a zero weight with a gradient moves (trust 1)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"lr": -1}, "lr"), ({"lr": 1, "momentum": 1.0}, "momentum"), ({"lr": 1, "weight_decay": -1}, "weight_decay"), ({"lr": 1, "eta": 0}, "eta")],
)
def test_lars_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LARS([nn.Parameter(torch.zeros(1))], **kwargs)


def test_learning_rate_scaling_formulas():
    assert scale_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scale_learning_rate(0.3, 256, "linear") == pytest.approx(0.3)
    assert scale_learning_rate(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scale_learning_rate(0.075, 256, "sqrt") == pytest.approx(1.2)
    with pytest.raises(ValueError, match="scaling"):
        scale_learning_rate(0.3, 256, "cubic")
    with pytest.raises(ValueError, match="batch_size"):
        scale_learning_rate(0.3, 0)


def test_warmup_then_cosine_values():
    total, warmup = 110, 10
    assert warmup_cosine(0, total, warmup) == 0.0
    assert warmup_cosine(5, total, warmup) == pytest.approx(0.5)
    assert warmup_cosine(10, total, warmup) == pytest.approx(1.0)
    assert warmup_cosine(60, total, warmup) == pytest.approx(0.5)
    assert warmup_cosine(35, total, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert warmup_cosine(110, total, warmup) == pytest.approx(0.0)
    assert warmup_cosine(500, total, warmup) == pytest.approx(0.0)
    assert warmup_cosine(3, 100, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.03)))


def test_scheduler_steps_per_optimizer_step_and_resumes():
    param = nn.Parameter(torch.zeros(1))
    optimizer = LARS([param], lr=2.0)
    scheduler = warmup_cosine_scheduler(optimizer, total_steps=20, warmup_steps=4)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:5] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    state = scheduler.state_dict()
    fresh_optimizer = LARS([param], lr=2.0)
    fresh = warmup_cosine_scheduler(fresh_optimizer, total_steps=20, warmup_steps=4)
    fresh.load_state_dict(state)
    fresh_optimizer.param_groups[0]["lr"] = fresh.get_last_lr()[0]
    assert fresh.get_last_lr()[0] == pytest.approx(2.0 * warmup_cosine(6, 20, 4))


def test_step_leaves_gradients_alone_and_keeps_only_momentum_in_state():
    # the decayed gradient lives in scratch buffers: p.grad still holds what backward wrote,
    # and a checkpoint's optimizer state is the momentum buffers only
    model = _small_model()
    optimizer = LARS(lars_param_groups(model), lr=0.3, weight_decay=0.1)
    for step in range(2):
        optimizer.zero_grad()
        _loss(model, step).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    state = optimizer.state_dict()["state"]
    assert len(state) == len(list(model.parameters()))
    assert all(set(entry) == {"momentum_buffer"} for entry in state.values())
