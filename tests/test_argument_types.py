"""Arguments of the wrong type fail at once with a ``TypeError`` that says what was expected."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kronlab.attribution import fit_curvature, influence_scores
from kronlab.optim import PSGD, SOAP, Muon, Shampoo, SIRFShampoo


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("optimizer", [SOAP, Shampoo, PSGD, Muon])
def test_parameters_passed_as_model(optimizer: type) -> None:
    model = tiny_model()
    with pytest.raises(TypeError, match=r"Invalid model: a generator \(expected a torch.nn.Module"):
        optimizer(None, model=model.parameters())


def test_sirfshampoo_model_must_be_a_module() -> None:
    with pytest.raises(TypeError, match="Invalid model: a generator"):
        SIRFShampoo(tiny_model().parameters())


@pytest.mark.parametrize("optimizer", [SOAP, Shampoo, PSGD, Muon])
def test_model_passed_as_params(optimizer: type) -> None:
    with pytest.raises(TypeError, match="Invalid params: a Sequential module.*model.parameters"):
        optimizer(tiny_model())


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(6, 4, generator=generator)
    return [(inputs, torch.tensor([0, 1, 2, 0, 1, 2]))]


def test_plain_loss_passed_as_loss_fn() -> None:
    with pytest.raises(TypeError, match=r"Invalid loss_fn: calling cross_entropy\(model, batch\)"):
        fit_curvature(tiny_model(), batches(), F.cross_entropy, fisher="empirical")


def test_loss_fn_with_too_few_arguments() -> None:
    def loss_of_batch(batch: object) -> torch.Tensor:
        raise AssertionError("never called with one argument")

    with pytest.raises(TypeError, match=r"expected loss_fn\(model: nn.Module, batch\)"):
        fit_curvature(tiny_model(), batches(), loss_of_batch, fisher="empirical")


def test_curvature_functions_check_model_and_loss_fn_types() -> None:
    def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    model = tiny_model()
    with pytest.raises(TypeError, match="Invalid model: a generator"):
        fit_curvature(model.parameters(), batches(), loss_fn)
    with pytest.raises(TypeError, match="Invalid loss_fn: a str"):
        fit_curvature(model, batches(), "cross_entropy")
    curvature = fit_curvature(model, batches(), loss_fn, method="identity")
    with pytest.raises(TypeError, match="Invalid query_loss_fn: a int"):
        influence_scores(
            curvature, batches(), batches(), model=model, loss_fn=loss_fn, query_loss_fn=3
        )
