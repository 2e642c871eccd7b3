"""SIRFShampoo: inverse- and root-free Shampoo with structured Kronecker factors.

Lin, Dangel, Eschenhagen, Bae, Turner, Makhzani, "Can We Remove the Square-Root in Adaptive
Gradient Methods? A Second-Order Perspective", ICML 2024 (arXiv:2402.03496), Fig. 3 / §3.

The preconditioner of a grouped tensor ``G`` with axes ``1..N`` is ``⊗_n K_n K_nᵀ``: the factors
``K_n`` parametrize the *inverse* of a Kronecker curvature estimate directly, so no matrix
inverse or root is ever taken. With ``K̃_n = K_n/√d_n`` (the code's stability scaling), batch
size ``B`` and ``Π`` the projection onto factor ``n``'s structure, every ``T`` steps::

    GK   = √B · G ×_1 K̃_1ᵀ ⋯ ×_N K̃_Nᵀ              t_j = tr(K̃_jᵀ K̃_j) / d_j = ‖K_j‖²_F / d_j²
    m̂_n  = (λ/2)·numel(G)·∏_{j≠n} t_j · Π(K̃_nᵀ K̃_n) + (d_n/2)·Π(GK_(n) GK_(n)ᵀ) − ½·I
    m_n  ← α2·m_n + (1 − α2)·m̂_n
    K_n  ← K_n − β2 / max(‖m_n‖_F, 1) · K_n m_n     (first-order truncation of K_n·Exp(−β2·m_n))

then ``PG = G ×_1 K_1K_1ᵀ ⋯ ×_N K_NK_Nᵀ``; ``step = PG + κ·p``; ``buf ← α1·buf + step``;
``p ← p − lr·buf``.

Constants: the paper's inverse-free Shampoo update with γ = 1 (a moving average of the
curvature, not a sum), written for ``N`` axes as in the authors' code (``sirfshampoo`` 0.0.1).
The curvature is the outer product of the batch-*sum* gradient, hence ``√B`` on the mean
gradient; ``−½·I`` is the log-determinant (entropy) term of the Gaussian objective; the damping
``λ·I`` of the full Kronecker product reaches factor ``n`` scaled by the traces of the others.
The ``1/√d`` scaling of ``K̃`` and the ``numel`` factor cancel exactly (at ``K = I`` the
λ-term is ``(λ/2)·I``) but keep products O(1) in half precision. The factors are updated
*before* preconditioning, so the current gradient is used, as in the authors' code. With these
constants the seed tutorial's printed losses (0.359, 0.225, …, 0.033) are reproduced exactly.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from kronlab.distributed import DistributedConfig, WorkItem
from kronlab.factors.kronecker import unfold
from kronlab.groups.rules import LinearWeightBias, PerParameter, PreconditionerGroup
from kronlab.optim.base import (
    DEFAULT_RULES,
    KronOptimizer,
    NonFinitePolicy,
    ParamsT,
    with_renamed_group_keys,
)
from kronlab.optim.bundles import ParameterBundle
from kronlab.optim.registry import register_optimizer
from kronlab.optim.sirf_structures import DiagonalStructure, MatrixStructure, make_structure
from kronlab.optim.step_template import Direction, Slot, Stack, Work
from kronlab.optim.validation import check_module, check_range

HALF_DTYPES = (torch.float16, torch.bfloat16)
StructureSpec = str | tuple[str, ...]
DtypeSpec = torch.dtype | None | tuple[torch.dtype | None, ...]


@dataclass(frozen=True)
class FactorPlan:
    """One bundle's factors: a structure and a dtype per axis of its grouped tensor."""

    structures: tuple[MatrixStructure, ...]
    dtypes: tuple[torch.dtype, ...]


