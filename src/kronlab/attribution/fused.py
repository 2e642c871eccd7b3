"""Opt-in execution option: run known unfused activations through torch's fused kernels.

Hugging Face writes several GELU variants as chains of elementwise ops; on CPU these dominate a
small model's forward and backward (GPT-2's ``gelu_new``: about eight elementwise kernels
forward, more backward, each a pass over the ``(n, T, 4d)`` activations). Each listed module
computes exactly the function of one of torch's fused GELU kernels (Hendrycks & Gimpel 2016):

- tanh form ``½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))`` = ``F.gelu(x, approximate="tanh")``:
  ``NewGELUActivation`` (``gelu_new``), ``FastGELUActivation`` (``gelu_fast``, the same
  polynomial factored as ``x · 0.7978845608 · (1 + 0.044715 x²)``; the constant is √(2/π) to
  10 digits, below float32's resolution), ``AccurateGELUActivation`` (``gelu_accurate``) and
  ``GELUTanh(use_gelu_tanh_python=True)`` (``gelu_python_tanh``);
- erf form ``½ x (1 + erf(x / √2))`` = ``F.gelu(x)``: ``GELUActivation(use_gelu_python=True)``
  (``gelu_python``).

So the model's function is unchanged; only the rounding differs (float32: a few ulps of the
activations, checked against a float64 evaluation of the definition in the tests). The swap
lasts for the ``with`` block and is undone on exit, also on error; parameters, buffers and the
state dict are untouched (the replaced modules have none). Not listed, so left alone:
activations with no equal fused kernel (``quick_gelu``'s ``x σ(1.702 x)``, clipped GELUs) and
modules that already call a fused kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_HF_ACTIVATIONS = "transformers.activations"
# Class name in transformers.activations -> approximate= of the equal fused F.gelu.
_ALWAYS_FUSABLE = {
    "NewGELUActivation": "tanh",
    "FastGELUActivation": "tanh",
    "AccurateGELUActivation": "tanh",
}
# Classes that hold their function in ``self.act``: fusable only for the Python variant.
_PYTHON_VARIANTS = {
    "GELUTanh": ("_gelu_tanh_python", "tanh"),
    "PytorchGELUTanh": ("_gelu_tanh_python", "tanh"),
    "GELUActivation": ("_gelu_python", "none"),
}


def fused_equivalent(module: nn.Module) -> nn.Module | None:
    """The fused ``nn.GELU`` computing ``module``'s function, or ``None`` if there is none."""
    cls = type(module)
    if cls.__module__ != _HF_ACTIVATIONS:
        return None
    approximate = _ALWAYS_FUSABLE.get(cls.__name__)
    if approximate is None and cls.__name__ in _PYTHON_VARIANTS:
        method, form = _PYTHON_VARIANTS[cls.__name__]
        act = getattr(module, "act", None)
        if getattr(act, "__func__", None) is getattr(cls, method, object()):
            approximate = form
    return None if approximate is None else nn.GELU(approximate=approximate)


@contextmanager
def fused_activations(model: nn.Module) -> Iterator[int]:
    """Within the block, every submodule :func:`fused_equivalent` recognizes is replaced by its
    fused ``nn.GELU``; yields how many module slots were replaced. A module shared by several
    parents gets one shared replacement; all originals are put back on exit."""
    replacements: dict[int, nn.Module] = {}
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                if child is None:
                    continue
                if id(child) not in replacements:
                    fused = fused_equivalent(child)
                    if fused is None:
                        continue
                    replacements[id(child)] = fused
                setattr(parent, name, replacements[id(child)])
                swapped.append((parent, name, child))
        yield len(swapped)
    finally:
        for parent, name, original in reversed(swapped):
            setattr(parent, name, original)
