"""Every registered Shampoo-family optimizer trains the digits task better than SGD, on bf16
parameters, on a torch.compile-d model, and resumes exactly from a state_dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kronlab.compare import train_one
from kronlab.optim import create_optimizer, get_optimizer
from kronlab.optim.checkpoint import GLOBAL_KEY
from kronlab.tasks.digits import digits_task

SHAMPOO_FAMILY = [
    "shampoo",
    "eigen_shampoo",
    "soap",
    "eshampoo",
    "pf_shampoo",
    "kl_shampoo",
    "kl_shampoo_root",
]
STEPS = 200


@pytest.fixture(scope="module")
def digits():
    return digits_task()


@pytest.fixture(scope="module")
def sgd_test_loss(digits) -> float:
    result = train_one(
        digits,
        "sgd",
        get_optimizer("sgd").default_lr,
        steps=STEPS,
        batch_size=64,
        seed=0,
        eval_every=STEPS,
    )
    return result.test_loss


@pytest.mark.parametrize("name", SHAMPOO_FAMILY)
def test_beats_sgd_on_digits(name: str, digits, sgd_test_loss: float) -> None:
    result = train_one(
        digits,
        name,
        get_optimizer(name).default_lr,
        steps=STEPS,
        batch_size=64,
        seed=0,
        eval_every=STEPS,
    )
    assert not result.diverged
    assert result.test_loss < sgd_test_loss


def small_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)).to(dtype)


def batches(count: int, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(16, 8, generator=generator).to(dtype),
            torch.randint(0, 4, (16,), generator=generator),
        )
        for _ in range(count)
    ]


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, data) -> list[float]:
    losses = []
    for inputs, targets in data:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs).float(), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def stack_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    found = []

    def collect(value: object) -> None:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    collect([state for key, state in optimizer.state.items() if key != GLOBAL_KEY])
    return found


@pytest.mark.parametrize("name", SHAMPOO_FAMILY)
def test_bf16_parameters_keep_float32_state(name: str) -> None:
    # One batch, repeated: the bf16 run must make the progress the float32 run makes.
    reference = small_model()
    reference_losses = train_steps(
        reference, create_optimizer(name, reference, lr=1e-2), batches(1) * 20
    )
    model = small_model(torch.bfloat16)
    optimizer = create_optimizer(name, model, lr=1e-2)
    losses = train_steps(model, optimizer, batches(1, torch.bfloat16) * 20)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < 0.9 * losses[0]
    assert abs(losses[-1] - reference_losses[-1]) < 0.05 * reference_losses[0]
    floating = [t for t in stack_tensors(optimizer) if t.is_floating_point()]
    assert floating and all(t.dtype == torch.float32 for t in floating)


@pytest.mark.parametrize("name", ["shampoo", "soap", "kl_shampoo"])
def test_compiled_model_trains_like_the_eager_model(name: str) -> None:
    eager, compiled_base = small_model(), small_model()
    compiled = torch.compile(compiled_base, backend="eager")
    data = batches(6)
    eager_losses = train_steps(eager, create_optimizer(name, eager, lr=1e-2), data)
    compiled_losses = train_steps(compiled, create_optimizer(name, compiled, lr=1e-2), data)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.parameters(), compiled_base.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