def update_factors(
    grad: Tensor,
    factors: Sequence[Tensor],
    momenta: Sequence[Tensor],
    structures: Sequence[MatrixStructure],
    *,
    batch_size: int,
    alpha2: float,
    beta2: float,
    lam: float,
) -> None:
    """One Riemannian step of every ``K_n`` and its momentum ``m_n`` in place (module docstring).

    Also on stacks: ``grad`` ``(S, *dims)`` with factor and momentum storage ``(S, *storage)``
    steps ``S`` same-structure bundles in one batched call per axis.

    Host-sync free: the trace products and step sizes stay 0-dim tensors; every Python-float
    coefficient is folded into a fused GEMM or ``addcmul``.
    """
    lead = structures[0].lead(factors[0])
    dims = grad.shape[lead:]
    numel = math.prod(dims)
    # GK = √B·G ×_j K̃_jᵀ = √(B/numel)·G ×_j K_jᵀ: one scalar on G instead of a pass per K_j,
    # applied first so that half-precision products stay as small as the reference's.
    projected = grad.to(factors[0].dtype) * math.sqrt(batch_size / numel)
    for axis, (structure, factor) in enumerate(zip(structures, factors)):
        projected = structure.apply(factor, projected.to(factor.dtype), axis, transpose=True)
    traces = [
        structure.frobenius_norm(factor).square() / dim**2
        for structure, factor, dim in zip(structures, factors, dims)
    ]
    for axis, (structure, factor, momentum) in enumerate(zip(structures, factors, momenta)):
        dim = dims[axis]
        columns = _unfold(projected, axis, lead).to(momentum.dtype)
        structure.accumulate_outer_(momentum, columns, alpha=(1 - alpha2) * dim / 2, beta=alpha2)
        if lam != 0.0:
            damping = (1 - alpha2) * lam / 2 * numel / dim  # Π(K̃ᵀK̃) = Π(KᵀK)/d
            gram = structure.gram(factor)
            others = [trace for index, trace in enumerate(traces) if index != axis]
            if others:
                trace_product = structure.per_matrix(math.prod(others).to(momentum.dtype))
                momentum.addcmul_(gram, trace_product, value=damping)
            else:
                momentum.add_(gram, alpha=damping)
        structure.add_to_diagonal_(momentum, -(1 - alpha2) / 2)
        rate = structure.per_matrix(beta2 / structure.frobenius_norm(momentum).clamp(min=1.0))
        factor.addcmul_(structure.matmul(factor, momentum.to(factor.dtype)), rate, value=-1.0)


def precondition(
    grad: Tensor, factors: Sequence[Tensor], structures: Sequence[MatrixStructure]
) -> Tensor:
    """``G ×_1 K_1K_1ᵀ ⋯ ×_N K_NK_Nᵀ`` (also on stacks, as ``update_factors``).

    Half-precision factors are applied as ``K/s`` with ``s = max(√max|K|, 1)`` and the result
    multiplied by ``s²`` (overflow guard of the reference code); wider dtypes need no guard.
    """
    result = grad
    for axis, (structure, factor) in enumerate(zip(structures, factors)):
        result = result.to(factor.dtype)
        scale = None
        if factor.dtype in HALF_DTYPES:
            scale = structure.max_abs(factor).sqrt().clamp(min=1.0)
            factor = factor / structure.per_matrix(scale)
        result = structure.apply(factor, structure.apply(factor, result, axis, True), axis)
        if scale is not None:
            lead = structure.lead(factor)
            result = result * scale.square().reshape(*scale.shape, *[1] * (result.ndim - lead))
    return result


def _unfold(tensor: Tensor, axis: int, lead: int) -> Tensor:
    """Mode-``axis`` unfolding of a tensor (``lead = 0``) or of each tensor of a stack (1)."""
    if lead:
        return unfold(tensor, axis)
    return unfold(tensor.unsqueeze(0), axis).squeeze(0)


