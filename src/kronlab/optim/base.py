"""The base class every kronlab optimizer shares: groups, validation, state, printing."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.optim import Optimizer

from kronlab.distributed import DistributedConfig, WorkItem, kronecker_item
from kronlab.groups.rules import PerParameter, PreconditionerGroup, check_rules
from kronlab.optim.adamw import adamw_step
from kronlab.optim.bundles import ParameterBundle, identify_bundles
from kronlab.optim.checkpoint import (
    GLOBAL_KEY,
    SIGNATURE_KEY,
    check_signature,
    from_torch_form,
    optimizer_signature,
    to_torch_form,
)
from kronlab.optim.full_views import sharded_parameters
from kronlab.optim.randomness import OptimizerGenerators, check_generator_state
from kronlab.optim.sharded_step import Sharding, check_shardable, implied_config, sharded_step
from kronlab.optim.stacked_state import StackedState
from kronlab.optim.step_template import (
    Direction,
    Slot,
    Stack,
    StackPlan,
    Work,
    apply_direction,
    momentum_,
)
from kronlab.optim.transaction import StepTransaction, eager_masked_update, masked_update
from kronlab.optim.validation import check_choice, check_module, check_params

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None
NonFinitePolicy = Literal["skip", "raise", "ignore", "mask"]
GENERATORS_KEY = "generators"
DEFAULT_RULES: tuple[PreconditionerGroup, ...] = (PerParameter(),)


class KronOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` whose parameters are partitioned into preconditioner bundles.

    Subclasses declare ``defaults``, check a param group in ``validate_group`` (raise
    ``ValueError`` naming the argument, its value and the allowed range), describe a bundle's
    preconditioner in ``describe_preconditioner`` and write the method's ``direction``; the
    step template (``kronlab.optim.step_template``) does the rest: ``update`` walks the stacks
    of ``plan`` (same-work blocks batched, ``work`` says a bundle's), takes each stack's
    gradients, ``momentum`` (where ``momentum_on`` says), the subclass's ``direction``, and
    ``apply`` (decoupled weight decay, lr, one foreach write). Param groups for which
    ``is_auxiliary`` holds are stepped by AdamW (``kronlab.optim.adamw``). A subclass may
    override any stage, or ``update`` itself.

    State is keyed by parameter, as torch.optim's: a bundle's under ``state[bundle.key]`` (its
    first parameter); the step counters are attributes (``global_step``, ``skipped_steps``).

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
      ``"mask"`` checks without a host sync, for ``torch.compile(optimizer.step)``: the step is
      computed and then undone with ``torch.where`` if a gradient or a new value is not finite
      (``kronlab.optim.transaction.masked_update``; ``masked_steps``, a 0-dim tensor, counts
      the steps undone; not saved by ``state_dict``). A step that refreshes an amortized
      preconditioner (``refresh_due``) runs eagerly inside a compiled step.
    * ``state_dict()`` / ``load_state_dict()`` round-trip exactly, also through
      ``torch.save`` / ``torch.load(weights_only=True)``; state keeps its dtype (float32 factors of
      bf16 parameters stay float32). The state_dict records the optimizer class, parameter
      shapes, bundles and variant settings (``kronlab.optim.checkpoint``): loading the state of
      another optimizer, variant or shape raises ``ValueError`` before anything changes. A
      loaded state is a copy: the source optimizer and the loader share no tensor.
    * ``seed``: the optimizer's own generators (``self.generator(device)``), for optimizers that
      draw random numbers; ``None`` derives one from ``torch.initial_seed()`` (follows
      ``torch.manual_seed`` without drawing from the global stream). Their states are saved in
      the state_dict, so a resumed run is exact without restoring the global RNG, which a step
      never touches.
    """

    # Param-group entries fixed at construction and never serialized (they may be arbitrary
    # Python objects that ``torch.load(weights_only=True)`` refuses).
    structural_keys: ClassVar[tuple[str, ...]] = ("combine_params",)
    # Param-group entries that name the variant: the state means something else under another
    # value, so a state_dict loads only where they agree (``kronlab.optim.checkpoint``).
    variant_keys: ClassVar[tuple[str, ...]] = ("combine_params",)
    # The template's momentum: on the gradient before the direction ("gradient"), on the
    # direction ("direction") or none; its state entry, and EMA or heavy-ball form
    # (``step_template.momentum_``). ``group["momentum"]`` is β, ``group.get("nesterov")``.
    momentum_on: ClassVar[Literal["gradient", "direction"] | None] = None
    momentum_key: ClassVar[str] = "momentum_buffer"
    momentum_ema: ClassVar[bool] = True
    # ``apply`` decays the parameters by ``lr · weight_decay`` unless the direction holds the
    # method's own (coupled) weight decay.
    decoupled_weight_decay: ClassVar[bool] = True

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        *,
        model: nn.Module | None = None,
        combine_params: PreconditionerGroup | tuple[PreconditionerGroup, ...] = DEFAULT_RULES,
        on_nonfinite_grad: NonFinitePolicy = "skip",
        verbose_init: bool = False,
        seed: int | None = None,
        distributed: DistributedConfig | None = None,
    ) -> None:
        check_choice("on_nonfinite_grad", on_nonfinite_grad, ("skip", "raise", "ignore", "mask"))
        if distributed is not None:
            _check_distributed(distributed, on_nonfinite_grad)
        self.distributed = distributed
        self._sharding: Sharding | None = None
        check_module("model", model, allow_none=True)
        check_params(params)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"Invalid seed: {seed!r} (allowed: None or an integer)")
        self._generators = OptimizerGenerators(seed)
        if params is None:
            if model is None:
                raise ValueError("pass params, or model= to optimize all its trainable parameters")
            params = [p for p in model.parameters() if p.requires_grad]
        self.model = model
        self.on_nonfinite_grad = on_nonfinite_grad
        self.bundles: list[ParameterBundle] = []
        self._plan: StackPlan | None = None
        # stacked state of same-work slots, whose per-parameter entries are views of it
        self.stacked_state = StackedState()
        # Python numbers, not state: ``state`` holds only per-parameter entries (torch.optim's
        # layout, which torch.distributed.checkpoint relies on)
        self._counters = {"step": 0, "skipped_steps": 0}
        self._names: dict[nn.Parameter, str] = (
            {p: name for name, p in model.named_parameters()} if model is not None else {}
        )
        super().__init__(params, {**defaults, "combine_params": check_rules(combine_params)})
        first = next((p for group in self.param_groups for p in group["params"]), None)
        self.masked_steps = torch.zeros(
            (), dtype=torch.int64, device=first.device if first is not None else None
        )
        self._transaction = StepTransaction()
        if distributed is None:
            self.distributed = implied_config(self)  # FSDP2 parameters are always split
        if self.distributed is not None:
            check_shardable(self)
        if verbose_init:
            print(self.describe())

    # --- construction -------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._sharding = None  # the next step assigns the new bundles too
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
        self._plan = None  # the stacks are planned again, new bundles included

    def validate_group(self, group: dict[str, Any]) -> None:
        """Check a param group's hyperparameters; raise ``ValueError`` on a bad one."""

    def parameter_name(self, param: torch.Tensor) -> str:
        """The model's name for ``param`` (``groupG.paramI`` without a model)."""
        return self._names.get(param, "a parameter")

    def generator(self, device: torch.device | str) -> torch.Generator:
        """This optimizer's random generator on ``device`` (seeded, saved in the state_dict)."""
        return self._generators.get(device)

    def bundle_generator(
        self, bundle: ParameterBundle, device: torch.device | str
    ) -> torch.Generator:
        """A generator of ``bundle``'s own, seeded from the optimizer's seed and the bundle's
        position: its draws are the same whichever rank steps the bundle (``distributed=``)
        and whatever the other bundles drew."""
        index = next(i for i, candidate in enumerate(self.bundles) if candidate is bundle)
        return self._generators.stream(index, device)

    def describe_preconditioner(self, bundle: ParameterBundle) -> list[str]:
        """One line per factor, e.g. ``'33x33 (Dense)'``, for ``verbose_init``."""
        return [f"{'x'.join(map(str, bundle.grouped_shape)) or 'scalar'} (none)"]

    def describe_options(self, bundle: ParameterBundle) -> dict[str, Any]:
        """The ``Other`` entry of ``verbose_init``: the bundle's group settings as resolved for
        it, with ``combine_params`` the rule that claimed the bundle (not the whole tuple)."""
        group = self.param_groups[bundle.group_index]
        options = {k: v for k, v in group.items() if k != "params"}
        options["combine_params"] = bundle.rule
        return options

    def describe(self) -> str:
        """The ``verbose_init`` report: one entry per preconditioner bundle (and, distributed,
        its owning rank and the load balance of the assignment)."""
        sharding = self.sharding()
        lines = ["Parameter groups:"]
        for index, bundle in enumerate(self.bundles):
            other = self.describe_options(bundle)
            lines += [
                f"Group {index}",
                f"- Parameter names: {list(bundle.names)}",
                f"- Pre-conditioner: {self.describe_preconditioner(bundle)}",
                f"- Other: {other}",
            ]
            if sharding is not None:
                lines.append(f"- Owner: rank {sharding.assignment.owners[index]}")
        if sharding is not None:
            lines.append(sharding.assignment.report())
        return "\n".join(lines)

    # --- distribution -------------------------------------------------------------------
    def distributed_work_items(self) -> list[WorkItem]:
        """One ``WorkItem`` per bundle (same order) for the cost model of the assignment:
        one factor per dimension of the grouped shape (up to ``max_preconditioner_dim``),
        refreshed every ``precondition_frequency`` steps; elementwise for AdamW groups."""
        items = []
        for index, bundle in enumerate(self.bundles):
            group = self.param_groups[bundle.group_index]
            shape = tuple(bundle.grouped_shape)
            if self.is_auxiliary(group):
                items.append(WorkItem(index, shape))
                continue
            interval = group.get("precondition_frequency", 1)
            items.append(
                kronecker_item(
                    index,
                    shape,
                    max_factor_dim=group.get("max_preconditioner_dim"),
                    refresh_interval=interval if isinstance(interval, int) else 1,
                )
            )
        return items

    def distribute(self, config: DistributedConfig) -> None:
        """Split the preconditioner work as ``distributed=config`` at construction does, for an
        optimizer built by code that does not pass it (``kronlab compare`` under torchrun: the
        registry's factories). Only before the first step: the state is not moved."""
        _check_distributed(config, self.on_nonfinite_grad)
        if self.global_step or self.state:
            raise ValueError(
                f"Invalid distributed: {config!r} after {self.global_step} steps (allowed: "
                "before the first step only; pass distributed= at construction)"
            )
        previous, self.distributed = self.distributed, config
        try:
            check_shardable(self)  # reads self.distributed
        except TypeError:
            self.distributed = previous
            raise
        self._sharding = None
        self._plan = None

    def sharding(self) -> Sharding | None:
        """Which rank owns which bundle; ``None`` when not distributed (no ``distributed=``,
        no initialized process group, or one rank)."""
        if self.distributed is None:
            return None
        if self._sharding is None:
            # one rank needs no split, but DTensor parameters still take the full-tensor step
            if self.distributed.world()[1] == 1 and not sharded_parameters(self):
                return None
            self._sharding = Sharding(self.distributed, self.distributed_work_items())
            self._plan = None  # planned again with this rank's bundles only
        return self._sharding

    # --- stepping -----------------------------------------------------------------------
    @property
    def global_step(self) -> int:
        """Steps taken (skipped non-finite steps not counted)."""
        return self._counters["step"]

    @property
    def skipped_steps(self) -> int:
        return self._counters["skipped_steps"]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_dense_gradients()
        sharding = self.sharding()
        if sharding is not None:
            sharded_step(self, sharding)
            return loss
        # every parameter, with a gradient or not: a bundle's state lives under its first
        # parameter, and a bundle updates all its parameters, whichever have gradients
        params = [p for group in self.param_groups for p in group["params"]]
        gradients = [p.grad for p in params if p.grad is not None]
        if self.on_nonfinite_grad == "ignore":
            self._counters["step"] += 1
            self.update()
        elif self.on_nonfinite_grad == "mask" and self.global_step > 0:
            # Python numbers advance either way: they cannot depend on a device value without a
            # sync. The first step runs the synchronous check instead, so that state created by
            # a step is never created from non-finite gradients.
            self._counters["step"] += 1
            states = [self.state[p] for p in params if p in self.state]
            # A step that refreshes a preconditioner runs eagerly under torch.compile (one
            # graph break, once per refresh period): its decompositions are LAPACK calls with
            # nothing to fuse, and their failure handling needs the host.
            update = eager_masked_update if self.refresh_due() else masked_update
            finite = update(states, params, gradients, self.update)
            # in place: a compiled step mutates the tensor rather than rebinding the attribute
            self.masked_steps.add_((~finite).to(self.masked_steps.device, torch.int64))
        else:
            self._counters["step"] += 1
            # a refused step draws no random numbers either: the next step sees the same stream
            generators = self._generators.state_dict()
            try:
                refused = self._transaction.run(self.state, params, gradients, self.update)
            except Exception:
                self._counters["step"] -= 1
                self._generators.load_state_dict(generators)
                raise
            if refused is not None:
                self._generators.load_state_dict(generators)
                self._refuse_step(refused)
        return loss

    def refresh_due(self) -> bool:
        """Whether the step being taken (``global_step`` already counts it) refreshes an
        amortized preconditioner (a decomposition every ``precondition_frequency`` steps).
        Default: never."""
        return False

    def _count_step(self, steps: int = 1) -> None:
        self._counters["step"] += steps

    def _refuse_step(self, reason: str) -> None:
        self._counters["step"] -= 1  # not state: the rollback does not put it back
        if self.on_nonfinite_grad == "raise":
            raise FloatingPointError(f"{reason}: step refused, state untouched")
        self._counters["skipped_steps"] += 1
        warnings.warn(
            f"{reason}: step skipped, parameters and state untouched", RuntimeWarning, stacklevel=3
        )

    # --- the step template ---------------------------------------------------------------
    @property
    def plan(self) -> StackPlan:
        """The stacks of same-work blocks of ``planned_bundles``, built once (again after
        ``add_param_group``)."""
        if self._plan is None:
            self._plan = StackPlan.build(self.planned_bundles(), self.work)
        return self._plan

    def planned_bundles(self) -> list[ParameterBundle]:
        """The bundles this process steps: all of them, or, distributed, those its rank owns
        (the others' stacks, state and work live on their owners)."""
        sharding = self.sharding()
        if sharding is None:
            return self.bundles
        return [bundle for index, bundle in enumerate(self.bundles) if sharding.owns(index)]

    def work(self, bundle: ParameterBundle) -> list[Work]:
        """The blocks of ``bundle`` (one ``Work`` each). Default: one block, the grouped
        tensor in the parameter's dtype."""
        return [Work(tuple(bundle.grouped_shape), bundle.key.dtype)]

    def update(self) -> None:
        """Apply one step to every bundle with a gradient, stack by stack. Gradients may hold
        NaN/Inf (they are checked with the result): ``step`` then rolls the whole update
        back."""
        # AdamW is elementwise: one call per param group, whatever the shapes of its stacks
        auxiliary: dict[int, list[Slot]] = {}
        for stack in self.plan.stacks:
            slots = stack.active()
            if not slots:
                continue
            group = self.param_groups[stack.group_index]
            if self.is_auxiliary(group):
                auxiliary.setdefault(stack.group_index, []).extend(slots)
            else:
                self.step_stack(stack, slots, group)
        for group_index, slots in auxiliary.items():
            group = self.param_groups[group_index]
            params = [p for slot in slots for p in slot.bundle.params if p.grad is not None]
            adamw_step(
                params,
                [self.state[p] for p in params],
                lr=group["lr"],
                betas=group["betas"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )

    def step_stack(self, stack: Stack, slots: list[Slot], group: dict[str, Any]) -> None:
        """gradients → momentum (``momentum_on``) → ``direction`` → ``apply`` for the active
        ``slots`` of ``stack``."""
        gradients = self.gradients(stack, slots)
        if self.momentum_on == "gradient":
            gradients = self.momentum(slots, gradients, group)
        direction = self.direction(stack, slots, gradients, group)
        if self.momentum_on == "direction":
            direction.values = self.momentum(slots, direction.values, group)
        self.apply(stack, slots, direction, group)

    def is_auxiliary(self, group: dict[str, Any]) -> bool:
        """Whether ``group``'s parameters are stepped by AdamW instead of the method."""
        return False

    def gradients(self, stack: Stack, slots: list[Slot]) -> list[torch.Tensor]:
        """Each slot's gradient in the work shape and dtype (a view where no cast is needed)."""
        work = stack.work
        return [slot.bundle.gradient().reshape(work.shape).to(work.dtype) for slot in slots]

    def momentum(self, slots: list[Slot], values: Any, group: dict[str, Any]) -> Any:
        """``step_template.momentum_`` with each slot's buffer ``state[momentum_key]`` (zeros
        at first). Heavy ball with β = 0 is the identity: no buffer, ``values`` unchanged."""
        beta = group["momentum"]
        if not self.momentum_ema and beta == 0:
            return values
        buffers = []
        for slot, value in zip(slots, values):
            state = self.state[slot.param]
            if self.momentum_key not in state:
                state[self.momentum_key] = torch.zeros_like(value)
            buffers.append(state[self.momentum_key])
        nesterov = group.get("nesterov", False)
        return momentum_(buffers, values, beta, ema=self.momentum_ema, nesterov=nesterov)

    def direction(
        self, stack: Stack, slots: list[Slot], gradients: list[torch.Tensor], group: dict[str, Any]
    ) -> Direction:
        """The method: the direction of the active ``slots`` of ``stack`` from their
        ``gradients`` (after momentum when ``momentum_on == "gradient"``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement direction or update")

    def apply(
        self, stack: Stack, slots: list[Slot], direction: Direction, group: dict[str, Any]
    ) -> None:
        """The parameter write (``step_template.apply_direction``), with decoupled weight
        decay ``lr · weight_decay`` unless ``decoupled_weight_decay`` is False."""
        decay = group["lr"] * group["weight_decay"] if self.decoupled_weight_decay else 0.0
        apply_direction(slots, direction, decay)

    def bundles_with_gradients(self) -> list[ParameterBundle]:
        return [bundle for bundle in self.bundles if bundle.has_gradient()]

    def _check_dense_gradients(self) -> None:
        """Refuse sparse gradients (e.g. ``nn.Embedding(sparse=True)``) before any state moves:
        every update here needs the dense gradient."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None and param.grad.layout != torch.strided:
                    name = self.parameter_name(param)
                    raise TypeError(
                        f"Invalid gradient of {name}: layout {param.grad.layout} (allowed: dense "
                        "torch.strided gradients; e.g. nn.Embedding(sparse=False)); step refused, "
                        "state untouched"
                    )

    # --- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for group in state["param_groups"]:
            for key in self.structural_keys:
                group.pop(key, None)
        global_entry = {
            **self._counters,
            SIGNATURE_KEY: optimizer_signature(self),
            GENERATORS_KEY: self._generators.state_dict(),
        }
        return to_torch_form(state, global_entry)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Everything is checked before anything changes: a refused state_dict leaves the
        # optimizer as it was.
        saved_global, state_dict = from_torch_form(state_dict)
        if not isinstance(saved_global, dict):
            raise ValueError(
                f"Invalid state_dict: no {GLOBAL_KEY!r} entry in its param groups (allowed: a "
                f"state_dict saved by a kronlab {type(self).__name__})"
            )
        check_signature(self, saved_global.get(SIGNATURE_KEY))
        check_generator_state(saved_global.get(GENERATORS_KEY))
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
        self._counters = {key: int(saved_global[key]) for key in self._counters}
        self._generators.load_state_dict(saved_global[GENERATORS_KEY])


def _check_distributed(distributed: object, on_nonfinite_grad: str) -> None:
    if not isinstance(distributed, DistributedConfig):
        raise ValueError(
            f"Invalid distributed: {distributed!r} (allowed: None or a "
            "kronlab.distributed.DistributedConfig)"
        )
    if on_nonfinite_grad == "mask":
        raise ValueError(
            "Invalid on_nonfinite_grad: 'mask' with distributed= (allowed: 'skip', 'raise' "
            "or 'ignore'; the ranks agree on a skipped step with one all-reduce)"
        )


def _copy_to_device(value: Any, device: torch.device | None) -> Any:
    """A deep copy of nested state with every tensor on ``device`` (``None``: where it is) in
    its own dtype."""
    if isinstance(value, torch.Tensor):
        return value.clone() if device is None else value.to(device=device, copy=True)
    if isinstance(value, dict):
        return {key: _copy_to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_to_device(item, device) for item in value)
    return copy.deepcopy(value)


def with_renamed_group_keys(state_dict: dict[str, Any], renamed: dict[str, str]) -> dict[str, Any]:
    """``state_dict`` with param-group keys saved under a former name (``renamed``: old → new)
    given their current name, so checkpoints written before a rename still load. The input is
    not modified."""
    groups = [
        {renamed.get(key, key): value for key, value in group.items()}
        for group in state_dict["param_groups"]
    ]
    return {**state_dict, "param_groups": groups}
