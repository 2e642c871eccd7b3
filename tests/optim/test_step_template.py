"""The step template: one stack plan, momentum written once, one parameter write, state keyed by
parameter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kronlab.groups import LinearWeightBias, PerParameter
from kronlab.optim import PSGD, Muon, SIRFShampoo, Spectron
from kronlab.optim.adamw import adamw_step
from kronlab.optim.base import KronOptimizer
from kronlab.optim.bundles import identify_bundles
from kronlab.optim.step_template import Direction, Slot, StackPlan, Work, apply_direction, momentum_
from kronlab.optim.validation import check_range

from .compile_checks import state_tensors


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))


OPTIMIZERS = {
    "muon": lambda m: Muon(None, model=m),
    "spectron": lambda m: Spectron(None, model=m, rank=2),
    "psgd": lambda m: PSGD(m.parameters()),
    "sirfshampoo": lambda m: SIRFShampoo(m),
}


def train(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        net(torch.randn(8, 4, generator=generator)).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_is_keyed_by_parameter(name: str) -> None:
    net = model()
    optimizer = OPTIMIZERS[name](net)
    assert not optimizer.state  # nothing before the first step (torch.optim's layout)
    train(net, optimizer, 2)
    params = set(net.parameters())
    assert optimizer.state and all(key in params for key in optimizer.state)
    assert optimizer.global_step == 2


def test_plan_stacks_same_work_and_is_rebuilt_by_add_param_group() -> None:
    net = model()
    optimizer = Muon(net.parameters())  # no model: every matrix is Muon's
    shapes = [stack.shape for stack in optimizer.plan.stacks]
    hidden = [stack for stack in optimizer.plan.stacks if stack.shape == (6, 6)]
    assert len(hidden) == 1  # the two 6x6 layers, one batched Newton–Schulz call
    assert [slot.param for slot in hidden[0].slots] == [net[2].weight, net[4].weight]
    plan = optimizer.plan
    assert optimizer.plan is plan  # built once
    extra = nn.Linear(6, 6)
    optimizer.add_param_group({"params": [extra.weight]})
    assert optimizer.plan is not plan
    assert len([s for s in optimizer.plan.stacks if s.shape == (6, 6)]) == 2  # new group
    assert len(optimizer.plan.stacks) == len(shapes) + 1


def test_plan_groups_blocks_by_group_work_and_device() -> None:
    net = model()
    params = list(net.parameters())
    bundles = identify_bundles(
        params,
        (LinearWeightBias(), PerParameter()),
        net,
        {p: str(i) for i, p in enumerate(params)},
        0,
    )
    plan = StackPlan.build(bundles, lambda b: [Work(tuple(b.grouped_shape), torch.float32)] * 2)
    assert sum(len(stack.slots) for stack in plan.stacks) == 2 * len(bundles)
    for stack in plan.stacks:
        assert all(tuple(slot.bundle.grouped_shape) == stack.shape for slot in stack.slots)
    assert [s.shape for s in plan.stacks] == [(6, 5), (6, 7)]
    assert [slot.block for slot in plan.stacks[1].slots] == [0, 1, 0, 1]


@pytest.mark.parametrize("nesterov", [False, True])
def test_ema_momentum_matches_definition(nesterov: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    buffers = [torch.randn(3, 4, generator=generator, dtype=torch.float64) for _ in range(2)]
    values = [torch.randn(3, 4, generator=generator, dtype=torch.float64) for _ in range(2)]
    expected_buffers = [0.9 * b + 0.1 * v for b, v in zip(buffers, values)]
    expected = (
        [0.1 * v + 0.9 * b for v, b in zip(values, expected_buffers)]
        if nesterov
        else expected_buffers
    )
    result = momentum_([b.clone() for b in buffers], values, 0.9, nesterov=nesterov)
    for got, want in zip(result, expected):
        torch.testing.assert_close(got, want)


def test_heavy_ball_momentum_matches_definition() -> None:
    buffer = torch.tensor([1.0, -2.0], dtype=torch.float64)
    value = torch.tensor([0.5, 0.25], dtype=torch.float64)
    (result,) = momentum_([buffer], [value], 0.5, ema=False)
    torch.testing.assert_close(result, torch.tensor([1.0, -0.75], dtype=torch.float64))
    assert result is buffer
    with pytest.raises(ValueError, match="nesterov"):
        momentum_([buffer], [value], 0.5, ema=False, nesterov=True)


def test_apply_direction_matches_definition() -> None:
    """``p ← p(1 − decay) − step·scale·d`` for the members with a gradient; a ``None`` value
    decays only; grouped bundles are split back into their parameters."""
    torch.manual_seed(0)
    linear = nn.Linear(3, 2).double()
    other = nn.Linear(3, 2).double()
    for module in (linear, other):
        for param in module.parameters():
            param.grad = torch.ones_like(param)
    names = {p: str(i) for i, p in enumerate([*linear.parameters(), *other.parameters()])}
    (grouped,) = identify_bundles(
        list(linear.parameters()), (LinearWeightBias(),), linear, names, 0
    )
    (plain,) = identify_bundles([other.weight], (PerParameter(),), None, names, 0)
    before = [p.detach().clone() for p in (linear.weight, linear.bias, other.weight)]
    update = torch.randn(2, 4, dtype=torch.float64)
    scale = torch.tensor([0.5, 2.0], dtype=torch.float64)
    direction = Direction([update, None], 0.1, scale)
    with torch.no_grad():
        apply_direction([Slot(grouped), Slot(plain)], direction, decay=0.01)
    torch.testing.assert_close(linear.weight, before[0] * 0.99 - 0.1 * 0.5 * update[:, :3])
    torch.testing.assert_close(linear.bias, before[1] * 0.99 - 0.1 * 0.5 * update[:, 3])
    torch.testing.assert_close(other.weight, before[2] * 0.99)


def test_adamw_step_matches_definition() -> None:
    torch.manual_seed(0)
    param = torch.randn(5, dtype=torch.float64, requires_grad=True)
    reference = param.detach().clone()
    state: dict = {}
    m = torch.zeros(5, dtype=torch.float64)
    v = torch.zeros(5, dtype=torch.float64)
    lr, (beta1, beta2), eps, decay = 0.1, (0.9, 0.99), 1e-8, 0.01
    for step in range(1, 4):
        grad = torch.randn(5, dtype=torch.float64)
        param.grad = grad
        with torch.no_grad():
            adamw_step([param], [state], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=decay)
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad.square()
        m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
        reference = reference * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + eps)
        # the moments are float32 whatever the parameter dtype
        torch.testing.assert_close(param.detach(), reference, rtol=1e-6, atol=1e-7)
    assert state["step"] == 3 and state["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_masked_step_undoes_everything_on_the_device(name: str) -> None:
    """``on_nonfinite_grad="mask"`` (the compiled path, run eagerly here): a step with a NaN
    gradient leaves the parameters and every state tensor, also those held in lists (one
    factor per axis), as they were."""
    net = model()
    optimizer = OPTIMIZERS[name](net)
    optimizer.on_nonfinite_grad = "mask"
    train(net, optimizer, 2)
    before = [p.detach().clone() for p in net.parameters()]
    state_before = state_tensors(optimizer.state)
    optimizer.zero_grad()
    net(torch.randn(8, 4)).square().mean().backward()
    net[0].weight.grad[0, 0] = float("nan")
    optimizer.step()
    assert int(optimizer.masked_steps) == 1
    for param, old in zip(net.parameters(), before):
        assert torch.equal(param, old)
    state_after = state_tensors(optimizer.state)
    assert len(state_after) == len(state_before)
    for new, old in zip(state_after, state_before):
        assert torch.equal(new, old)


class SignMomentum(KronOptimizer):
    """A whole optimizer on the template: ``B ← βB + (1−β)g``, ``p ← p(1 − lr·wd) − lr·sign(B)``
    (Lion-like); it writes its defaults, its check and its direction, nothing else."""

    momentum_on = "gradient"

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.0, **kwargs):
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults, **kwargs)

    def validate_group(self, group):
        check_range("lr", group["lr"], 0.0)

    def direction(self, stack, slots, gradients, group):
        return Direction(torch.stack(gradients).sign(), group["lr"])


def test_an_optimizer_writes_only_its_direction() -> None:
    torch.manual_seed(0)
    net = model().double()
    initial = [p.detach().clone() for p in net.parameters()]
    optimizer = SignMomentum(net.parameters(), lr=0.01, momentum=0.5, weight_decay=0.1)
    buffers = [torch.zeros_like(p) for p in initial]
    expected = [p.clone() for p in initial]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        optimizer.zero_grad()
        inputs = torch.randn(8, 4, generator=generator, dtype=torch.float64)
        net(inputs).square().mean().backward()
        for index, param in enumerate(net.parameters()):
            buffers[index] = 0.5 * buffers[index] + 0.5 * param.grad
            expected[index] = expected[index] * (1 - 0.01 * 0.1) - 0.01 * buffers[index].sign()
        optimizer.step()
    for param, want in zip(net.parameters(), expected):
        torch.testing.assert_close(param.detach(), want, rtol=1e-12, atol=1e-14)
    assert optimizer.global_step == 3
