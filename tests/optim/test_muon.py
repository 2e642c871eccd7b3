"""Muon against a float64 reference written here, against torch.optim.Muon, and its AdamW split."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kronlab.compare import compare
from kronlab.linalg import NEWTON_SCHULZ_COEFFICIENTS
from kronlab.optim import Muon, available_optimizers
from kronlab.tasks.digits import digits_task


def reference_newton_schulz(matrix: torch.Tensor, schedule, steps: int) -> torch.Tensor:
    """float64 Newton–Schulz from the definition: X = G/‖G‖_F (wide), X ← aX + (bA + cA²)X."""
    x = matrix.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for index in range(steps):
        a, b, c = schedule[min(index, len(schedule) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def reference_muon(weights, gradients, *, lr, momentum, nesterov, weight_decay, adjust, steps=5):
    """float64 Muon trajectory: EMA momentum, Nesterov, quintic NS, shape scale, decoupled wd."""
    schedule = NEWTON_SCHULZ_COEFFICIENTS["simple"].schedule
    weights = [w.double().clone() for w in weights]
    buffers = [torch.zeros_like(w.reshape(w.shape[0], -1)) for w in weights]
    for step_gradients in gradients:
        for index, (weight, gradient) in enumerate(zip(weights, step_gradients)):
            gradient = gradient.double().reshape(weight.shape[0], -1)
            buffers[index] = momentum * buffers[index] + (1 - momentum) * gradient
            direction = (
                (1 - momentum) * gradient + momentum * buffers[index]
                if nesterov
                else buffers[index]
            )
            orthogonal = reference_newton_schulz(direction, schedule, steps)
            rows, columns = orthogonal.shape
            scale = {
                "original": math.sqrt(max(1, rows / columns)),
                "match_adamw_rms": 0.2 * math.sqrt(max(rows, columns)),
                "spectral": math.sqrt(rows / columns),
                None: 1.0,
            }[adjust]
            weight.mul_(1 - lr * weight_decay)
            weight.sub_(lr * scale * orthogonal.reshape(weight.shape))
    return weights


def random_gradients(shapes, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(steps)]


@pytest.mark.parametrize("adjust", ["original", "match_adamw_rms", "spectral", None])
@pytest.mark.parametrize("nesterov", [True, False])
def test_first_steps_match_float64_reference(adjust, nesterov):
    # two same-shape matrices (one batched call), a tall one and a conv kernel (flattened)
    shapes = [(6, 4), (6, 4), (3, 8), (5, 2, 3, 3)]
    weights = [torch.randn(shape) for shape in shapes]
    params = [nn.Parameter(w.clone()) for w in weights]
    hyper = {"lr": 0.05, "momentum": 0.9, "nesterov": nesterov, "weight_decay": 0.1}
    optimizer = Muon(params, **hyper, adjust_lr=adjust, ns_dtype=torch.float32)
    gradients = random_gradients(shapes, steps=3)
    for step_gradients in gradients:
        for param, gradient in zip(params, step_gradients):
            param.grad = gradient.clone()
        optimizer.step()
    expected = reference_muon(weights, gradients, adjust=adjust, **hyper)
    for param, reference in zip(params, expected):
        torch.testing.assert_close(param.double(), reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(NEWTON_SCHULZ_COEFFICIENTS))
def test_orthogonalized_update_has_singular_values_in_the_band(name):
    coefficients = NEWTON_SCHULZ_COEFFICIENTS[name]
    # singular values spread over 2.5 decades (all above the band's 1e-3 after normalization)
    left, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    spectrum = torch.logspace(0, -2.5, 16, dtype=torch.float64)
    gradient = (left[:, :16] * spectrum) @ right.T
    param = nn.Parameter(torch.zeros(24, 16))
    optimizer = Muon(
        [param],
        lr=1.0,
        momentum=0.0,
        nesterov=False,
        ns_steps=coefficients.default_steps,
        ns_coefficients=name,
        adjust_lr=None,
        ns_dtype=torch.float64,
    )
    param.grad = gradient.float()
    optimizer.step()
    singular_values = torch.linalg.svdvals(-param.detach().double())
    low, high = coefficients.band
    assert singular_values.min() >= low and singular_values.max() <= high
    # and the singular vectors are the gradient's: the update is U f(S) Vᵀ
    rotated = left[:, :16].T @ (-param.detach().double()) @ right
    torch.testing.assert_close(rotated, torch.diag(rotated.diagonal()), atol=2e-5, rtol=0)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_equivalent_to_torch_optim_muon(adjust):
    torch.manual_seed(3)
    ours_model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.Linear(32, 32, bias=False))
    theirs_model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.Linear(32, 32, bias=False))
    theirs_model.load_state_dict(ours_model.state_dict())
    hyper = {"lr": 0.02, "momentum": 0.95, "nesterov": True, "weight_decay": 0.1, "ns_steps": 5}
    # torch.optim.Muon orthogonalizes in bfloat16: ask for the same
    ours = Muon(list(ours_model.parameters()), **hyper, adjust_lr=adjust, ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon(theirs_model.parameters(), **hyper, adjust_lr_fn=adjust)
    inputs = torch.randn(64, 16)
    initial = [p.detach().clone() for p in ours_model.parameters()]
    for _ in range(4):
        for model, optimizer in ((ours_model, ours), (theirs_model, theirs)):
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()
    for start, mine, reference in zip(initial, ours_model.parameters(), theirs_model.parameters()):
        moved_ours, moved_theirs = mine.detach() - start, reference.detach() - start
        # bfloat16 Newton–Schulz: agreement to bf16 precision (~3 significant digits)
        relative = (moved_ours - moved_theirs).norm() / moved_theirs.norm()
        assert relative < 2e-2, relative
        # a real step happened (the comparison is not between two no-ops)
        assert moved_theirs.norm() > 0.05


def test_model_split_sends_embeddings_head_and_vectors_to_adamw():
    model = nn.Sequential(
        nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 5)
    )
    optimizer = Muon(model=model)
    names = {name: p for name, p in model.named_parameters()}
    by_algorithm = {
        group["algorithm"]: {n for n, p in names.items() if any(p is q for q in group["params"])}
        for group in optimizer.param_groups
    }
    assert by_algorithm["muon"] == {"1.weight", "3.weight"}
    assert by_algorithm["adamw"] == set(names) - {"1.weight", "3.weight"}
    adamw_group = next(g for g in optimizer.param_groups if g["algorithm"] == "adamw")
    assert adamw_group["lr"] == 3e-4


def test_tied_head_goes_to_adamw():
    embedding = nn.Embedding(12, 6)
    head = nn.Linear(6, 12, bias=False)
    head.weight = embedding.weight
    model = nn.Sequential(embedding, nn.Linear(6, 6), head)
    optimizer = Muon(model=model)
    muon_params = [
        p for g in optimizer.param_groups if g["algorithm"] == "muon" for p in g["params"]
    ]
    assert len(muon_params) == 1 and muon_params[0] is model[1].weight


def test_per_group_override_and_plain_params_split_by_ndim():
    matrix, other_matrix, bias = (
        nn.Parameter(torch.randn(4, 4)),
        nn.Parameter(torch.randn(4, 4)),
        nn.Parameter(torch.randn(4)),
    )
    optimizer = Muon(
        [{"params": [matrix, bias]}, {"params": [other_matrix], "use_muon": False, "lr": 0.1}]
    )
    algorithms = [(g["algorithm"], len(g["params"]), g["lr"]) for g in optimizer.param_groups]
    assert algorithms == [("muon", 1, 0.02), ("adamw", 1, 3e-4), ("adamw", 1, 0.1)]
    with pytest.raises(ValueError, match=r"shape \(4,\).*algorithm='adamw'"):
        Muon([{"params": [bias], "algorithm": "muon"}])


def test_adamw_groups_match_torch_adamw():
    params = [nn.Parameter(torch.randn(7)), nn.Parameter(torch.randn(3, 5))]
    reference = [nn.Parameter(p.detach().clone()) for p in params]
    hyper = {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05}
    ours = Muon([{"params": params, "algorithm": "adamw", **hyper}])
    theirs = torch.optim.AdamW(reference, **hyper)
    for gradients in random_gradients([(7,), (3, 5)], steps=4):
        for mine, other, gradient in zip(params, reference, gradients):
            mine.grad, other.grad = gradient.clone(), gradient.clone()
        ours.step()
        theirs.step()
    for mine, other in zip(params, reference):
        torch.testing.assert_close(mine, other, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "Invalid lr: -1.0"),
        ({"momentum": 1.0}, "Invalid momentum: 1.0"),
        ({"ns_steps": 0}, "Invalid ns_steps: 0"),
        ({"adjust_lr": "sqrt"}, "Invalid adjust_lr: 'sqrt'"),
        ({"ns_coefficients": "septic"}, "Invalid ns_coefficients: 'septic'"),
        ({"ns_dtype": torch.int32}, "Invalid ns_dtype"),
        ({"ns_dtype": "fast"}, "Invalid ns_dtype: 'fast' \\(allowed: 'auto', torch.float64"),
        ({"adamw_betas": (0.9, 1.0)}, r"Invalid adamw_betas\[1\]: 1.0"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(kwargs, message):
    params = [nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))]
    with pytest.raises(ValueError, match=message):
        Muon(params, **kwargs)


def test_registered_and_beats_sgd_on_digits():
    assert "muon" in available_optimizers()
    results = compare(digits_task(), ["muon", "sgd"], steps=150, show_progress=False)
    by_name = {r.name: r for r in results}
    assert by_name["muon"].test_loss < by_name["sgd"].test_loss
    assert by_name["muon"].test_accuracy >= by_name["sgd"].test_accuracy


def test_non_finite_gradient_skips_the_step_but_large_finite_ones_do_not():
    matrix, bias = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    optimizer = Muon([matrix, bias])
    before = [matrix.detach().clone(), bias.detach().clone()]
    matrix.grad, bias.grad = torch.randn(4, 4), torch.tensor([1.0, float("nan"), 0.0, 0.0])
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        optimizer.step()
    assert torch.equal(matrix, before[0]) and torch.equal(bias, before[1])
    assert optimizer.skipped_steps == 1 and not optimizer.state[matrix]
    # a float16 gradient whose norm exceeds float16's range is still finite: a real step
    half = nn.Parameter(torch.randn(4, 4, dtype=torch.float16))
    optimizer = Muon([half], ns_dtype=torch.float32)
    half.grad = torch.full((4, 4), 60000.0, dtype=torch.float16)
    optimizer.step()
    assert optimizer.skipped_steps == 0 and optimizer.global_step == 1
