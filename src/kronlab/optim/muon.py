"""Muon: Newton–Schulz-orthogonalized momentum for hidden matrices (Jordan et al., 2024)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from kronlab.distributed import DistributedConfig, OrthogonalizationItem, WorkItem
from kronlab.linalg.matmul_speed import newton_schulz_dtype
from kronlab.linalg.newton_schulz import newton_schulz, resolve_coefficients
from kronlab.optim.base import NonFinitePolicy, ParamsT
from kronlab.optim.hybrid import HybridMatrixOptimizer, matrix_shape
from kronlab.optim.registry import register_optimizer
from kronlab.optim.step_template import Direction, Slot, Stack
from kronlab.optim.validation import check_choice, check_range

# Learning-rate scale per update shape (rows m, columns n), so one lr suits every matrix:
# "original" keeps the update's RMS shape-independent for tall matrices (Jordan et al., 2024);
# "match_adamw_rms" gives it AdamW's typical RMS 0.2 (Liu et al., 2025, "Muon is scalable for LLM
# training"); "spectral" sets its spectral norm to √(fan_out/fan_in) (Bernstein & Newhouse, 2024).
ADJUST_LR = ("original", "match_adamw_rms", "spectral", None)
NS_DTYPES = ("auto", torch.float64, torch.float32, torch.bfloat16, torch.float16)
_TORCH_SPELLING = {"match_rms_adamw": "match_adamw_rms"}


def adjusted_lr(lr: float, adjust_lr: str | None, rows: int, columns: int) -> float:
    """``lr`` times the shape scale of ``adjust_lr`` for an ``rows × columns`` update."""
    if adjust_lr == "original":
        return lr * math.sqrt(max(1.0, rows / columns))
    if adjust_lr == "match_adamw_rms":
        return lr * 0.2 * math.sqrt(max(rows, columns))
    if adjust_lr == "spectral":
        return lr * math.sqrt(rows / columns)
    return lr


class Muon(HybridMatrixOptimizer):
    """MomentUm Orthogonalized by Newton–Schulz (Jordan et al., 2024), with an auxiliary AdamW.

    For each matrix (conv kernels flattened to ``(out, in·kh·kw)``):
    ``B ← μB + (1−μ)G``; ``U = (1−μ)G + μB`` (Nesterov) or ``B``; ``O = NS(U)``;
    ``W ← W(1 − lr·wd) − lr·s(m, n)·O`` with ``s`` from ``adjust_lr`` (see ``adjusted_lr``).
    Same-shape matrices of a group are orthogonalized in one batched Newton–Schulz call.

    The momentum is the EMA form of ``torch.optim.Muon`` (its ``lerp``), which equals the
    classical ``B ← μB + G`` up to the factor ``1/(1−μ)`` that Newton–Schulz's normalization
    removes. Differences from ``torch.optim.Muon``: ``adjust_lr=None`` here means no scaling
    (torch's None means "original"); "spectral" is extra; the momentum is float32 whatever the
    parameter dtype; Newton–Schulz runs in ``ns_dtype`` (torch always uses bfloat16); the input
    is scaled by its float32 Frobenius norm (torch: the bfloat16 norm, clamped at ε).

    Args:
        params: tensors or param groups; ``None`` with ``model=`` takes all of the model's.
        model: lets embeddings and the output head be routed to AdamW automatically.
        lr, momentum, nesterov, weight_decay: Muon's hyperparameters for the matrices.
        ns_steps, ns_coefficients: Newton–Schulz steps and coefficient set (a name from
            ``kronlab.linalg.NEWTON_SCHULZ_COEFFICIENTS`` or a tuple of ``(a, b, c)``); the
            default ``"simple"`` is the single triple of torch.optim.Muon and Keller Jordan's.
        ns_dtype: the dtype of the Newton–Schulz matmuls. ``"auto"`` (default): bfloat16 on
            accelerators; on CPU bfloat16 for matrices of at least 128 on each side and 2**15
            entries when the CPU has bf16 matrix units (AMX), else float32
            (``kronlab.linalg.matmul_speed``: a fixed rule, so a machine always picks the same
            dtype). An explicit dtype (bfloat16 as torch, float32 etc. for accuracy, or for runs
            bitwise identical across machines) is used as given. The update is added to the
            parameters from this dtype.
        adjust_lr: "original" (default, as torch), "match_adamw_rms", "spectral" or None.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: defaults of the AdamW groups.
        on_nonfinite_grad: ``"skip"`` (default), ``"raise"`` or ``"ignore"`` (see
            ``KronOptimizer``).
        verbose_init: print each parameter's algorithm at construction.
        distributed: a ``kronlab.distributed.DistributedConfig`` to split the preconditioner
            work over the ranks of a process group (see ``kronlab.optim.KronOptimizer``).
    """

    matrix_algorithm = "muon"
    momentum_on = "gradient"  # EMA of the gradient, then Newton–Schulz

    def __init__(
        self,
        params: ParamsT = None,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: str | tuple[tuple[float, float, float], ...] = "simple",
        weight_decay: float = 0.0,
        adjust_lr: str | None = "original",
        ns_dtype: torch.dtype | Literal["auto"] = "auto",
        *,
        model: nn.Module | None = None,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        on_nonfinite_grad: NonFinitePolicy = "skip",
        verbose_init: bool = False,
        distributed: DistributedConfig | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "ns_coefficients": ns_coefficients,
            "weight_decay": weight_decay,
            "adjust_lr": _TORCH_SPELLING.get(adjust_lr, adjust_lr),
            "ns_dtype": ns_dtype,
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
        )

    def validate_matrix_group(self, group: dict[str, Any]) -> None:
        check_range("momentum", group["momentum"], 0.0, 1.0, high_inclusive=False)
        check_choice("nesterov", group["nesterov"], (True, False))
        check_range("ns_steps", group["ns_steps"], 1, 100, integer=True)
        group["adjust_lr"] = _TORCH_SPELLING.get(group["adjust_lr"], group["adjust_lr"])
        check_choice("adjust_lr", group["adjust_lr"], ADJUST_LR)
        check_choice("ns_dtype", group["ns_dtype"], NS_DTYPES)
        resolve_coefficients(group["ns_coefficients"])

    def describe_matrix(self, param: torch.Tensor, group: dict[str, Any]) -> str:
        rows, columns = matrix_shape(param)
        return (
            f"Muon: Newton-Schulz {group['ns_coefficients']!s} x{group['ns_steps']} "
            f"on {rows}x{columns}"
        )

    def distributed_work_items(self) -> list[WorkItem]:
        """Matrix bundles cost their Newton–Schulz steps (``numel · min(m, n)`` each), not the
        Kronecker factors of the default model; AdamW bundles stay elementwise."""
        items = super().distributed_work_items()
        for index, bundle in enumerate(self.bundles):
            group = self.param_groups[bundle.group_index]
            if not self.is_auxiliary(group):
                shape = matrix_shape(bundle.key)
                items[index] = OrthogonalizationItem(index, shape, iterations=group["ns_steps"])
        return items

    def direction(
        self, stack: Stack, slots: list[Slot], gradients: list[torch.Tensor], group: dict[str, Any]
    ) -> Direction:
        """``NS(U)`` of the stack's momenta ``U`` (one batched call), stepped by ``adjusted_lr``."""
        rows, columns = stack.shape
        ns_dtype = group["ns_dtype"]
        if ns_dtype == "auto":
            ns_dtype = newton_schulz_dtype(rows, columns, stack.device)
        # cast piecewise, then stack: one pass, and the result stays in ns_dtype
        stacked = torch.stack([update.to(ns_dtype) for update in gradients])
        orthogonal = newton_schulz(stacked, group["ns_steps"], group["ns_coefficients"])
        return Direction(orthogonal, adjusted_lr(group["lr"], group["adjust_lr"], rows, columns))


@register_optimizer(
    "muon", default_lr=0.02, summary="Muon (Newton-Schulz orthogonalized momentum) + AdamW"
)
def _muon(model: nn.Module, lr: float) -> Muon:
    return Muon(model=model, lr=lr, adamw_lr=3e-3)
