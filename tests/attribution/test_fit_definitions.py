"""Fitted factors and eigenvalues equal their definitions, computed here with autograd."""

from __future__ import annotations

import torch
from torch import nn

from kronlab.attribution import cross_entropy_loss, fit_curvature
from kronlab.curvature import find_modules, gradient_matrix

from .attribution_models import classification_batches, tiny_mlp


def _example_gradients(model, inputs, targets):
    """{module: (n, d_out, d_in)} from one backward per example."""
    modules = find_modules(model)
    rows = {name: [] for name in modules}
    for x, y in zip(inputs, targets):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[None]), y[None], reduction="sum").backward()
        for name, module in modules.items():
            rows[name].append(gradient_matrix(module, module.weight.grad, module.bias.grad))
    return {name: torch.stack(matrices) for name, matrices in rows.items()}


def test_kfac_factors_ekfac_and_diagonal_eigenvalues_match_definitions() -> None:
    model = tiny_mlp()
    inputs, targets = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    data = classification_batches(inputs, targets, 7)
    per_example = _example_gradients(model, inputs, targets)

    def fit(method):
        return fit_curvature(
            model, data, cross_entropy_loss, method, fisher="empirical", dtype=torch.float64
        )

    kfac, ekfac, diagonal = fit("kfac"), fit("ekfac"), fit("diagonal")

    # First layer: a = [x, 1]; S from the output gradients g_i = G_i[:, -1] (bias column).
    activations = torch.cat([inputs, torch.ones(30, 1, dtype=torch.float64)], 1)
    expected_a = activations.T @ activations / 30
    output_gradients = per_example["0"][:, :, -1]
    expected_s = output_gradients.T @ output_gradients / 30
    first = kfac.modules["0"]
    torch.testing.assert_close(
        first.input_eigenvectors * first.input_eigenvalues @ first.input_eigenvectors.T, expected_a
    )
    torch.testing.assert_close(
        first.output_eigenvectors * first.output_eigenvalues @ first.output_eigenvectors.T,
        expected_s,
    )
    for name, grads in per_example.items():
        module = ekfac.modules[name]
        rotated = module.output_eigenvectors.T @ grads @ module.input_eigenvectors
        torch.testing.assert_close(module.eigenvalues(), rotated.square().mean(0))
        torch.testing.assert_close(diagonal.modules[name].eigenvalues(), grads.square().mean(0))


def test_several_fisher_samples_equal_repeating_the_data() -> None:
    model = tiny_mlp()
    data = classification_batches(
        torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,)), 6
    )
    repeated = fit_curvature(model, data * 3, cross_entropy_loss, "ekfac", dtype=torch.float64)
    sampled = fit_curvature(
        model, data, cross_entropy_loss, "ekfac", dtype=torch.float64, samples=3
    )
    for name, module in repeated.modules.items():
        torch.testing.assert_close(module.eigenvalues(), sampled.modules[name].eigenvalues())
