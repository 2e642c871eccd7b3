"""Matrix optimizers with an auxiliary AdamW: which parameters get which, and the AdamW step.

Orthogonalized methods (Muon, Spectron) only make sense for hidden weight matrices. Embeddings,
the output head and every parameter with fewer than two dimensions are stepped by AdamW inside
the same optimizer (Jordan et al., 2024, "Muon: an optimizer for hidden layers"). Each param group
carries ``algorithm``: the matrix method's name or ``"adamw"``; groups that do not say are split
automatically by ``auxiliary_parameters``. Keller Jordan's ``use_muon=True/False`` is accepted as
a synonym.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kronlab.distributed import DistributedConfig
from kronlab.optim.base import KronOptimizer, NonFinitePolicy, ParamsT
from kronlab.optim.bundles import ParameterBundle
from kronlab.optim.step_template import Work
from kronlab.optim.validation import (
    check_betas,
    check_choice,
    check_module,
    check_params,
    check_range,
)

ADAMW = "adamw"
AUTO = "auto"


def auxiliary_parameters(model: nn.Module) -> set[int]:
    """Ids of the parameters of ``model`` that belong to AdamW: embeddings, the output head and
    all parameters with fewer than two dimensions.

    The output head is the last ``nn.Linear`` in module order, or any linear layer whose weight
    is tied to an embedding.
    """
    embeddings = [
        module.weight
        for module in model.modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
    ]
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    heads = [linears[-1].weight] if linears else []
    heads += [m.weight for m in linears if any(m.weight is e for e in embeddings)]
    auxiliary = [p for p in model.parameters() if p.ndim < 2] + embeddings + heads
    return {id(p) for p in auxiliary}


def split_param_groups(
    params: ParamsT,
    model: nn.Module | None,
    matrix_algorithm: str,
    auxiliary_defaults: dict[str, Any],
) -> list[dict[str, Any]]:
    """Param groups with an explicit ``algorithm`` each.

    A group without ``algorithm`` (or with ``"auto"``) is split in two: its matrices go to
    ``matrix_algorithm`` and its auxiliary parameters (``auxiliary_parameters`` of ``model``, or
    all parameters with < 2 dims when no model is given) to AdamW, which takes
    ``auxiliary_defaults`` (lr, betas, ...) for the keys the group does not set.
    """
    check_module("model", model, allow_none=True)
    check_params(params)
    if params is None:
        if model is None:
            raise ValueError("pass params, or model= to optimize all its trainable parameters")
        params = [p for p in model.parameters() if p.requires_grad]
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    auxiliary = auxiliary_parameters(model) if model is not None else set()
    result: list[dict[str, Any]] = []
    for group in groups:
        group = dict(group)
        members = group["params"]
        group["params"] = [members] if isinstance(members, Tensor) else list(members)
        if "use_muon" in group:
            use_matrix = group.pop("use_muon")
            group.setdefault("algorithm", matrix_algorithm if use_matrix else ADAMW)
        algorithm = group.get("algorithm", AUTO)
        if algorithm == ADAMW:
            result.append({**auxiliary_defaults, **group})
        elif algorithm != AUTO:
            result.append(group)
        else:
            is_auxiliary = [p.ndim < 2 or id(p) in auxiliary for p in group["params"]]
            matrices = [p for p, aux in zip(group["params"], is_auxiliary) if not aux]
            others = [p for p, aux in zip(group["params"], is_auxiliary) if aux]
            if matrices:
                result.append({**group, "params": matrices, "algorithm": matrix_algorithm})
            if others:
                result.append({**auxiliary_defaults, **group, "params": others, "algorithm": ADAMW})
    return result


def as_matrix(tensor: Tensor) -> Tensor:
    """A ``(rows, rest)`` view: conv kernels ``(out, in, kh, kw)`` become ``(out, in·kh·kw)``."""
    return tensor.reshape(tensor.shape[0], -1)


def matrix_shape(param: Tensor) -> tuple[int, int]:
    return param.shape[0], param[0].numel()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in ``optimizer.state`` (any ``torch.optim.Optimizer``)."""
    return sum(_tensor_bytes(value) for value in optimizer.state.values())


def _tensor_bytes(value: object) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


