"""PSGD Kron (QUAD and Procrustes): float64 references written here from the update rules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kronlab.compare import compare
from kronlab.groups import LinearWeightBias, PerParameter
from kronlab.linalg._dtypes import product_dtype
from kronlab.optim import PSGD, available_optimizers, plan_psgd_layout
from kronlab.optim import psgd as psgd_module
from kronlab.optim.psgd_factors import (
    balance_scales,
    gram_norm_lower_bound,
    procrustes_step,
    spectral_norm_lower_bound,
)
from kronlab.tasks.digits import digits_task

F64 = torch.float64
METHODS = ("quad", "procrustes")


# --- float64 references, written from the definitions ------------------------------------
def reference_lower_bound(matrix: torch.Tensor, iterations: int = 2) -> torch.Tensor:
    """Power iteration from the largest-norm row; ``uᵀ A v`` with unit ``u, v``."""
    u = matrix[matrix.norm(dim=1).argmax()]
    u = u / u.norm()
    for _ in range(iterations):
        v = matrix.T @ u
        v = v / v.norm()
        u = matrix @ v
        u = u / u.norm()
    return (u @ matrix @ v).abs()


def reference_procrustes(q: torch.Tensor) -> torch.Tensor:
    skew = q.T - q
    skew = skew / skew.abs().max()
    rq = skew @ q
    if torch.trace(rq) <= 0:
        return q
    angle = 0.125 / reference_lower_bound(skew)
    rrq = skew @ rq
    if torch.trace(rrq) < 0:
        angle = min(angle, -torch.trace(rq) / torch.trace(rrq))
    return q + angle * (rq + 0.5 * angle * rrq)


def reference_factor_step(q, term1, c, lipschitz, mu, method):
    """One factor update; returns (new Q, new L)."""
    dense = q.ndim == 2
    bound = (reference_lower_bound(term1) if dense else term1.max()) + c
    lipschitz = max(0.95 * lipschitz + 0.05 * bound, bound)
    if dense and method == "quad":
        k = mu / (2 * lipschitz)
        half = q - k * (term1 @ q - c * q)
        half = half - k * (half @ term1 - c * half)
        return (half + half.T) / 2, lipschitz
    if dense:
        return reference_procrustes(q - mu / lipschitz * (term1 @ q - c * q)), lipschitz
    if method == "quad":
        return q * (1 - mu / (2 * lipschitz) * (term1 - c)) ** 2, lipschitz
    return q * (1 - mu / lipschitz * (term1 - c)), lipschitz


def square(q):
    return q @ q if q.ndim == 2 else torch.diag(q * q)


def reference_step(grad, factors, lipschitz, step, method, lr, weight_decay, param):
    """The whole PSGD step (momentum 0, no noise) on a matrix gradient."""
    mu = max(0.3, 0.7 / math.sqrt(1 + step / 10000))
    left, right = factors
    pg = square(left) @ grad @ square(right)
    numel = grad.numel()
    term_left = pg @ pg.T if left.ndim == 2 else (pg * pg).sum(1)
    term_right = pg.T @ pg if right.ndim == 2 else (pg * pg).sum(0)
    new_left, l_left = reference_factor_step(
        left, term_left, numel / grad.shape[0], lipschitz[0], mu, method
    )
    new_right, l_right = reference_factor_step(
        right, term_right, numel / grad.shape[1], lipschitz[1], mu, method
    )
    direction = square(new_left) @ grad @ square(new_right)
    direction = direction * 1.1 / max(direction.square().mean().sqrt(), 1.1)
    new_param = param * (1 - lr * weight_decay) - lr / 5 * direction
    return new_left, new_right, (l_left, l_right), new_param


def factor_of(optimizer, param, side):
    return optimizer.state[param][f"{side}_factor"]


# --- layout -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "skew", "merged", "kinds"),
    [
        ((128, 128), 1.0, (128, 128), ("dense", "dense")),
        ((128, 1024), 1.0, (128, 1024), ("dense", "diagonal")),
        ((128, 1024), math.inf, (128, 1024), ("dense", "dense")),
        ((128, 128), math.inf, (128, 128), ("dense", "dense")),
        ((32, 64, 1024), 1.0, (2048, 1024), ("diagonal", "dense")),
        ((32, 64, 1024), math.inf, (2048, 1024), ("dense", "dense")),
        ((300,), 1.0, (1, 300), ("none", "diagonal")),
        ((1, 300, 1), math.inf, (1, 300), ("none", "diagonal")),
        ((), 1.0, (1, 1), ("none", "diagonal")),
    ],
)
def test_layout_follows_the_seed_examples(shape, skew, merged, kinds):
    layout = plan_psgd_layout(shape, 16384, skew)
    assert layout.matrix_shape == merged
    assert (layout.left, layout.right) == kinds


def test_max_size_dense_makes_large_dims_diagonal():
    layout = plan_psgd_layout((128, 64), 100, math.inf)
    assert (layout.left, layout.right) == ("diagonal", "dense")


def test_state_has_the_planned_factor_shapes_and_verbose_line(capsys):
    weight = nn.Parameter(torch.randn(32, 64, 16))
    optimizer = PSGD([weight])
    assert optimizer.describe_preconditioner(optimizer.bundles[0]) == [
        "32x64x16 → 32x1024 → [dense, diagonal]"
    ]
    bias = PSGD([nn.Parameter(torch.zeros(300))], verbose_init=True)
    assert bias.describe_preconditioner(bias.bundles[0]) == ["300 → 300 → [diagonal]"]
    assert "300 → 300 → [diagonal]" in capsys.readouterr().out
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    assert factor_of(optimizer, weight, "left").shape == (32, 32)
    assert factor_of(optimizer, weight, "right").shape == (1024,)


# --- one step against the float64 reference ------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("shape", "skew"),
    # all dense with tall axes: term1 and Q² not formed (9x3, 3x9), term1 not formed (10x5 quad)
    [
        ((5, 5), 1.0),
        ((6, 4), 1.0),
        ((4, 7), 1.0),
        ((9, 3), math.inf),
        ((3, 9), math.inf),
        ((10, 5), math.inf),
    ],
)
def test_one_factor_update_matches_float64_reference(method, shape, skew):
    generator = torch.Generator().manual_seed(1)
    param = nn.Parameter(torch.randn(shape, dtype=F64, generator=generator))
    optimizer = PSGD(
        [param],
        lr=0.01,
        method=method,
        momentum=0.0,
        noise_scale=0.0,
        dtype=F64,
        max_skew_dense=skew,
    )
    param.grad = torch.randn(shape, dtype=F64, generator=generator)
    optimizer.step()  # initialises the state
    state = optimizer.state[param]
    # start from general factors: non-symmetric dense Q exercises the Procrustes rotation
    factors = []
    for side, size in zip(("left", "right"), shape):
        if state[f"{side}_factor"].ndim == 2:
            q = torch.eye(size, dtype=F64) + 0.3 * torch.randn(
                size, size, dtype=F64, generator=generator
            )
            q = (q + q.T) / 2 if method == "quad" else q
        else:
            q = 0.5 + torch.rand(size, dtype=F64, generator=generator)
        state[f"{side}_factor"] = q.clone()
        factors.append(q)
    lipschitz = (torch.tensor(3.0, dtype=F64), torch.tensor(0.5, dtype=F64))
    state["left_lipschitz"], state["right_lipschitz"] = (x.clone() for x in lipschitz)
    grad = torch.randn(shape, dtype=F64, generator=generator)
    before = param.detach().clone()
    param.grad = grad
    optimizer.step()
    new_left, new_right, bounds, new_param = reference_step(
        grad, factors, lipschitz, 2, method, 0.01, 0.1, before
    )
    torch.testing.assert_close(state["left_factor"], new_left, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["right_factor"], new_right, rtol=1e-10, atol=1e-12)
    for side, bound in zip(("left", "right"), bounds):
        torch.testing.assert_close(state[f"{side}_lipschitz"], bound, rtol=1e-10, atol=0)
    torch.testing.assert_close(param.detach(), new_param, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_one_dimensional_update_matches_reference(method):
    generator = torch.Generator().manual_seed(2)
    bias = nn.Parameter(torch.randn(7, dtype=F64, generator=generator))
    optimizer = PSGD(
        [bias],
        method=method,
        momentum=0.0,
        noise_scale=0.0,
        dtype=F64,
        preconditioner_init_scale=0.8,
        weight_decay=0.0,
        lr_style=None,
        lr=0.1,
    )
    grad = torch.randn(7, dtype=F64, generator=generator)
    before = bias.detach().clone()
    bias.grad = grad
    optimizer.step()
    q = torch.full((7,), 0.8, dtype=F64)
    term1 = (q * q * grad) ** 2
    new_q, _ = reference_factor_step(q, term1, 1.0, 0.0, 0.7 / math.sqrt(1.0001), method)
    torch.testing.assert_close(optimizer.state[bias]["right_factor"], new_q)
    direction = new_q**2 * grad
    direction = direction * 1.1 / max(direction.square().mean().sqrt(), 1.1)
    torch.testing.assert_close(bias.detach(), before - 0.1 * direction)


def test_automatic_init_scale_and_first_momentum():
    """``scale = (max mean(g²) + noise²)^(-1/4)`` over the params initialised together."""
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(4, 3, dtype=F64, generator=generator), 3 * torch.randn(5, dtype=F64)]
    scale = (max(float(g.square().mean()) for g in grads) + 0.5**2) ** -0.25
    states = []
    for init_scale in (None, scale):
        params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
        optimizer = PSGD(  # the same seed: the same noise in both runs
            params, dtype=F64, noise_scale=0.5, preconditioner_init_scale=init_scale, seed=11
        )
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer.step()
        states.append([optimizer.state[p] for p in params])
    for automatic, explicit in zip(*states):
        for key in ("left_factor", "right_factor", "momentum"):
            if key in explicit:
                torch.testing.assert_close(automatic[key], explicit[key], rtol=0, atol=0)
    torch.testing.assert_close(states[0][0]["momentum"], grads[0].reshape(4, 3))


def test_same_shape_bundles_are_batched_without_changing_results():
    torch.manual_seed(4)
    params = [nn.Parameter(torch.randn(6, 5, dtype=F64)) for _ in range(3)]
    grads = [[torch.randn(6, 5, dtype=F64) for _ in params] for _ in range(3)]
    singles = [nn.Parameter(p.detach().clone()) for p in params]
    kwargs = {"dtype": F64, "noise_scale": 0.0, "preconditioner_init_scale": 1.0}
    together = PSGD(params, **kwargs)
    alone = [PSGD([p], **kwargs) for p in singles]
    for step_grads in grads:
        for p, s, g in zip(params, singles, step_grads):
            p.grad, s.grad = g.clone(), g.clone()
        together.step()
        for optimizer in alone:
            optimizer.step()
    for p, s in zip(params, singles):
        torch.testing.assert_close(p, s, rtol=1e-12, atol=1e-13)


def test_fit_noise_is_fresh_standard_normal_for_every_parameter(monkeypatch):
    """Each bundle's fit sees ``M + noise_scale · Z``, ``Z`` i.i.d. ``N(0, 1)`` and fresh every
    step; one draw is shared by all bundles (views of it), which each bundle's fit cannot see."""
    real_fit_noise = psgd_module._fit_noise
    seen = []

    def spy(momenta, standard_normal, scale):
        noisy = real_fit_noise(momenta, standard_normal, scale)
        seen.append((noisy - momenta) / scale)
        return noisy

    monkeypatch.setattr(psgd_module, "_fit_noise", spy)
    generator = torch.Generator().manual_seed(15)
    shapes = [(64, 48), (32, 16), (32, 16), (40,)]
    params = [nn.Parameter(torch.randn(shape, dtype=F64, generator=generator)) for shape in shapes]
    optimizer = PSGD(params, dtype=F64, noise_scale=1e-3)
    history: dict[tuple, list[torch.Tensor]] = {}
    for _ in range(4):
        for param in params:
            param.grad = torch.randn(param.shape, dtype=F64, generator=generator)
        seen.clear()
        optimizer.step()
        assert len(seen) == 3  # one bucket per layout: the two 32x16 weights are stacked
        for noise in seen:
            assert noise.shape[0] == (2 if noise.shape[1:] == (32, 16) else 1)
            history.setdefault(tuple(noise.shape[1:]), []).append(noise[0].flatten())
    for shape, draws in history.items():
        draws = torch.stack(draws)  # (steps, m·n) of one parameter
        tolerance = 4 / math.sqrt(draws.numel())  # ~4 standard errors
        assert abs(draws.mean()) < tolerance, shape
        assert abs(draws.std() - 1) < tolerance, shape
        within_one_sigma = (draws.abs() < 1).double().mean()
        assert abs(within_one_sigma - 0.6827) < tolerance, shape
        if draws.shape[1] >= 512:  # fresh each step: successive draws are uncorrelated
            for first, second in zip(draws[:-1], draws[1:]):
                assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1]) < 0.2, shape


