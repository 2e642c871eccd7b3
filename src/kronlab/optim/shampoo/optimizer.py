"""The Shampoo family in one optimizer: the variant is a config, the step is one pipeline."""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from kronlab.distributed import DistributedConfig
from kronlab.factors.eigenbasis import refresh_eigenbasis
from kronlab.groups.layout import BlockLayout
from kronlab.groups.rules import PreconditionerGroup
from kronlab.linalg._dtypes import working_dtype
from kronlab.linalg.batching import concatenate_matrices
from kronlab.optim.base import (
    DEFAULT_RULES,
    GLOBAL_STATE,
    KronOptimizer,
    NonFinitePolicy,
    ParamsT,
    with_renamed_group_keys,
)
from kronlab.optim.bundles import ParameterBundle
from kronlab.optim.shampoo import variants
from kronlab.optim.shampoo.config import (
    KL_VARIANTS,
    EigenvalueCorrectedConfig,
    PerFactorEigenvalueCorrectedConfig,
    resolve_grafting,
    resolve_preconditioner,
)
from kronlab.optim.shampoo.moments import (
    diagonal_direction,
    filtered_gradient,
    graft_scales,
    grafting_direction,
    grafting_norms,
    momentum_numerator,
)
from kronlab.optim.shampoo.plan import StackingPlan, build_plan
from kronlab.optim.shampoo.settings import StackSettings
from kronlab.optim.shampoo.statistics import update_factors_
from kronlab.optim.validation import check_betas, check_choice, check_range

VECTOR_PRECONDITIONERS = ("diagonal", "grafting", "dense")


class KroneckerBlock(NamedTuple):
    """One block's Kronecker state, as views into the optimizer's stacks (see ``Shampoo``).

    ``factors[i]`` is the accumulated (not bias-corrected) ``F_i``; divide by
    ``factor_bias_correction``. ``eigenvalues`` are the factor eigenvalues (eigendecomposed) or
    the per-factor EMA ``E_k`` (divide by ``eigenvalue_bias_correction``); ``second_moment`` is
    SOAP's eigenbasis second moment (same correction). Absent pieces are ``None``.
    """

    block_shape: tuple[int, ...]
    factors: list[torch.Tensor]
    eigenvectors: list[torch.Tensor] | None
    eigenvalues: list[torch.Tensor] | None
    second_moment: torch.Tensor | None
    inverse_roots: list[torch.Tensor] | None
    factor_bias_correction: float
    eigenvalue_bias_correction: float


class StackWork(NamedTuple):
    """One stack's per-step quantities between the statistics and the direction.

    An elementwise stack has only ``final`` (its direction). A Kronecker stack has the factor
    gradient, the filtered gradient before its bias correction (``M = filtered /
    filtered_correction``), ``grafting`` (before preconditioning starts: the direction to use;
    after: the grafting method's per-block norms, or ``None`` without grafting) and this step's
    outer products where the variant reads them.
    """

    final: torch.Tensor | None = None
    gradient: torch.Tensor | None = None
    filtered: torch.Tensor | None = None
    filtered_correction: float = 1.0
    grafting: torch.Tensor | None = None
    products: list[torch.Tensor] | None = None


