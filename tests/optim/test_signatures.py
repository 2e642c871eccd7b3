"""Every public optimizer's signature and docstring name every argument (no ``**options``)."""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch

from kronlab.compat.distributed_shampoo import DistributedShampoo
from kronlab.compat.emerging_optimizers import Spectron as EmergingSpectron
from kronlab.compat.quad_torch import QUAD, Procrustes
from kronlab.compat.sirfshampoo import SIRFShampoo as SeedSIRFShampoo
from kronlab.optim import PSGD, SOAP, KLShampoo, Muon, Shampoo, SIRFShampoo, Spectron

CLASSES = [
    Shampoo,
    SOAP,
    KLShampoo,
    SIRFShampoo,
    PSGD,
    Muon,
    Spectron,
    DistributedShampoo,
    QUAD,
    Procrustes,
    EmergingSpectron,
    SeedSIRFShampoo,
]


def _documented_names(cls: type) -> set[str]:
    """Names listed in the ``Args:`` section of the class or of a base it refers to."""
    names: set[str] = set()
    for klass in cls.__mro__:
        doc = inspect.getdoc(klass) or ""
        if "Args:" in doc:
            section = doc.split("Args:", 1)[1]
            names |= set(re.findall(r"^\s{0,12}([a-zA-Z_0-9, ]+):", section, flags=re.MULTILINE))
    return {name.strip() for entry in names for name in entry.split(",")}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_every_argument_is_in_the_signature_and_the_args_section(cls: type) -> None:
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert not [p.name for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    missing = {p.name for p in parameters} - _documented_names(cls)
    assert not missing, f"{cls.__name__} does not document {sorted(missing)}"


def test_torch_names_work_and_the_former_epsilon_is_kept() -> None:
    param = torch.nn.Parameter(torch.zeros(3, 2))
    assert SOAP([param], eps=1e-6).param_groups[0]["eps"] == 1e-6
    assert Shampoo([param], epsilon=1e-6).param_groups[0]["eps"] == 1e-6
    assert KLShampoo([{"params": [param], "epsilon": 1e-5}]).param_groups[0]["eps"] == 1e-5
    with pytest.raises(ValueError, match="epsilon"):
        SOAP([param], eps=1e-6, epsilon=1e-7)


def _train(optimizer: torch.optim.Optimizer, model: torch.nn.Module, steps: int) -> None:
    generator = torch.Generator().manual_seed(steps)
    for _ in range(steps):
        optimizer.zero_grad()
        inputs = torch.randn(16, 4, generator=generator)
        model(inputs).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize(
    ("build", "former"),
    [
        (lambda model: SOAP(model.parameters(), precondition_frequency=2), {"eps": "epsilon"}),
        (
            lambda model: SIRFShampoo(model, lr=0.01, weight_decay=0.01),
            {"momentum": "alpha1", "weight_decay": "kappa"},
        ),
    ],
)
def test_checkpoints_with_former_group_keys_resume_exactly(build, former) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    optimizer = build(model)
    _train(optimizer, model, 3)
    saved = copy.deepcopy(optimizer.state_dict())  # the live state moves on below
    saved["param_groups"] = [
        {former.get(key, key): value for key, value in group.items()}
        for group in saved["param_groups"]
    ]
    weights = [p.detach().clone() for p in model.parameters()]
    _train(optimizer, model, 2)
    expected = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for param, weight in zip(model.parameters(), weights):
            param.copy_(weight)
    resumed = build(model)
    resumed.load_state_dict(saved)
    _train(resumed, model, 2)
    for param, value in zip(model.parameters(), expected):
        torch.testing.assert_close(param.detach(), value, rtol=0, atol=0)
