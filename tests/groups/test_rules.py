from collections import OrderedDict

import pytest
import torch
from torch import nn

from kronlab.groups import FlattenEmbedding, LinearWeightBias, PerParameter, check_rules


def tutorial_model() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            embedding=nn.Embedding(64, 128),
            linear1=nn.Linear(128, 32, bias=False),
            relu1=nn.ReLU(),
            linear2=nn.Linear(32, 4),
        )
    )


def test_per_parameter_identifies_every_trainable_parameter():
    model = tutorial_model()
    model.linear1.weight.requires_grad_(False)
    groups = PerParameter().identify(model)
    assert [len(g) for g in groups] == [1, 1, 1]
    assert groups[0][0] is model.embedding.weight


def test_linear_weight_bias_appends_bias_column_and_round_trips():
    model = tutorial_model()
    rule = LinearWeightBias()
    (group,) = rule.identify(model)  # linear1 has no bias
    assert group == [model.linear2.weight, model.linear2.bias]
    weight, bias = torch.randn(4, 32), torch.randn(4)
    combined = rule.group([weight, bias])
    assert combined.shape == (4, 33) and torch.equal(combined[:, -1], bias)
    back = rule.ungroup(combined, [weight.shape, bias.shape])
    assert torch.equal(back[0], weight) and torch.equal(back[1], bias)


def test_flatten_embedding_round_trips():
    model = tutorial_model()
    rule = FlattenEmbedding()
    (group,) = rule.identify(model)
    weight = torch.randn(64, 128)
    flat = rule.group([weight])
    assert flat.shape == (8192,)
    assert torch.equal(rule.ungroup(flat, [weight.shape])[0], weight)


def test_check_rules():
    (single,) = check_rules(PerParameter())
    assert isinstance(single, PerParameter)
    rules = check_rules((LinearWeightBias(), PerParameter()))
    assert [type(r) for r in rules] == [LinearWeightBias, PerParameter]
    with pytest.raises(ValueError, match="non-empty sequence"):
        check_rules(())
    with pytest.raises(ValueError, match="PreconditionerGroup instances"):
        check_rules((PerParameter(), "linear"))
    assert repr(PerParameter()) == "PerParameter()"
