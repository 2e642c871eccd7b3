"""quad_torch 0.5's ``QUAD`` and ``Procrustes`` over ``kronlab.optim.PSGD``.

The same constructor arguments and defaults as quad_torch: ``dtype=None`` (the gradient's
dtype; kronlab's ``PSGD`` defaults to bfloat16), a ``preconditioner_lr`` below 0.3 raised to 0.3
(the schedule's floor), and each parameter's shape decision printed on the first step
(``original shape → merged shape → [dense, diagonal]``).
"""

from __future__ import annotations

from typing import Literal

import torch

from kronlab.optim.base import ParamsT
from kronlab.optim.psgd import PSGD, PSGDMethod

PRECONDITIONER_LR_FLOOR = 0.3


class _QuadTorch(PSGD):
    method: PSGDMethod

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.001,
        lr_style: Literal["adam"] | None = "adam",
        momentum: float = 0.95,
        weight_decay: float = 0.1,
        max_size_dense: float = 16384,
        max_skew_dense: float = 1.0,
        preconditioner_lr: float = 0.7,
        preconditioner_init_scale: float | None = None,
        noise_scale: float = 1e-9,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(preconditioner_lr, (int, float)) and not isinstance(preconditioner_lr, bool):
            preconditioner_lr = max(preconditioner_lr, PRECONDITIONER_LR_FLOOR)
        super().__init__(
            params,
            lr,
            self.method,
            lr_style,
            momentum,
            weight_decay,
            max_size_dense,
            max_skew_dense,
            preconditioner_lr,
            preconditioner_init_scale,
            noise_scale,
            dtype,
        )

    def update(self) -> None:
        if self.global_step == 1:
            for bundle in self.bundles:
                print(self.layout(bundle).describe())
        super().update()


class QUAD(_QuadTorch):
    """PSGD-QUAD (Li et al.): ``Q ← sym((I − μ/2L·E) Q (I − μ/2L·E))``; see ``kronlab.optim.PSGD``.

    Args:
        params: parameters or param groups.
        lr, lr_style, momentum, weight_decay: the step ``p ← p(1 − lr·wd) − lr'·update`` with
            ``lr' = lr/5`` for ``lr_style="adam"`` (else ``lr``), ``update`` from the momentum.
        max_size_dense, max_skew_dense: per merged axis, dense or diagonal factor.
        preconditioner_lr: the fit's step size ``μ_0`` (below 0.3: raised to 0.3).
        preconditioner_init_scale: initial ``Q = scale·I``; ``None``: from the first gradients.
        noise_scale: std of the noise added to the momentum for the fit.
        dtype: state and preconditioner dtype; ``None`` = the gradient's.
    """

    method = "quad"


class Procrustes(_QuadTorch):
    """PSGD-Procrustes (Li et al.): ``Q ← Q − μ/L·E Q`` then a rotation back toward symmetric
    positive definite (the ``Q^0.5 E Q^1.5`` form); see ``kronlab.optim.PSGD``.

    Args:
        params, lr, lr_style, momentum, weight_decay, max_size_dense, max_skew_dense,
            preconditioner_lr, preconditioner_init_scale, noise_scale, dtype: as ``QUAD``.
    """

    method = "procrustes"
