"""Name → optimizer factory, so ``kronlab compare`` finds every optimizer without edits.

An optimizer module registers itself::

    @register_optimizer("soap", default_lr=3e-3, summary="Shampoo with Adam in its eigenbasis")
    def _soap(model: nn.Module, lr: float) -> Optimizer:
        return SOAP(model.parameters(), lr=lr)

``default_lr`` (and whatever the factory hard-codes) is tuned for the small default tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.optim import Optimizer

OptimizerFactory = Callable[[nn.Module, float], Optimizer]


@dataclass(frozen=True)
class RegisteredOptimizer:
    name: str
    factory: OptimizerFactory
    default_lr: float
    summary: str


_REGISTRY: dict[str, RegisteredOptimizer] = {}


def register_optimizer(
    name: str, *, default_lr: float, summary: str
) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Decorator registering ``factory(model, lr) -> Optimizer`` under ``name``."""

    def decorate(factory: OptimizerFactory) -> OptimizerFactory:
        if name in _REGISTRY:
            raise ValueError(f"optimizer {name!r} is already registered")
        _REGISTRY[name] = RegisteredOptimizer(name, factory, default_lr, summary)
        return factory

    return decorate


def available_optimizers() -> list[str]:
    return sorted(_REGISTRY)


def get_optimizer(name: str) -> RegisteredOptimizer:
    """The registry entry for ``name``; ``ValueError`` listing the available names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown optimizer {name!r}; available: {', '.join(available_optimizers())}"
        )
    return _REGISTRY[name]


def create_optimizer(name: str, model: nn.Module, lr: float | None = None) -> Optimizer:
    """Build the registered optimizer ``name`` for ``model`` (its default lr unless given)."""
    entry = get_optimizer(name)
    return entry.factory(model, entry.default_lr if lr is None else lr)
