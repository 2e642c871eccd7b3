import io
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from kronlab.groups import FlattenEmbedding, LinearWeightBias, PerParameter
from kronlab.optim import KronOptimizer
from kronlab.optim.validation import check_range


class MomentumOnBundles(KronOptimizer):
    """Heavy-ball momentum on grouped tensors, float32 state: exercises the base class."""

    def __init__(self, params=None, lr=0.1, momentum=0.9, **kwargs):
        super().__init__(params, {"lr": lr, "momentum": momentum}, **kwargs)

    def validate_group(self, group):
        check_range("lr", group["lr"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_inclusive=False)

    def describe_preconditioner(self, bundle):
        return [f"{d}x{d} (Identity)" for d in bundle.grouped_shape]

    def update(self):
        for bundle in self.bundles_with_gradients():
            group = self.param_groups[bundle.group_index]
            state = self.state[bundle.key]
            if "buffer" not in state:
                state["buffer"] = torch.zeros(bundle.grouped_shape, dtype=torch.float32)
            state["buffer"].mul_(group["momentum"]).add_(bundle.gradient().float())
            bundle.add_(state["buffer"], alpha=-group["lr"])


def tutorial_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            embedding=nn.Embedding(64, 8),
            linear1=nn.Linear(8, 6, bias=False),
            relu1=nn.ReLU(),
            linear2=nn.Linear(6, 4),
        )
    ).to(dtype)


def train(model, optimizer, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, 64, (16,), generator=generator)
        optimizer.zero_grad()
        model(tokens).float().pow(2).mean().backward()
        optimizer.step()


def test_matches_definition_of_grouped_momentum():
    model = tutorial_model()
    initial = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    optimizer = MomentumOnBundles(
        model=model, lr=0.05, combine_params=(LinearWeightBias(), PerParameter())
    )
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (16,), generator=generator)
    optimizer.zero_grad()
    model(tokens).pow(2).mean().backward()
    grads = {n: p.grad.detach().double() for n, p in model.named_parameters()}
    optimizer.step()
    for name, param in model.named_parameters():
        expected = initial[name] - 0.05 * grads[name]
        assert torch.allclose(param.double(), expected, atol=1e-6), name


