"""PSGD Kron with the QUAD and Procrustes preconditioner updates (Xi-Lin Li et al.).

Papers: Li, *Preconditioned stochastic gradient descent* (arXiv:1512.04202); *Preconditioner on
matrix Lie group for SGD* (arXiv:1809.10232); *Stochastic Hessian fittings on Lie groups*
(arXiv:2402.11858); Pooladzandi & Li (arXiv:2402.04553). User-facing names follow quad_torch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kronlab.distributed import DistributedConfig, WorkItem
from kronlab.distributed.communication import all_reduce_max
from kronlab.groups.layout import plan_layout
from kronlab.groups.rules import PreconditionerGroup
from kronlab.linalg._dtypes import product_dtype
from kronlab.optim.base import DEFAULT_RULES, KronOptimizer, NonFinitePolicy, ParamsT
from kronlab.optim.bundles import ParameterBundle
from kronlab.optim.psgd_factors import (
    DENSE_UPDATES,
    DIAGONAL_UPDATES,
    FactorKind,
    apply_axis,
    balance_scales,
    factor_square,
    forms_square,
    keeps_root,
    preconditioner_lr_schedule,
    whitening_terms,
)
from kronlab.optim.registry import register_optimizer
from kronlab.optim.sharded_step import Sharding
from kronlab.optim.step_template import Direction, Slot, Stack, Work
from kronlab.optim.validation import check_choice, check_range

PSGDMethod = Literal["quad", "procrustes"]
DTYPES = (None, torch.bfloat16, torch.float16, torch.float32, torch.float64)
BALANCE_EVERY = 100
UPDATE_RMS_CLIP = 1.1
ADAM_RMS_DIVISOR = 5.0  # PSGD's update has RMS ≈ 1, Adam's ≈ 0.2
NoiseKey = tuple[torch.device, torch.dtype]  # a noise draw's device and dtype


@dataclass(frozen=True)
class PSGDLayout:
    """A tensor seen as an ``m × n`` matrix with a left and a right factor kind.

    1-D tensors (and tensors with one non-unit dim) are ``1 × n`` with no left factor and a
    diagonal right factor, which makes the generic matrix update exactly the 1-D PSGD update
    (``term1 = Pg²``, ``c = 1``).
    """

    original_shape: tuple[int, ...]
    matrix_shape: tuple[int, int]
    left: FactorKind
    right: FactorKind

    def describe(self) -> str:
        original = "x".join(map(str, self.original_shape)) or "scalar"
        shape = self.matrix_shape if self.left != "none" else self.matrix_shape[1:]
        merged = "x".join(map(str, shape))
        kinds = [kind for kind in (self.left, self.right) if kind != "none"]
        return f"{original} → {merged} → [{', '.join(kinds)}]"


def plan_psgd_layout(
    shape: tuple[int, ...] | torch.Size, max_size_dense: float, max_skew_dense: float
) -> PSGDLayout:
    """Most-square matrix view of ``shape`` and each axis's factor kind.

    An axis of size ``d`` is diagonal if ``d > max_size_dense`` or ``d² > max_skew_dense ·
    numel`` (rules applied to the merged matrix), else dense; 1-D tensors are diagonal.
    """
    view = plan_layout(tuple(shape), most_square=True).shape
    if len(view) <= 1:
        return PSGDLayout(tuple(shape), (1, math.prod(view)), "none", "diagonal")
    rows, cols = view
    numel = rows * cols

    def kind(size: int) -> FactorKind:
        too_skewed = size * size > max_skew_dense * numel
        return "diagonal" if size > max_size_dense or too_skewed else "dense"

    return PSGDLayout(tuple(shape), (rows, cols), kind(rows), kind(cols))


class PSGD(KronOptimizer):
    """PSGD Kron: ``p ← p(1 − lr·wd) − lr' · clip(Q_l² M Q_r²)`` with ``Q`` fitted online.

    Each step, for every preconditioner bundle (same-layout bundles stacked and done in one
    batched call): momentum ``M ← lerp(M, g, 1 − momentum)``; the factors are fitted so that
    ``Pg = Q_l² (M + noise) Q_r²`` is whitened (``E[Pg Pgᵀ] = c I``), by one Lie-group step of
    ``method``:

    * ``"quad"``: ``Q ← sym((I − μ/2L·E) Q (I − μ/2L·E))`` with ``E = term1 − c``;
    * ``"procrustes"``: ``Q ← Q − μ/L·E Q`` followed by a rotation back toward symmetric
      positive definite (the ``Q^0.5 E Q^1.5`` form of the fit, kept on the group exactly).

    ``L`` tracks ``‖term1‖₂ + c`` (cheap lower bounds, EMA that never goes below the newest
    bound); ``μ = max(0.3, preconditioner_lr / sqrt(1 + t/10000))`` (a ``preconditioner_lr`` below
    0.3 is used as is). The update ``Q_l² M Q_r²`` uses the refreshed factors, its RMS is clipped at
    1.1, and every 100 steps the two factors are rescaled to the geometric mean of their max-abs
    values (``P`` unchanged) so neither drifts toward under- or overflow. The stacked state of a
    stack is reused from step to step (the per-bundle entries are views of it) and so is ``Q²``
    of the refreshed factors, which the next step's fit needs again. On tall dense axes (much
    larger than the other axis) ``term1`` and ``Q²`` are not formed; their products go through
    ``Pg`` and ``Q`` (``keeps_root``, ``forms_square``).

    Args:
        params: tensors or param groups; ``None`` with ``model=`` takes all of the model's.
        lr: learning rate. The registry's ``psgd_quad`` and ``psgd_procrustes``
            (``create_optimizer``) use 1e-2, which won the convergence benchmark's ``charlm``
            grid (BENCHMARKS.md, "Convergence"); the class default is kept so that code
            written against it trains as before.
        lr_style: ``"adam"``: the step is ``lr/5 · update`` so AdamW's learning rates and weight
            decays transfer (PSGD's update RMS ≈ 1, Adam's ≈ 0.2); ``None`` steps by
            ``lr · update``.
        method: ``"quad"`` or ``"procrustes"``.
        momentum: EMA coefficient of the gradient; the preconditioner is fitted to the momentum.
        weight_decay: decoupled, ``p ← p (1 − lr · weight_decay)``.
        max_size_dense, max_skew_dense: factor kinds, see ``plan_psgd_layout``; >2-D tensors are
            first reshaped to their most-square matrix (``[32, 64, 1024] → [2048, 1024]``).
        preconditioner_lr: ``μ_0`` of the schedule above, in ``(0, 1]``.
        preconditioner_init_scale: initial ``Q = scale · I``; ``None`` sets
            ``scale = (max mean(g²) + noise_scale²)^(-1/4)`` from the first gradients of the
            bundles initialised on that step (a bundle is initialised on the first step where its
            gradient is not all zero, so zero gradients cannot produce an infinite scale).
        noise_scale: std of the Gaussian noise added to ``M`` for the fit (keeps it well posed
            when gradients vanish); 0 disables it. Each bundle's noise is i.i.d. and fresh every
            step: the leading ``m·n`` entries of the step's standard normal sequence, which is
            shared by all bundles (views of it; no bundle's fit can tell that apart from
            independent draws) and made from ``seed`` and the step count alone, never from the
            global RNG (see ``_step_noise``).
        seed: seed of that sequence; ``None`` derives one from ``torch.initial_seed()`` (see
            ``KronOptimizer``). It is saved in the state_dict.
        dtype: dtype of the state and the preconditioner math; ``None`` = the gradient's dtype.
            On CPU, half-precision state is multiplied in float32 (``product_dtype``: CPU half
            GEMMs accumulate in float32 anyway and are ~2x slower) and the refreshed factors
            are stored rounded to ``dtype``. Updates are cast back to each parameter's dtype;
            Lipschitz estimates are kept in at least float32.
        model: lets grouping rules find layers and gives parameters their names.
        combine_params: grouping rules (``kronlab.groups``), first match wins.
        on_nonfinite_grad: ``"skip"`` (default), ``"raise"`` or ``"ignore"`` (see
            ``KronOptimizer``).
        verbose_init: print each parameter's layout at construction.
        distributed: a ``kronlab.distributed.DistributedConfig`` to split the preconditioner
            work over the ranks of a process group (see ``kronlab.optim.KronOptimizer``). Each
            rank draws only the noise its own bundles use, the same numbers one process draws
            for them; until every bundle is initialised the ranks agree on the default initial
            scale (one small all-reduce per step). Give them the same ``seed``.
    """

    variant_keys = ("combine_params", "method")
    momentum_on = "gradient"  # the factors are fitted to the momentum
    momentum_key = "momentum"

    def __init__(
        self,
        params: ParamsT = None,
        lr: float = 1e-3,
        method: PSGDMethod = "quad",
        lr_style: Literal["adam"] | None = "adam",
        momentum: float = 0.95,
        weight_decay: float = 0.1,
        max_size_dense: float = 16384,
        max_skew_dense: float = 1.0,
        preconditioner_lr: float = 0.7,
        preconditioner_init_scale: float | None = None,
        noise_scale: float = 1e-9,
        dtype: torch.dtype | None = torch.bfloat16,
        *,
        model: nn.Module | None = None,
        combine_params: PreconditionerGroup | tuple[PreconditionerGroup, ...] = DEFAULT_RULES,
        on_nonfinite_grad: NonFinitePolicy = "skip",
        verbose_init: bool = False,
        distributed: DistributedConfig | None = None,
        seed: int | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "method": method,
            "lr_style": lr_style,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "max_size_dense": max_size_dense,
            "max_skew_dense": max_skew_dense,
            "preconditioner_lr": preconditioner_lr,
            "preconditioner_init_scale": preconditioner_init_scale,
            "noise_scale": noise_scale,
            "dtype": dtype,
        }
        super().__init__(
            params,
            defaults,
            model=model,
            combine_params=combine_params,
            on_nonfinite_grad=on_nonfinite_grad,
            verbose_init=verbose_init,
            distributed=distributed,
            seed=seed,
        )
        # (sharding, step) of the step after which no bundle on any rank waited for its
        # initialisation: once that step is taken, no scale is left to agree on
        self._settlement: tuple[Sharding, int] | None = None

    def validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_choice("method", group["method"], ("quad", "procrustes"))
        check_choice("lr_style", group["lr_style"], ("adam", None))
        check_range("momentum", group["momentum"], 0.0, 1.0, high_inclusive=False)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("max_size_dense", group["max_size_dense"], 1, integer=True, or_infinity=True)
        check_range("max_skew_dense", group["max_skew_dense"], 0.0, or_infinity=True)
        check_range("preconditioner_lr", group["preconditioner_lr"], 0.0, 1.0, low_inclusive=False)
        if group["preconditioner_init_scale"] is not None:
            check_range(
                "preconditioner_init_scale",
                group["preconditioner_init_scale"],
                0.0,
                math.inf,
                low_inclusive=False,
                high_inclusive=False,
            )
        check_range("noise_scale", group["noise_scale"], 0.0)
        check_choice("dtype", group["dtype"], DTYPES)

    def layout(self, bundle: ParameterBundle) -> PSGDLayout:
        group = self.param_groups[bundle.group_index]
        return plan_psgd_layout(
            bundle.grouped_shape, group["max_size_dense"], group["max_skew_dense"]
        )

    def describe_preconditioner(self, bundle: ParameterBundle) -> list[str]:
        return [self.layout(bundle).describe()]

    def distributed_work_items(self) -> list[WorkItem]:
        """The cost model's view of each bundle's layout: a dense axis of size ``d`` costs
        ``~numel · d`` per product and ``~d³`` for its factor step, every step (a factor whose
        step is a decomposition refreshed every step); a diagonal axis only elementwise passes,
        so a bundle without dense axes (vectors, very skewed matrices) is elementwise work."""
        items = []
        for index, bundle in enumerate(self.bundles):
            layout = self.layout(bundle)
            sizes = zip((layout.left, layout.right), layout.matrix_shape)
            dense = tuple(size for kind, size in sizes if kind == "dense")
            items.append(WorkItem(index, layout.matrix_shape, dense))
        return items

    # --- the step -----------------------------------------------------------------------
    def work(self, bundle: ParameterBundle) -> list[Work]:
        """The bundle's ``m × n`` matrix in the state dtype; its factor kinds must agree too."""
        layout = self.layout(bundle)
        dtype = self.param_groups[bundle.group_index]["dtype"] or bundle.key.dtype
        return [Work(layout.matrix_shape, dtype, (layout.left, layout.right))]

    def update(self) -> None:
        """The template's stages, with two that span stacks first: a param group's bundles seen
        for the first time share one initial scale (``_initialize``), and one noise sequence
        serves every stack (``_step_noise``). Distributed, the ranks agree on the scale
        (``_agree_across_ranks``) while some bundle is not initialised; the noise needs no
        agreement (each bundle's is the same whichever rank draws it)."""
        active = []
        for stack in self.plan.stacks:
            slots = stack.active()
            if slots:
                active.append((stack, slots, self.gradients(stack, slots)))
        # bundles not initialised yet (``refresh_due``: such a step runs eagerly when compiled)
        fresh: dict[int, list[tuple[Slot, Tensor]]] = defaultdict(list)
        for stack, slots, gradients in active:
            entries = [
                (slot, grad)
                for slot, grad in zip(slots, gradients)
                if not self.state[slot.param].get("step")
            ]
            if entries:
                fresh[stack.group_index] += entries
        moments = {index: _mean_squares(entries) for index, entries in fresh.items()}
        # all-zero (and zero-size: NaN mean) gradients wait; they must not set the shared scale
        initialized = {
            id(slot.param)
            for index, entries in fresh.items()
            for (slot, _), moment in zip(entries, moments[index])
            if moment > 0
        }
        # bundles whose gradients were all zero so far wait (state at step 0) and only decay
        ready = [
            [
                id(slot.param) in initialized or self.state[slot.param].get("step", 0) > 0
                for slot in slots
            ]
            for _, slots, _ in active
        ]
        peaks = {
            index: max((moment for moment in values if moment > 0), default=0.0)
            for index, values in moments.items()
        }
        sizes = self._noise_sizes(
            [(stack, any(flags)) for (stack, _, _), flags in zip(active, ready)]
        )
        sharding = self.sharding()
        if sharding is not None and not self._settled(sharding):
            peaks, waiting = self._agree_across_ranks(peaks, self._waiting(initialized))
            self._settlement = None if waiting else (sharding, self.global_step)
        for index, entries in fresh.items():
            self._initialize(self.param_groups[index], entries, moments[index], peaks[index])
        noise = {
            (device, dtype): self._step_noise(size, device, dtype)
            for (device, dtype), size in sizes.items()
            if size > 0
        }
        for (stack, slots, gradients), flags in zip(active, ready):
            group = self.param_groups[stack.group_index]
            stepped = [slot for slot, flag in zip(slots, flags) if flag]
            values: list[Tensor | None] = [None] * len(slots)
            scales: list[Tensor | None] = [None] * len(slots)
            step_size = 0.0
            if stepped:
                momenta = self.momentum(
                    stepped, [g for g, flag in zip(gradients, flags) if flag], group
                )
                direction = self.direction(
                    stack, stepped, momenta, group, noise.get(_noise_key(stack))
                )
                positions = [index for index, flag in enumerate(flags) if flag]
                for position, value, scale in zip(
                    positions, direction.values.unbind(0), direction.scale.unbind(0)
                ):
                    values[position], scales[position] = value, scale
                step_size = direction.step_size
            self.apply(stack, slots, Direction(values, step_size, scales), group)

    def refresh_due(self) -> bool:
        """Whether this step initialises a bundle (its first step, or its first non-zero
        gradient): the initial scale is read on the host, so under ``torch.compile`` such a step
        runs eagerly. Every other step draws its noise inside the graph (``_step_noise``)."""
        return any(
            not self.state[slot.param].get("step")
            for stack in self.plan.stacks
            for slot in stack.active()
        )

    def direction(
        self,
        stack: Stack,
        slots: list[Slot],
        gradients: list[Tensor],
        group: dict[str, Any],
        noise: Tensor | None = None,
    ) -> Direction:
        """Refit the stack's factors to its momenta (plus ``noise``, this step's standard normal
        draw for the stack's device and dtype, scaled by ``noise_scale``); ``Q_l² M Q_r²``,
        RMS-clipped by ``scale``."""
        if group["noise_scale"] == 0:
            noise = None
        left, right = stack.work.key
        updates, clip = self._precondition_stack(stack, group, slots, left, right, noise)
        step_size = group["lr"] / ADAM_RMS_DIVISOR if group["lr_style"] == "adam" else group["lr"]
        return Direction(updates, step_size, clip)

    def _initialize(
        self,
        group: dict[str, Any],
        entries: list[tuple[Slot, Tensor]],
        moments: list[float],
        peak: float,
    ) -> None:
        """Create state for bundles seen for the first time: those with a positive mean square
        gradient (``moments``) are initialised, with ``Q = scale · I`` where the default scale
        is ``(peak + noise_scale²)^(-1/4)``, ``peak`` the largest of those mean squares.

        A bundle whose gradient is all zero is not initialised (it would set the shared scale
        to infinity): it gets placeholder state at step 0 (zero momentum, identity factors),
        replaced at its first non-zero gradient. So every bundle that took a step has all its
        state entries, as a checkpoint template built from one step on zero gradients needs.
        """
        for (slot, grad), moment in zip(entries, moments):
            if moment == 0 and not self.state[slot.param]:  # zero-size ones keep no state
                self._new_state(slot, torch.zeros_like(grad), 1.0)
        kept = [entry for entry, moment in zip(entries, moments) if moment > 0]
        if not kept:
            return
        scale = group["preconditioner_init_scale"]
        if scale is None:
            scale = (peak + group["noise_scale"] ** 2) ** -0.25
        for slot, grad in kept:
            self._new_state(slot, grad.clone(), scale)

    def _new_state(self, slot: Slot, momentum: Tensor, scale: float) -> None:
        """A bundle's state at step 0: ``momentum`` and factors ``scale · I``."""
        layout = self.layout(slot.bundle)
        state = self.state[slot.param]
        state["step"] = 0
        state["momentum"] = momentum
        for side, kind, size in zip(("left", "right"), (layout.left, layout.right), momentum.shape):
            if kind == "none":
                continue
            factor = torch.ones(size, dtype=momentum.dtype, device=momentum.device)
            state[f"{side}_factor"] = scale * (torch.diag(factor) if kind == "dense" else factor)
            state[f"{side}_lipschitz"] = torch.zeros(
                (), dtype=torch.promote_types(momentum.dtype, torch.float32), device=momentum.device
            )

    def _noise_sizes(self, stacks: list[tuple[Stack, bool]]) -> dict[NoiseKey, int]:
        """Per device and product dtype of the active stacks that add fit noise, the length of
        that key's draw: the largest matrix of those ``(stack, stepped)`` that are stepped (0
        where none is)."""
        sizes: dict[NoiseKey, int] = {}
        for stack, stepped in stacks:
            if self.param_groups[stack.group_index]["noise_scale"] > 0:
                rows, cols = stack.shape
                size = rows * cols if stepped else 0
                sizes[_noise_key(stack)] = max(sizes.get(_noise_key(stack), 0), size)
        return sizes

    def _step_noise(self, size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The first ``size`` entries of this step's flat ``N(0, I)`` sequence for ``device``
        and ``dtype``; chunk ``k`` (``NORMAL_CHUNK`` entries) is drawn from a generator seeded
        from the seed, the step count and ``k`` alone (``randomness.step_standard_normal``, a
        custom operator: under ``torch.compile`` the draw is one call inside the graph).

        Every bundle's fit noise is a view of it (``_fit_noise``): each bundle's factors are
        fitted to its own gradient only, so what each bundle sees must be i.i.d. ``N(0, 1)``
        and fresh every step, which a view of a fresh draw is; that different bundles see
        correlated noise does not change any bundle's fit. Drawing ``max(numel)`` numbers
        instead of one per gradient entry saves most of the cost of the noise (``normal_``
        of all 3.4 M gradient entries of the benchmark transformer was ~12 % of its step).
        As a bundle's noise depends on its size, the seed and the step only, a rank that steps
        some of the bundles draws, for each, the numbers one process draws, and no more than
        its own largest bundle needs; a refused step draws nothing that the next one would
        not draw again, and a resumed run draws what an uninterrupted one does.
        """
        return self._generators.step_standard_normal(size, self.global_step, dtype, device)

    def _settled(self, sharding: Sharding) -> bool:
        """Whether every bundle on every rank was initialised by a step taken under
        ``sharding`` (a refused step counts again: its initialisations were rolled back)."""
        if self._settlement is None:
            return False
        settled_under, step = self._settlement
        return settled_under is sharding and self.global_step > step

    def _waiting(self, initialized: set[int]) -> bool:
        """Whether some bundle this process steps is still not initialised after this step
        (``initialized``: the ids of the bundles initialised by it)."""
        return any(
            id(slot.param) not in initialized and not self.state[slot.param].get("step")
            for stack in self.plan.stacks
            for slot in stack.slots
        )

    def _agree_across_ranks(
        self, peaks: dict[int, float], waiting: bool
    ) -> tuple[dict[int, float], bool]:
        """The initial-scale peaks of one process stepping every bundle (the maxima over the
        ranks, each stepping its own bundles) and whether a bundle on any rank still waits
        for its initialisation, by one all-reduce. Once none waits, no scale is left to agree
        on and the step needs no all-reduce of its own."""
        groups = range(len(self.param_groups))
        local = [peaks.get(index, 0.0) for index in groups] + [float(waiting)]
        assert self.distributed is not None
        first = next(p for group in self.param_groups for p in group["params"])
        agreed = all_reduce_max(local, first.device, self.distributed.process_group)
        return {index: agreed[index] for index in peaks}, agreed[-1] > 0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._settlement = None  # the loaded state may hold bundles not initialised yet

    def _precondition_stack(
        self,
        stack: Stack,
        group: dict[str, Any],
        slots: list[Slot],
        left_kind: FactorKind,
        right_kind: FactorKind,
        noise: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Refresh the stacked factors of same-layout bundles; return their updates unclipped
        and the RMS clip factor of each (applied by the template's write).

        Pipeline: (balance) → ``Pg = P_l (M + noise) P_r`` → one factor step per axis →
        ``P_l' M P_r'`` with the refreshed factors → RMS clip. The state stays in its dtype;
        the arithmetic runs in ``product_dtype`` (float32 for half-precision state on CPU) and
        refreshed factors are rounded to the state dtype before they are used or cached.
        ``noise`` is this step's flat standard normal draw (``_step_noise``) or
        None without fit noise.
        """
        key = stack.index
        states = [self.state[slot.param] for slot in slots]
        for state in states:
            state["step"] += 1
        stored_momentum = self.stacked_state.stack((key, "momentum"), states, "momentum")
        compute = product_dtype(stored_momentum.dtype, stored_momentum.device)
        # cast once for the fit and the output: a mixed-dtype elementwise op would make its own
        # cast copy of the half-precision operand (TensorIterator), i.e. one cast per use
        momentum = stored_momentum.to(compute)
        steps = torch.tensor([state["step"] for state in states], device=momentum.device)
        kinds = {"left": left_kind, "right": right_kind}
        sides = [side for side, kind in kinds.items() if kind != "none"]
        # per dense axis: size d and width r (the other axis) decide the cheaper products
        rows, cols = momentum.shape[1:]
        sizes = {"left": (rows, cols), "right": (cols, rows)}
        squared = {side: kinds[side] == "diagonal" or forms_square(*sizes[side]) for side in sides}
        roots = {side: keeps_root(*sizes[side], group["method"]) for side in sides}
        stored = {
            side: self.stacked_state.stack((key, side), states, f"{side}_factor") for side in sides
        }
        factors = {side: self._in_dtype((key, side), stored[side], compute) for side in sides}
        squares = {side: self.stacked_state.derived((key, side), stored[side]) for side in sides}
        # decided from the host-side step counts: no device sync
        if len(sides) == 2 and any(state["step"] % BALANCE_EVERY == 0 for state in states):
            factors["left"], factors["right"] = balance_scales(
                factors["left"], factors["right"], steps % BALANCE_EVERY == 0
            )
            squares = {}
        noisy = momentum
        if noise is not None:
            noisy = _fit_noise(momentum, noise, group["noise_scale"])
        symmetric = group["method"] == "quad"  # QUAD keeps dense Q symmetric: so is Q²
        preconditioned = _precondition(noisy, factors, kinds, squares, squared, symmetric)
        lr = preconditioner_lr_schedule(group["preconditioner_lr"], steps)
        numel = rows * cols
        for side in sides:
            updates = DENSE_UPDATES if kinds[side] == "dense" else DIAGONAL_UPDATES
            axis = 0 if side == "left" else 1
            term1 = whitening_terms(preconditioned, axis, kinds[side], roots[side])
            term2 = torch.full_like(lr, numel / factors[side].shape[-1])
            name = f"{side}_lipschitz"
            lipschitz = self.stacked_state.stack((key, name), states, name)
            refreshed = updates[group["method"]](factors[side], term1, term2, lipschitz, lr)
            stored[side] = self.stacked_state.store(
                (key, side), states, f"{side}_factor", refreshed.factor.to(stored[side].dtype)
            )
            factors[side] = self._in_dtype((key, side), stored[side], compute)
            self.stacked_state.store((key, name), states, name, refreshed.lipschitz)
        squares = {
            side: factor_square(factors[side], kinds[side], symmetric) if squared[side] else None
            for side in sides
        }
        for side in sides:  # reused by the next step's fit while the factors stay unchanged
            self.stacked_state.store_derived((key, side), stored[side], squares[side])
        directions = _precondition(momentum, factors, kinds, squares, squared, symmetric)
        return directions, _rms_clip_factors(directions, UPDATE_RMS_CLIP)

    def _in_dtype(self, key: tuple, stored: Tensor, dtype: torch.dtype) -> Tensor:
        """``stored.to(dtype)``, cached while ``stored`` is unchanged: the copy made when a
        refreshed factor is stored serves the next step too (no cast at the start of a step)."""
        if stored.dtype == dtype:
            return stored
        cached = self.stacked_state.derived((*key, dtype), stored)
        if cached is None:
            cached = stored.to(dtype)
            self.stacked_state.store_derived((*key, dtype), stored, cached)
        return cached


def _precondition(
    matrices: Tensor,
    factors: dict[str, Tensor],
    kinds: dict[str, FactorKind],
    squares: dict[str, Tensor | None],
    squared: dict[str, bool],
    symmetric: bool,
) -> Tensor:
    """``Q_l² X Q_r²`` for a stack ``X`` of ``(B, m, n)``.

    ``squares`` are reused where given; missing ones are formed where ``squared`` says so,
    else that factor is applied twice; ``symmetric``: dense factors are symmetric (QUAD).
    """
    for axis, side in enumerate(("left", "right")):
        if kinds[side] == "none":
            continue
        square = squares.get(side)
        if square is None and squared[side]:
            square = factor_square(factors[side], kinds[side], symmetric)
        matrices = apply_axis(matrices, axis, kinds[side], factors[side], square)
    return matrices


def _mean_squares(entries: list[tuple[Slot, Tensor]]) -> list[float]:
    """``mean(g²)`` of each entry's gradient (NaN for an empty one)."""
    return [
        float(g.square().mean(dtype=torch.promote_types(g.dtype, torch.float32)))
        for _, g in entries
    ]


def _noise_key(stack: Stack) -> NoiseKey:
    """Device and product dtype of a stack."""
    return stack.device, product_dtype(stack.work.dtype, stack.device)


def _fit_noise(momenta: Tensor, standard_normal: Tensor, scale: float) -> Tensor:
    """``M_b + scale · Z`` for every matrix ``M_b`` of a stack ``(B, m, n)``, ``Z`` the leading
    ``m·n`` entries of a flat standard normal draw (one addition, broadcast over the stack)."""
    rows, cols = momenta.shape[-2:]
    return torch.add(momenta, standard_normal[: rows * cols].view(rows, cols), alpha=scale)


def _rms_clip_factors(directions: Tensor, limit: float) -> Tensor:
    """``limit / max(RMS, limit)`` per matrix of a stack: the factor that scales each matrix
    whose RMS exceeds ``limit`` down to RMS ``limit`` (shape ``(B,)``)."""
    accumulate = torch.promote_types(directions.dtype, torch.float32)
    norms = torch.linalg.vector_norm(directions, dim=(-2, -1), dtype=accumulate)
    rms = norms / math.sqrt(directions.shape[-2] * directions.shape[-1])
    return (limit / rms.clamp(min=limit)).to(directions.dtype)


@register_optimizer(
    "psgd_quad", default_lr=1e-2, summary="PSGD Kron, QUAD preconditioner update (Li)"
)
def _psgd_quad(model: nn.Module, lr: float) -> PSGD:
    return PSGD(model.parameters(), lr=lr, method="quad")


@register_optimizer(
    "psgd_procrustes",
    default_lr=1e-2,
    summary="PSGD Kron, Procrustes (Q^0.5 E Q^1.5) preconditioner update (Li)",
)
def _psgd_procrustes(model: nn.Module, lr: float) -> PSGD:
    return PSGD(model.parameters(), lr=lr, method="procrustes")
