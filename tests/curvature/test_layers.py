"""Module discovery and the bad inputs the hooks must reject clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kronlab.curvature import find_modules, layer_spec, per_example_gradients

from .curvature_models import Conv1D, TinySequenceModel


def test_find_modules_all_and_patterns() -> None:
    model = TinySequenceModel()
    assert list(find_modules(model)) == ["embedding", "mixer", "head"]
    assert list(find_modules(model, ["head", "emb*"])) == ["embedding", "head"]
    assert list(find_modules(model, "mix*")) == ["mixer"]


def test_specs_include_bias_column() -> None:
    assert layer_spec(nn.Linear(3, 2)).d_in == 4
    assert layer_spec(nn.Linear(3, 2, bias=False)).d_in == 3
    assert layer_spec(Conv1D(2, 3)).d_in == 4
    assert layer_spec(nn.Conv2d(2, 5, 3)).d_in == 2 * 9 + 1
    assert layer_spec(nn.Embedding(7, 3)).d_in == 7
    assert layer_spec(nn.Conv2d(4, 4, 3, groups=2)) is None
    assert layer_spec(nn.LayerNorm(3)) is None


def test_unmatched_pattern_and_untrackable_model() -> None:
    with pytest.raises(ValueError, match="'decoder.\\*' matches no trackable module"):
        find_modules(TinySequenceModel(), ["decoder.*"])
    with pytest.raises(ValueError, match="no trackable module"):
        find_modules(nn.Sequential(nn.LayerNorm(3), nn.ReLU()))


def test_module_without_gradient_is_an_error() -> None:
    """Frozen parameters do not matter (the pass freezes them anyway); a module run under
    ``no_grad`` or whose output is detached before the loss has no gradient: a clear error."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))

    def no_grad_first(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.no_grad():
            hidden = net[0](batch[0])
        return nn.functional.cross_entropy(net[1](hidden), batch[1], reduction="sum")

    def detached_first(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        hidden = net[0](batch[0]).detach()
        return nn.functional.cross_entropy(net[1](hidden), batch[1], reduction="sum")

    with pytest.raises(ValueError, match="received no gradient.*no_grad.*: 0"):
        per_example_gradients(model, batch, no_grad_first, find_modules(model))
    with pytest.raises(ValueError, match="received no gradient from the loss: \\['0'\\]"):
        per_example_gradients(model, batch, detached_first, find_modules(model))
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_unused_module_is_an_error() -> None:
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    with pytest.raises(ValueError, match="not called by loss_fn: unused"):
        per_example_gradients(
            model,
            torch.randn(2, 3),
            lambda net, x: net["used"](x).sum(),
            find_modules(model),
        )


def test_bad_loss_mask_and_projection() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    modules = find_modules(model)
    inputs = torch.randn(4, 3)
    with pytest.raises(ValueError, match="scalar tensor"):
        per_example_gradients(model, inputs, lambda net, x: net(x), modules)
    with pytest.raises(ValueError, match="mask shape"):
        per_example_gradients(
            model, inputs, lambda net, x: net(x).sum(), modules, mask=torch.ones(4, 2)
        )
    with pytest.raises(ValueError, match="P_A shape"):
        per_example_gradients(
            model,
            inputs,
            lambda net, x: net(x).sum(),
            modules,
            projections={"0": (None, torch.randn(2, 3))},
        )
    with pytest.raises(ValueError, match="no tracked module named"):
        per_example_gradients(
            model, inputs, lambda net, x: net(x).sum(), modules, projections={"x": (None, None)}
        )