class Shampoo(KronOptimizer):
    """Shampoo and its eigenbasis variants (Gupta et al., 2018; Shi et al., 2023; George et al.,
    2018; Vyas et al., 2024; Lin et al., 2025).

    For a block ``G`` with k factors: ``F_i ← β₂ F_i + (1 − β₂) G_(i) G_(i)ᵀ`` and the direction is
    ``M ×_1 (F_1/bc + εI)^{-p} ⋯ ×_k (F_k/bc + εI)^{-p}`` (``p = 1/(2k)``), with ``M`` the β₁-EMA
    of the gradient. ``preconditioner`` picks how that is computed (``"root_inv"``,
    ``"eigendecomposed"``, ``"eigenvalue_corrected"`` = SOAP/EShampoo,
    ``"per_factor_eigenvalue_corrected"``, or a config from ``kronlab.optim.shampoo.config``);
    ``kl=True`` makes it KL-Shampoo (statistics ``G F_{other}^{-1} Gᵀ / c``, ``p = 1/2``).

    Step: gradients → blocks (grouped by shape into stacks) → momentum and grafting → factor
    statistics → (every ``precondition_frequency`` steps) one batched decomposition per factor
    size → eigenvalue correction and direction → grafting (per-block norm matching) → weight
    decay → update. Before ``start_preconditioning_step`` the grafting direction is used alone.
    The eigenvalue-corrected variants decompose after the direction instead (SOAP's order: the
    basis never contains the gradient it measures; before the first refresh they use the
    identity basis, except SOAP's own path (no grafting, preconditioned from step 1), whose first
    step only measures the factors and does not move the parameters, as in SOAP); the others
    decompose before it (Distributed Shampoo's order).

    Parameters with at most one dim > 1 get ``vector_preconditioner``: ``"diagonal"`` (Adam with
    this optimizer's β₂, ε), ``"grafting"`` (the grafting direction), or ``"dense"`` (a one-factor
    Kronecker block). A decomposition that fails keeps the previous preconditioner (warning);
    ``max_consecutive_failures`` failures in a row raise ``DecompositionFailed``. A bundle without
    a gradient on a step is neither updated nor decayed, but its statistics see a zero gradient.

    State layout: blocks live in stacks, ``optimizer.state["kronlab"]["stacks"][s]``, a dict with
    ``step`` (updates of the stack), ``momentum`` (``eigenbasis_momentum`` for the
    eigenvalue-corrected variant without grafting) and ``grafting_second_moment`` ``(B, *block)``,
    ``factors`` ``[(B, d_i, d_i)]``, ``failures`` ``[(B,)]`` and the variant's cache
    (``variants.py``: ``inverse_roots`` | ``eigenvectors``, ``eigenvalues`` | ``second_moment``
    | ``eigenvalue_ema``, ``correction_step``). ``kronecker_factors(param)`` returns, per block of
    the parameter's bundle, a ``KroneckerBlock`` of views into them; ``block_layout(param)`` says
    how the grouped tensor is cut into those blocks. A param group added after the first step
    gets stacks of its own (``planned_groups`` records which groups were planned together, see
    ``plan.py``), so the stacks that already hold state keep their members.


    Args:
        params: tensors or param groups (a group may set any argument below but ``model``);
            ``None`` with ``model=`` takes all of the model's trainable parameters.
        lr: learning rate.
        betas: ``(β₁, β₂)``: the EMA rates of the gradient (0: none) and of the factors
            (``1``: running sums, AdaGrad-style).
        eps: damping ``ε`` added to the (bias-corrected) factors' eigenvalues.
        preconditioner: the variant, by name or config (see above).
        kl: KL-Shampoo statistics.
        grafting: ``"none"``, ``"sgd"``, ``"adagrad"``, ``"rmsprop"``, ``"adam"`` or a
            ``GraftingConfig``: rescale each block's direction to that method's norm.
        weight_decay: ``p ← p(1 − lr·wd)`` (decoupled) or ``g ← g + wd·p`` (L2).
        decoupled_weight_decay: which of the two.
        nesterov: Nesterov's form of the β₁ momentum.
        bias_correction: divide the EMAs by ``1 − β^t``.
        precondition_frequency: steps between decompositions.
        start_preconditioning_step: the first preconditioned step (earlier: grafting alone).
        max_preconditioner_dim: dims larger than this are cut into blocks (``None``: never).
        merge_dims: merge adjacent small dims while their product fits that size.
        factor_dtype: ``torch.float32`` or ``torch.float64`` for factors and decompositions.
        vector_preconditioner: ``"diagonal"``, ``"grafting"`` or ``"dense"`` (see above).
        max_consecutive_failures: failed decompositions in a row before raising.
        model: lets grouping rules find layers and gives parameters their names.
        combine_params: grouping rules (``kronlab.groups``), first match wins.
        on_nonfinite_grad: ``"skip"`` (default), ``"raise"`` or ``"ignore"`` (see
            ``KronOptimizer``).
        verbose_init: print each preconditioner group at construction.
        distributed: a ``kronlab.distributed.DistributedConfig`` to split the preconditioner
            work over the ranks of a process group (see ``kronlab.optim.KronOptimizer``).
        epsilon: the former name of ``eps``, still accepted.
    """

    structural_keys = ("combine_params", "preconditioner", "grafting")
    variant_keys = ("combine_params", "preconditioner", "grafting", "kl")

    def __init__(
        self,
        params: ParamsT = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-12,
        *,
        preconditioner: object = "root_inv",
        kl: bool = False,
        grafting: object = "adam",
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        nesterov: bool = False,
        bias_correction: bool = True,
        precondition_frequency: int = 1,
        start_preconditioning_step: float = 1,
        max_preconditioner_dim: int | None = 1024,
        merge_dims: bool = True,
        factor_dtype: torch.dtype = torch.float32,
        vector_preconditioner: str = "diagonal",
        max_consecutive_failures: int = 5,
        model: nn.Module | None = None,
        combine_params: PreconditionerGroup | tuple[PreconditionerGroup, ...] = DEFAULT_RULES,
        on_nonfinite_grad: NonFinitePolicy = "skip",
        verbose_init: bool = False,
        distributed: DistributedConfig | None = None,
        epsilon: float | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=_renamed_eps(eps, epsilon, type(self)),
            preconditioner=preconditioner,
            kl=kl,
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
            vector_preconditioner=vector_preconditioner,
            max_consecutive_failures=max_consecutive_failures,
        )
        self._plan: StackingPlan | None = None
        super().__init__(
            params,
            defaults,
            model=model,
            combine_params=combine_params,
            on_nonfinite_grad=on_nonfinite_grad,
            verbose_init=verbose_init,
            distributed=distributed,
        )

    # --- construction ---------------------------------------------------------------------
    def validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas("betas", group["betas"])
        if "epsilon" in group:  # a param group written with the former name
            group["eps"] = group.pop("epsilon")
        check_range("eps", group["eps"], 0.0, low_inclusive=False)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("precondition_frequency", group["precondition_frequency"], 1, integer=True)
        check_range(
            "start_preconditioning_step",
            group["start_preconditioning_step"],
            1,
            integer=True,
            or_infinity=True,
        )
        if group["max_preconditioner_dim"] is not None:
            check_range("max_preconditioner_dim", group["max_preconditioner_dim"], 1, integer=True)
        check_range("max_consecutive_failures", group["max_consecutive_failures"], 1, integer=True)
        check_choice("factor_dtype", group["factor_dtype"], (torch.float32, torch.float64))
        check_choice(
            "vector_preconditioner", group["vector_preconditioner"], VECTOR_PRECONDITIONERS
        )
        for flag in ("kl", "nesterov", "bias_correction", "decoupled_weight_decay", "merge_dims"):
            check_choice(flag, group[flag], (True, False))
        group["preconditioner"] = resolve_preconditioner(group["preconditioner"])
        group["grafting"] = resolve_grafting(group["grafting"])
        if group["kl"]:
            if group["preconditioner"].name not in KL_VARIANTS:
                raise ValueError(
                    f"Invalid kl: True with preconditioner {group['preconditioner'].name!r} "
                    f"(allowed: kl=True with one of {list(KL_VARIANTS)})"
                )
            override = getattr(group["preconditioner"], "exponent_override", None)
            if override is not None and override != 0.5:
                raise ValueError(
                    f"Invalid exponent_override: {override!r} with kl=True "
                    "(allowed: None or 0.5, KL-Shampoo's exponent)"
                )

    def describe_preconditioner(self, bundle: ParameterBundle) -> list[str]:
        plan = self._stacking_plan()
        index = self.bundles.index(bundle)
        lines = []
        for stack_index, _ in plan.slots[index]:
            stack = plan.stacks[stack_index]
            if stack.kind == "kronecker":
                lines += [f"{d}x{d} (Dense)" for d in stack.block_shape]
            else:
                lines.append(
                    f"{'x'.join(map(str, bundle.grouped_shape)) or 'scalar'} ({stack.kind})"
                )
        return lines

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._plan = None  # the next step plans the new group's blocks (stacks of their own)

    def _stacking_plan(self) -> StackingPlan:
        if self._plan is None:
            # Groups whose stacks already have state keep them: ``planned_groups`` (saved with
            # the stacks) says which groups were planned together.
            planned = self.state[GLOBAL_STATE].get("planned_groups", ())
            self._plan = build_plan(self.bundles, self.param_groups, _stack_key, planned)
        return self._plan

    # --- the step --------------------------------------------------------------------------
    def update(self) -> None:
        plan = self._stacking_plan()
        global_state = self.state[GLOBAL_STATE]
        stack_states = global_state.setdefault("stacks", [])
        stack_states.extend({} for _ in range(len(plan.stacks) - len(stack_states)))
        global_state["planned_groups"] = list(plan.segments)
        gradients = [self._bundle_gradient(bundle) for bundle in self.bundles]
        settings = [
            StackSettings.from_group(self.param_groups[stack.group_index]) for stack in plan.stacks
        ]
        work = [
            self._accumulate_statistics(
                plan, index, stack_states[index], settings[index], gradients
            )
            for index in range(len(plan.stacks))
        ]
        self._refresh_due_decompositions(plan, stack_states, settings, after_step=False)
        directions = [
            self._direction(state, options, stack_work)
            for state, options, stack_work in zip(stack_states, settings, work)
        ]
        self._refresh_due_decompositions(plan, stack_states, settings, after_step=True)
        self._apply_updates(plan.scatter(directions, [b.grouped_shape for b in self.bundles]))

    def _bundle_gradient(self, bundle: ParameterBundle) -> torch.Tensor:
        group = self.param_groups[bundle.group_index]
        gradient = bundle.gradient()
        if group["weight_decay"] and not group["decoupled_weight_decay"]:
            gradient = gradient + group["weight_decay"] * bundle.value()  # L2 regularization
        return gradient

    def _accumulate_statistics(
        self,
        plan: StackingPlan,
        index: int,
        state: dict[str, Any],
        settings: StackSettings,
        gradients: list[torch.Tensor],
    ) -> StackWork:
        """Momentum, grafting and (for Kronecker stacks) factor statistics of one stack.

        For a Kronecker stack the filtered gradient is returned before its bias correction
        (``filtered / filtered_correction`` is ``M``) and, once preconditioning runs, the
        grafting method enters only through its per-block norms (``grafting_norms``).
        """
        stack = plan.stacks[index]
        state_dtype = working_dtype(self.bundles[stack.members[0][0]].key.dtype)
        gradient = plan.gather(index, gradients).to(state_dtype)
        state["step"] = state.get("step", 0) + 1
        if stack.kind != "kronecker":
            filtered = filtered_gradient(state, gradient, settings)
            if stack.kind == "diagonal":
                return StackWork(final=diagonal_direction(state, gradient, filtered, settings))
            grafted = grafting_direction(state, gradient, filtered, settings)
            return StackWork(final=filtered if grafted is None else grafted)
        if variants.momentum_in_eigenbasis(settings):
            # The momentum is filtered in the eigenbasis (variants.py).
            filtered, filtered_correction = gradient, 1.0
        else:
            filtered, filtered_correction = momentum_numerator(state, gradient, settings)
        if state["step"] < settings.start_preconditioning_step:
            corrected = filtered / filtered_correction
            grafted = grafting_direction(state, gradient, corrected, settings)
            grafting = corrected if grafted is None else grafted
        else:
            grafting = grafting_norms(state, gradient, filtered, filtered_correction, settings)
        factor_gradient = gradient.to(settings.factor_dtype)
        products = update_factors_(
            state,
            factor_gradient,
            variants.kl_inverse_sqrts(state, settings, stack.num_factors),
            settings.factor_beta,
            keep_products=variants.reads_outer_products(settings),
        )
        if products is not None:
            variants.update_eigenvalue_ema(state, settings, factor_gradient, products)
        return StackWork(
            None,
            factor_gradient,
            filtered,
            filtered_correction,
            grafting,
            [] if products is None else products,
        )

    def _refresh_due_decompositions(
        self,
        plan: StackingPlan,
        stack_states: list[dict[str, Any]],
        settings: list[StackSettings],
        *,
        after_step: bool,
    ) -> None:
        """Decompose every due factor, one batched call per (size, dtype, method).

        Root-inverse and eigendecomposed stacks refresh before preconditioning (their factors
        include this step's gradient, as in Distributed Shampoo); eigenvalue-corrected stacks
        refresh after it, so a basis never contains the gradient it measures (as in SOAP).
        """
        batches: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
        for index, (stack, state) in enumerate(zip(plan.stacks, stack_states)):
            options = settings[index]
            if (
                stack.kind == "kronecker"
                and options.refresh_after_step == after_step
                and options.is_refresh_step(state["step"])
            ):
                method = variants.refresh_method(state, options)
                tracked = variants.tracks_columns(options)
                for axis, factor in enumerate(state["factors"]):
                    batches[(factor.shape[-1], factor.dtype, method, tracked)].append((index, axis))
        results: dict[tuple[int, int], tuple] = {}
        for (size, _, method, tracked), members in batches.items():
            factors, previous_vectors, previous_values, failures = [], [], [], []
            for index, axis in members:
                state = stack_states[index]
                factor = state["factors"][axis]
                failures.append(
                    state.setdefault(
                        "failures",
                        [
                            torch.zeros(f.shape[0], dtype=torch.long, device=f.device)
                            for f in state["factors"]
                        ],
                    )[axis]
                )
                vectors, values = variants.previous_eigenpairs(state, axis)
                factors.append(factor)
                previous_vectors.append(vectors)
                previous_values.append(values)
            # The factor and eigenvector stacks go as lists: the QR refresh batches them
            # without copying them into one tensor first.
            refreshed = refresh_eigenbasis(
                factors,
                _with_defaults(
                    previous_vectors,
                    factors,
                    lambda f: torch.eye(f.shape[-1], dtype=f.dtype, device=f.device).expand_as(f),
                ),
                _concatenate_or_none(previous_values, factors, lambda f: f.new_zeros(f.shape[:-1])),
                concatenate_matrices(failures),
                method=method,
                max_consecutive_failures=settings[members[0][0]].max_consecutive_failures,
                name=f"Shampoo factors of size {size}",
                track_columns=tracked,
                # A QR refresh's exact eigenvalues would cost another F Q: the variants read
                # the warm start's Rayleigh quotients (root-inverse, eigendecomposed) or none.
                exact_eigenvalues=False,
            )
            sizes = [factor.shape[0] for factor in factors]
            for (index, axis), values, vectors, fails, ok, order in zip(
                members,
                refreshed.eigenvalues.split(sizes),
                refreshed.eigenvectors.split(sizes),
                refreshed.failures.split(sizes),
                refreshed.ok.split(sizes),
                refreshed.order.split(sizes),
            ):
                stack_states[index]["failures"][axis] = fails
                results[(index, axis)] = (values, vectors, ok, order)
        for index, state in enumerate(stack_states):
            axes = [
                results[(index, axis)]
                for axis in range(plan.stacks[index].num_factors)
                if (index, axis) in results
            ]
            if axes:
                variants.install(state, settings[index], *zip(*axes))

    def _direction(
        self,
        state: dict[str, Any],
        settings: StackSettings,
        work: StackWork,
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """The preconditioned, grafted direction of one stack, as ``(D, s)``: the step
        direction is ``s · D``, with ``s`` a float or per-block factors ``(B, 1, …)``; the
        parameter update applies ``s`` (no pass over ``D`` here)."""
        if work.final is not None:  # an elementwise stack
            return work.final, 1.0
        filtered = work.filtered
        assert filtered is not None and work.products is not None and work.gradient is not None
        if state["step"] < settings.start_preconditioning_step:
            assert work.grafting is not None
            return work.grafting, 1.0  # the grafting direction (or ``M``) alone
        direction = variants.correct_and_precondition(
            state, settings, work.gradient, filtered.to(settings.factor_dtype), work.products
        ).to(filtered.dtype)
        if work.grafting is None:  # every variant's preconditioner is linear in M
            return direction, 1.0 / work.filtered_correction
        return direction, graft_scales(direction, work.grafting)

    def _apply_updates(self, grouped_directions: list[tuple[torch.Tensor, Any]]) -> None:
        """Decoupled weight decay, then ``p ← p − lr · s · D`` for bundles with a gradient:
        one fused pass per parameter (``add_`` with ``alpha``, or ``addcmul_`` by a 0-d ``s``)."""
        for bundle, (direction, scale) in zip(self.bundles, grouped_directions):
            if not bundle.has_gradient():
                continue
            group = self.param_groups[bundle.group_index]
            lr, weight_decay = group["lr"], group["weight_decay"]
            for param, update in zip(bundle.params, bundle.split(direction)):
                if param.grad is None:
                    continue  # a bundle member without a gradient this step does not move
                if weight_decay and group["decoupled_weight_decay"]:
                    param.mul_(1.0 - lr * weight_decay)
                # the update stays in its (float32 or wider) dtype: the in-place op scales it
                # there and rounds only the sum to the parameter's dtype, so a raw direction
                # beyond float16's range (e.g. 1.8e5 before a grafting scale of 7e-6) is fine
                if isinstance(scale, torch.Tensor):
                    param.addcmul_(update, scale, value=-lr)
                else:
                    param.add_(update, alpha=-lr * scale)

    # --- read access for attribution -------------------------------------------------------
    def _bundle_of(self, bundle_or_param: ParameterBundle | torch.Tensor) -> int:
        for index, bundle in enumerate(self.bundles):
            if bundle is bundle_or_param or any(p is bundle_or_param for p in bundle.params):
                return index
        raise ValueError("the parameter is not optimized by this optimizer")

    def block_layout(self, bundle_or_param: ParameterBundle | torch.Tensor) -> BlockLayout | None:
        """How the bundle's grouped tensor is cut into blocks (``None``: elementwise)."""
        return self._stacking_plan().layouts[self._bundle_of(bundle_or_param)]

    def kronecker_factors(
        self, bundle_or_param: ParameterBundle | torch.Tensor
    ) -> list[KroneckerBlock]:
        """Per block of the bundle, its Kronecker state (views, empty before the first step)."""
        plan = self._stacking_plan()
        stacks = self.state[GLOBAL_STATE].get("stacks")
        if stacks is None:
            return []
        blocks = []
        for stack_index, position in plan.slots[self._bundle_of(bundle_or_param)]:
            stack, state = plan.stacks[stack_index], stacks[stack_index]
            if stack.kind != "kronecker" or "factors" not in state:
                continue
            settings = StackSettings.from_group(self.param_groups[stack.group_index])

            def pick(key: str, state: dict = state, position: int = position) -> Any:
                value = state.get(key)
                if value is None:
                    return None
                if isinstance(value, list):
                    return [item[position] for item in value]
                return value[position]

            config = settings.preconditioner
            eigenvalues = (
                pick("eigenvalue_ema")
                if isinstance(config, PerFactorEigenvalueCorrectedConfig)
                else pick("eigenvalues")
            )
            blocks.append(
                KroneckerBlock(
                    block_shape=stack.block_shape,
                    factors=pick("factors"),
                    eigenvectors=pick("eigenvectors"),
                    eigenvalues=eigenvalues,
                    second_moment=pick("second_moment"),
                    inverse_roots=pick("inverse_roots"),
                    factor_bias_correction=variants.factor_correction(state, settings),
                    eigenvalue_bias_correction=variants.eigenvalue_correction(
                        {"correction_step": state.get("correction_step", 0)}, settings
                    ),
                )
            )
        return blocks

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(with_renamed_group_keys(state_dict, {"epsilon": "eps"}))
        self._plan = None


def _with_defaults(
    tensors: list[torch.Tensor | None],
    factors: list[torch.Tensor],
    default: Callable[[torch.Tensor], torch.Tensor],
) -> list[torch.Tensor] | None:
    """The members' previous eigenpairs (``default(factor)`` where a member has none yet), or
    ``None`` when no member has any (the refresh's own fallback is the same)."""
    if all(tensor is None for tensor in tensors):
        return None
    return [default(f) if tensor is None else tensor for tensor, f in zip(tensors, factors)]


def _concatenate_or_none(
    tensors: list[torch.Tensor | None],
    factors: list[torch.Tensor],
    default: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor | None:
    """``_with_defaults`` as one batch."""
    members = _with_defaults(tensors, factors, default)
    return None if members is None else concatenate_matrices(members)


def _stack_key(group: dict[str, Any], param: torch.Tensor) -> tuple:
    """Blocks may share a stack when these agree (lr and weight decay are applied per bundle)."""
    return (param.device, working_dtype(param.dtype), StackSettings.from_group(group))


def _renamed_eps(eps: float, epsilon: float | None, optimizer: type) -> float:
    """``eps``, or the value passed under its former name ``epsilon`` (not both)."""
    if epsilon is None:
        return eps
    default = inspect.signature(optimizer.__init__).parameters["eps"].default
    if eps != default:
        raise ValueError(
            f"Invalid epsilon: {epsilon!r} together with eps={eps!r} (allowed: one of them; "
            "epsilon is the former name of eps)"
        )
    return epsilon


class SOAP(Shampoo):
    """SOAP (Vyas et al., 2024): Adam in the eigenbasis of Shampoo's factors, refreshed by one
    warm-started QR step every ``precondition_frequency`` steps. Published defaults: lr 3e-3,
    betas (0.95, 0.95), ε 1e-8, weight decay 0.01, frequency 10, max dim 10000, no dim merging,
    1-D parameters by Adam.

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
        super().__init__(
            params,
            lr,
            betas,
            _renamed_eps(eps, epsilon, SOAP),
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

    def __init__(
        self,
        params: ParamsT = None,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        *,
        preconditioner: object = "per_factor_eigenvalue_corrected",
        grafting: object = "adam",
        weight_decay: float = 0.01,
        decoupled_weight_decay: bool = True,
        nesterov: bool = False,
        bias_correction: bool = True,
        precondition_frequency: int = 10,
        start_preconditioning_step: float = 1,
        max_preconditioner_dim: int | None = 1024,
        merge_dims: bool = True,
        factor_dtype: torch.dtype = torch.float32,
        vector_preconditioner: str = "diagonal",
        max_consecutive_failures: int = 5,
        model: nn.Module | None = None,
        combine_params: PreconditionerGroup | tuple[PreconditionerGroup, ...] = DEFAULT_RULES,
        on_nonfinite_grad: NonFinitePolicy = "skip",
        verbose_init: bool = False,
        distributed: DistributedConfig | None = None,
        epsilon: float | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            _renamed_eps(eps, epsilon, KLShampoo),
            preconditioner=preconditioner,
            kl=True,
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
            vector_preconditioner=vector_preconditioner,
            max_consecutive_failures=max_consecutive_failures,
            model=model,
            combine_params=combine_params,
            on_nonfinite_grad=on_nonfinite_grad,
            verbose_init=verbose_init,
            distributed=distributed,
        )
