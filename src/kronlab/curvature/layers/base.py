"""The layer-adapter interface: how one tracked layer type becomes K-FAC's ``s_t = W a_t (+ b)``.

Every tracked layer computes, per token ``t``, ``s_t = W a_t (+ b)``; its weight gradient for one
example is ``G = Σ_t g_t a_tᵀ`` with ``g_t = ∂loss/∂s_t``, and with a bias ``a_t`` gets an
appended 1 so the last column of ``G`` is the bias gradient (Martens & Grosse 2015; Grosse &
Martens 2016 for convolutions). ``G`` always has shape ``(d_out, d_in [+1])``.

A :class:`LayerAdapter` subclass says, for one module type, what ``W`` is as a matrix, what its
tokens' ``a_t`` and ``g_t`` are, and which axis of the weight is K-FAC's output side (for
optimizers that precondition the weight in its own dims). Defining a subclass with
``kind="name"`` registers it; the default methods are those of a dense ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from kronlab.curvature.attention import Record
    from kronlab.curvature.hooks import LayerBatch

    RecordFor = Callable[[str], Record]  # a tracked module's name → where its calls go
    Undo = Callable[[], None]

# Registered adapters by kind, in registration order (the order modules are matched in).
_ADAPTERS: dict[str, LayerAdapter] = {}


@dataclass(frozen=True)
class LayerSpec:
    """Shape of a tracked module's gradient matrix ``G ∈ R^{d_out × d_in}`` (bias included).

    ``kind`` names the :class:`LayerAdapter` that handles the module; it is saved with fitted
    curvatures, so a registered kind keeps its name.
    """

    kind: str
    d_out: int
    d_in: int
    has_bias: bool

    @property
    def adapter(self) -> LayerAdapter:
        """The registered adapter for this kind of layer."""
        adapter = _ADAPTERS.get(self.kind)
        if adapter is None:
            raise ValueError(f"Invalid layer kind: {self.kind!r} (allowed: {', '.join(_ADAPTERS)})")
        return adapter

    @property
    def diagonal_activation(self) -> bool:
        """Whether ``A = mean a aᵀ`` is kept as its diagonal (one-hot ``a_t``: embeddings)."""
        return self.adapter.diagonal_activation

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "d_out": self.d_out,
            "d_in": self.d_in,
            "has_bias": self.has_bias,
        }


class LayerAdapter:
    """How K-FAC sees one type of module; subclass with ``kind="name"`` to register one.

    Class attributes: ``description`` (how error messages name the trackable modules),
    ``diagonal_activation`` (``a_t`` one-hot, so only ``diag A`` is kept), ``hooked`` (a forward
    hook sees the module's input and ``s``; ``False`` when the module is recorded from inside
    another forward), ``output_axis`` (the weight axis that is ``G``'s rows).
    """

    kind: ClassVar[str]
    description: ClassVar[str]
    diagonal_activation: ClassVar[bool] = False
    hooked: ClassVar[bool] = True
    output_axis: ClassVar[int] = 0

    def __init_subclass__(cls, kind: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if kind is None:
            return
        if kind in _ADAPTERS:
            raise ValueError(f"Invalid layer kind: {kind!r} is already registered")
        cls.kind = kind
        if not hasattr(cls, "description"):
            cls.description = kind
        _ADAPTERS[kind] = cls()

    # -- which modules, and their shapes --------------------------------------------------------

    def matches(self, module: nn.Module) -> bool:
        """Whether this adapter handles ``module``'s type (the first registered match wins)."""
        raise NotImplementedError

    def trackable(self, module: nn.Module) -> bool:
        """Whether this configuration of a matched module can be tracked."""
        return True

    def reroute(
        self, model: nn.Module, tracked: dict[str, nn.Module], record_for: RecordFor
    ) -> list[Undo]:
        """Make the calls no forward hook sees visible while the hooks record: patch the
        modules of ``model`` that apply a ``tracked`` layer inside a fused call so they hand
        its ``(inputs, outputs)`` to ``record_for(name)``; returns the callables that undo it.
        Hooked layers need none."""
        return []

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The parameter the block belongs to."""
        return module.weight

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        bias = getattr(module, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def weight_dims(self, module: nn.Module) -> tuple[int, int]:
        """``(d_out, d_in)`` of ``W`` as a matrix, without the bias column."""
        return module.out_features, module.in_features

    def spec(self, module: nn.Module, include_bias: bool) -> LayerSpec | None:
        """The module's :class:`LayerSpec`, or ``None`` if it cannot be tracked."""
        if not self.trackable(module):
            return None
        d_out, d_in = self.weight_dims(module)
        has_bias = include_bias and self.bias(module) is not None
        return LayerSpec(self.kind, d_out, d_in + int(has_bias), has_bias)

    # -- weight ↔ matrix ------------------------------------------------------------------------

    def weight_matrix(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor as ``(d_out, d_in)`` (``nn.Linear``: itself)."""
        return weight

    def matrix_weight(self, module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`weight_matrix` for ``(..., d_out, d_in)``: ``(..., *weight shape)``."""
        return matrix

    def grouped_shapes(self, module: nn.Module) -> list[tuple[int, ...]]:
        """Shapes an optimizer may precondition the weight in (its own dims, first)."""
        return [tuple(self.weight(module).shape)]

    # -- tokens -----------------------------------------------------------------------------

    def token_inputs(self, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The recorded input as ``(n, T, d_in)`` token vectors (no bias column)."""
        if inputs.ndim < 2:
            raise ValueError(f"expected batched input to a {self.kind} module, got {inputs.shape}")
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])

    def token_gradients(
        self, module: nn.Module, output_gradient: torch.Tensor, n: int, d_out: int
    ) -> torch.Tensor:
        """``∂loss/∂output`` as ``(n, T, d_out)``, the same tokens as :meth:`token_inputs`."""
        return output_gradient.reshape(n, -1, d_out)

    def token_mask(
        self, module: nn.Module, inputs: torch.Tensor, token_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The tokens that count, given the caller's mask (``None``: all)."""
        return token_mask

    def activations(self, layer: LayerBatch) -> torch.Tensor:
        """K-FAC's ``a_t`` ``(n, T, d_in [+1])``: bias 1 appended, masked tokens zero."""
        activations = layer.inputs
        if layer.spec.has_bias:
            ones = activations.new_ones(*activations.shape[:2], 1)
            activations = torch.cat([activations, ones], dim=-1)
        if layer.token_mask is not None:
            activations = activations * layer.token_mask.to(activations.dtype).unsqueeze(-1)
        return activations

    def activation_outer_sum(self, layer: LayerBatch) -> torch.Tensor:
        """``Σ_t a_t a_tᵀ`` over the batch's tokens in float64 (masked ones are zero)."""
        activations = layer.activations.reshape(-1, layer.spec.d_in).double()
        return activations.transpose(0, 1) @ activations

    def example_gradients(
        self, layer: LayerBatch, gradients: torch.Tensor, input_side: torch.Tensor | None
    ) -> torch.Tensor:
        """``Σ_t g_t (P_A a_t)ᵀ`` per example, one batched ``(n, p_S, T) @ (n, T, p_A)``.

        ``gradients`` ``(n, T, p_S)`` are ``layer.gradients``, already output-projected. With a
        bias, ``P_A [x_t; 1] = P_W x_t + p_b`` is one fused multiply-add, so the ``[x_t; 1]``
        copy is never made; masked tokens are not zeroed there (their ``g_t`` is).
        """
        if input_side is None:
            projected = layer.activations
        elif layer.spec.has_bias:
            side = input_side.to(gradients.dtype)
            projected = F.linear(layer.inputs, side[:, :-1], side[:, -1])
        else:
            projected = layer.inputs @ input_side.to(gradients.dtype).transpose(0, 1)
        return gradients.transpose(1, 2) @ projected


def registered_adapters() -> tuple[LayerAdapter, ...]:
    """Every registered adapter, in the order modules are matched against them."""
    return tuple(_ADAPTERS.values())
