"""Module discovery and the bad inputs the hooks must reject clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kronlab.curvature import find_modules, layer_spec, per_example_gradients

from .curvature_models import Conv1D, TinySequenceModel, classification_sum_loss


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
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    with pytest.raises(ValueError, match="received no gradient.*0"):
        per_example_gradients(model, batch, classification_sum_loss, find_modules(model))


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


class _SequenceFirst(nn.Module):
    """A custom model that feeds its Linear (tokens, examples, width)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.transpose(0, 1)).transpose(0, 1)


def test_a_module_fed_tokens_first_is_refused() -> None:
    model = _SequenceFirst()
    inputs = torch.randn(4, 5, 3)  # (examples, tokens, width)
    with pytest.raises(ValueError, match=r"'proj' got an input of shape \(5, 4, 3\).* 4 examples"):
        per_example_gradients(model, inputs, lambda net, x: net(x).sum(), find_modules(model))
    merged = nn.Sequential(nn.Flatten(0, 1), nn.Linear(3, 2))  # examples and tokens merged
    with pytest.raises(ValueError, match=r"'1' got an input of shape \(20, 3\)"):
        per_example_gradients(merged, inputs, lambda net, x: net(x).sum(), find_modules(merged))
