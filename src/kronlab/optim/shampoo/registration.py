"""The Shampoo family in the optimizer registry (``kronlab compare``), tuned for the digits task."""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer

from kronlab.optim.registry import register_optimizer
from kronlab.optim.shampoo.optimizer import Shampoo
from kronlab.optim.shampoo.presets import SOAP, KLShampoo

# What the digits task wants from every plain-Shampoo entry; each entry adds its variant.
DIGITS_DEFAULTS = {"eps": 1e-8, "precondition_frequency": 10, "weight_decay": 1e-2}


def _register_shampoo(name: str, summary: str, **variant: object) -> None:
    def factory(model: nn.Module, lr: float) -> Optimizer:
        return Shampoo(model.parameters(), lr=lr, **DIGITS_DEFAULTS, **variant)

    register_optimizer(name, default_lr=3e-3, summary=summary)(factory)


_register_shampoo("shampoo", "Shampoo, root-inverse, Adam grafting")
_register_shampoo(
    "eigen_shampoo",
    "Shampoo from cached eigenpairs, Adam grafting",
    preconditioner="eigendecomposed",
)
_register_shampoo(
    "eshampoo",
    "eigenvalue-corrected Shampoo (eigh refresh)",
    betas=(0.95, 0.95),
    preconditioner="eigenvalue_corrected",
    grafting="none",
)
_register_shampoo(
    "pf_shampoo",
    "per-factor eigenvalue-corrected Shampoo (m+n)",
    preconditioner="per_factor_eigenvalue_corrected",
)


@register_optimizer("soap", default_lr=3e-3, summary="SOAP: Adam in Shampoo's eigenbasis (QR)")
def _soap(model: nn.Module, lr: float) -> Optimizer:
    return SOAP(model.parameters(), lr=lr)


@register_optimizer("kl_shampoo", default_lr=3e-3, summary="KL-Shampoo, per-factor eigenvalues")
def _kl_shampoo(model: nn.Module, lr: float) -> Optimizer:
    return KLShampoo(model.parameters(), lr=lr)


@register_optimizer(
    "kl_shampoo_root", default_lr=3e-3, summary="KL-Shampoo with root-inverse factors"
)
def _kl_shampoo_root(model: nn.Module, lr: float) -> Optimizer:
    return KLShampoo(model.parameters(), lr=lr, preconditioner="root_inv")
