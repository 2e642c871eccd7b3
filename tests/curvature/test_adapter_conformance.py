"""Every registered layer adapter against autograd, in float64.

Parametrized over :func:`kronlab.curvature.registered_adapters`: each kind needs a case in
``CASES`` below (a test fails for a kind without one). Per case: per-example gradients (plain
and projected) equal one backward per example; K-FAC statistics equal their definitions over
the recorded tokens; and, for hooked layers, the recorded ``a_t`` and ``g_t`` are the layer's
own, ``s_t = W a_t (+ b)`` with ``W`` in the adapter's matrix view and ``g_t = ∂loss/∂s_t``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from kronlab.curvature import (
    KroneckerStatistics,
    gradient_matrix,
    layer_adapter,
    layer_batches,
    layer_spec,
    parameters_from_matrix,
    per_example_gradients,
    registered_adapters,
)


class Conv1D(nn.Module):
    """HF-style ``Conv1D`` (``y = x W + b``, weight ``(in, out)``), with an optional bias."""

    def __init__(self, nf: int, nx: int, bias: bool) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


class SelfAttention(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.layer = nn.MultiheadAttention(4, 2, bias=bias, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, x, x, need_weights=False)[0]


@dataclass
class Case:
    """A model, the layer under test inside it, and a batch of inputs."""

    model: nn.Module
    layer: nn.Module
    inputs: torch.Tensor


def _holding(layer: nn.Module, inputs: torch.Tensor) -> Case:
    model = nn.Sequential(layer).double()
    return Case(model, model[0], inputs)


def _attention(bias: bool) -> Case:
    model = SelfAttention(bias).double()
    return Case(model, model.layer, _sequences())


def _sequences(n: int = 5, tokens: int = 3, width: int = 4) -> torch.Tensor:
    return torch.randn(n, tokens, width, dtype=torch.float64)


CASES: dict[str, dict[str, Callable[[], Case]]] = {
    "linear": {
        "bias": lambda: _holding(nn.Linear(4, 3), _sequences()),
        "no-bias": lambda: _holding(nn.Linear(4, 3, bias=False), _sequences()),
    },
    "conv1d": {
        "bias": lambda: _holding(Conv1D(3, 4, bias=True), _sequences()),
        "no-bias": lambda: _holding(Conv1D(3, 4, bias=False), _sequences()),
    },
    "conv2d": {
        "bias": lambda: _holding(
            nn.Conv2d(2, 3, 3, padding=1, stride=2), torch.randn(5, 2, 5, 5, dtype=torch.float64)
        ),
        "no-bias": lambda: _holding(
            nn.Conv2d(2, 3, 2, dilation=2, bias=False),
            torch.randn(5, 2, 5, 5, dtype=torch.float64),
        ),
    },
    "torch_conv1d": {
        "bias": lambda: _holding(
            nn.Conv1d(2, 3, 3, padding=1, stride=2), torch.randn(5, 2, 7, dtype=torch.float64)
        ),
        "no-bias": lambda: _holding(
            nn.Conv1d(2, 3, 2, dilation=2, bias=False), torch.randn(5, 2, 7, dtype=torch.float64)
        ),
    },
    "embedding": {
        "plain": lambda: _holding(nn.Embedding(7, 3), torch.randint(0, 7, (5, 4))),
        "padding-idx": lambda: _holding(
            nn.Embedding(7, 3, padding_idx=0), torch.randint(0, 7, (5, 4))
        ),
    },
    "attention": {
        "bias": lambda: _attention(bias=True),
        "no-bias": lambda: _attention(bias=False),
    },
}


def _loss(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A sum of per-example losses, nonlinear in the model's output so ``g_t`` varies."""
    output = model(inputs)
    return (output.sin() + 0.5 * output.square()).sum()


def _parameters(case: Case) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    module = case.layer
    adapter = layer_adapter(module)
    bias = adapter.bias(module) if layer_spec(module).has_bias else None
    return module, adapter.weight(module), bias


def _autograd_gradients(case: Case) -> torch.Tensor:
    """``(n, d_out, d_in)``: one backward per example, the ``.grad`` in the matrix view."""
    module, weight, bias = _parameters(case)
    rows = []
    for example in case.inputs:
        case.model.zero_grad()
        _loss(case.model, example[None]).backward()
        rows.append(gradient_matrix(module, weight.grad, None if bias is None else bias.grad))
    return torch.stack(rows)


