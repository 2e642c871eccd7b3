"""Opt-in fused activations: the same function as Hugging Face's unfused GELUs (float64
definitions), swapped only inside the block, and a build equal to the default one."""

import math

import pytest
import torch
from torch import nn

from kronlab.attribution.fused import fused_activations, fused_equivalent
from kronlab.attribution.pipeline import AttributionConfig, AttributionRun
from kronlab.attribution.sources import AttributionTask, ExampleSet, language_model_loss
from kronlab.attribution.store import GradientStore
from kronlab.curvature import find_modules, per_example_gradients

activations = pytest.importorskip("transformers.activations")


def gelu_tanh_definition(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu_erf_definition(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


FUSABLE = [
    (lambda: activations.NewGELUActivation(), gelu_tanh_definition),
    (lambda: activations.FastGELUActivation(), gelu_tanh_definition),
    (lambda: activations.AccurateGELUActivation(), gelu_tanh_definition),
    (lambda: activations.GELUTanh(use_gelu_tanh_python=True), gelu_tanh_definition),
    (lambda: activations.GELUActivation(use_gelu_python=True), gelu_erf_definition),
]


@pytest.mark.parametrize("make, definition", FUSABLE)
def test_fused_equivalent_computes_the_same_function_and_gradient(make, definition):
    original = make()
    fused = fused_equivalent(original)
    assert isinstance(fused, nn.GELU)
    x = torch.linspace(-8, 8, 4001)
    exact = x.double().requires_grad_(True)
    expected = definition(exact)
    (expected_grad,) = torch.autograd.grad(expected.sum(), exact)
    for module in (original, fused):
        inputs = x.clone().requires_grad_(True)
        values = module(inputs)
        (grad,) = torch.autograd.grad(values.sum(), inputs)
        # float32 rounding of a function with |f'| <= 1.13 on [-8, 8]: a few ulps.
        assert (values.double() - expected).abs().max() < 2e-6
        assert (grad.double() - expected_grad).abs().max() < 2e-6


@pytest.mark.parametrize(
    "module",
    [
        activations.QuickGELUActivation(),  # x σ(1.702 x): no equal fused kernel
        activations.GELUTanh(),  # already F.gelu(approximate="tanh")
        activations.GELUActivation(),  # already F.gelu
        nn.GELU(approximate="tanh"),
        nn.ReLU(),
    ],
)
def test_modules_without_an_equal_fused_kernel_are_left_alone(module):
    assert fused_equivalent(module) is None


def test_a_class_of_the_same_name_outside_transformers_is_not_swapped():
    class NewGELUActivation(nn.Module):  # a user's own class: its function is unknown
        def forward(self, x):
            return x

    assert fused_equivalent(NewGELUActivation()) is None


def tiny_gpt2(activation: str = "gelu_new"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=23, n_positions=12, n_embd=8, n_layer=2, n_head=2, activation_function=activation
    )
    return GPT2LMHeadModel(config).eval()


def test_swap_only_inside_the_block_and_undone_on_error():
    model = tiny_gpt2()
    shared = model.transformer.h[0].mlp.act
    model.transformer.h[1].mlp.act = shared  # one instance in two parents
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with fused_activations(model) as replaced:
        assert replaced == 2
        fused = model.transformer.h[0].mlp.act
        assert isinstance(fused, nn.GELU) and model.transformer.h[1].mlp.act is fused
        assert model.state_dict().keys() == state.keys()
    assert model.transformer.h[0].mlp.act is shared and model.transformer.h[1].mlp.act is shared
    with pytest.raises(RuntimeError, match="inside"):
        with fused_activations(model):
            raise RuntimeError("inside")
    assert model.transformer.h[0].mlp.act is shared and model.transformer.h[1].mlp.act is shared
    assert all(torch.equal(state[name], t) for name, t in model.state_dict().items())


def test_per_example_gradients_with_fused_activations_match_the_float64_model():
    model = tiny_gpt2()
    modules = find_modules(model, ["transformer.h.*"])
    tokens = torch.randint(23, (5, 12), generator=torch.Generator().manual_seed(1))
    batch = (tokens, torch.ones_like(tokens, dtype=torch.bool))
    default = per_example_gradients(model, batch, language_model_loss, modules)
    with fused_activations(model):
        fused = per_example_gradients(model, batch, language_model_loss, modules)
    reference_model = tiny_gpt2().double()  # same seed, the unfused definition in float64
    reference = per_example_gradients(
        reference_model,
        batch,
        language_model_loss,
        find_modules(reference_model, ["transformer.h.*"]),
    )
    for name, expected in reference.items():
        scale = expected.abs().max()
        assert (fused[name].double() - expected).abs().max() <= 1e-5 * scale
        assert (default[name].double() - expected).abs().max() <= 1e-5 * scale
        assert (fused[name] - default[name]).abs().max() <= 1e-5 * scale


def test_fused_build_equals_the_default_build_and_default_runs_the_model_as_given(tmp_path):
    tokens = torch.randint(23, (10, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    config = AttributionConfig(
        projection_dim=4,
        compression="project",
        modules=("transformer.h.*",),
        batch_size=4,
        chunk_rows=4,
        num_queries=2,
        method="kfac",
        report_queries=0,
    )
    seen: dict[bool, set[str]] = {}
    rows = {}
    for fused in (False, True):
        model = tiny_gpt2()

        def loss_fn(model, batch, sample=False, fused=fused):
            seen.setdefault(fused, set()).update(
                type(m.mlp.act).__name__ for m in model.transformer.h
            )
            return language_model_loss(model, batch, sample)

        examples = ExampleSet((tokens, mask), "text", [""] * len(tokens))
        task = AttributionTask(model, loss_fn, examples, examples.subset(2))
        run = AttributionRun(
            tmp_path / str(fused), config, task=task, show_progress=False, fused_activations=fused
        )
        run.build()
        run.fit()
        rows[fused] = GradientStore.open(run.train_store_dir).read()
        assert type(model.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"
    assert seen == {False: {"NewGELUActivation"}, True: {"GELU"}}
    scale = rows[False].abs().max()
    assert (rows[True] - rows[False]).abs().max() <= 1e-5 * scale


def test_gelu_pytorch_tanh_config_is_the_fused_model():
    # The benchmark's third configuration: HF's own fused GELU gives the fused option's outputs.
    tokens = torch.randint(23, (3, 12), generator=torch.Generator().manual_seed(3))
    tanh_model = tiny_gpt2("gelu_pytorch_tanh")
    model = tiny_gpt2()
    with fused_activations(model), torch.no_grad():
        assert torch.equal(model(tokens).logits, tanh_model(tokens).logits)


def test_cli_flag_reaches_the_run(tmp_path, monkeypatch):
    import kronlab.attribution.pipeline as pipeline
    from kronlab.cli import main

    seen = []

    class Stop(BaseException):  # passes through the CLI's one-line error reporting
        pass

    def fake_run(*args, **kwargs):
        seen.append(kwargs["fused_activations"])
        raise Stop

    monkeypatch.setattr(pipeline, "AttributionRun", fake_run)
    for flags, expected in (([], False), (["--fused-activations"], True)):
        with pytest.raises(Stop):
            main(["attribute", "build", "--run-dir", str(tmp_path), *flags])
        assert seen.pop() is expected


def test_a_compiled_model_is_refused_with_the_reason():
    # The compiled graph's backward is one node: the hooks' outputs have no path to the loss.
    model = tiny_gpt2()
    modules = find_modules(model, ["transformer.h.*"])
    tokens = torch.randint(23, (3, 12), generator=torch.Generator().manual_seed(4))
    model.compile(backend="aot_eager")  # no code generation: the same autograd structure
    with pytest.raises(ValueError, match="torch.compile'd.*eager model"):
        per_example_gradients(
            model, (tokens, torch.ones_like(tokens, dtype=torch.bool)), language_model_loss, modules
        )
