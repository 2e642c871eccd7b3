"""SOAP and KL-Shampoo: ``Shampoo`` with the defaults (and for SOAP the names) of their papers."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kronlab.distributed import DistributedConfig
from kronlab.groups.rules import PreconditionerGroup
from kronlab.optim.base import DEFAULT_RULES, NonFinitePolicy, ParamsT
from kronlab.optim.shampoo.eigenvalue_corrected import EigenvalueCorrectedConfig
from kronlab.optim.shampoo.optimizer import Shampoo, renamed_eps
from kronlab.optim.validation import check_range


def with_defaults(fixed: dict[str, Any], **defaults: Any) -> Callable[..., None]:
    """A ``Shampoo.__init__`` with other ``defaults`` and the ``fixed`` arguments left out of
    its signature (which ``inspect.signature`` reports, so every argument stays named and
    documented): a preset is the few values where it differs, never a copied signature."""
    signature = inspect.signature(Shampoo.__init__)
    parameters = [
        parameter.replace(default=defaults.get(name, parameter.default))
        for name, parameter in signature.parameters.items()
        if name not in fixed
    ]
    preset = signature.replace(parameters=parameters)

    def __init__(self: Shampoo, *args: Any, **kwargs: Any) -> None:
        bound = preset.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        Shampoo.__init__(self, **arguments, **fixed)

    __init__.__signature__ = preset  # type: ignore[attr-defined]
    return __init__


class SOAP(Shampoo):
    """SOAP (Vyas et al., 2024): Adam in the eigenbasis of Shampoo's factors, refreshed by one
    warm-started QR step every ``precondition_frequency`` steps. Published defaults: lr 3e-3,
    betas (0.95, 0.95), ε 1e-8, weight decay 0.01, frequency 10, max dim 10000, no dim merging,
    1-D parameters by Adam. The registry's ``soap`` (``create_optimizer``) uses lr 1e-2, which
    won the convergence benchmark's grids (BENCHMARKS.md, "Convergence"); the class keeps the
    published defaults.

    Args:
        params, lr, betas, eps, weight_decay, precondition_frequency, max_preconditioner_dim,
            merge_dims: as ``Shampoo`` (SOAP's defaults above).
        shampoo_beta: the factors' EMA rate (``None``: ``betas[1]``).
        precondition_1d: give parameters with one dim > 1 a dense factor (else Adam).
        eigenbasis: ``"qr"`` (SOAP's warm-started QR step) or ``"eigh"``.
        grafting, decoupled_weight_decay, nesterov, bias_correction, start_preconditioning_step,
            factor_dtype, max_consecutive_failures, model, combine_params, on_nonfinite_grad,
            verbose_init, distributed, epsilon: as ``Shampoo`` (``grafting`` defaults to
            ``"none"``).
    """

    def __init__(
        self,
        params: ParamsT = None,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        *,
        shampoo_beta: float | None = None,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_preconditioner_dim: int | None = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        eigenbasis: str = "qr",
        grafting: object = "none",
        decoupled_weight_decay: bool = True,
        nesterov: bool = False,
        bias_correction: bool = True,
        start_preconditioning_step: float = 1,
        factor_dtype: torch.dtype = torch.float32,
        max_consecutive_failures: int = 5,
        model: nn.Module | None = None,
        combine_params: PreconditionerGroup | tuple[PreconditionerGroup, ...] = DEFAULT_RULES,
        on_nonfinite_grad: NonFinitePolicy = "skip",
        verbose_init: bool = False,
        distributed: DistributedConfig | None = None,
        epsilon: float | None = None,
    ) -> None:
        if shampoo_beta is not None:  # checked here so the error names SOAP's argument
            check_range("shampoo_beta", shampoo_beta, 0.0, 1.0)
        super().__init__(
            params,
            lr,
            betas,
            renamed_eps(eps, epsilon, SOAP),
            preconditioner=EigenvalueCorrectedConfig(
                eigenbasis=eigenbasis,  # type: ignore[arg-type]
                factor_beta=shampoo_beta,
            ),
            grafting=grafting,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            nesterov=nesterov,
            bias_correction=bias_correction,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            max_preconditioner_dim=max_preconditioner_dim,
            merge_dims=merge_dims,
            factor_dtype=factor_dtype,
            vector_preconditioner="dense" if precondition_1d else "diagonal",
            max_consecutive_failures=max_consecutive_failures,
            model=model,
            combine_params=combine_params,
            on_nonfinite_grad=on_nonfinite_grad,
            verbose_init=verbose_init,
            distributed=distributed,
        )


class KLShampoo(Shampoo):
    """KL-Shampoo (Lin et al., 2025, "Understanding and Improving Shampoo and SOAP via
    Kullback–Leibler Minimization"): factors ``L ← β₂ L + (1 − β₂) G R^{-1} Gᵀ / n`` (and
    symmetrically R), direction ``L^{-1/2} M R^{-1/2}``. lr 3e-3, betas (0.95, 0.95), ε 1e-8,
    weight decay 0.01 and frequency 10 follow the paper's SOAP-based reference; the
    preconditioner defaults to per-factor eigenvalue correction. The reference clamps the inverse
    square-root eigenvalues to keep early steps bounded (its direction scales like 1/σ of a
    single low-rank gradient); here Adam grafting (per-block norm matching) does that job by
    default — pass ``grafting="none"`` for the raw KL-Shampoo step. While a factor's eigenvalues
    are all zero (before any gradient was measured) the statistics skip its inverse.

    Args:
        params, lr, betas, eps, preconditioner, grafting, weight_decay, decoupled_weight_decay,
            nesterov, bias_correction, precondition_frequency, start_preconditioning_step,
            max_preconditioner_dim, merge_dims, factor_dtype, vector_preconditioner,
            max_consecutive_failures, model, combine_params, on_nonfinite_grad, verbose_init,
            distributed, epsilon: as ``Shampoo`` (the defaults above; ``preconditioner`` one of
            ``"root_inv"``, ``"eigendecomposed"``, ``"per_factor_eigenvalue_corrected"``).
    """

    __init__ = with_defaults(
        {"kl": True},
        lr=3e-3,
        betas=(0.95, 0.95),
        eps=1e-8,
        preconditioner="per_factor_eigenvalue_corrected",
        weight_decay=0.01,
        precondition_frequency=10,
    )