def _data_parallel_world_size(model: nn.Module) -> int:
    """Ranks a ``DistributedDataParallel`` wrapper, or FSDP2's ``fully_shard``, averages
    gradients over (1 otherwise)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return torch.distributed.get_world_size(model.process_group)
    if isinstance(model, FSDPModule):
        # the mesh its parameters are sharded over (every mesh dimension splits the batch)
        sharded = (p for p in model.parameters() if isinstance(p, DTensor))
        return next((p.device_mesh.size() for p in sharded), 1)
    return 1


def factor_update_due(schedule: int | Callable[[int], bool], step: int) -> bool:
    """Whether the factors are updated at 0-based ``step``: ``step % T == 0``, or ``T(step)``."""
    return bool(schedule(step)) if callable(schedule) else step % schedule == 0


class SIRFShampoo(KronOptimizer):
    """Structured inverse- and root-free Shampoo (Lin et al., ICML 2024); see the module docs.

    Args:
        model: the model; its forward pre-hook counts the batch size ``B`` (the sum of the
            leading dims of the first input of every training-mode forward since the last step,
            so gradient accumulation over micro-batches counts them all; none counted: ``B = 1``,
            with a warning the first time) and grouping rules find its layers.
        params: parameters or param groups (default: all trainable parameters of ``model``);
            a group may set its own ``combine_params``, ``structures``, ... .
        lr: parameter step size (β1 in the paper). The class keeps the paper's defaults; the
            registry's ``sirfshampoo`` (``create_optimizer``) uses lr 0.01, ``beta2=0.5`` and
            ``lam=0.1``, tuned for short runs (BENCHMARKS.md, "SIRFShampoo's lag").
        beta2: factor step size, in ``[0, 1]`` (not an EMA rate as Shampoo's ``betas[1]``).
        momentum: parameter momentum ``buf ← momentum·buf + step``, ``[0, 1)`` (the paper's
            and sirfshampoo's ``alpha1``; torch.optim's name).
        alpha2: factor (Riemannian) momentum, ``[0, 1)``.
        lam: damping λ ≥ 0.
        weight_decay: κ ≥ 0, ``step ← PG + κ·p`` before momentum (sirfshampoo's ``kappa``).
        T: factor update every ``T`` steps, or a callable ``step -> bool`` on the 0-based step.
            Fixed at construction: it is not saved by ``state_dict`` (callables cannot be).
        structures: one name for every axis or a tuple with one per axis of the grouped tensor:
            ``'dense'``, ``'diagonal'``, ``'block_diagonal'`` (``'block_diagonal:<b>'`` sets the
            block size), ``'lower_triangular'``, ``'upper_triangular'``.
        preconditioner_dtypes: factor dtypes, one or one per axis; ``None`` means the
            parameter's dtype, but float32 for 16-bit parameters.
        combine_params: grouping rules (``kronlab.groups``), first match wins.
        verbose_init: print the groups with their factors, e.g. ``'33x33 (DenseMatrix)'``.
        distributed: a ``kronlab.distributed.DistributedConfig`` to split the preconditioner
            work over the ranks of a process group (see ``kronlab.optim.KronOptimizer``).
        data_parallel_size: how many processes' batches each gradient averages, so that ``B``
            is the global batch (the hook only sees this process's inputs). ``None``: the world
            size of ``model``'s process group when ``model`` is a ``DistributedDataParallel``
            wrapper, the size of its parameters' mesh when ``fully_shard`` (FSDP2) made it,
            else 1; pass it when the model is wrapped after the optimizer is built.
        on_nonfinite_grad: see ``KronOptimizer``. The update itself never synchronizes with the
            host; the default ``"skip"`` check costs one sync per step, ``"ignore"`` none.
    """

    structural_keys: ClassVar[tuple[str, ...]] = ("combine_params", "T")
    # heavy-ball momentum on the direction PG + κ·p (κ is the method's own, coupled, decay)
    momentum_on = "direction"
    momentum_ema = False
    decoupled_weight_decay = False
    # the factor plans are made from these at construction; T is a schedule, free to change
    variant_keys: ClassVar[tuple[str, ...]] = (
        "combine_params",
        "structures",
        "preconditioner_dtypes",
    )

    def __init__(
        self,
        model: nn.Module,
        params: ParamsT = None,
        lr: float = 1e-3,
        beta2: float = 0.01,
        momentum: float = 0.9,
        alpha2: float = 0.5,
        lam: float = 1e-3,
        weight_decay: float = 0.0,
        T: int | Callable[[int], bool] = 1,
        structures: StructureSpec = "dense",
        preconditioner_dtypes: DtypeSpec = None,
        combine_params: PreconditionerGroup | tuple[PreconditionerGroup, ...] = DEFAULT_RULES,
        verbose_init: bool = False,
        *,
        data_parallel_size: int | None = None,
        on_nonfinite_grad: NonFinitePolicy = "skip",
        distributed: DistributedConfig | None = None,
    ) -> None:
        check_module("model", model)
        if data_parallel_size is None:
            data_parallel_size = _data_parallel_world_size(model)
        check_range("data_parallel_size", data_parallel_size, 1, integer=True)
        self._data_parallel_size = data_parallel_size
        self._plans: dict[ParameterBundle, FactorPlan] = {}
        # The Python values a step reads and writes, items of a dict rather than attributes:
        # a compiled step (torch.compile) carries out a dict's item writes, but Dynamo drops
        # attribute writes on an optimizer object (the batch count would never be reset).
        self._step_values: dict[str, Any] = {
            "batch_size": 0,  # counted by the forward pre-hook since the last step
            "step_batch_size": 0,  # the batch size of the step being taken
            "due": [],  # per param group: whether this step updates the factors
            "no_forward": False,  # a factor update found no batch counted (batch size 1)
            "warned_no_forward": False,
        }
        defaults = dict(
            lr=lr,
            beta2=beta2,
            momentum=momentum,
            alpha2=alpha2,
            lam=lam,
            weight_decay=weight_decay,
            T=T,
            structures=structures,
            preconditioner_dtypes=preconditioner_dtypes,
        )
        super().__init__(
            params,
            defaults,
            model=model,
            combine_params=combine_params,
            on_nonfinite_grad=on_nonfinite_grad,
            verbose_init=verbose_init,
            distributed=distributed,
        )
        # A weak reference, so the hook neither keeps a discarded optimizer alive nor outlives it.
        optimizer_ref = weakref.ref(self)

        def count_batch_size(module: nn.Module, args: tuple, kwargs: dict) -> None:
            optimizer = optimizer_ref()
            if optimizer is not None:
                optimizer._count_batch_size(module, args, kwargs)

        handle = model.register_forward_pre_hook(count_batch_size, with_kwargs=True)
        weakref.finalize(self, handle.remove)

    # --- construction -----------------------------------------------------------------------
    def validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("beta2", group["beta2"], 0.0, 1.0)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_inclusive=False)
        check_range("alpha2", group["alpha2"], 0.0, 1.0, high_inclusive=False)
        check_range("lam", group["lam"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        schedule = group["T"]
        if not callable(schedule):
            check_range("T", schedule, 1, integer=True)
        for spec in _as_tuple(group["structures"]):
            try:
                make_structure(spec, 1)
            except ValueError as error:
                raise ValueError(f"structures: {error}") from None
        for dtype in _as_tuple(group["preconditioner_dtypes"]):
            if dtype is not None and not (
                isinstance(dtype, torch.dtype) and dtype.is_floating_point
            ):
                raise ValueError(
                    f"Invalid preconditioner_dtypes: {group['preconditioner_dtypes']!r} "
                    "(allowed: None, a floating torch.dtype, or a tuple of them, one per axis)"
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        first_new = len(self.bundles)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for bundle in self.bundles[first_new:]:
                self._plans[bundle] = _plan_factors(bundle, group)
        except ValueError:
            for bundle in self.bundles[first_new:]:
                self._plans.pop(bundle, None)
            del self.bundles[first_new:]
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # checkpoints written when momentum and weight_decay were alpha1 and kappa
        renamed = {"alpha1": "momentum", "kappa": "weight_decay"}
        super().load_state_dict(with_renamed_group_keys(state_dict, renamed))

    @property
    def pending_batch_size(self) -> int:
        """Examples counted by the forward pre-hook since the last step (``B`` of the next)."""
        return self._step_values["batch_size"]

    def describe_preconditioner(self, bundle: ParameterBundle) -> list[str]:
        return [structure.describe() for structure in self._plans[bundle].structures]

    def distributed_work_items(self) -> list[WorkItem]:
        """Each axis's factor as the cost model's Kronecker factor: a dense (or triangular)
        ``K`` costs ~d³ per factor update (every step by default, no amortization), a block
        diagonal one ~d·b² (``d/b`` factors of size ``b``), a diagonal one nothing beyond the
        elementwise passes. Vectors get dense factors too (SIRFShampoo's default)."""
        items = []
        for index, bundle in enumerate(self.bundles):
            dims: list[int] = []
            for structure in self._plans[bundle].structures:
                if not isinstance(structure, DiagonalStructure):
                    block = getattr(structure, "block_size", structure.dim)
                    dims += [block] * getattr(structure, "num_blocks", 1)
            interval = self.param_groups[bundle.group_index]["T"]
            refresh = interval if isinstance(interval, int) else 1
            items.append(WorkItem(index, tuple(bundle.grouped_shape), tuple(dims), 1, refresh))
        return items

    def describe_options(self, bundle: ParameterBundle) -> dict[str, Any]:
        """The group's settings with ``structures`` and ``preconditioner_dtypes`` resolved per
        axis of this bundle (e.g. ``('dense', 'dense')``, ``(torch.float32, torch.float32)``)."""
        options = super().describe_options(bundle)
        dims = tuple(bundle.grouped_shape)
        options["structures"] = _per_axis("structures", options["structures"], bundle, dims)
        options["preconditioner_dtypes"] = self._plans[bundle].dtypes
        return options

    def _count_batch_size(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if not module.training:
            return
        first = next(
            (x for x in (*args, *kwargs.values()) if isinstance(x, Tensor) and x.ndim > 0), None
        )
        if first is not None:
            # A Python int (no host sync); DDP averages the gradient over every rank's batch.
            self._step_values["batch_size"] += first.shape[0] * self._data_parallel_size

    # --- stepping ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = super().step(closure)
        values = self._step_values
        values["batch_size"] = 0  # also after a skipped (non-finite) step: not reused
        # Once: a warning breaks a compiled step's graph (Dynamo cannot trace it), and here
        # rather than in the per-stack code, where Dynamo would compile the rest of that code
        # once per stack shape and then trace it with dynamic shapes (which fails).
        if values["no_forward"] and not values["warned_no_forward"]:
            values["warned_no_forward"] = True
            warnings.warn(
                "SIRFShampoo saw no training-mode forward pass before a step; its factor "
                "update used batch size 1 (warned once)",
                RuntimeWarning,
                stacklevel=4,  # the caller of step (past no_grad and the step hooks)
            )
        return loss

    def update(self) -> None:
        """The template's stages over stacks of same-structure bundles; which groups update
        their factors this step (``T``) and the batch size are decided once per step."""
        step = self.global_step - 1  # 0-based, as T's callable sees it
        values = self._step_values
        batch_size, values["batch_size"] = values["batch_size"], 0
        # T is asked once per group and step: a stateful callable sees every step exactly once.
        values["due"] = [factor_update_due(group["T"], step) for group in self.param_groups]
        if batch_size == 0 and any(values["due"]):
            batch_size = 1
            values["no_forward"] = True  # warned by step, once per optimizer
        values["step_batch_size"] = batch_size
        super().update()

    def work(self, bundle: ParameterBundle) -> list[Work]:
        """The grouped tensor; bundles share a stack when their factor structures and dtypes
        agree."""
        plan = self._plans[bundle]
        key = (tuple(s.describe() for s in plan.structures), plan.dtypes)
        return [Work(tuple(bundle.grouped_shape), bundle.key.dtype, key)]

    def direction(
        self, stack: Stack, slots: list[Slot], gradients: list[Tensor], group: dict[str, Any]
    ) -> Direction:
        """Factor step (when due), then ``PG + κ·p``, for the whole stack at once.

        A stack of one bundle runs on the bundle's own tensors (no stack dim: no copy of the
        gradient, and the 2-D kernels, which are faster than batched ones of batch 1)."""
        plan = self._plans[slots[0].bundle]
        states = [self._bundle_state(slot.bundle, plan) for slot in slots]
        single = len(slots) == 1

        def factor_stacks(name: str) -> list[Tensor]:
            if single:
                return states[0][name]
            # the per-bundle entries are views of these stacks, reused from step to step
            return [
                self.stacked_state.stack((stack.index, name, axis), states, name, axis)
                for axis in range(len(plan.structures))
            ]

        factors = factor_stacks("factors")
        grad = gradients[0] if single else torch.stack(gradients)
        if plan.structures and self._step_values["due"][stack.group_index]:
            update_factors(
                grad,
                factors,
                factor_stacks("factor_momenta"),
                plan.structures,
                batch_size=self._step_values["step_batch_size"],
                alpha2=group["alpha2"],
                beta2=group["beta2"],
                lam=group["lam"],
            )
        direction = precondition(grad, factors, plan.structures)
        if direction.dtype in HALF_DTYPES:
            direction = direction.float()
        if group["weight_decay"] != 0.0:
            values = [slot.bundle.value() for slot in slots]
            value = values[0] if single else torch.stack(values)
            direction = direction.add(value.to(direction.dtype), alpha=group["weight_decay"])
        return Direction([direction] if single else direction.unbind(0), group["lr"])

    def _bundle_state(self, bundle: ParameterBundle, plan: FactorPlan) -> dict[str, Any]:
        state = self.state[bundle.key]
        if "factors" not in state:
            device = bundle.key.device
            state["factors"] = [
                s.identity(dtype, device) for s, dtype in zip(plan.structures, plan.dtypes)
            ]
            state["factor_momenta"] = [
                s.zeros(dtype, device) for s, dtype in zip(plan.structures, plan.dtypes)
            ]
        return state


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _plan_factors(bundle: ParameterBundle, group: dict[str, Any]) -> FactorPlan:
    """Resolve a group's ``structures`` / ``preconditioner_dtypes`` for one bundle's axes."""
    dims = tuple(bundle.grouped_shape)
    structures = _per_axis("structures", group["structures"], bundle, dims)
    dtypes = _per_axis("preconditioner_dtypes", group["preconditioner_dtypes"], bundle, dims)
    param_dtype = bundle.key.dtype
    default_dtype = torch.float32 if param_dtype in HALF_DTYPES else param_dtype
    return FactorPlan(
        structures=tuple(make_structure(spec, dim) for spec, dim in zip(structures, dims)),
        dtypes=tuple(default_dtype if dtype is None else dtype for dtype in dtypes),
    )


def _per_axis(name: str, value: Any, bundle: ParameterBundle, dims: tuple[int, ...]) -> tuple:
    if not isinstance(value, (tuple, list)):
        return (value,) * len(dims)
    if len(value) != len(dims):
        raise ValueError(
            f"Invalid {name}: {value!r} (allowed: one value, or a tuple of {len(dims)} — one per "
            f"axis of the grouped tensor of shape {dims} for parameters {list(bundle.names)})"
        )
    return tuple(value)


@register_optimizer(
    "sirfshampoo",
    default_lr=0.01,
    summary="SIRFShampoo: inverse- and root-free Shampoo, dense factors (Lin et al., 2024)",
)
def _sirfshampoo(model: nn.Module, lr: float) -> SIRFShampoo:
    # Tuned for short runs (digits, charlm; BENCHMARKS.md "Convergence"): faster factor learning
    # (beta2) and stronger damping (lam) than the paper's defaults, which stay near the identity
    # for this short a run and diverge for lr >= 0.03 with lam = 1e-3.
    return SIRFShampoo(
        model, lr=lr, beta2=0.5, lam=0.1, combine_params=(LinearWeightBias(), PerParameter())
    )
