"""A set of parameters that share one preconditioner, found by the grouping rules."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kronlab.groups.rules import PerParameter, PreconditionerGroup


@dataclass(frozen=True, eq=False)
class ParameterBundle:
    """Parameters preconditioned jointly: ``rule.group`` combines them into one tensor.

    Optimizer state for the bundle lives under ``optimizer.state[bundle.key]`` (its first
    parameter), so torch's ``state_dict`` packs and restores it like any per-parameter state.
    """

    params: tuple[nn.Parameter, ...]
    names: tuple[str, ...]
    rule: PreconditionerGroup
    group_index: int
    grouped_shape: torch.Size = field(init=False)

    def __post_init__(self) -> None:
        meta = [torch.empty(p.shape, device="meta") for p in self.params]
        object.__setattr__(self, "grouped_shape", self.rule.group(meta).shape)

    def __repr__(self) -> str:
        shapes = ", ".join("x".join(map(str, shape)) or "scalar" for shape in self.shapes)
        grouped = "x".join(map(str, self.grouped_shape)) or "scalar"
        return (
            f"ParameterBundle({list(self.names)}, shapes [{shapes}] grouped as {grouped} by "
            f"{self.rule!r}, param group {self.group_index})"
        )

    @property
    def key(self) -> nn.Parameter:
        return self.params[0]

    @property
    def shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.params]

    def has_gradient(self) -> bool:
        return any(p.grad is not None for p in self.params)

    def gradient(self) -> Tensor:
        """The grouped gradient; parameters without a gradient this step contribute zeros."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        return self.rule.group(grads)

    def value(self) -> Tensor:
        """The grouped parameter values (a new tensor for multi-parameter rules)."""
        return self.rule.group([p.detach() for p in self.params])

    def split(self, grouped: Tensor) -> list[Tensor]:
        """Split a grouped-shape tensor into one tensor per parameter."""
        return self.rule.ungroup(grouped, self.shapes)

    def add_(self, grouped_update: Tensor, alpha: float = 1.0, scale: Tensor | None = None) -> None:
        """``p += alpha · update`` (``alpha · scale · update`` with a 0-dim tensor ``scale``)
        for each parameter that has a gradient, rounded to the parameter's dtype.

        A tensor ``scale`` is multiplied in by the same fused pass (``addcmul_``), so a
        per-bundle scale known only on the device (e.g. an RMS clip) needs no pass of its own
        over the update and no host sync.
        """
        for param, update in zip(self.params, self.split(grouped_update)):
            if param.grad is None:
                continue  # a parameter without a gradient this step does not move
            # no cast first: the op computes in the update's dtype and rounds only the result
            # (a float16 parameter may take a large update times a small alpha)
            if scale is None:
                param.add_(update, alpha=alpha)
            else:
                param.addcmul_(update, scale, value=alpha)


def identify_bundles(
    params: Sequence[nn.Parameter],
    rules: Sequence[PreconditionerGroup],
    model: nn.Module | None,
    names: dict[nn.Parameter, str],
    group_index: int,
) -> list[ParameterBundle]:
    """Partition ``params`` into bundles, trying ``rules`` in order (first claim wins).

    A rule's parameter set is claimed only if all of it belongs to ``params`` and is unclaimed.
    Raises ``ValueError`` naming any parameter that no rule matched.
    """
    unclaimed = {id(p): p for p in params}
    bundles: list[ParameterBundle] = []
    for rule in rules:
        for param_set in _candidate_sets(rule, params, model):
            if param_set and all(id(p) in unclaimed for p in param_set):
                for p in param_set:
                    del unclaimed[id(p)]
                bundles.append(
                    ParameterBundle(
                        tuple(param_set), tuple(names[p] for p in param_set), rule, group_index
                    )
                )
    if unclaimed:
        raise ValueError(_unclaimed_message(list(unclaimed.values()), rules, model, names))
    return bundles


def _unclaimed_message(
    unclaimed: list[nn.Parameter],
    rules: Sequence[PreconditionerGroup],
    model: nn.Module | None,
    names: dict[nn.Parameter, str],
) -> str:
    """Say why no rule claimed these parameters: frozen, not in the model, or no rule fits."""
    frozen = [names[p] for p in unclaimed if not p.requires_grad]
    if frozen:
        return (
            f"Invalid params: {frozen} do not require grad (frozen parameters get no "
            "preconditioner; pass only trainable parameters, or params=None with model= to "
            "take all trainable ones)"
        )
    if model is not None:
        in_model = {id(p) for p in model.parameters()}
        foreign = [names[p] for p in unclaimed if id(p) not in in_model]
        if foreign:
            return (
                f"Invalid params: {foreign} are not parameters of model= (the grouping rules "
                "find parameters in the model; pass that parameter's own model)"
            )
    missing = [names[p] for p in unclaimed]
    return (
        f"combine_params rules {list(rules)} matched no preconditioner group for "
        f"parameters {missing}; add a fallback rule such as PerParameter()"
    )


def _candidate_sets(
    rule: PreconditionerGroup, params: Sequence[nn.Parameter], model: nn.Module | None
) -> Iterable[list[nn.Parameter]]:
    if isinstance(rule, PerParameter):
        if model is None:
            return [[p] for p in params]
        # Parameters outside the model (e.g. a param group added for another module) need no
        # model to get a preconditioner of their own.
        in_model = {id(p) for p in model.parameters()}
        outside = [[p] for p in params if id(p) not in in_model and p.requires_grad]
        return rule.identify(model) + outside
    if model is not None:
        return rule.identify(model)
    raise ValueError(f"combine_params rule {rule!r} needs the model: pass model= to the optimizer")