def test_verbose_init_prints_groups_in_rule_order(capsys):
    model = tutorial_model()
    MomentumOnBundles(
        model=model, combine_params=(LinearWeightBias(), PerParameter()), verbose_init=True
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Parameter groups:"
    assert out[1:4] == [
        "Group 0",
        "- Parameter names: ['linear2.weight', 'linear2.bias']",
        "- Pre-conditioner: ['4x4 (Identity)', '7x7 (Identity)']",
    ]
    assert out[4].startswith("- Other: {'lr': 0.1, 'momentum': 0.9, 'combine_params': ")
    assert "- Parameter names: ['embedding.weight']" in out
    assert "- Parameter names: ['linear1.weight']" in out


def test_missing_fallback_rule_names_the_parameter():
    with pytest.raises(ValueError, match=r"linear1\.weight"):
        MomentumOnBundles(model=tutorial_model(), combine_params=(LinearWeightBias(),))


def test_param_groups_with_their_own_rules():
    model = tutorial_model()
    optimizer = MomentumOnBundles(
        model=model,
        params=[
            {
                "params": [model.embedding.weight],
                "combine_params": (FlattenEmbedding(),),
                "lr": 0.5,
            },
            {"params": [model.linear1.weight, model.linear2.weight, model.linear2.bias]},
        ],
    )
    assert len(optimizer.param_groups) == 2
    shapes = [tuple(bundle.grouped_shape) for bundle in optimizer.bundles]
    assert shapes == [(512,), (6, 8), (4, 6), (4,)]
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_rules_other_than_per_parameter_need_a_model():
    model = tutorial_model()
    with pytest.raises(ValueError, match="needs the model"):
        MomentumOnBundles(model.parameters(), combine_params=(LinearWeightBias(), PerParameter()))
    optimizer = MomentumOnBundles(model.parameters())
    assert len(optimizer.bundles) == 4
    assert optimizer.bundles[0].names == ("group0.param0",)


def test_params_or_model_required():
    with pytest.raises(ValueError, match="pass params, or model="):
        MomentumOnBundles()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1.0}, r"Invalid lr: -1.0 \(allowed: a finite number, 0.0 <= lr\)"),
        (
            {"momentum": 1.0},
            r"Invalid momentum: 1.0 \(allowed: a finite number, 0.0 <= momentum < 1.0\)",
        ),
        ({"on_nonfinite_grad": "panic"}, "Invalid on_nonfinite_grad"),
        ({"combine_params": ()}, "combine_params"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MomentumOnBundles(model=tutorial_model(), **kwargs)


def test_add_param_group_validates_and_rolls_back():
    model = tutorial_model()
    optimizer = MomentumOnBundles([model.linear1.weight])
    with pytest.raises(ValueError, match="Invalid lr"):
        optimizer.add_param_group({"params": [model.linear2.weight], "lr": -3.0})
    assert len(optimizer.param_groups) == 1 and len(optimizer.bundles) == 1
    optimizer.add_param_group({"params": [model.linear2.weight], "lr": 0.3})
    assert len(optimizer.bundles) == 2 and optimizer.bundles[1].group_index == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_identically(dtype):
    rules = (LinearWeightBias(), PerParameter())
    reference_model = tutorial_model(dtype)
    reference = MomentumOnBundles(model=reference_model, combine_params=rules)
    train(reference_model, reference, 5)
    train(reference_model, reference, 10, seed=2)

    model = tutorial_model(dtype)
    optimizer = MomentumOnBundles(model=model, combine_params=rules)
    train(model, optimizer, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed_model = tutorial_model(dtype)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = MomentumOnBundles(model=resumed_model, combine_params=rules)
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.global_step == 5
    assert resumed.param_groups[0]["combine_params"] == resumed.defaults["combine_params"]
    for bundle in resumed.bundles:
        assert resumed.state[bundle.key]["buffer"].dtype == torch.float32  # not cast to bf16
    train(resumed_model, resumed, 10, seed=2)
    for (name, expected), actual in zip(
        reference_model.state_dict().items(), resumed_model.state_dict().values()
    ):
        assert torch.equal(expected, actual), name


def test_loaded_state_is_a_copy():
    model = tutorial_model()
    optimizer = MomentumOnBundles(model=model)
    train(model, optimizer, 2)
    saved = optimizer.state_dict()
    other = MomentumOnBundles(model=model)
    other.load_state_dict(saved)
    train(model, other, 1)
    assert not torch.equal(
        saved["state"][0]["buffer"], other.state[model.embedding.weight]["buffer"]
    )


def test_nonfinite_gradient_skips_step_without_touching_state():
    model = tutorial_model()
    optimizer = MomentumOnBundles(model=model)
    train(model, optimizer, 2)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = {k: v["buffer"].clone() for k, v in optimizer.state.items() if "buffer" in v}
    optimizer.zero_grad()
    model(torch.tensor([1, 2])).sum().backward()
    model.linear2.bias.grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        optimizer.step()
    assert optimizer.skipped_steps == 1 and optimizer.global_step == 2
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(buffers[k], optimizer.state[k]["buffer"]) for k in buffers)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_any_nonfinite_entry_is_caught_and_large_finite_ones_are_not(bad, dtype):
    param = nn.Parameter(torch.zeros(3, 4, dtype=dtype))
    optimizer = MomentumOnBundles([param], on_nonfinite_grad="raise")
    param.grad = torch.full_like(param, 6e4)  # near fp16's max: a 2-norm would overflow
    optimizer.step()
    param.grad[1, 2] = bad
    with pytest.raises(FloatingPointError):
        optimizer.step()


def test_nonfinite_policy_raise_and_ignore():
    model = tutorial_model()
    model(torch.tensor([1])).sum().backward()
    model.linear1.weight.grad.fill_(float("inf"))
    with pytest.raises(FloatingPointError):
        MomentumOnBundles(model=model, on_nonfinite_grad="raise").step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MomentumOnBundles(model=model, on_nonfinite_grad="ignore").step()
    assert not torch.isfinite(model.linear1.weight).all()


def test_parameters_without_gradients_are_left_alone_and_closure_is_called():
    model = tutorial_model()
    optimizer = MomentumOnBundles(model=model, combine_params=(LinearWeightBias(), PerParameter()))
    frozen = model.embedding.weight.detach().clone()

    def closure():
        optimizer.zero_grad()
        loss = model.linear2(torch.randn(3, 6)).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss is not None
    assert torch.equal(model.embedding.weight, frozen)
    assert model.embedding.weight not in optimizer.state