# --- the fit: P·H approaches a multiple of the identity ------------------------------------
def random_spd(size, log10_cond, generator, diagonal):
    eigenvalues = torch.logspace(0, log10_cond, size, dtype=F64)
    if diagonal:
        return torch.diag(eigenvalues)
    basis, _ = torch.linalg.qr(torch.randn(size, size, dtype=F64, generator=generator))
    return basis @ torch.diag(eigenvalues) @ basis.T


def condition(matrix):
    magnitudes = torch.linalg.eigvals(matrix).abs()
    return (magnitudes.max() / magnitudes.min()).item()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("diagonal", [False, True])
def test_preconditioner_whitens_a_kronecker_hessian(method, diagonal):
    """H = A ⊗ B, gradients h = H v with v ~ N(0, I): the fit drives cond(P H) toward 1."""
    generator = torch.Generator().manual_seed(5)
    a, b = random_spd(8, 2.0, generator, diagonal), random_spd(6, 1.5, generator, diagonal)
    param = nn.Parameter(torch.zeros(8, 6, dtype=F64))
    optimizer = PSGD(
        [param],
        lr=0.0,
        method=method,
        momentum=0.0,
        weight_decay=0.0,
        dtype=F64,
        max_skew_dense=math.inf,
        max_size_dense=1 if diagonal else 16384,
        preconditioner_lr=0.1,
    )

    def condition_of_ph():  # P H acts as G ↦ (P_l A) G (B P_r)
        state = optimizer.state[param]
        return condition(square(state["left_factor"]) @ a) * condition(
            b @ square(state["right_factor"])
        )

    for step in range(300):
        param.grad = a @ torch.randn(8, 6, dtype=F64, generator=generator) @ b
        optimizer.step()
        if step == 0:
            initial = condition(a) * condition(b)
    final = condition_of_ph()
    print(f"{method} diagonal={diagonal}: cond(PH) {initial:.0f} -> {final:.2f}")
    assert initial > 1000
    assert final < initial / 10
    assert (factor_of(optimizer, param, "left").ndim == 1) == diagonal