CASE_IDS = [
    (adapter.kind, variant)
    for adapter in registered_adapters()
    for variant in CASES.get(adapter.kind, {"(no case)": None})
]


def _case(kind: str, variant: str) -> Case:
    if kind not in CASES:
        pytest.fail(f"layer kind {kind!r} is registered but has no conformance case in CASES")
    torch.manual_seed(3)
    return CASES[kind][variant]()


@pytest.mark.parametrize(("kind", "variant"), CASE_IDS)
def test_per_example_gradients_equal_autograd(kind: str, variant: str) -> None:
    case = _case(kind, variant)
    module = case.layer
    spec = layer_spec(module)
    assert spec is not None and spec.kind == kind
    expected = _autograd_gradients(case)
    assert expected.shape[1:] == (spec.d_out, spec.d_in)
    modules = {"layer": module}
    gradients = per_example_gradients(case.model, case.inputs, _loss, modules)["layer"]
    torch.testing.assert_close(gradients, expected, rtol=1e-10, atol=1e-12)
    output_side = torch.randn(2, spec.d_out, dtype=torch.float64)
    input_side = torch.randn(3, spec.d_in, dtype=torch.float64)
    projected = per_example_gradients(
        case.model, case.inputs, _loss, modules, {"layer": (output_side, input_side)}
    )["layer"]
    torch.testing.assert_close(
        projected, output_side @ expected @ input_side.T, rtol=1e-10, atol=1e-12
    )
    # The matrix view and its inverse are one round trip.
    _, weight, bias = _parameters(case)
    matrix = gradient_matrix(module, weight, bias)
    weight_back, bias_back = parameters_from_matrix(module, matrix)
    assert torch.equal(weight_back, weight)
    assert (bias_back is None) == (bias is None)
    if bias is not None:
        assert torch.equal(bias_back, bias)


@pytest.mark.parametrize(("kind", "variant"), CASE_IDS)
def test_kfac_statistics_equal_their_definitions(kind: str, variant: str) -> None:
    case = _case(kind, variant)
    module = case.layer
    spec = layer_spec(module)
    layers = list(layer_batches(case.model, case.inputs, _loss, {"layer": module}))
    statistics = KroneckerStatistics()
    statistics.update(layers)
    activation, gradient = statistics.factors()["layer"]

    (layer,) = layers
    tokens = layer.activations
    if spec.diagonal_activation:  # one-hot a_t, masked tokens (padding rows) zero
        tokens = nn.functional.one_hot(tokens, spec.d_in).double()
        if layer.token_mask is not None:
            tokens = tokens * layer.token_mask.unsqueeze(-1)
    flat_a = tokens.reshape(-1, spec.d_in)
    expected_a = flat_a.T @ flat_a / layer.num_tokens
    if spec.diagonal_activation:
        expected_a = expected_a.diagonal()
    flat_g = layer.gradients.reshape(-1, spec.d_out)
    torch.testing.assert_close(activation, expected_a, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        gradient, flat_g.T @ flat_g / len(case.inputs), rtol=1e-12, atol=1e-14
    )
    # Σ_t g_t a_tᵀ of the recorded tokens is each example's autograd gradient.
    torch.testing.assert_close(
        layer.gradients.transpose(1, 2) @ tokens,
        _autograd_gradients(case),
        rtol=1e-10,
        atol=1e-12,
    )

    if not layer_adapter(module).hooked:
        return  # recorded inside another forward: the tokens above are all there is to check
    # The recorded tokens are the layer's own: s_t = W a_t (+ b) and g_t = ∂loss/∂s_t.
    outputs = []
    handle = module.register_forward_hook(lambda _, __, output: outputs.append(output))
    try:
        loss = _loss(case.model, case.inputs)
    finally:
        handle.remove()
    (output,) = outputs
    (output_gradient,) = torch.autograd.grad(loss, output)
    adapter = layer_adapter(module)
    n = len(case.inputs)
    token_outputs = adapter.token_gradients(module, output.detach(), n, spec.d_out)
    token_gradients = adapter.token_gradients(module, output_gradient, n, spec.d_out)
    _, weight, bias = _parameters(case)
    matrix = gradient_matrix(module, weight.detach(), None if bias is None else bias.detach())
    torch.testing.assert_close(token_outputs, tokens @ matrix.T, rtol=1e-10, atol=1e-12)
    mask = 1.0 if layer.token_mask is None else layer.token_mask.unsqueeze(-1)
    torch.testing.assert_close(layer.gradients, token_gradients * mask, rtol=0, atol=0)
