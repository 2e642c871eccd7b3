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
from kronlab.linalg.batching import concatenate_matrices
from kronlab.optim.base import (
    DEFAULT_RULES,
    KronOptimizer,
    NonFinitePolicy,
    ParamsT,
    with_renamed_group_keys,
)
from kronlab.optim.bundles import ParameterBundle
from kronlab.optim.checkpoint import GLOBAL_KEY
from kronlab.optim.shampoo.config import KL_VARIANTS, resolve_grafting, resolve_preconditioner
from kronlab.optim.shampoo.kl import check_kl, kl_inverse_sqrts
from kronlab.optim.shampoo.moments import (
    diagonal_direction,
    filtered_gradient,
    graft_scales,
    grafting_direction,
    grafting_norms,
    momentum_numerator,
)
from kronlab.optim.shampoo.plan import Scaled, bundle_layout, bundle_work, gather, scatter
from kronlab.optim.shampoo.settings import StackSettings
from kronlab.optim.shampoo.state import BLOCKS, StackStates
from kronlab.optim.shampoo.statistics import update_factors_
from kronlab.optim.shampoo.variant import Refreshed, ShampooVariant, StepInputs
from kronlab.optim.step_template import Direction, Slot, Stack, Work, apply_direction
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


class PendingDirection(NamedTuple):
    """A preconditioned stack's per-step quantities between the statistics and the direction:
    the factor gradient, the filtered gradient before its bias correction (``M = filtered /
    filtered_correction``), the grafting method's per-block norms (``None`` without grafting)
    and this step's outer products (empty unless the variant reads them)."""

    gradient: torch.Tensor
    filtered: torch.Tensor
    filtered_correction: float
    grafting_norms: torch.Tensor | None
    products: list[torch.Tensor]


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

    State layout: keyed by parameter, as torch.optim's: a bundle's blocks live under its first
    parameter, ``optimizer.state[param]["blocks"][j]``, a dict with ``step`` (updates of the
    block), ``momentum`` (``eigenbasis_momentum`` for the eigenvalue-corrected variant without
    grafting) and ``grafting_second_moment`` (block-shaped), ``factors`` ``[(d_i, d_i)]``,
    ``failures`` ``[()]`` and the variant's cache (described in its file: ``root_inverse.py``,
    ``eigendecomposed.py``, ``eigenvalue_corrected.py``, ``per_factor.py``). The step computes
    on same-shape blocks of a param group as stacks ``(B, …)``; the per-parameter tensors are
    views of them (``state.py``). ``kronecker_factors(param)`` returns, per block of the
    parameter's bundle, a ``KroneckerBlock`` of these views; ``block_layout(param)`` says how the
    grouped tensor is cut into those blocks.

    Args:
        params: tensors or param groups (a group may set any argument below but ``model``);
            ``None`` with ``model=`` takes all of the model's trainable parameters.
        lr: learning rate. The registry's ``shampoo`` and ``kl_shampoo`` (``create_optimizer``)
            use 3e-3, which won the convergence benchmark's ``charlm`` grid (BENCHMARKS.md,
            "Convergence"); the class default is kept so that code written against it trains
            as before.
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
            eps=renamed_eps(eps, epsilon, type(self)),
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
        self._layouts: dict[int, BlockLayout | None] = {}  # by ``id`` of the bundle
        self._stack_states = StackStates()
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
            preconditioner = group["preconditioner"]
            check_kl(preconditioner, preconditioner.variant.supports_kl, KL_VARIANTS)

    def describe_preconditioner(self, bundle: ParameterBundle) -> list[str]:
        layout = self._layout(bundle)
        if layout is None:
            (work,) = self.work(bundle)
            return [f"{'x'.join(map(str, bundle.grouped_shape)) or 'scalar'} ({work.key})"]
        return [f"{d}x{d} (Dense)" for shape in layout.block_shapes for d in shape]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        # the plan is built again, the new group's blocks in stacks of their own; the stacks
        # are gathered again from the per-parameter state
        self._stack_states.clear()

    def work(self, bundle: ParameterBundle) -> list[Work]:
        return bundle_work(bundle, self.param_groups[bundle.group_index], self._layout(bundle))

    def _layout(self, bundle: ParameterBundle) -> BlockLayout | None:
        key = id(bundle)
        if key not in self._layouts:
            group = self.param_groups[bundle.group_index]
            self._layouts[key] = bundle_layout(bundle, group)
        return self._layouts[key]

    # --- the step --------------------------------------------------------------------------
    def update(self) -> None:
        stacks = self.plan.stacks
        bundles = self.planned_bundles()
        gradients = {id(bundle): self._bundle_gradient(bundle) for bundle in bundles}
        stack_states = [self._stack_states.get(self.state, stack) for stack in stacks]
        variants = [
            StackSettings.from_group(self.param_groups[stack.group_index]).variant()
            for stack in stacks
        ]
        work = [
            self._accumulate_statistics(stack, state, variant, gradients)
            for stack, state, variant in zip(stacks, stack_states, variants)
        ]
        self._refresh_due_decompositions(stacks, stack_states, variants, after_step=False)
        directions = [
            self._direction(state, variant, stack_work)
            if isinstance(stack_work, PendingDirection)
            else stack_work
            for state, variant, stack_work in zip(stack_states, variants, work)
        ]
        self._refresh_due_decompositions(stacks, stack_states, variants, after_step=True)
        for stack in stacks:
            self._stack_states.publish(stack)
        grouped = scatter(stacks, directions, self._layouts)
        self._apply_updates([grouped[id(bundle)] for bundle in bundles])

    def refresh_due(self) -> bool:
        """Whether a Kronecker stack's next update (its own step count plus one) decomposes."""
        for stack in self.plan.stacks:
            if stack.work.key != "kronecker":
                continue
            group = self.param_groups[stack.group_index]
            state = self._stack_states.get(self.state, stack)
            if StackSettings.from_group(group).variant().is_refresh_step(state.get("step", 0) + 1):
                return True
        return False

    def _bundle_gradient(self, bundle: ParameterBundle) -> torch.Tensor:
        group = self.param_groups[bundle.group_index]
        gradient = bundle.gradient()
        if group["weight_decay"] and not group["decoupled_weight_decay"]:
            gradient = gradient + group["weight_decay"] * bundle.value()  # L2 regularization
        return gradient

    def _accumulate_statistics(
        self,
        stack: Stack,
        state: dict[str, Any],
        variant: ShampooVariant,
        gradients: dict[int, torch.Tensor],
    ) -> Scaled | PendingDirection:
        """Momentum, grafting and (for Kronecker stacks) factor statistics of one stack.

        Elementwise stacks, and Kronecker stacks before preconditioning starts, get their
        direction here. For a preconditioned stack the filtered gradient is kept before its bias
        correction (``filtered / filtered_correction`` is ``M``) and the grafting method enters
        only through its per-block norms (``grafting_norms``).
        """
        settings = variant.settings
        kind = stack.work.key
        gradient = gather(stack, self._layouts, gradients).to(stack.work.dtype)
        state["step"] = state.get("step", 0) + 1
        if kind != "kronecker":
            filtered = filtered_gradient(state, gradient, settings)
            if kind == "diagonal":
                return diagonal_direction(state, gradient, filtered, settings), 1.0
            grafted = grafting_direction(state, gradient, filtered, settings)
            return (filtered if grafted is None else grafted), 1.0
        if variant.filters_in_eigenbasis:  # the variant filters the raw gradient itself
            filtered, filtered_correction = gradient, 1.0
        else:
            filtered, filtered_correction = momentum_numerator(state, gradient, settings)
        preconditioned = state["step"] >= settings.start_preconditioning_step
        if preconditioned:
            grafting = grafting_norms(state, gradient, filtered, filtered_correction, settings)
        else:  # the grafting direction (or ``M``) alone
            corrected = filtered / filtered_correction
            grafted = grafting_direction(state, gradient, corrected, settings)
        factor_gradient = gradient.to(settings.factor_dtype)
        products = update_factors_(
            state,
            factor_gradient,
            kl_inverse_sqrts(variant, state, len(stack.shape)),
            variant.factor_beta,
            keep_products=variant.reads_outer_products,
        )
        if products is not None:
            variant.measure(state, factor_gradient, products)
        if not preconditioned:
            return (corrected if grafted is None else grafted), 1.0
        return PendingDirection(
            factor_gradient, filtered, filtered_correction, grafting, products or []
        )

    def _refresh_due_decompositions(
        self,
        stacks: tuple[Stack, ...],
        stack_states: list[dict[str, Any]],
        variants: list[ShampooVariant],
        *,
        after_step: bool,
    ) -> None:
        """Decompose every due factor, one batched call per (size, dtype, method).

        Root-inverse and eigendecomposed stacks refresh before preconditioning (their factors
        include this step's gradient, as in Distributed Shampoo); eigenvalue-corrected stacks
        refresh after it, so a basis never contains the gradient it measures (as in SOAP).
        """
        due = [
            index
            for index, (stack, state, variant) in enumerate(zip(stacks, stack_states, variants))
            if stack.work.key == "kronecker"
            and variant.refresh_after_step == after_step
            and variant.is_refresh_step(state["step"])
        ]
        if due:  # between refreshes a compiled step traces no decomposition (no graph break)
            self._decompose(due, stacks, stack_states, variants)

    # An eager region under torch.compile: eigh and QR run in LAPACK either way (nothing to
    # fuse), and a failed decomposition needs the host (the fallback's warning, and
    # DecompositionFailed). Refreshes are amortized, so the break costs once per refresh.
    @torch.compiler.disable
    def _decompose(
        self,
        due: list[int],
        stacks: tuple[Stack, ...],
        stack_states: list[dict[str, Any]],
        variants: list[ShampooVariant],
    ) -> None:
        """Decompose the factors of the ``due`` stacks, one batched call per (size, dtype,
        method), and install the results in the variants' state."""
        batches: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
        for index in due:
            state, variant = stack_states[index], variants[index]
            method = variant.refresh_method(state)
            for axis, factor in enumerate(state["factors"]):
                key = (factor.shape[-1], factor.dtype, method, variant.tracks_columns)
                batches[key].append((index, axis))
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
                vectors, values = variants[index].previous_eigenpairs(state, axis)
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
                max_consecutive_failures=variants[members[0][0]].settings.max_consecutive_failures,
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
                for axis in range(len(stacks[index].shape))
                if (index, axis) in results
            ]
            if axes:
                variants[index].install(state, Refreshed(*map(list, zip(*axes))))

    def _direction(
        self, state: dict[str, Any], variant: ShampooVariant, work: PendingDirection
    ) -> Scaled:
        """The preconditioned, grafted direction of one stack, as ``(D, s)``: the step
        direction is ``s · D``, with ``s`` a float or per-block factors ``(B, 1, …)``; the
        parameter update applies ``s`` (no pass over ``D`` here)."""
        filtered = work.filtered
        inputs = StepInputs(
            work.gradient, filtered.to(variant.settings.factor_dtype), work.products
        )
        direction = variant.direction(state, inputs).to(filtered.dtype)
        if work.grafting_norms is None:  # every variant's preconditioner is linear in M
            return direction, 1.0 / work.filtered_correction
        return direction, graft_scales(direction, work.grafting_norms)

    def _apply_updates(self, grouped: list[Scaled]) -> None:
        """Decoupled weight decay, then ``p ← p − lr · s · D`` (``grouped``: per bundle of
        ``planned_bundles``) for parameters with a gradient (``step_template.apply_direction``):
        one write per param group and float ``s`` (step size ``lr · s``), or per param group with
        each bundle's 0-d ``s`` multiplied in.
        The update stays in its (float32 or wider) dtype: the write scales it there and rounds
        only the sum to the parameter's dtype, so a raw direction beyond float16's range (e.g.
        1.8e5 before a grafting scale of 7e-6) is fine."""
        writes: dict[tuple, tuple[list[Slot], list[torch.Tensor], list[torch.Tensor]]] = {}
        for bundle, (direction, scale) in zip(self.planned_bundles(), grouped):
            per_bundle = isinstance(scale, torch.Tensor)
            key = (bundle.group_index, None if per_bundle else scale)
            slots, values, scales = writes.setdefault(key, ([], [], []))
            slots.append(Slot(bundle))
            values.append(direction)
            if per_bundle:
                scales.append(scale)
        for (group_index, scale), (slots, values, scales) in writes.items():
            group = self.param_groups[group_index]
            lr = group["lr"]
            decay = lr * group["weight_decay"] if group["decoupled_weight_decay"] else 0.0
            if scale is None:
                apply_direction(slots, Direction(values, lr, scales), decay)
            else:
                apply_direction(slots, Direction(values, lr * scale), decay)

    # --- read access for attribution -------------------------------------------------------
    def _bundle_of(self, bundle_or_param: ParameterBundle | torch.Tensor) -> ParameterBundle:
        for bundle in self.bundles:
            if bundle is bundle_or_param or any(p is bundle_or_param for p in bundle.params):
                return bundle
        raise ValueError("the parameter is not optimized by this optimizer")

    def block_layout(self, bundle_or_param: ParameterBundle | torch.Tensor) -> BlockLayout | None:
        """How the bundle's grouped tensor is cut into blocks (``None``: elementwise)."""
        return self._layout(self._bundle_of(bundle_or_param))

    def kronecker_factors(
        self, bundle_or_param: ParameterBundle | torch.Tensor
    ) -> list[KroneckerBlock]:
        """Per block of the bundle, its Kronecker state (views, empty before the first step)."""
        bundle = self._bundle_of(bundle_or_param)
        layout = self._layout(bundle)
        states = self.state.get(bundle.key, {}).get(BLOCKS, [])
        if layout is None or not states:
            return []
        variant = StackSettings.from_group(self.param_groups[bundle.group_index]).variant()
        return [
            KroneckerBlock(
                block_shape=shape,
                factors=state["factors"],
                eigenvectors=state.get("eigenvectors"),
                eigenvalues=state.get(variant.exported_eigenvalues),
                # a second moment not yet updated (SOAP's first step) is no estimate
                second_moment=state.get("second_moment") if state.get("correction_step") else None,
                inverse_roots=state.get("inverse_roots"),
                factor_bias_correction=variant.factor_correction(state),
                eigenvalue_bias_correction=variant.eigenvalue_correction(state),
            )
            for shape, state in zip(layout.block_shapes, states)
            if "factors" in state
        ]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_global = state_dict.get("state", {}).get(GLOBAL_KEY, {})
        if isinstance(saved_global, dict) and "stacks" in saved_global:
            raise ValueError(
                "Invalid state_dict: Shampoo state saved per stack (allowed: a state_dict "
                "whose Shampoo state is keyed by parameter, as saved by this version)"
            )
        super().load_state_dict(with_renamed_group_keys(state_dict, {"epsilon": "eps"}))
        self._stack_states.clear()


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


def renamed_eps(eps: float, epsilon: float | None, optimizer: type) -> float:
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
