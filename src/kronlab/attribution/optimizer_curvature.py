"""Curvature for attribution from a trained optimizer's own Kronecker factors.

Shampoo keeps ``L ≈ E[G Gᵀ]`` and ``R ≈ E[Gᵀ G]``; ``L ⊗ R`` is, up to a scalar, the best
Kronecker approximation of the gradient second moment (Morwani et al. 2024), so its eigenvectors
and eigenvalue products act as a K-FAC curvature. SOAP / eigenvalue-corrected Shampoo (Vyas et
al. 2024) also keeps the second moment in that eigenbasis, ``E ≈ E[(Q_Lᵀ G Q_R)²]``, which is
EK-FAC's eigenvalue correction. The scalar scale does not matter under relative damping.

Interface (``kronlab.optim.Shampoo`` / ``SOAP``, or anything duck-typed like them):
``optimizer.kronecker_factors(param)`` returns the blocks of the bundle holding ``param``, each
with ``block_shape``, ``factors`` ``[L, R]``, ``eigenvectors`` ``[Q_L, Q_R]`` or ``None``,
``eigenvalues`` ``[λ_L, λ_R]`` or ``None``, ``second_moment`` or ``None``, and optionally
``factor_bias_correction`` / ``eigenvalue_bias_correction``. A tracked module is usable when its
weight (with the bias as a last column if the optimizer groups them, ``LinearWeightBias``) is
one unblocked, unmerged block in the parameter's own dims (size-1 dims dropped): ``(out, in)``
for ``nn.Linear``, ``(out, C, kh, kw)`` for ``nn.Conv2d`` (one factor per dim; the input side
is their Kronecker product), ``(in, out)`` for Conv1D, ``(vocab, dim)`` for embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kronlab.curvature import layer_spec
from kronlab.curvature.layers import tracked_weight
from kronlab.factors import KroneckerEigenbasis
from kronlab.linalg import eigh, rayleigh_quotients


def optimizer_eigenbases(
    optimizer: Any, tracked: dict[str, nn.Module]
) -> dict[str, KroneckerEigenbasis]:
    """Each ``tracked`` module's ``(output, input)`` eigenbasis, converted from the optimizer's."""
    exporter = getattr(optimizer, "kronecker_factors", None)
    if not callable(exporter):
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__} exposes no kronecker_factors() "
            "(allowed: Shampoo/SOAP-style optimizers with two-factor preconditioners)"
        )
    fitted, unusable = {}, []
    for name, module in tracked.items():
        try:
            blocks = exporter(tracked_weight(module))
        except ValueError:  # the optimizer does not hold this parameter
            blocks = []
        layout = _block_layout(module, blocks[0]) if len(blocks) == 1 else None
        if layout is None:
            unusable.append(name)
            continue
        fitted[name] = _module_eigenbasis(name, module, blocks[0], layout)
    if unusable:
        raise ValueError(
            f"the optimizer has no single Kronecker block in the weight's own dims for modules "
            f"{unusable} (not optimized, not stepped yet, blocked, dims merged: use "
            "merge_dims=False, or vector-preconditioned); pass modules= to select those it has"
        )
    return fitted


def _block_layout(module: nn.Module, block: Any) -> tuple[int, ...] | None:
    """The weight's shape as the optimizer grouped it (bias as an extra column for
    ``LinearWeightBias``), if the block is that shape with size-1 dims dropped."""
    spec = layer_spec(module)
    assert spec is not None
    for candidate in spec.adapter.grouped_shapes(module):
        kept = tuple(size for size in candidate if size != 1)
        if kept and tuple(block.block_shape) == kept and len(block.factors) == len(kept):
            return candidate
    return None


def _module_eigenbasis(
    name: str, module: nn.Module, block: Any, grouped_shape: tuple[int, ...]
) -> KroneckerEigenbasis:
    """Map the block's per-dim factors onto K-FAC's (output, input) sides: the input side of a
    convolution ``(out, C, kh, kw)`` is ``Q_C ⊗ Q_kh ⊗ Q_kw`` (the unfold order)."""
    spec = layer_spec(module)
    assert spec is not None
    vectors, values = _eigen_pairs(name, block)
    reference = vectors[0]
    # Size-1 dims have no factor in the block: their eigenpair is (1, 1).
    unit = (reference.new_ones(1, 1), reference.new_ones(1))
    pairs = iter(zip(vectors, values))
    per_dim = [next(pairs) if size != 1 else unit for size in grouped_shape]
    # Conv1D and embedding weights are stored (in, out): their row factor is the input side.
    output_axis = spec.adapter.output_axis
    input_axes = [axis for axis in range(len(grouped_shape)) if axis != output_axis]
    output_vectors, output_values = per_dim[output_axis]
    input_vectors, input_values = per_dim[input_axes[0]]
    for axis in input_axes[1:]:
        input_vectors = torch.kron(input_vectors, per_dim[axis][0])
        input_values = torch.kron(input_values, per_dim[axis][1].to(input_values.dtype))
    corrected = block.second_moment
    if corrected is not None:
        corrected = corrected.detach() / getattr(block, "eigenvalue_bias_correction", 1.0)
        corrected = corrected.reshape(grouped_shape).movedim(output_axis, 0)
        corrected = corrected.reshape(spec.d_out, -1)
    vectors = [output_vectors, input_vectors]
    values = [output_values.to(output_vectors.dtype), input_values.to(input_vectors.dtype)]
    if input_vectors.shape[-1] != spec.d_in:  # the optimizer preconditioned the weight alone
        vectors, values, corrected = _append_bias_direction(vectors, values, corrected)
    return KroneckerEigenbasis(
        (vectors[0].contiguous(), vectors[1].contiguous()),
        (values[0].clamp_min(0), values[1].clamp_min(0)),
        corrected,
    )


def _eigen_pairs(name: str, block: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Eigenvectors and eigenvalues of ``L`` and ``R``: the optimizer's own, or ``eigh``."""
    factors = [f.detach() / getattr(block, "factor_bias_correction", 1.0) for f in block.factors]
    if block.eigenvectors is None:
        decompositions = [eigh(factor, float64=True) for factor in factors]
        if not all(bool(d.ok) for d in decompositions):
            raise ValueError(f"non-finite optimizer factors for module {name!r}")
        return [d.eigenvectors for d in decompositions], [d.eigenvalues for d in decompositions]
    vectors = [q.detach() for q in block.eigenvectors]
    # Rayleigh quotients diag(Qᵀ F Q): exact eigenvalues for a fresh basis, and the factors'
    # spectrum in the optimizer's (possibly stale) basis otherwise.
    values = [rayleigh_quotients(f.to(q.dtype), q) for q, f in zip(vectors, factors)]
    return vectors, values


def _append_bias_direction(
    vectors: list[torch.Tensor], values: list[torch.Tensor], corrected: torch.Tensor | None
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """The optimizer preconditioned the weight alone: the bias column gets its own direction
    with the mean eigenvalue (a neutral choice under relative damping)."""
    input_vectors = torch.block_diag(vectors[1], vectors[1].new_ones(1, 1))
    input_values = torch.cat([values[1], values[1].mean().reshape(1)])
    if corrected is not None:
        corrected = torch.cat([corrected, corrected.mean(1, keepdim=True)], dim=1)
    return [vectors[0], input_vectors], [values[0], input_values], corrected
