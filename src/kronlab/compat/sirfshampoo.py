"""sirfshampoo's names: ``SIRFShampoo`` and the ``sirfshampoo.combiner`` rules.

kronlab's ``SIRFShampoo`` already takes sirfshampoo's arguments (``model``, ``params``, ``lr``,
``beta2``, ``alpha1``, ``alpha2``, ``lam``, ``kappa``, ``T``, ``structures``,
``preconditioner_dtypes``, ``combine_params``, ``verbose_init``) with the same defaults, and its
grouping rules have the same ``identify`` / ``group`` / ``ungroup`` interface, so this module only
gathers the names in one place: ``from sirfshampoo import SIRFShampoo`` and ``from
sirfshampoo.combiner import ...`` both become ``from kronlab.compat.sirfshampoo import ...``.
"""

from kronlab.groups import FlattenEmbedding, LinearWeightBias, PerParameter, PreconditionerGroup
from kronlab.optim.sirfshampoo import SIRFShampoo

__all__ = [
    "FlattenEmbedding",
    "LinearWeightBias",
    "PerParameter",
    "PreconditionerGroup",
    "SIRFShampoo",
]
