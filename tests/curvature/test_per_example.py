"""Per-example gradients from hooks equal autograd's gradient of each example's own loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kronlab.curvature import (
    find_modules,
    gradient_matrix,
    parameters_from_matrix,
    per_example_gradients,
)

from .curvature_models import (
    Conv1D,
    PositionalSequenceModel,
    TinySequenceModel,
    classification_sum_loss,
    sequence_loss,
)


def _autograd_example_matrices(model, modules, loss_fn, examples):
    """Reference: one backward per example, parameters' .grad rearranged into G."""
    result = {name: [] for name in modules}
    for example in examples:
        model.zero_grad()
        loss_fn(model, example).backward()
        for name, module in modules.items():
            bias = None if getattr(module, "bias", None) is None else module.bias.grad
            weight_grad = module.weight.grad
            if weight_grad is None:
                weight_grad = torch.zeros_like(module.weight)
            result[name].append(gradient_matrix(module, weight_grad, bias))
    return {name: torch.stack(matrices) for name, matrices in result.items()}


def _conv_net(bias: bool) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2, bias=bias),
        nn.Tanh(),
        nn.Conv2d(3, 4, 2, dilation=2, bias=bias),
        nn.Flatten(),
        nn.Linear(4, 3, bias=bias),
    ).double()


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_and_conv_match_autograd(bias: bool) -> None:
    for model, inputs in (
        (
            nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias)),
            torch.randn(6, 5),
        ),
        (_conv_net(bias), torch.randn(6, 2, 6, 6, dtype=torch.float64)),
    ):
        model = model.double()
        targets = torch.randint(0, 3, (6,))
        modules = find_modules(model)
        hooked = per_example_gradients(
            model, (inputs.double(), targets), classification_sum_loss, modules
        )
        examples = [(inputs[i : i + 1].double(), targets[i : i + 1]) for i in range(6)]
        reference = _autograd_example_matrices(model, modules, classification_sum_loss, examples)
        for name in modules:
            assert hooked[name].shape == reference[name].shape
            torch.testing.assert_close(hooked[name], reference[name])


def test_sequence_model_with_padding_matches_autograd() -> None:
    model = TinySequenceModel(padding_idx=0).double()
    tokens = torch.randint(1, 7, (4, 5))
    tokens[1, 3:] = 0
    tokens[3, 1:] = 0
    mask = (tokens != 0).double()
    targets = torch.randint(0, 7, (4, 5))
    modules = find_modules(model)
    hooked = per_example_gradients(
        model, (tokens, targets, mask), sequence_loss, modules, mask=mask
    )
    examples = [(tokens[i : i + 1], targets[i : i + 1], mask[i : i + 1]) for i in range(4)]
    reference = _autograd_example_matrices(model, modules, sequence_loss, examples)
    assert set(hooked) == {"embedding", "mixer", "head"}
    for name in modules:
        torch.testing.assert_close(hooked[name], reference[name])


def test_module_called_once_per_batch_and_broadcast_gets_per_example_gradients() -> None:
    # The position embedding sees ids (1, T) and its output is broadcast over the batch, so
    # autograd alone would give the batch's summed gradient (before the fix: a (1, ...) block).
    model = PositionalSequenceModel().double()
    tokens = torch.randint(0, 7, (4, 5))
    batch = (tokens, torch.randint(0, 7, (4, 5)), torch.ones(4, 5, dtype=torch.float64))
    modules = find_modules(model)
    hooked = per_example_gradients(model, batch, sequence_loss, modules)
    examples = [tuple(t[i : i + 1] for t in batch) for i in range(4)]
    reference = _autograd_example_matrices(model, modules, sequence_loss, examples)
    assert hooked["position"].shape == (4, 5, 8)
    for name in modules:
        torch.testing.assert_close(hooked[name], reference[name])