# --- factor helpers ------------------------------------------------------------------------
def test_spectral_norm_lower_bound_is_a_tight_lower_bound():
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(4, 9, 12, generator=generator, dtype=F64)
    psd = x @ x.transpose(-1, -2)
    bound = spectral_norm_lower_bound(psd)
    exact = torch.linalg.matrix_norm(psd, ord=2)
    assert torch.all(bound <= exact * (1 + 1e-12))
    assert torch.all(bound >= 0.9 * exact)
    rank_one = torch.outer(x[0, 0], x[0, 0]).unsqueeze(0)
    torch.testing.assert_close(
        spectral_norm_lower_bound(rank_one), torch.linalg.matrix_norm(rank_one, ord=2)
    )
    assert torch.isfinite(spectral_norm_lower_bound(torch.zeros(2, 3, 3))).all()


def test_gram_bound_through_the_root_is_the_same_estimate():
    generator = torch.Generator().manual_seed(13)
    root = torch.randn(3, 10, 4, generator=generator, dtype=F64)
    torch.testing.assert_close(
        gram_norm_lower_bound(root),
        torch.stack([reference_lower_bound(x @ x.T) for x in root]),
        rtol=1e-12,
        atol=0,
    )
    assert torch.isfinite(gram_norm_lower_bound(torch.zeros(2, 5, 2))).all()


