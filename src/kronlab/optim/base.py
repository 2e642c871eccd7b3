"""The base class every kronlab optimizer shares: groups, validation, state, printing."""

from __future__ import annotations

import copy
import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.optim import Optimizer

from kronlab.groups.rules import PerParameter, PreconditionerGroup, check_rules
from kronlab.linalg.finite import all_finite
from kronlab.optim.bundles import ParameterBundle, identify_bundles
from kronlab.optim.transaction import StepTransaction
from kronlab.optim.validation import check_choice

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None
NonFinitePolicy = Literal["skip", "raise", "ignore"]
GLOBAL_STATE = "kronlab"
DEFAULT_RULES: tuple[PreconditionerGroup, ...] = (PerParameter(),)


class KronOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` whose parameters are partitioned into preconditioner bundles.

    Subclasses declare ``defaults``, check a param group in ``validate_group`` (raise
    ``ValueError`` naming the argument, its value and the allowed range), describe a bundle's
    preconditioner in ``describe_preconditioner`` and do the arithmetic in ``update``.

    * ``model=`` lets grouping rules (``combine_params``) find layers and gives parameter names;
      ``params=None`` then means all trainable parameters of the model.
    * ``combine_params`` (also per param group) picks the rules; see ``kronlab.groups``.
    * ``on_nonfinite_grad``: a step either leaves finite parameters and state or is refused
      with both untouched: when the gradients hold NaN/Inf, or when the step itself would write
      a non-finite value (an overflow, e.g. in half-precision state). ``"skip"`` (default) then
      warns and counts it in ``skipped_steps``; ``"raise"`` raises ``FloatingPointError``.
      Either way the step runs as a transaction (``kronlab.optim.transaction``: the state and
      parameters are copied into buffers kept across steps, and one finiteness test, one host
      sync, decides after the update), which costs one copy of the state per step and its
      memory. ``"ignore"`` runs the bare update with no check and no copy, when e.g. an AMP
      grad scaler already does the checking.
    * ``state_dict()`` / ``load_state_dict()`` round-trip exactly, also through
      ``torch.save`` / ``torch.load(weights_only=True)``; state keeps its dtype (float32 factors of
      bf16 parameters stay float32).
    """

    # Param-group entries fixed at construction and never serialized (they may be arbitrary
    # Python objects that ``torch.load(weights_only=True)`` refuses).
    structural_keys: ClassVar[tuple[str, ...]] = ("combine_params",)

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        *,
        model: nn.Module | None = None,
        combine_params: PreconditionerGroup | tuple[PreconditionerGroup, ...] = DEFAULT_RULES,
        on_nonfinite_grad: NonFinitePolicy = "skip",
        verbose_init: bool = False,
    ) -> None:
        check_choice("on_nonfinite_grad", on_nonfinite_grad, ("skip", "raise", "ignore"))
        if params is None:
            if model is None:
                raise ValueError("pass params, or model= to optimize all its trainable parameters")
            params = [p for p in model.parameters() if p.requires_grad]
        self.model = model
        self.on_nonfinite_grad = on_nonfinite_grad
        self.bundles: list[ParameterBundle] = []
        self._names: dict[nn.Parameter, str] = (
            {p: name for name, p in model.named_parameters()} if model is not None else {}
        )
        super().__init__(params, {**defaults, "combine_params": check_rules(combine_params)})
        self.state[GLOBAL_STATE] = {"step": 0, "skipped_steps": 0}
        self._transaction = StepTransaction()
        if verbose_init:
            print(self.describe())

    # --- construction -------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            group["combine_params"] = check_rules(group["combine_params"])
            self.validate_group(group)
            for index, param in enumerate(group["params"]):
                self._names.setdefault(param, f"group{len(self.param_groups) - 1}.param{index}")
            for param in group["params"]:
                if param.is_complex():
                    raise TypeError(
                        f"Invalid parameter {self._names[param]}: dtype {param.dtype} (allowed: "
                        f"real floating dtypes; {type(self).__name__} does not support complex "
                        "parameters)"
                    )
            # Zero-size parameters have nothing to update: no bundle, no state, never stepped.
            bundles = identify_bundles(
                [param for param in group["params"] if param.numel() > 0],
                group["combine_params"],
                self.model,
                self._names,
                len(self.param_groups) - 1,
            )
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        self.bundles.extend(bundles)

    def validate_group(self, group: dict[str, Any]) -> None:
        """Check a param group's hyperparameters; raise ``ValueError`` on a bad one."""

    def describe_preconditioner(self, bundle: ParameterBundle) -> list[str]:
        """One line per factor, e.g. ``'33x33 (Dense)'``, for ``verbose_init``."""
        return [f"{'x'.join(map(str, bundle.grouped_shape)) or 'scalar'} (none)"]

    def describe(self) -> str:
        """The ``verbose_init`` report: one entry per preconditioner bundle."""
        lines = ["Parameter groups:"]
        for index, bundle in enumerate(self.bundles):
            group = self.param_groups[bundle.group_index]
            other = {k: v for k, v in group.items() if k != "params"}
            lines += [
                f"Group {index}",
                f"- Parameter names: {list(bundle.names)}",
                f"- Pre-conditioner: {self.describe_preconditioner(bundle)}",
                f"- Other: {other}",
            ]
        return "\n".join(lines)

    # --- stepping -----------------------------------------------------------------------
    @property
    def global_step(self) -> int:
        """Steps taken (skipped non-finite steps not counted)."""
        return self.state[GLOBAL_STATE]["step"]

    @property
    def skipped_steps(self) -> int:
        return self.state[GLOBAL_STATE]["skipped_steps"]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.on_nonfinite_grad == "ignore":
            self.state[GLOBAL_STATE]["step"] += 1
            self.update()
            return loss
        # The step is a transaction (kronlab.optim.transaction): it is committed only if the
        # gradients, the new parameters and the new state are all finite, which one finiteness
        # test (one host sync) decides after the update; otherwise everything is put back, so a
        # non-finite value born inside the step (an overflow) is refused like a non-finite
        # gradient.
        params = [p for group in self.param_groups for p in group["params"]]
        gradients = [p.grad for p in params if p.grad is not None]
        self._transaction.begin(self.state, params)
        self.state[GLOBAL_STATE]["step"] += 1
        try:
            self.update()
        except Exception:
            self._transaction.rollback(self.state)
            if all_finite(gradients):
                raise
            failed = True  # the update choked on the non-finite gradient: refused below
        else:
            failed = False
        if failed:
            self._refuse_step("non-finite gradient")
            return loss
        gradients_finite, step_finite = self._transaction.commit_if_finite(
            self.state, params, gradients
        )
        if not step_finite:
            self._transaction.rollback(self.state)
            self._refuse_step(
                "non-finite value produced by the step (overflow)"
                if gradients_finite
                else "non-finite gradient"
            )
        return loss

    def _refuse_step(self, reason: str) -> None:
        if self.on_nonfinite_grad == "raise":
            raise FloatingPointError(f"{reason}: step refused, state untouched")
        self.state[GLOBAL_STATE]["skipped_steps"] += 1
        warnings.warn(
            f"{reason}: step skipped, parameters and state untouched", RuntimeWarning, stacklevel=3
        )

    @abstractmethod
    def update(self) -> None:
        """Apply one step to every bundle with a gradient. Gradients may hold NaN/Inf (they are
        checked with the result): ``step`` then rolls the whole update back."""

    def bundles_with_gradients(self) -> list[ParameterBundle]:
        return [bundle for bundle in self.bundles if bundle.has_gradient()]

    # --- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for group in state["param_groups"]:
            for key in self.structural_keys:
                group.pop(key, None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        structural = [
            {key: group[key] for key in self.structural_keys if key in group}
            for group in self.param_groups
        ]
        super().load_state_dict(state_dict)
        for group, saved in zip(self.param_groups, structural):
            group.update(saved)
        # torch casts floating state to each parameter's dtype; kronlab state keeps the dtype it
        # was saved with (e.g. float32 factors of bf16 parameters), so re-copy it unchanged.
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        id_to_param = dict(zip(saved_ids, params))
        for key, saved in state_dict["state"].items():
            if key in id_to_param:
                param = id_to_param[key]
                self.state[param] = _copy_to_device(saved, param.device)


def _copy_to_device(value: Any, device: torch.device) -> Any:
    """A deep copy of nested state with every tensor on ``device`` in its own dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, copy=True)
    if isinstance(value, dict):
        return {key: _copy_to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_to_device(item, device) for item in value)
    return copy.deepcopy(value)
