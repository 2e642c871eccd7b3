"""kronlab: Kronecker-factored second-order methods for PyTorch.

Optimizers (``kronlab.optim``) and influence functions (``kronlab.attribution``) on one
numerical core (``kronlab.linalg``, ``kronlab.factors``, ``kronlab.groups``).
"""

__version__ = "0.1.0"
