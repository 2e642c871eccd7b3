"""kronlab: Kronecker-factored second-order methods for PyTorch.

Optimizers (``kronlab.optim``) and influence functions (``kronlab.attribution``) on one
numerical core (``kronlab.linalg``, ``kronlab.factors``, ``kronlab.groups``); the seed projects'
names in ``kronlab.compat``. Subpackages are imported on first access (``kronlab.optim`` after
``import kronlab``), so ``import kronlab`` stays cheap.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"

SUBPACKAGES = (
    "attribution",
    "compat",
    "curvature",
    "factors",
    "groups",
    "linalg",
    "optim",
    "tasks",
)
__all__ = ["__version__", *SUBPACKAGES]


def __getattr__(name: str) -> ModuleType:
    if name in SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *SUBPACKAGES})