def test_procrustes_step_matches_reference_and_fixes_symmetric_matrices():
    generator = torch.Generator().manual_seed(7)
    q = torch.eye(5, dtype=F64) + 0.4 * torch.randn(3, 5, 5, dtype=F64, generator=generator)
    stepped = procrustes_step(q)
    for index in range(3):
        torch.testing.assert_close(stepped[index], reference_procrustes(q[index]))
        # the rotation raises tr(Q) (Procrustes objective) and lowers the asymmetry
        assert torch.trace(stepped[index]) > torch.trace(q[index])
    symmetric = (q + q.transpose(-1, -2)) / 2
    torch.testing.assert_close(procrustes_step(symmetric), symmetric, rtol=0, atol=0)


def test_balance_keeps_the_preconditioner_and_equalizes_scales():
    generator = torch.Generator().manual_seed(8)
    left = 100 * torch.randn(2, 4, 4, dtype=F64, generator=generator)
    right = 0.01 * torch.rand(2, 3, dtype=F64, generator=generator)
    new_left, new_right = balance_scales(left, right, torch.tensor([True, False]))
    for index in range(2):
        before = torch.kron(square(left[index]), square(right[index]))
        after = torch.kron(square(new_left[index]), square(new_right[index]))
        torch.testing.assert_close(after, before)
    torch.testing.assert_close(new_left[0].abs().max(), new_right[0].abs().max())
    torch.testing.assert_close(new_left[1], left[1], rtol=0, atol=0)


