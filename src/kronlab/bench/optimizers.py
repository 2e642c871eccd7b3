"""The optimizers the benchmark runs: every registered kronlab optimizer and the peers.

A peer is another library's implementation of one of kronlab's algorithms, built at that
library's own defaults (only ``lr`` is swept, as for kronlab; the shared schedule and weight
decay replace the library's own). Peers need the ``bench`` extra; a peer whose package is
missing is skipped with a message naming the package. Peers that only handle some parameter
kinds (``torch.optim.Muon``: 2-D matrices; SINGD: linear and conv layers) get AdamW for the rest,
with the same split as kronlab's Muon (``kronlab.optim.auxiliary_parameters``) where it applies.
heavyball runs uncompiled (``heavyball.utils.compile_mode = None``): compiling its steps on CPU
takes minutes per model, longer than the runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

# The algorithms every default benchmark run covers, one registry entry each.
DEFAULT_KRONLAB = (
    "adamw", "soap", "shampoo", "kl_shampoo", "psgd_quad", "muon", "sirfshampoo", "spectron",
)  # fmt: skip
REFERENCE = "adamw"
AUXILIARY_ADAMW_LR = 3e-3  # the AdamW half of hybrids, as in kronlab's Muon registration


@dataclass(frozen=True)
class OptimizerSpec:
    """``factory(model, lr)`` builds the optimizer; ``package`` is the peer's import name
    (None for kronlab); ``algorithm`` pairs a peer with the kronlab optimizer it implements."""

    name: str
    factory: Callable[[nn.Module, float], Any]
    default_lr: float
    algorithm: str
    package: str | None = None

    def available(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package) is not None


class CombinedOptimizer:
    """Several optimizers over disjoint parameters, stepped together (one optimizer to the
    harness: ``param_groups`` and ``state`` are the members' together)."""

    def __init__(self, *members: Any) -> None:
        self.members = members
        self.param_groups = [group for member in members for group in member.param_groups]

    @property
    def state(self) -> dict:
        return {key: value for member in self.members for key, value in member.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for member in self.members:
            member.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for member in self.members:
            member.step()


def _split(model: nn.Module, primary: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    chosen = {id(p) for p in primary}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]


def _with_adamw(
    model: nn.Module, build: Callable[[list[nn.Parameter]], Any], handled: list[nn.Parameter]
) -> Any:
    """``build(handled)`` plus AdamW for the other parameters (only AdamW when none is handled:
    e.g. ``torch.optim.Muon`` on a conv net whose one matrix is the output head)."""
    rest = _split(model, handled)
    if not handled:
        return torch.optim.AdamW(rest, lr=AUXILIARY_ADAMW_LR)
    primary = build(handled)
    if not rest:
        return primary
    return CombinedOptimizer(primary, torch.optim.AdamW(rest, lr=AUXILIARY_ADAMW_LR))


def _matrices(model: nn.Module) -> list[nn.Parameter]:
    from kronlab.optim import auxiliary_parameters

    auxiliary = auxiliary_parameters(model)
    return [p for p in model.parameters() if p.requires_grad and id(p) not in auxiliary]


def _heavyball(name: str) -> Callable[[nn.Module, float], Any]:
    def factory(model: nn.Module, lr: float) -> Any:
        import heavyball
        import heavyball.utils

        heavyball.utils.compile_mode = None
        if name == "Muon":  # Muon for the matrices, AdamW for the rest, as kronlab's
            matrices = _matrices(model)
            build = partial(heavyball.Muon, lr=lr, compile_step=False)
            return _with_adamw(model, build, matrices)
        return getattr(heavyball, name)(model.parameters(), lr=lr, compile_step=False)

    return factory


def _pytorch_optimizer(name: str) -> Callable[[nn.Module, float], Any]:
    def factory(model: nn.Module, lr: float) -> Any:
        import pytorch_optimizer

        return getattr(pytorch_optimizer, name)(model.parameters(), lr=lr)

    return factory


def _torch_muon(model: nn.Module, lr: float) -> Any:
    matrices = [p for p in _matrices(model) if p.ndim == 2]  # torch's Muon takes 2-D only
    return _with_adamw(model, partial(torch.optim.Muon, lr=lr), matrices)


def _sirfshampoo(model: nn.Module, lr: float) -> Any:
    from sirfshampoo import SIRFShampoo

    return SIRFShampoo(model, lr=lr)


def _singd(model: nn.Module, lr: float) -> Any:
    from singd.optim.optimizer import SINGD

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    handled = [p for layer in layers for p in layer.parameters()]
    build = partial(SINGD, model, lr=lr, warn_unsupported=False)
    return _with_adamw(model, lambda params: build(params=params), handled)


PEERS = (
    OptimizerSpec("heavyball_soap", _heavyball("SOAP"), 3e-3, "soap", "heavyball"),
    OptimizerSpec("heavyball_psgdkron", _heavyball("PSGDKron"), 1e-3, "psgd_quad", "heavyball"),
    OptimizerSpec("heavyball_muon", _heavyball("Muon"), 2.5e-3, "muon", "heavyball"),
    OptimizerSpec("pto_soap", _pytorch_optimizer("SOAP"), 3e-3, "soap", "pytorch_optimizer"),
    OptimizerSpec(
        "pto_shampoo", _pytorch_optimizer("Shampoo"), 1e-3, "shampoo", "pytorch_optimizer"
    ),
    OptimizerSpec("pto_kron", _pytorch_optimizer("Kron"), 1e-3, "psgd_quad", "pytorch_optimizer"),
    OptimizerSpec("torch_muon", _torch_muon, 1e-3, "muon"),
    OptimizerSpec("sirfshampoo_peer", _sirfshampoo, 1e-3, "sirfshampoo", "sirfshampoo"),
    OptimizerSpec("singd_peer", _singd, 1e-3, "sirfshampoo", "singd"),
)


def kronlab_spec(name: str) -> OptimizerSpec:
    import kronlab.optim  # noqa: F401  (registers the optimizers)
    from kronlab.optim.registry import create_optimizer, get_optimizer

    entry = get_optimizer(name)

    def factory(model: nn.Module, lr: float) -> Any:
        return create_optimizer(name, model, lr)

    return OptimizerSpec(name, factory, entry.default_lr, name)


def optimizer_names(selection: str) -> list[str]:
    """Names from ``--optimizers``: a comma list, where ``kronlab`` is the default set,
    ``kronlab-all`` every registered optimizer and ``peers`` every peer."""
    import kronlab.optim  # noqa: F401
    from kronlab.optim.registry import available_optimizers

    groups = {
        "kronlab": list(DEFAULT_KRONLAB),
        "kronlab-all": available_optimizers(),
        "peers": [spec.name for spec in PEERS],
    }
    names: list[str] = []
    for item in (part.strip() for part in selection.split(",")):
        if item:
            names += groups.get(item, [item])
    if not names:
        raise ValueError(f"--optimizers selects nothing: {selection!r}")
    return list(dict.fromkeys(names))


def resolve(name: str) -> OptimizerSpec:
    """The spec of a peer or registered kronlab optimizer; ``ValueError`` naming both lists."""
    for spec in PEERS:
        if spec.name == name:
            return spec
    try:
        return kronlab_spec(name)
    except ValueError as error:
        peers = ", ".join(spec.name for spec in PEERS)
        raise ValueError(f"{error}; peers: {peers}") from None
