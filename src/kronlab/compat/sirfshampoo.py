"""sirfshampoo's names: ``SIRFShampoo`` with its arguments, and the ``sirfshampoo.combiner`` rules.

``from sirfshampoo import SIRFShampoo`` and ``from sirfshampoo.combiner import ...`` both become
``from kronlab.compat.sirfshampoo import ...``. kronlab's own ``SIRFShampoo`` names the parameter
momentum and the weight decay as torch.optim does (``momentum``, ``weight_decay``); this class
takes sirfshampoo's ``alpha1`` and ``kappa`` (also in param groups) and reports them under those
names in ``verbose_init``. The grouping rules have the same ``identify`` / ``group`` /
``ungroup`` interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from kronlab.groups import FlattenEmbedding, LinearWeightBias, PerParameter, PreconditionerGroup
from kronlab.optim.base import DEFAULT_RULES, NonFinitePolicy, ParamsT
from kronlab.optim.bundles import ParameterBundle
from kronlab.optim.sirfshampoo import DtypeSpec, StructureSpec
from kronlab.optim.sirfshampoo import SIRFShampoo as KronlabSIRFShampoo

__all__ = [
    "FlattenEmbedding",
    "LinearWeightBias",
    "PerParameter",
    "PreconditionerGroup",
    "SIRFShampoo",
]

# sirfshampoo's name → kronlab's
RENAMED = {"alpha1": "momentum", "kappa": "weight_decay"}


class SIRFShampoo(KronlabSIRFShampoo):
    """SIRFShampoo (Lin et al., ICML 2024) with sirfshampoo's argument names.

    Args:
        model, params, lr, beta2, alpha2, lam, T, structures, preconditioner_dtypes,
            combine_params, verbose_init, data_parallel_size, on_nonfinite_grad: as
            ``kronlab.optim.SIRFShampoo``.
        alpha1: parameter momentum (kronlab: ``momentum``).
        kappa: weight decay added to the step before momentum (kronlab: ``weight_decay``).
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamsT = None,
        lr: float = 1e-3,
        beta2: float = 0.01,
        alpha1: float = 0.9,
        alpha2: float = 0.5,
        lam: float = 1e-3,
        kappa: float = 0.0,
        T: int | Callable[[int], bool] = 1,
        structures: StructureSpec = "dense",
        preconditioner_dtypes: DtypeSpec = None,
        combine_params: PreconditionerGroup | tuple[PreconditionerGroup, ...] = DEFAULT_RULES,
        verbose_init: bool = False,
        *,
        data_parallel_size: int | None = None,
        on_nonfinite_grad: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__(
            model,
            params,
            lr,
            beta2,
            alpha1,
            alpha2,
            lam,
            kappa,
            T,
            structures,
            preconditioner_dtypes,
            combine_params,
            verbose_init,
            data_parallel_size=data_parallel_size,
            on_nonfinite_grad=on_nonfinite_grad,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = {RENAMED.get(key, key): value for key, value in param_group.items()}
        super().add_param_group(group)

    def describe_options(self, bundle: ParameterBundle) -> dict[str, Any]:
        seed_names = {kronlab: seed for seed, kronlab in RENAMED.items()}
        options = super().describe_options(bundle)
        return {seed_names.get(key, key): value for key, value in options.items()}
