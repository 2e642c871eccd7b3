"""Finding the modules K-FAC can track, and mapping their weights to gradient matrices.

Which module types are trackable, and how, is the registered :class:`LayerAdapter` s' business
(one file each in this package); this module asks them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from kronlab.curvature.layers.base import LayerAdapter, LayerSpec, registered_adapters

_INCLUDE_BIAS: ContextVar[bool] = ContextVar("kronlab_include_bias", default=True)


@contextmanager
def bias_in_curvature(include: bool) -> Iterator[None]:
    """Within the block, tracked layers' biases are (default) or are not part of the curvature:
    with ``include=False`` a layer's ``G`` is its weight gradient alone, ``a_t`` gets no
    appended 1 and the bias is neither fitted nor scored (bergson's ``include_bias=False``)."""
    token = _INCLUDE_BIAS.set(include)
    try:
        yield
    finally:
        _INCLUDE_BIAS.reset(token)


def includes_bias() -> bool:
    """Whether biases are part of the curvature here (see :func:`bias_in_curvature`)."""
    return _INCLUDE_BIAS.get()


def layer_adapter(module: nn.Module) -> LayerAdapter | None:
    """The registered adapter for ``module``'s type (the first that matches), or ``None``."""
    return next((a for a in registered_adapters() if a.matches(module)), None)


def layer_spec(module: nn.Module) -> LayerSpec | None:
    """The module's :class:`LayerSpec`, or ``None`` if K-FAC cannot track it."""
    adapter = layer_adapter(module)
    return None if adapter is None else adapter.spec(module, _INCLUDE_BIAS.get())


def find_modules(
    model: nn.Module, patterns: str | list[str] | tuple[str, ...] | None = None
) -> dict[str, nn.Module]:
    """Tracked modules by name: all trackable ones, or those whose names match ``patterns``.

    ``patterns`` are exact module names or ``fnmatch`` globs (``"blocks.*.mlp.*"``). A pattern
    that matches no trackable module, or a model without any, raises ``ValueError``.
    """
    trackable = {name: module for name, module in model.named_modules() if layer_spec(module)}
    if not trackable:
        kinds = ", ".join(adapter.description for adapter in registered_adapters())
        raise ValueError(f"Invalid model: no trackable module ({kinds})")
    if patterns is None:
        return trackable
    if isinstance(patterns, str):
        patterns = [patterns]
    if len(patterns) == 0:
        raise ValueError("Invalid modules: [] (allowed: None or a non-empty list of patterns)")
    selected: dict[str, nn.Module] = {}
    for pattern in patterns:
        matches = [name for name in trackable if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise ValueError(
                f"Invalid modules pattern: {pattern!r} matches no trackable module "
                f"(trackable: {', '.join(sorted(trackable))})"
            )
        selected.update((name, trackable[name]) for name in matches)
    # Keep the model's module order so results are deterministic whatever the pattern order.
    return {name: module for name, module in trackable.items() if name in selected}


# Parts of a module's qualified name that mark attention in common models: GPT-2's
# ``attn.c_attn``, Llama's ``self_attn.q_proj``, BERT's ``attention.self.query``, torch's
# ``self_attn`` (an ``nn.MultiheadAttention``, whose ``out_proj`` lies inside it).
ATTENTION_NAME_PARTS = ("attn", "attention")


def is_attention(name: str, module: nn.Module) -> bool:
    """Whether the module ``name`` belongs to attention: an ``nn.MultiheadAttention``, or a
    part of its qualified name contains one of ``ATTENTION_NAME_PARTS``."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    parts = name.lower().split(".")
    return any(marker in part for part in parts for marker in ATTENTION_NAME_PARTS)


def find_modules_outside_attention(model: nn.Module) -> dict[str, nn.Module]:
    """Every trackable module of ``model`` outside attention (``is_attention``), or all of
    them when that leaves none: ``kronlab attribute``'s default, because tracking attention
    lowered the LDS on both text benchmarks (BENCHMARKS.md, "Tracked modules")."""
    trackable = find_modules(model)
    outside = {name: module for name, module in trackable.items() if not is_attention(name, module)}
    return outside or trackable


def tracked_weight(module: nn.Module) -> torch.Tensor:
    """The weight a tracked module's block belongs to (attention: ``in_proj_weight``)."""
    return _spec_or_raise(module).adapter.weight(module)


def gradient_matrix(
    module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``(d_out, d_in [+1])`` matrix from weight- (and bias-) shaped tensors, e.g. ``.grad``."""
    spec = _spec_or_raise(module)
    matrix = spec.adapter.weight_matrix(module, weight)
    if spec.has_bias:
        if bias is None:
            raise ValueError(f"module {type(module).__name__} has a bias; pass its tensor too")
        matrix = torch.cat([matrix, bias.reshape(-1, 1)], dim=1)
    return matrix


def parameters_from_matrix(
    module: nn.Module, matrix: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`gradient_matrix`: ``(weight-shaped, bias-shaped or None)``."""
    spec = _spec_or_raise(module)
    if matrix.shape[-2:] != (spec.d_out, spec.d_in):
        raise ValueError(
            f"Invalid matrix shape: {tuple(matrix.shape)} (allowed: (..., {spec.d_out}, "
            f"{spec.d_in}) for this {spec.kind} module)"
        )
    weight_part = matrix[..., : spec.d_in - int(spec.has_bias)]
    bias_part = matrix[..., spec.d_in - 1] if spec.has_bias else None
    return spec.adapter.matrix_weight(module, weight_part), bias_part


def _spec_or_raise(module: nn.Module) -> LayerSpec:
    spec = layer_spec(module)
    if spec is None:
        raise ValueError(f"Invalid module: {type(module).__name__} is not trackable by K-FAC")
    return spec
