"""Invariances: Conv1D == Linear, padding changes nothing, determinism, save/load round-trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kronlab.attribution import Curvature, cross_entropy_loss, fit_curvature, influence_scores

from .attribution_models import Conv1D, classification_batches, tiny_mlp


def _pair_of_models() -> tuple[nn.Module, nn.Module]:
    linear = tiny_mlp()
    converted = nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(3, 6)).double()
    with torch.no_grad():
        for source, target in ((linear[0], converted[0]), (linear[2], converted[2])):
            target.weight.copy_(source.weight.T)
            target.bias.copy_(source.bias)
    return linear, converted


@pytest.mark.parametrize("method", ["kfac", "ekfac", "diagonal"])
def test_conv1d_gives_the_same_curvature_and_scores_as_linear(method: str) -> None:
    linear, converted = _pair_of_models()
    inputs, targets = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    data = classification_batches(inputs, targets, 10)
    results = []
    for model in (linear, converted):
        curvature = fit_curvature(model, data, cross_entropy_loss, method, dtype=torch.float64)
        results.append(
            (
                curvature,
                influence_scores(
                    curvature,
                    data[:1],
                    data,
                    model=model,
                    loss_fn=cross_entropy_loss,
                    progress=False,
                ),
            )
        )
    (linear_curvature, linear_scores), (conv1d_curvature, conv1d_scores) = results
    torch.testing.assert_close(linear_scores, conv1d_scores)
    for name in ("0", "2"):
        torch.testing.assert_close(
            linear_curvature.modules[name].eigenvalues(),
            conv1d_curvature.modules[name].eigenvalues(),
        )


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(9, 4)
        self.hidden = nn.Linear(4, 5)
        self.head = nn.Linear(5, 9, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embedding(tokens))))


def _token_loss(model, batch, sample: bool = False):
    logits = model(batch["input_ids"])
    targets = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
    return cross_entropy_loss(lambda _: logits, (None, targets), sample=sample)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_padding_tokens_change_nothing(method: str) -> None:
    model = _TokenModel().double()
    lengths = [5, 3, 4, 2]
    tokens = [torch.randint(1, 9, (length,)) for length in lengths]
    labels = [torch.randint(0, 9, (length,)) for length in lengths]

    def padded(width: int):
        ids = torch.zeros(len(lengths), width, dtype=torch.long)
        targets = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for row, (sequence, target) in enumerate(zip(tokens, labels)):
            ids[row, : len(sequence)], targets[row, : len(target)] = sequence, target
            mask[row, : len(sequence)] = 1
            ids[row, len(sequence) :] = 7  # padding with a real token id must still be ignored
        return [{"input_ids": ids, "labels": targets, "attention_mask": mask}]

    short, long = padded(5), padded(9)
    # Empirical Fisher: label sampling would draw at padded positions too and shift the stream.
    fits = [
        fit_curvature(model, data, _token_loss, method, fisher="empirical", dtype=torch.float64)
        for data in (short, long)
    ]
    for name in fits[0].modules:
        first, second = fits[0].modules[name], fits[1].modules[name]
        for side in ("output", "input"):
            vectors = [getattr(m, f"{side}_eigenvectors") for m in (first, second)]
            values = [getattr(m, f"{side}_eigenvalues") for m in (first, second)]
            if vectors[0] is None:  # embedding: the diagonal activation factor itself
                torch.testing.assert_close(values[0], values[1])
                continue
            factors = [q * v @ q.T for q, v in zip(vectors, values)]
            torch.testing.assert_close(factors[0], factors[1], msg=f"{name} {side} factor")
        torch.testing.assert_close(first.eigenvalues(), second.eigenvalues(), msg=name)
    scores = [
        influence_scores(fit, data, data, model=model, loss_fn=_token_loss, progress=False)
        for fit, data in zip(fits, (short, long))
    ]
    torch.testing.assert_close(scores[0], scores[1])


def test_same_seed_gives_identical_scores_and_other_seed_differs() -> None:
    model = tiny_mlp()
    inputs, targets = torch.randn(24, 4, dtype=torch.float64), torch.randint(0, 3, (24,))
    data = classification_batches(inputs, targets, 8)

    def run(seed: int) -> torch.Tensor:
        curvature = fit_curvature(model, data, cross_entropy_loss, "ekfac", seed=seed)
        return influence_scores(
            curvature, data[:1], data, model=model, loss_fn=cross_entropy_loss, progress=False
        )

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))  # the true Fisher samples labels from the seed


@pytest.mark.parametrize("method", ["kfac", "ekfac", "diagonal", "identity"])
def test_save_load_round_trip(method: str, tmp_path) -> None:
    model = _TokenModel()
    batch = {
        "input_ids": torch.randint(0, 9, (3, 4)),
        "labels": torch.randint(0, 9, (3, 4)),
        "attention_mask": torch.ones(3, 4, dtype=torch.long),
    }
    curvature = fit_curvature(model, [batch], _token_loss, method)
    path = tmp_path / "curvature.safetensors"
    curvature.save(path)
    loaded = Curvature.load(path)
    assert loaded.method == method and loaded.metadata == curvature.metadata
    assert list(loaded.modules) == list(curvature.modules)
    for name, module in curvature.modules.items():
        assert loaded.modules[name].spec == module.spec
        assert module.tensors().keys() == loaded.modules[name].tensors().keys()
        for kind, tensor in module.tensors().items():
            assert torch.equal(tensor, loaded.modules[name].tensors()[kind])
    grads = {
        name: torch.randn(2, m.spec.d_out, m.spec.d_in) for name, m in curvature.modules.items()
    }
    original, restored = curvature.inverse_hvp(grads), loaded.inverse_hvp(grads)
    for name in grads:
        assert torch.equal(original[name], restored[name])


def test_to_changes_dtype_and_keeps_products() -> None:
    model = tiny_mlp()
    data = classification_batches(
        torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,)), 6
    )
    curvature = fit_curvature(model, data, cross_entropy_loss, "ekfac", dtype=torch.float64)
    single = curvature.to(dtype=torch.float32)
    assert all(
        t.dtype == torch.float32 for m in single.modules.values() for t in m.tensors().values()
    )
    grads = {"0": torch.randn(6, 5, dtype=torch.float64)}
    torch.testing.assert_close(
        single.inverse_hvp(grads)["0"], curvature.inverse_hvp(grads)["0"], rtol=1e-4, atol=1e-6
    )