# --- the optimizer in use ------------------------------------------------------------------
def test_registered_for_compare_and_beats_sgd_on_digits():
    assert {"psgd_quad", "psgd_procrustes"} <= set(available_optimizers())
    results = compare(
        digits_task(), ["sgd", "psgd_quad", "psgd_procrustes"], steps=60, show_progress=False
    )
    by_name = {result.name: result for result in results}
    for name in ("psgd_quad", "psgd_procrustes"):
        assert not by_name[name].diverged
        assert by_name[name].test_loss < by_name["sgd"].test_loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, None])
def test_bf16_parameters_train_and_keep_their_dtype(dtype):
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(torch.bfloat16)
    inputs = torch.randn(64, 16, dtype=torch.bfloat16)
    targets = torch.randint(0, 4, (64,))
    optimizer = PSGD(model.parameters(), lr=0.1, dtype=dtype)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs).float(), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    state_dtype = dtype or torch.bfloat16
    assert optimizer.state[model[0].weight]["momentum"].dtype == state_dtype
    assert math.isfinite(losses[-1]) and losses[-1] < 0.5 * losses[0]


def test_half_state_is_multiplied_in_float32_on_cpu_and_stored_in_half():
    assert product_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert product_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    assert product_dtype(torch.float64, torch.device("cpu")) == torch.float64
    generator = torch.Generator().manual_seed(14)
    grads = [torch.randn(12, 8, generator=generator) for _ in range(5)]
    factors = {}
    for dtype in (torch.bfloat16, torch.float32):
        param = nn.Parameter(torch.zeros(12, 8))
        optimizer = PSGD([param], dtype=dtype, noise_scale=0.0, max_skew_dense=math.inf)
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        factors[dtype] = optimizer.state[param]["left_factor"]
    assert factors[torch.bfloat16].dtype == torch.bfloat16
    half, single = factors[torch.bfloat16].float(), factors[torch.float32]
    assert (half - single).norm() < 2e-2 * single.norm()


