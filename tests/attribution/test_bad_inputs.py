"""Bad input gets a ValueError that names the problem."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kronlab.attribution import (
    Curvature,
    cross_entropy_loss,
    fit_curvature,
    influence_scores,
    top_k,
)

from .attribution_models import classification_batches, tiny_mlp


def _data(n: int = 12):
    return classification_batches(
        torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,)), 6
    )


def test_model_without_trackable_module() -> None:
    model = nn.Sequential(nn.Flatten(), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="no trackable module"):
        fit_curvature(model, _data(), cross_entropy_loss)


def test_unmatched_module_pattern() -> None:
    with pytest.raises(ValueError, match="'attention.\\*' matches no trackable module"):
        fit_curvature(tiny_mlp(), _data(), cross_entropy_loss, modules=["attention.*"])


def test_module_that_received_no_gradient() -> None:
    model = tiny_mlp()
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match="received no gradient"):
        fit_curvature(model, _data(), cross_entropy_loss, "kfac")


def test_non_finite_statistics() -> None:
    model = tiny_mlp()
    inputs = torch.randn(6, 4, dtype=torch.float64)
    inputs[2, 1] = float("inf")
    data = [(inputs, torch.randint(0, 3, (6,)))]
    for method in ("kfac", "diagonal"):
        with pytest.raises(ValueError, match="non-finite"):
            fit_curvature(model, data, cross_entropy_loss, method, fisher="empirical")


def test_curvature_and_model_mismatch() -> None:
    curvature = fit_curvature(tiny_mlp(), _data(), cross_entropy_loss, "kfac")
    wider = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    with pytest.raises(ValueError, match="mismatch at '0'"):
        influence_scores(curvature, _data(), _data(), model=wider, loss_fn=cross_entropy_loss)
    renamed = nn.Sequential(nn.Sequential(tiny_mlp()))
    with pytest.raises(ValueError, match="model has no module"):
        influence_scores(curvature, _data(), _data(), model=renamed, loss_fn=cross_entropy_loss)
    with pytest.raises(ValueError, match="gradient shape"):
        curvature.inverse_hvp({"0": torch.randn(6, 4)})
    with pytest.raises(ValueError, match="no curvature"):
        curvature.inverse_hvp({"1": torch.randn(6, 5)})


def test_invalid_options() -> None:
    model = tiny_mlp()
    with pytest.raises(ValueError, match="Invalid method: 'shampoo'"):
        fit_curvature(model, _data(), cross_entropy_loss, "shampoo")
    with pytest.raises(ValueError, match="Invalid fisher: 'exact'"):
        fit_curvature(model, _data(), cross_entropy_loss, fisher="exact")
    with pytest.raises(ValueError, match="must accept sample=True"):
        fit_curvature(model, _data(), lambda net, b: nn.functional.cross_entropy(net(b[0]), b[1]))
    with pytest.raises(ValueError, match="Invalid samples: 0"):
        fit_curvature(model, _data(), cross_entropy_loss, samples=0)
    with pytest.raises(ValueError, match="Invalid samples: 2"):
        fit_curvature(model, _data(), cross_entropy_loss, fisher="empirical", samples=2)
    with pytest.raises(ValueError, match="no batch"):
        fit_curvature(model, [], cross_entropy_loss)
    curvature = fit_curvature(model, _data(), cross_entropy_loss, "kfac")
    with pytest.raises(ValueError, match="Invalid damping: -1"):
        curvature.inverse_hvp({"0": torch.randn(6, 5)}, damping=-1)
    with pytest.raises(ValueError, match="Invalid damping_factor"):
        curvature.inverse_hvp({"0": torch.randn(6, 5)}, damping_factor=float("nan"))
    with pytest.raises(ValueError, match="Invalid normalize: 'l2'"):
        influence_scores(
            curvature, _data(), _data(), model=model, loss_fn=cross_entropy_loss, normalize="l2"
        )
    with pytest.raises(ValueError, match="Invalid k: 13"):
        top_k(torch.randn(2, 12), 13)


def test_load_rejects_other_versions(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "curvature.safetensors"
    header = {"format": "kronlab.curvature", "version": 99, "method": "kfac", "modules": {}}
    save_file({"x": torch.zeros(1)}, str(path), metadata={"kronlab.curvature": json.dumps(header)})
    with pytest.raises(ValueError, match="version: 99"):
        Curvature.load(path)
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="no kronlab.curvature metadata"):
        Curvature.load(path)


def test_top_k_orders_scores() -> None:
    scores = torch.tensor([[0.1, 3.0, -2.0, 1.0], [5.0, 4.0, 6.0, -1.0]])
    values, indices = top_k(scores, 2)
    assert indices.tolist() == [[1, 3], [2, 0]]
    assert values.tolist() == [[3.0, 1.0], [6.0, 5.0]]
    assert top_k(scores, 1, largest=False)[1].tolist() == [[2], [3]]


def _zero_input_feature_data(n: int = 12):
    """Inputs whose last feature is always 0: A = mean a aᵀ has a zero eigenvalue."""
    inputs = torch.randn(n, 4, dtype=torch.float64)
    inputs[:, -1] = 0
    return classification_batches(inputs, torch.randint(0, 3, (n,)), 6)


def test_zero_damping_on_zero_eigenvalues_is_an_error_not_inf() -> None:
    model = tiny_mlp(bias=False)
    curvature = fit_curvature(
        model, _zero_input_feature_data(), cross_entropy_loss, "ekfac", fisher="empirical"
    )
    eigenvalues = curvature.modules["0"].eigenvalues()
    assert float(eigenvalues.min()) <= 1e-20  # the premise: a (numerically) zero eigenvalue
    with pytest.raises(ValueError, match="Invalid damping for module '0'.*damping=0"):
        curvature.inverse_hvp({"0": torch.randn(6, 4, dtype=torch.float64)}, damping=0.0)
    with pytest.raises(ValueError, match="Invalid damping for module '0'"):
        influence_scores(
            curvature,
            _zero_input_feature_data(),
            _zero_input_feature_data(),
            model=model,
            loss_fn=cross_entropy_loss,
            damping=0.0,
            progress=False,
        )
    # A positive damping is fine, and matches (Λ + λ)⁻¹ in the eigenbasis computed here.
    grad = torch.randn(6, 4, dtype=torch.float64)
    module = curvature.modules["0"]
    q_s, q_a = module.output_eigenvectors.double(), module.input_eigenvectors.double()
    expected = q_s @ ((q_s.T @ grad @ q_a) / (eigenvalues.double() + 0.5)) @ q_a.T
    torch.testing.assert_close(curvature.inverse_hvp({"0": grad}, damping=0.5)["0"], expected)


def test_non_finite_inputs_are_errors_not_nan_scores() -> None:
    model = tiny_mlp()
    curvature = fit_curvature(model, _data(), cross_entropy_loss, "kfac", fisher="empirical")
    for bad in (float("nan"), float("inf")):
        grad = torch.randn(6, 5, dtype=torch.float64)
        grad[1, 2] = bad
        with pytest.raises(ValueError, match=r"Invalid grads\['0'\]: it has NaN or infinite"):
            curvature.inverse_hvp({"0": grad})
        poisoned = _data()
        poisoned[1][0][0, 0] = bad
        with pytest.raises(ValueError, match="Invalid train_data: batch 1 gives NaN"):
            influence_scores(
                curvature, _data(), poisoned, model=model, loss_fn=cross_entropy_loss,
                progress=False,
            )  # fmt: skip
        with pytest.raises(ValueError, match="Invalid query_data: batch 1 gives NaN"):
            influence_scores(
                curvature, poisoned, _data(), model=model, loss_fn=cross_entropy_loss,
                progress=False,
            )  # fmt: skip


def test_load_rejects_damaged_files(tmp_path) -> None:
    curvature = fit_curvature(tiny_mlp(), _data(), cross_entropy_loss, "kfac")
    path = tmp_path / "curvature.safetensors"
    curvature.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="Invalid curvature file: .* cannot be read"):
        Curvature.load(path)
    curvature.modules["0"].output_eigenvalues[1] = float("nan")
    curvature.save(path)
    with pytest.raises(ValueError, match=r"non-finite values in \['0::output_eigenvalues'\]"):
        Curvature.load(path)
