"""Each seed project's public names over kronlab's optimizers: change the import, keep the code.

One thin module per project; none holds a second implementation of any method:

* ``kronlab.compat.distributed_shampoo``: ``DistributedShampoo`` and its config classes.
* ``kronlab.compat.quad_torch``: ``QUAD`` and ``Procrustes`` with quad_torch 0.5's defaults.
* ``kronlab.compat.emerging_optimizers``: ``Spectron`` with the NeMo Emerging-Optimizers names.
* ``kronlab.compat.sirfshampoo``: ``SIRFShampoo`` and the ``sirfshampoo.combiner`` rules.

The differences that remain are listed in the README ("Coming from ...").
"""