def test_parameter_without_gradient_on_first_step_gets_state_later():
    first, second = nn.Linear(4, 4), nn.Linear(4, 2)
    optimizer = PSGD([*first.parameters(), *second.parameters()], lr=0.01)
    first(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    assert not optimizer.state[second.weight]
    before = second.weight.detach().clone()
    second(first(torch.randn(8, 4))).sum().backward()
    optimizer.step()
    assert optimizer.state[second.weight]["step"] == 1
    assert optimizer.state[first.weight]["step"] == 2
    assert not torch.equal(second.weight, before)


def test_all_zero_gradients_do_not_produce_nan():
    param = nn.Parameter(torch.randn(5, 3))
    optimizer = PSGD([param], lr=0.01, noise_scale=0.0, weight_decay=0.1)
    before = param.detach().clone()
    param.grad = torch.zeros_like(param)
    optimizer.step()
    # initialisation waits for a non-zero gradient: placeholder state at step 0
    assert optimizer.state[param]["step"] == 0
    torch.testing.assert_close(param.detach(), before * (1 - 0.01 * 0.1))
    for _ in range(3):
        param.grad = torch.randn_like(param)
        optimizer.step()
        param.grad = torch.zeros_like(param)
        optimizer.step()
    assert torch.isfinite(param).all()
    assert all(
        torch.isfinite(v).all() for v in optimizer.state[param].values() if torch.is_tensor(v)
    )


def test_lr_style_adam_divides_the_step_by_five():
    deltas = {}
    for style in ("adam", None):
        param = nn.Parameter(torch.ones(4, 4, dtype=F64))
        optimizer = PSGD(
            [param], lr=0.1, lr_style=style, weight_decay=0.0, dtype=F64, noise_scale=0.0
        )
        param.grad = torch.arange(16, dtype=F64).reshape(4, 4)
        optimizer.step()
        deltas[style] = param.detach() - 1
    torch.testing.assert_close(deltas[None], 5 * deltas["adam"])


def test_preconditioner_groups_combine_weight_and_bias():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    optimizer = PSGD(model=model, combine_params=(LinearWeightBias(), PerParameter()))
    assert len(optimizer.bundles) == 2
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    assert optimizer.state[model[0].weight]["momentum"].shape == (5, 7)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("lr", -1.0),
        ("method", "newton"),
        ("lr_style", "sgd"),
        ("momentum", 1.0),
        ("weight_decay", -0.1),
        ("max_size_dense", 0),
        ("max_skew_dense", -1.0),
        ("preconditioner_lr", 0.0),
        ("preconditioner_lr", 1.5),
        ("preconditioner_init_scale", 0.0),
        ("noise_scale", -1e-9),
        ("dtype", torch.int32),
    ],
)
def test_bad_hyperparameters_raise_at_construction(name, value):
    with pytest.raises(
        ValueError, match=rf"Invalid {name}: {value!r}".replace("(", r"\(").replace(")", r"\)")
    ):
        PSGD([nn.Parameter(torch.zeros(2, 2))], **{name: value})


def test_in_place_and_replaced_state_edits_are_both_seen_by_the_next_step():
    """Stacked state is cached between steps; edits to it must still take effect."""
    torch.manual_seed(12)
    grads = [torch.randn(3, 5, 4, dtype=F64) for _ in range(3)]
    results = []
    for edit in ("in_place", "replace"):
        params = [nn.Parameter(torch.ones(5, 4, dtype=F64)) for _ in range(3)]
        optimizer = PSGD(params, dtype=F64, noise_scale=0.0, max_skew_dense=math.inf)
        for step, step_grads in enumerate(grads):
            for param, grad in zip(params, step_grads):
                param.grad = grad.clone()
            optimizer.step()
            if step == 1:
                state = optimizer.state[params[1]]
                if edit == "in_place":
                    state["left_factor"].mul_(2.0)
                else:
                    state["left_factor"] = state["left_factor"] * 2.0
        results.append([p.detach().clone() for p in params])
    for in_place, replaced in zip(*results):
        torch.testing.assert_close(in_place, replaced, rtol=0, atol=0)