def test_projected_gradients_equal_projection_of_full_gradients() -> None:
    model = TinySequenceModel().double()
    tokens = torch.randint(0, 7, (3, 4))
    batch = (tokens, torch.randint(0, 7, (3, 4)), torch.ones(3, 4, dtype=torch.float64))
    modules = find_modules(model)
    full = per_example_gradients(model, batch, sequence_loss, modules)
    projections = {
        "embedding": (
            torch.randn(2, 5, dtype=torch.float64),
            torch.randn(3, 7, dtype=torch.float64),
        ),
        "mixer": (None, torch.randn(4, 6, dtype=torch.float64)),
        "head": (torch.randn(3, 7, dtype=torch.float64), None),
    }
    projected = per_example_gradients(model, batch, sequence_loss, modules, projections)
    for name, (output_side, input_side) in projections.items():
        expected = full[name]
        if output_side is not None:
            expected = output_side @ expected
        if input_side is not None:
            expected = expected @ input_side.T
        torch.testing.assert_close(projected[name], expected)


def test_shared_module_sums_its_calls() -> None:
    layer = nn.Linear(3, 3).double()
    model = nn.Sequential(layer, nn.Tanh(), layer)
    inputs = torch.randn(4, 3, dtype=torch.float64)

    def loss_fn(net, batch):
        return (net(batch) ** 2).sum()

    modules = find_modules(model, ["0"])
    hooked = per_example_gradients(model, inputs, loss_fn, modules)
    reference = _autograd_example_matrices(
        model, modules, loss_fn, [inputs[i : i + 1] for i in range(4)]
    )
    torch.testing.assert_close(hooked["0"], reference["0"])


def test_parameters_from_matrix_inverts_gradient_matrix() -> None:
    for module in (nn.Linear(3, 2), nn.Conv2d(2, 3, 2), nn.Embedding(5, 2), nn.Linear(3, 2, False)):
        bias = getattr(module, "bias", None)
        matrix = gradient_matrix(module, module.weight, bias)
        weight, bias_back = parameters_from_matrix(module, matrix)
        torch.testing.assert_close(weight, module.weight)
        if bias is not None:
            torch.testing.assert_close(bias_back, bias)


def test_parameter_grads_untouched() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    per_example_gradients(
        model,
        (torch.randn(4, 3), torch.randint(0, 2, (4,))),
        classification_sum_loss,
        find_modules(model),
    )
    assert all(parameter.grad is None for parameter in model.parameters())


def test_module_called_with_keyword_input() -> None:
    layer = nn.Linear(3, 2).double()
    inputs = torch.randn(4, 3, dtype=torch.float64)

    def loss_fn(module, batch):
        return (module(input=batch) ** 2).sum()

    hooked = per_example_gradients(layer, inputs, loss_fn, {"layer": layer})
    reference = _autograd_example_matrices(
        layer, {"layer": layer}, loss_fn, [inputs[i : i + 1] for i in range(4)]
    )
    torch.testing.assert_close(hooked["layer"], reference["layer"])


def test_projected_with_padding_and_conv_equals_projected_full() -> None:
    """Projected per-example gradients (bias folded into ``P_A``, masked tokens dropped through
    their zero ``g_t``) equal the projection of the full ones, padding and conv included."""
    model = TinySequenceModel(padding_idx=0).double()
    tokens = torch.randint(1, 7, (4, 5))
    tokens[1, 3:] = 0
    mask = (tokens != 0).double()
    batch = (tokens, torch.randint(0, 7, (4, 5)), mask)
    modules = find_modules(model)
    full = per_example_gradients(model, batch, sequence_loss, modules, mask=mask)
    generator = torch.Generator().manual_seed(0)
    projections = {
        name: (
            torch.randn(3, matrix.shape[1], generator=generator, dtype=torch.float64),
            torch.randn(2, matrix.shape[2], generator=generator, dtype=torch.float64),
        )
        for name, matrix in full.items()
    }
    projected = per_example_gradients(model, batch, sequence_loss, modules, projections, mask)
    for name, (output_side, input_side) in projections.items():
        torch.testing.assert_close(projected[name], output_side @ full[name] @ input_side.T)

    conv = _conv_net(bias=True)
    inputs = (torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,)))
    modules = find_modules(conv)
    full = per_example_gradients(conv, inputs, classification_sum_loss, modules)
    projections = {
        name: (
            torch.randn(2, matrix.shape[1], generator=generator, dtype=torch.float64),
            torch.randn(2, matrix.shape[2], generator=generator, dtype=torch.float64),
        )
        for name, matrix in full.items()
    }
    projected = per_example_gradients(conv, inputs, classification_sum_loss, modules, projections)
    for name, (output_side, input_side) in projections.items():
        torch.testing.assert_close(projected[name], output_side @ full[name] @ input_side.T)


