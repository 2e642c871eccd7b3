"""Hyperparameter checks that name the argument, its value and the allowed range."""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection

from torch import nn


def check_range(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
    or_infinity: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a number in ``[low, high]`` (bounds optional).

    ``integer=True`` asks for a real integer (``int`` or a NumPy integer, not ``bool``): a
    whole-number float such as ``4.0`` is refused here rather than crashing later in a
    ``range()`` or a shape. Infinities are refused (an infinite learning rate or damping only
    fails steps later) unless ``or_infinity=True`` (e.g. "never", "no limit").
    """
    allowed = _describe_range(name, low, high, low_inclusive, high_inclusive, integer, or_infinity)
    if isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")
    if integer:
        valid = isinstance(value, numbers.Integral) or (or_infinity and value == math.inf)
    else:
        valid = (
            isinstance(value, (int, float))
            and not math.isnan(value)
            and (or_infinity or not math.isinf(value))
        )
    if not valid:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")
    too_low = low is not None and (value < low or (not low_inclusive and value == low))
    too_high = high is not None and (value > high or (not high_inclusive and value == high))
    if too_low or too_high:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")


def check_choice(name: str, value: object, choices: Collection[object]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {', '.join(map(repr, choices))})")


def check_betas(name: str, betas: object, count: int = 2, *, high_inclusive: bool = True) -> None:
    """Raise ``ValueError`` unless ``betas`` is a sequence of ``count`` numbers in ``[0, 1]``."""
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(
            f"Invalid {name}: {betas!r} (allowed: a tuple of {count} numbers in [0, 1])"
        )
    for index, beta in enumerate(betas):
        check_range(f"{name}[{index}]", beta, 0.0, 1.0, high_inclusive=high_inclusive)


def _describe_range(
    name: str,
    low: float | None,
    high: float | None,
    low_inclusive: bool,
    high_inclusive: bool,
    integer: bool,
    or_infinity: bool = False,
) -> str:
    kind = "an integer" if integer else "a number" if or_infinity else "a finite number"
    if integer and or_infinity:
        kind = "an integer or inf"
    parts = []
    if low is not None:
        parts.append(f"{low} {'<=' if low_inclusive else '<'} ")
    parts.append(name)
    if high is not None:
        parts.append(f" {'<=' if high_inclusive else '<'} {high}")
    return f"{kind}, {''.join(parts)}" if (low is not None or high is not None) else kind


def check_module(name: str, value: object, *, allow_none: bool = False) -> None:
    """Raise ``TypeError`` unless ``value`` is a ``torch.nn.Module`` (or ``None`` if allowed)."""
    if not isinstance(value, nn.Module) and not (allow_none and value is None):
        hint = " (pass the model itself, not model.parameters())" if _is_iterator(value) else ""
        raise TypeError(
            f"Invalid {name}: a {type(value).__name__} (expected a torch.nn.Module){hint}"
        )


def check_loss_fn(name: str, value: object) -> None:
    """Raise ``TypeError`` unless ``value`` is callable (as ``loss_fn(model, batch)``)."""
    if not callable(value):
        raise TypeError(
            f"Invalid {name}: a {type(value).__name__} (expected a callable "
            f"{name}(model, batch) returning the summed loss as a scalar tensor)"
        )


def _is_iterator(value: object) -> bool:
    return hasattr(value, "__next__") or isinstance(value, (list, tuple))


def check_params(value: object) -> None:
    """Raise ``TypeError`` if ``params`` is a module or tensor-less object rather than an
    iterable of tensors or param groups (``None`` passes: the optimizer then takes ``model=``)."""
    if isinstance(value, nn.Module):
        raise TypeError(
            f"Invalid params: a {type(value).__name__} module (expected an iterable of tensors "
            "or param groups: pass model.parameters(), or params=None with model=model)"
        )
    if value is not None and not hasattr(value, "__iter__"):
        raise TypeError(
            f"Invalid params: a {type(value).__name__} (expected an iterable of tensors "
            "or param groups, or None with model=)"
        )
