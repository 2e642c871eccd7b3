"""The Shampoo family in the optimizer registry (``kronlab compare``), tuned for the digits task."""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer

from kronlab.optim.registry import register_optimizer
from kronlab.optim.shampoo.optimizer import SOAP, KLShampoo, Shampoo

FREQUENCY = 10


@register_optimizer("shampoo", default_lr=3e-3, summary="Shampoo, root-inverse, Adam grafting")
def _shampoo(model: nn.Module, lr: float) -> Optimizer:
    return Shampoo(
        model.parameters(),
        lr=lr,
        epsilon=1e-8,
        precondition_frequency=FREQUENCY,
        weight_decay=1e-2,
    )


@register_optimizer(
    "eigen_shampoo", default_lr=3e-3, summary="Shampoo from cached eigenpairs, Adam grafting"
)
def _eigen_shampoo(model: nn.Module, lr: float) -> Optimizer:
    return Shampoo(
        model.parameters(),
        lr=lr,
        epsilon=1e-8,
        preconditioner="eigendecomposed",
        precondition_frequency=FREQUENCY,
        weight_decay=1e-2,
    )


@register_optimizer("soap", default_lr=3e-3, summary="SOAP: Adam in Shampoo's eigenbasis (QR)")
def _soap(model: nn.Module, lr: float) -> Optimizer:
    return SOAP(model.parameters(), lr=lr)


@register_optimizer(
    "eshampoo", default_lr=3e-3, summary="eigenvalue-corrected Shampoo (eigh refresh)"
)
def _eshampoo(model: nn.Module, lr: float) -> Optimizer:
    return Shampoo(
        model.parameters(),
        lr=lr,
        betas=(0.95, 0.95),
        epsilon=1e-8,
        preconditioner="eigenvalue_corrected",
        grafting="none",
        precondition_frequency=FREQUENCY,
        weight_decay=1e-2,
    )


@register_optimizer(
    "pf_shampoo", default_lr=3e-3, summary="per-factor eigenvalue-corrected Shampoo (m+n)"
)
def _pf_shampoo(model: nn.Module, lr: float) -> Optimizer:
    return Shampoo(
        model.parameters(),
        lr=lr,
        epsilon=1e-8,
        preconditioner="per_factor_eigenvalue_corrected",
        precondition_frequency=FREQUENCY,
        weight_decay=1e-2,
    )


@register_optimizer("kl_shampoo", default_lr=3e-3, summary="KL-Shampoo, per-factor eigenvalues")
def _kl_shampoo(model: nn.Module, lr: float) -> Optimizer:
    return KLShampoo(model.parameters(), lr=lr)


@register_optimizer(
    "kl_shampoo_root", default_lr=3e-3, summary="KL-Shampoo with root-inverse factors"
)
def _kl_shampoo_root(model: nn.Module, lr: float) -> Optimizer:
    return KLShampoo(model.parameters(), lr=lr, preconditioner="root_inv")