class _MixedModel(nn.Module):
    """Embedding (padding) → LayerNorm → Conv1D → Linear (no bias) → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 5, padding_idx=0)
        self.norm = nn.LayerNorm(5)
        self.mixer = Conv1D(6, 5)
        self.hidden = nn.Linear(6, 6, bias=False)
        self.head = nn.Linear(6, 7)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.mixer(self.norm(self.embedding(tokens)))
        return self.head(torch.tanh(self.hidden(torch.tanh(hidden))))


def _definition_gradients(model, modules, examples):
    """Reference from the definition: a copy with every parameter trainable, one backward per
    single-example batch, each module's weight (and bias) gradient rearranged into G."""
    import copy

    reference_model = copy.deepcopy(model).requires_grad_(True)
    reference_modules = dict(reference_model.named_modules())
    rows = {name: [] for name in modules}
    for example in examples:
        loss = sequence_loss(reference_model, example)
        for name in modules:
            module = reference_modules[name]
            bias = getattr(module, "bias", None)
            parameters = [module.weight] + ([bias] if bias is not None else [])
            grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads)]
            rows[name].append(gradient_matrix(module, *grads))
    return {name: torch.stack(matrices) for name, matrices in rows.items()}


def test_mixed_model_equals_definition_and_leaves_the_model_as_it_was() -> None:
    """Per-example gradients of Embedding (padding), Conv1D, Linear ± bias equal the loop of
    single-example backwards; requires_grad flags (a frozen LayerNorm included) and .grad
    fields are unchanged afterwards."""
    torch.manual_seed(0)
    model = _MixedModel().double()
    model.norm.requires_grad_(False)  # an untracked frozen module: no effect on the others
    model.head.weight.grad = torch.full_like(model.head.weight, 3.0)
    tokens = torch.randint(1, 7, (4, 5))
    tokens[1, 3:] = 0
    tokens[3, 1:] = 0
    mask = (tokens != 0).double()
    targets = torch.randint(0, 7, (4, 5))
    modules = find_modules(model, ["embedding", "mixer", "hidden", "head"])
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    grads = {name: p.grad for name, p in model.named_parameters()}
    hooked = per_example_gradients(
        model, (tokens, targets, mask), sequence_loss, modules, mask=mask
    )
    examples = [(tokens[i : i + 1], targets[i : i + 1], mask[i : i + 1]) for i in range(4)]
    reference = _definition_gradients(model, modules, examples)
    for name in modules:
        torch.testing.assert_close(hooked[name], reference[name], msg=name)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is grads[name] for name, p in model.named_parameters())
    assert torch.equal(model.head.weight.grad, torch.full_like(model.head.weight, 3.0))


def test_model_unchanged_when_the_pass_raises() -> None:
    model = _MixedModel().double()
    model.norm.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    tokens = torch.randint(1, 7, (2, 3))

    def failing_loss(net, batch):
        net(batch)
        raise RuntimeError("loss failed mid-pass")

    with pytest.raises(RuntimeError, match="mid-pass"):
        per_example_gradients(model, tokens, failing_loss, find_modules(model))
    with pytest.raises(ValueError, match="does not require grad"):
        per_example_gradients(
            model, tokens, lambda net, batch: net(batch).detach().sum(), find_modules(model)
        )
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_relu_inplace_after_a_tracked_module_does_not_change_its_gradients() -> None:
    # Without a copy the recorded output would be the one after ReLU(inplace=True) and its
    # gradient the post-ReLU one: wrong by O(1), silently.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)).double()
    inputs, targets = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    modules = find_modules(model)
    examples = [(inputs[i : i + 1], targets[i : i + 1]) for i in range(6)]
    reference = _autograd_example_matrices(model, modules, classification_sum_loss, examples)
    for _ in range(2):  # the first pass detects the edit and records again; later ones copy
        hooked = per_example_gradients(model, (inputs, targets), classification_sum_loss, modules)
        for name in modules:
            torch.testing.assert_close(hooked[name], reference[name])
