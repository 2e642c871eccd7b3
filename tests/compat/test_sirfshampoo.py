"""The SIRFShampoo preconditioner-groups tutorial's usage, with only the import changed."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import Size, Tensor
from torch.nn import Embedding, Linear, Module, MSELoss, Parameter, ReLU, Sequential

from kronlab.compat.sirfshampoo import (
    FlattenEmbedding,
    LinearWeightBias,
    PerParameter,
    PreconditionerGroup,
    SIRFShampoo,
)


def _model() -> Sequential:
    torch.manual_seed(0)
    layers = {
        "embedding": Embedding(64, 128),
        "linear1": Linear(128, 32, bias=False),
        "relu1": ReLU(),
        "linear2": Linear(32, 4),
    }
    return Sequential(OrderedDict(layers))


def _others(printed: str) -> list[str]:
    return [line for line in printed.splitlines() if line.startswith("- Other:")]


def test_default_groups_show_resolved_structures_and_the_claiming_rule(capsys) -> None:
    SIRFShampoo(_model(), verbose_init=True)
    others = _others(capsys.readouterr().out)
    assert len(others) == 4
    assert "'structures': ('dense', 'dense')" in others[0]
    assert "'preconditioner_dtypes': (torch.float32, torch.float32)" in others[0]
    assert "'structures': ('dense',)" in others[3]  # linear2.bias: one axis
    assert all("'combine_params': PerParameter()" in line for line in others)


def test_seed_names_map_to_kronlab_and_are_reported_back(capsys) -> None:
    model = _model()
    groups = [{"params": list(model.parameters()), "alpha1": 0.5, "kappa": 0.01}]
    optimizer = SIRFShampoo(model, params=groups, alpha1=0.8, verbose_init=True)
    assert (optimizer.param_groups[0]["momentum"], optimizer.param_groups[0]["weight_decay"]) == (
        0.5,
        0.01,
    )
    other = _others(capsys.readouterr().out)[0]
    assert "'alpha1': 0.5" in other and "'kappa': 0.01" in other and "momentum" not in other


def test_linear_weight_bias_rule_and_missing_fallback(capsys) -> None:
    model = _model()
    SIRFShampoo(model, combine_params=(LinearWeightBias(), PerParameter()), verbose_init=True)
    printed = capsys.readouterr().out
    assert "['linear2.weight', 'linear2.bias']" in printed
    assert "'4x4 (DenseMatrix)', '33x33 (DenseMatrix)'" in printed
    others = _others(printed)
    assert "'combine_params': LinearWeightBias()" in others[0]
    assert "'combine_params': PerParameter()" in others[1]
    with pytest.raises(ValueError):  # linear1 has no bias and nothing else claims it
        SIRFShampoo(model, combine_params=(LinearWeightBias(),))


def test_flattened_embedding_with_a_diagonal_group(capsys) -> None:
    model = _model()
    embeddings = [p for m in model.modules() if isinstance(m, Embedding) for p in m.parameters()]
    linears = [p for m in model.modules() if isinstance(m, Linear) for p in m.parameters()]
    groups = [
        {"params": embeddings, "combine_params": (FlattenEmbedding(),), "structures": "diagonal"},
        {"params": linears},
    ]
    SIRFShampoo(model, params=groups, verbose_init=True)
    printed = capsys.readouterr().out
    assert "['8192x8192 (DiagonalMatrix)']" in printed
    assert "'structures': ('diagonal',)" in _others(printed)[0]


class WeightsAloneBiasesTogether(PreconditionerGroup):
    """Each weight on its own; all biases stacked into one vector."""

    def identify(self, model: Module) -> list[list[Parameter]]:
        weights = [[p] for name, p in model.named_parameters() if "weight" in name]
        return weights + [[p for name, p in model.named_parameters() if "bias" in name]]

    def group(self, tensors: list[Tensor]) -> Tensor:
        joined = torch.cat(tensors).squeeze()
        return joined.unsqueeze(0) if joined.ndim == 0 else joined

    def ungroup(self, grouped_tensor: Tensor, tensor_shapes: list[Size]) -> list[Tensor]:
        if len(tensor_shapes) == 1:
            return [grouped_tensor.reshape(tensor_shapes[0])]
        pieces = grouped_tensor.split([s.numel() for s in tensor_shapes])
        return [piece.reshape(shape) for piece, shape in zip(pieces, tensor_shapes)]


def test_custom_rule_trains(capsys) -> None:
    model = _model()
    optimizer = SIRFShampoo(
        model, combine_params=(WeightsAloneBiasesTogether(), PerParameter()), verbose_init=True
    )
    assert "WeightsAloneBiasesTogether()" in _others(capsys.readouterr().out)[0]
    inputs, targets = torch.randint(0, 32, (32,)), torch.rand(32, 4)
    loss_function = MSELoss()
    initial = loss_function(model(inputs), targets).item()
    for _ in range(50):
        optimizer.zero_grad()
        loss_function(model(inputs), targets).backward()
        optimizer.step()
    assert loss_function(model(inputs), targets).item() < initial