class HybridMatrixOptimizer(KronOptimizer):
    """Base for a matrix method (its ``direction`` on float32 ``(rows, rest)`` matrices) plus
    AdamW (``kronlab.optim.adamw``) for the auxiliary parameters."""

    matrix_algorithm: ClassVar[str]
    variant_keys: ClassVar[tuple[str, ...]] = ("combine_params", "algorithm")

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        *,
        model: nn.Module | None,
        adamw_lr: float,
        adamw_betas: tuple[float, float],
        adamw_eps: float,
        adamw_weight_decay: float,
        on_nonfinite_grad: NonFinitePolicy,
        verbose_init: bool,
        distributed: DistributedConfig | None = None,
        seed: int | None = None,
    ) -> None:
        # Checked under the constructor's names; the groups' own keys are checked per group.
        check_range("adamw_lr", adamw_lr, 0.0)
        check_betas("adamw_betas", adamw_betas, high_inclusive=False)
        check_range("adamw_eps", adamw_eps, 0.0)
        check_range("adamw_weight_decay", adamw_weight_decay, 0.0)
        auxiliary_defaults = {
            "lr": adamw_lr,
            "betas": tuple(adamw_betas),
            "eps": adamw_eps,
            "weight_decay": adamw_weight_decay,
        }
        self._auxiliary_defaults = auxiliary_defaults
        groups = split_param_groups(params, model, self.matrix_algorithm, auxiliary_defaults)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        defaults = {**auxiliary_defaults, **defaults, "algorithm": self.matrix_algorithm}
        super().__init__(
            groups,
            defaults,
            model=model,
            on_nonfinite_grad=on_nonfinite_grad,
            verbose_init=verbose_init,
            distributed=distributed,
            seed=seed,
        )

    # --- construction -------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, split by ``split_param_groups`` as at construction: a group without
        ``algorithm`` becomes a matrix group and an AdamW group. All or nothing."""
        count = len(self.param_groups)
        bundle_count = len(self.bundles)
        try:
            for group in split_param_groups(
                [param_group], self.model, self.matrix_algorithm, self._auxiliary_defaults
            ):
                super().add_param_group(group)
        except ValueError:
            del self.param_groups[count:]
            del self.bundles[bundle_count:]
            raise

    def validate_group(self, group: dict[str, Any]) -> None:
        check_choice("algorithm", group["algorithm"], (self.matrix_algorithm, ADAMW))
        check_range("lr", group["lr"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        if group["algorithm"] == ADAMW:
            check_betas("betas", group["betas"], high_inclusive=False)
            check_range("eps", group["eps"], 0.0)
            return
        for param in group["params"]:
            if param.ndim < 2:
                name = self._names.get(param, "a parameter")
                raise ValueError(
                    f"Invalid parameter for {self.matrix_algorithm}: {name} has shape "
                    f"{tuple(param.shape)} (allowed: >= 2 dims); put it in a group with "
                    f"algorithm='adamw' or leave algorithm unset to route it automatically"
                )
        self.validate_matrix_group(group)

    @abstractmethod
    def validate_matrix_group(self, group: dict[str, Any]) -> None:
        """Check the matrix method's hyperparameters of a group."""

    def describe_preconditioner(self, bundle: ParameterBundle) -> list[str]:
        group = self.param_groups[bundle.group_index]
        shape = "x".join(map(str, bundle.grouped_shape)) or "scalar"
        if group["algorithm"] == ADAMW:
            return [f"{shape} (AdamW)"]
        return [f"{shape} ({self.describe_matrix(bundle.key, group)})"]

    def describe_matrix(self, param: Tensor, group: dict[str, Any]) -> str:
        return self.matrix_algorithm

    # --- stepping -----------------------------------------------------------------------
    def is_auxiliary(self, group: dict[str, Any]) -> bool:
        return group["algorithm"] == ADAMW

    def work(self, bundle: ParameterBundle) -> list[Work]:
        """Matrix groups: the float32 ``(rows, rest)`` matrix; AdamW groups: the parameter."""
        param = bundle.key
        if self.param_groups[bundle.group_index]["algorithm"] == ADAMW:
            return [Work(tuple(param.shape), param.dtype)]
        return [Work(matrix_shape(param), torch.float32)]

    # --- reporting ----------------------------------------------------------------------
    def state_bytes(self) -> dict[str, int]:
        """Optimizer-state bytes per algorithm (``matrix_algorithm``, ``"adamw"``) and total."""
        result = {self.matrix_algorithm: 0, ADAMW: 0}
        for group in self.param_groups:
            result[group["algorithm"]] += sum(
                _tensor_bytes(self.state[p]) for p in group["params"] if p in self.state
            )
        result["total"] = result[self.matrix_algorithm] + result[ADAMW]
        return result


__all__ = [
    "ADAMW",
    "HybridMatrixOptimizer",
    "as_matrix",
    "auxiliary_parameters",
    "matrix_shape",
    "optimizer_state_bytes",
    "split_param_groups",
]
