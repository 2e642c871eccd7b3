"""Spectron: low-rank training with orthogonalized factor momenta (arXiv 2602.12429)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from kronlab.distributed import DistributedConfig
from kronlab.linalg.newton_schulz import newton_schulz, resolve_coefficients
from kronlab.linalg.power import power_iteration
from kronlab.optim.base import NonFinitePolicy, ParamsT
from kronlab.optim.hybrid import HybridMatrixOptimizer, as_matrix, matrix_shape
from kronlab.optim.registry import register_optimizer
from kronlab.optim.step_template import Direction, Slot, Stack, momentum_
from kronlab.optim.validation import check_choice, check_range

FACTOR_DTYPE = torch.float32
# per-matrix state: factors and their momenta (views of one stacked buffer per stack)
FACTOR_KEYS = ("factor_a", "factor_b", "momentum_a", "momentum_b", "left_vector_a", "left_vector_b")


WEIGHT_DECAY_METHODS = ("decoupled", "independent", "l2")


def spectron_rank(
    rows: int, columns: int, rank: int | None, rank_fraction: float | None, cap: bool = False
) -> int:
    """The factor rank of a ``rows × columns`` matrix: ``rank`` (``min(rank, rows, columns)``
    with ``cap``), or ``round(fraction·min)`` ≥ 1."""
    if rank is not None:
        return min(rank, rows, columns) if cap else rank
    return max(1, round(rank_fraction * min(rows, columns)))


@contextlib.contextmanager
def full_precision_matmul() -> Iterator[None]:
    """float32 matmuls without TF32 (factor gradients must not lose bits to tensor cores).

    Not under ``torch.compile``: Dynamo cannot trace the global setting's read; the compiled
    step keeps the precision the caller set."""
    if torch.compiler.is_compiling():
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class Spectron(HybridMatrixOptimizer):
    """Spectron (Janson, Oyallon & Belilovsky, 2026): train ``W = A Bᵀ`` through its factors.

    The model keeps dense ``W``; the optimizer keeps rank-``r`` factors as float32 state. First
    step: ``W ≈ U S Vᵀ`` (truncated SVD), ``A = U√S``, ``B = V√S``. Every step, with ``G = ∂L/∂W``
    in float32: ``G_A = G B``, ``G_B = Gᵀ A``; ``A, B ← (1 − lr·wd)·A, B``;
    ``M_* ← βM_* + (1−β)G_*``; ``O_* = NS(M_*)``; ``σ_* ≈ ‖*‖₂`` (warm-started power iteration on
    the factors); ``ρ = lr/(σ_A + σ_B + 1)``; ``A ← A − ρO_A``, ``B ← B − ρO_B``;
    ``W ← A Bᵀ`` in W's dtype. So ``‖ΔW‖₂ ≲ lr``. Weight decay on the factors per
    ``weight_decay_method``: ``"decoupled"`` ``A ← (1 − lr·wd)A`` (above), ``"independent"``
    ``A ← (1 − wd)A``, ``"l2"`` ``G_A ← G_A + wd·A`` (the names of NVIDIA Emerging-Optimizers).

    Memory: ``2(m+n)r + (m+n) + 2`` float32 numbers per ``m × n`` matrix (two factors, two
    momenta, two power-iteration vectors, two σ), against ``2mn`` for AdamW and ``mn`` for Muon
    (smaller than Muon's when ``r < mn / (2(m+n))``, i.e. ``r < n/4`` for square matrices); see
    ``state_bytes()``. The weights themselves stay dense, as in the NeMo reference.
    Writing to ``W`` outside the optimizer is not seen by the factors (they overwrite it).

    Args:
        params, model: as ``Muon``; auxiliary parameters go to AdamW.
        lr: the bound on the spectral norm of each weight update. The registry's ``spectron``
            (``create_optimizer``) uses 0.05, within one grid point of the best on the
            convergence benchmark's three tasks (BENCHMARKS.md, "Convergence"); the class
            default is kept so that code written against it trains as before.
        rank, rank_fraction: exactly one; ``rank`` must be in ``[1, min(m, n)]`` for every matrix
            unless ``cap_rank=True``, which uses ``min(rank, m, n)`` per matrix.
        momentum, weight_decay, ns_steps: as in the update above.
        ns_coefficients: a name from ``kronlab.linalg.NEWTON_SCHULZ_COEFFICIENTS`` (default
            ``"simple"``) or a tuple of ``(a, b, c)``.
        power_iterations: warm-started power-iteration steps per optimizer step.
        weight_decay_method: ``"decoupled"`` (default), ``"independent"`` or ``"l2"``.
        cap_rank: cap ``rank`` at each matrix's ``min(m, n)`` instead of refusing it.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: defaults of the AdamW groups.
        on_nonfinite_grad, verbose_init: as ``kronlab.optim.KronOptimizer``.
        distributed: a ``kronlab.distributed.DistributedConfig`` to split the preconditioner
            work over the ranks of a process group (see ``kronlab.optim.KronOptimizer``).
        seed: seed of the power-iteration start vectors (``None``: derived from
            ``torch.initial_seed()``, see ``KronOptimizer``); never the global RNG. Each bundle
            draws from its own stream, seeded from ``seed`` and the bundle's position
            (``KronOptimizer.bundle_generator``), so a sharded run draws one process's vectors.
    """

    matrix_algorithm = "spectron"
    variant_keys = ("combine_params", "algorithm", "rank", "rank_fraction")

    def __init__(
        self,
        params: ParamsT = None,
        lr: float = 0.01,
        rank: int | None = None,
        rank_fraction: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        power_iterations: int = 1,
        ns_coefficients: str | tuple[tuple[float, float, float], ...] = "simple",
        *,
        weight_decay_method: str = "decoupled",
        cap_rank: bool = False,
        model: nn.Module | None = None,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        on_nonfinite_grad: NonFinitePolicy = "skip",
        verbose_init: bool = False,
        distributed: DistributedConfig | None = None,
        seed: int | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "rank": rank,
            "rank_fraction": rank_fraction,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "ns_steps": ns_steps,
            "power_iterations": power_iterations,
            "ns_coefficients": ns_coefficients,
            "weight_decay_method": weight_decay_method,
            "cap_rank": cap_rank,
        }
        super().__init__(
            params,
            defaults,
            model=model,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            on_nonfinite_grad=on_nonfinite_grad,
            verbose_init=verbose_init,
            distributed=distributed,
            seed=seed,
        )

    def validate_matrix_group(self, group: dict[str, Any]) -> None:
        rank, fraction = group["rank"], group["rank_fraction"]
        if (rank is None) == (fraction is None):
            raise ValueError(
                f"Invalid rank/rank_fraction: {rank!r}/{fraction!r} (allowed: exactly one of "
                f"rank, an integer >= 1, or rank_fraction, a number 0 < rank_fraction <= 1)"
            )
        if fraction is not None:
            check_range("rank_fraction", fraction, 0.0, 1.0, low_inclusive=False)
        else:
            check_range("rank", rank, 1, integer=True)
            check_choice("cap_rank", group["cap_rank"], (True, False))
            for param in group["params"] if not group["cap_rank"] else ():
                rows, columns = matrix_shape(param)
                if rank > min(rows, columns):
                    name = self._names.get(param, "a parameter")
                    raise ValueError(
                        f"Invalid rank: {rank} (allowed: 1 <= rank <= min(m, n) = "
                        f"{min(rows, columns)} for {name} of shape {rows}x{columns})"
                    )
        check_range("momentum", group["momentum"], 0.0, 1.0, high_inclusive=False)
        check_range("ns_steps", group["ns_steps"], 1, 100, integer=True)
        check_range("power_iterations", group["power_iterations"], 1, 100, integer=True)
        check_choice("weight_decay_method", group["weight_decay_method"], WEIGHT_DECAY_METHODS)
        resolve_coefficients(group["ns_coefficients"])

    def describe_matrix(self, param: torch.Tensor, group: dict[str, Any]) -> str:
        rows, columns = matrix_shape(param)
        rank = _group_rank(rows, columns, group)
        return f"Spectron: factors {rows}x{rank} and {columns}x{rank}"

    def direction(
        self, stack: Stack, slots: list[Slot], gradients: list[torch.Tensor], group: dict[str, Any]
    ) -> Direction:
        """One batched ``spectron_step`` of the stack's factors; the direction's values are the
        new weights ``A Bᵀ`` (``apply`` writes them)."""
        rows, columns = stack.shape
        params = [slot.param for slot in slots]
        fresh = [slot for slot in slots if "factor_a" not in self.state[slot.param]]
        if fresh:
            self._initialize(fresh, _group_rank(rows, columns, group))
        states = [self.state[p] for p in params]
        # the per-parameter entries are views of the stacks, reused from step to step
        old = [self.stacked_state.stack((stack.index, name), states, name) for name in FACTOR_KEYS]
        with full_precision_matmul():
            new = spectron_step(torch.stack(gradients), *old, group)
            weights = new[0] @ new[1].transpose(-1, -2)
        for name, value in zip(FACTOR_KEYS + ("sigma_a", "sigma_b"), new):
            self.stacked_state.store((stack.index, name), states, name, value)
        return Direction(weights, 1.0)

    def apply(
        self, stack: Stack, slots: list[Slot], direction: Direction, group: dict[str, Any]
    ) -> None:
        """``W ← A Bᵀ`` (the factors carry the weight decay and the step)."""
        for slot, weight in zip(slots, direction.values):
            slot.param.copy_(weight.view(slot.param.shape))

    def _initialize(self, slots: list[Slot], rank: int) -> None:
        """Truncated SVD of the current weights (one batched call): ``A = U√S``, ``B = V√S``;
        power-iteration start vectors from each bundle's own random stream."""
        params = [slot.param for slot in slots]
        weights = torch.stack([as_matrix(p.detach()) for p in params]).to(FACTOR_DTYPE)
        left, singular, right_t = torch.linalg.svd(weights, full_matrices=False)
        root = singular[..., :rank].sqrt().unsqueeze(-2)
        factor_a = left[..., :rank] * root
        factor_b = right_t[..., :rank, :].transpose(-1, -2) * root
        for index, (slot, param) in enumerate(zip(slots, params)):
            rows, columns = matrix_shape(param)
            state = self.state[param]
            state["factor_a"] = factor_a[index].contiguous()
            state["factor_b"] = factor_b[index].contiguous()
            state["momentum_a"] = torch.zeros_like(state["factor_a"])
            state["momentum_b"] = torch.zeros_like(state["factor_b"])
            generator = self.bundle_generator(slot.bundle, param.device)
            state["left_vector_a"] = _random_unit(rows, generator)
            state["left_vector_b"] = _random_unit(columns, generator)
            param.copy_((state["factor_a"] @ state["factor_b"].T).view(param.shape))


def spectron_step(
    grads: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    momentum_a: torch.Tensor,
    momentum_b: torch.Tensor,
    left_a: torch.Tensor,
    left_b: torch.Tensor,
    group: dict[str, Any],
) -> tuple[torch.Tensor, ...]:
    """One Spectron step on stacks ``(k, m, r)``/``(k, n, r)`` of float32 factors.

    Returns the new factors, momenta (updated in place) and power-iteration vectors and the
    ``σ`` estimates used.
    """
    lr, beta, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
    method = group.get("weight_decay_method", "decoupled")
    grad_a = grads @ b
    grad_b = grads.transpose(-1, -2) @ a
    if weight_decay != 0 and method == "l2":
        grad_a, grad_b = grad_a + weight_decay * a, grad_b + weight_decay * b
    elif weight_decay != 0:
        decay = 1 - (lr * weight_decay if method == "decoupled" else weight_decay)
        a, b = a * decay, b * decay
    momentum_a, momentum_b = momentum_([momentum_a, momentum_b], [grad_a, grad_b], beta)
    steps, coefficients = group["ns_steps"], group["ns_coefficients"]
    orthogonal_a = newton_schulz(momentum_a, steps, coefficients, dtype=FACTOR_DTYPE)
    orthogonal_b = newton_schulz(momentum_b, steps, coefficients, dtype=FACTOR_DTYPE)
    sigma_a, left_a = power_iteration(a, left_a, group["power_iterations"])
    sigma_b, left_b = power_iteration(b, left_b, group["power_iterations"])
    step_size = (lr / (sigma_a + sigma_b + 1))[:, None, None]
    a = a - step_size * orthogonal_a
    b = b - step_size * orthogonal_b
    return a, b, momentum_a, momentum_b, left_a, left_b, sigma_a, sigma_b


def _group_rank(rows: int, columns: int, group: dict[str, Any]) -> int:
    cap = group.get("cap_rank", False)
    return spectron_rank(rows, columns, group["rank"], group["rank_fraction"], cap)


def _random_unit(size: int, generator: torch.Generator) -> torch.Tensor:
    vector = torch.randn(size, dtype=FACTOR_DTYPE, device=generator.device, generator=generator)
    return vector / vector.norm()


@register_optimizer(
    "spectron",
    default_lr=0.05,
    summary="Spectron (low-rank factors, orthogonalized momenta) at rank_fraction 0.5 + AdamW",
)
def _spectron(model: nn.Module, lr: float) -> Spectron:
    return Spectron(model=model, lr=lr, rank_fraction=0.5, adamw_lr=3e-3)
