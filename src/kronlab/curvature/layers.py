"""Which modules K-FAC can track, and how each one's weight maps to a gradient matrix.

Every tracked module computes ``s_t = W a_t (+ b)`` per token ``t``; its weight gradient for one
example is ``G = Σ_t g_t a_tᵀ`` with ``g_t = ∂loss/∂s_t`` and, with a bias, ``a_t`` gets an
appended 1 so the last column of ``G`` is the bias gradient (Martens & Grosse 2015, K-FAC;
Grosse & Martens 2016, KFC for convolutions). ``G`` always has shape ``(d_out, d_in [+1])``:

- ``nn.Linear``: weight ``(out, in)`` is ``G[:, :in]``.
- HF ``Conv1D`` (any class named ``Conv1D`` with ``weight (in, out)``, ``y = x W + b``): weight is
  ``G[:, :in]ᵀ``.
- ``nn.Conv2d`` (groups 1, zero padding): tokens are output positions, ``a_t`` the unfolded input
  patch; weight ``(out, C, kh, kw)`` is ``G[:, :C·kh·kw]`` reshaped.
- ``nn.Embedding``: ``a_t`` is the one-hot token, so the activation factor is diagonal; weight
  ``(vocab, dim)`` is ``Gᵀ``.
- ``nn.MultiheadAttention`` (packed ``in_proj_weight``): the module stands for its
  in-projection, one ``(3E, E [+1])`` block laid out as ``in_proj_weight`` (``in_proj_bias``);
  its ``out_proj`` is an ``nn.Linear`` of its own (see :mod:`kronlab.curvature.attention`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from kronlab.curvature.attention import packed_in_projection

LayerKind = Literal["linear", "conv1d", "conv2d", "embedding", "attention"]


@dataclass(frozen=True)
class LayerSpec:
    """Shape of a tracked module's gradient matrix ``G ∈ R^{d_out × d_in}`` (bias included)."""

    kind: LayerKind
    d_out: int
    d_in: int
    has_bias: bool

    @property
    def diagonal_activation(self) -> bool:
        """Embeddings: ``A = mean a aᵀ`` of one-hot tokens is diagonal (token frequencies)."""
        return self.kind == "embedding"

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "d_out": self.d_out,
            "d_in": self.d_in,
            "has_bias": self.has_bias,
        }


def _is_hf_conv1d(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and getattr(module, "nf", weight.shape[1]) == weight.shape[1]
    )


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


def layer_spec(module: nn.Module) -> LayerSpec | None:
    """The module's :class:`LayerSpec`, or ``None`` if K-FAC cannot track it."""
    bias = getattr(module, "bias", None)
    has_bias = isinstance(bias, torch.Tensor) and _INCLUDE_BIAS.get()
    extra = int(has_bias)
    if isinstance(module, nn.Linear):
        return LayerSpec("linear", module.out_features, module.in_features + extra, has_bias)
    if _is_hf_conv1d(module):
        d_in, d_out = module.weight.shape
        return LayerSpec("conv1d", d_out, d_in + extra, has_bias)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        patch = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        return LayerSpec("conv2d", module.out_channels, patch + extra, has_bias)
    if packed_in_projection(module):
        has_bias = module.in_proj_bias is not None
        width = module.embed_dim
        return LayerSpec("attention", 3 * width, width + int(has_bias), has_bias)
    if isinstance(module, nn.Embedding):
        if module.scale_grad_by_freq or module.max_norm is not None:
            return None
        return LayerSpec("embedding", module.embedding_dim, module.num_embeddings, False)
    return None


def find_modules(
    model: nn.Module, patterns: str | list[str] | tuple[str, ...] | None = None
) -> dict[str, nn.Module]:
    """Tracked modules by name: all trackable ones, or those whose names match ``patterns``.

    ``patterns`` are exact module names or ``fnmatch`` globs (``"blocks.*.mlp.*"``). A pattern
    that matches no trackable module, or a model without any, raises ``ValueError``.
    """
    trackable = {name: module for name, module in model.named_modules() if layer_spec(module)}
    if not trackable:
        raise ValueError(
            "Invalid model: no trackable module (nn.Linear, HF Conv1D, nn.Conv2d with groups=1 "
            "and zero padding, nn.Embedding without max_norm/scale_grad_by_freq, "
            "nn.MultiheadAttention)"
        )
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


def tracked_weight(module: nn.Module) -> torch.Tensor:
    """The weight a tracked module's block belongs to (attention: ``in_proj_weight``)."""
    if packed_in_projection(module):
        return module.in_proj_weight
    return module.weight


def gradient_matrix(
    module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``(d_out, d_in [+1])`` matrix from weight- (and bias-) shaped tensors, e.g. ``.grad``."""
    spec = _spec_or_raise(module)
    if spec.kind in ("linear", "attention"):
        matrix = weight
    elif spec.kind == "conv1d":
        matrix = weight.transpose(0, 1)
    elif spec.kind == "conv2d":
        matrix = weight.reshape(weight.shape[0], -1)
    else:
        matrix = weight.transpose(0, 1)
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
    if spec.kind in ("conv1d", "embedding"):
        weight_part = weight_part.transpose(-1, -2)
    elif spec.kind == "conv2d":
        weight_part = weight_part.reshape(*matrix.shape[:-2], *module.weight.shape)
    return weight_part, bias_part


def _spec_or_raise(module: nn.Module) -> LayerSpec:
    spec = layer_spec(module)
    if spec is None:
        raise ValueError(f"Invalid module: {type(module).__name__} is not trackable by K-FAC")
    return spec
