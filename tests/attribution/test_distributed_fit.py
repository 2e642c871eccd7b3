"""``fit_curvature`` over two gloo ranks equals the one-process fit, for every fit option."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kronlab.attribution import fit_curvature
from kronlab.attribution.distributed import Workers

from ..curvature.curvature_models import TinySequenceModel
from .gloo import run_on_ranks

VOCAB = 7


def _mask(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return batch[2]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, ...], sample: bool = False) -> torch.Tensor:
    """Summed masked next-token loss. ``sample=True`` stands for a true-Fisher draw with a
    deterministic one (the most likely token's neighbour), so that ranks drawing from their own
    generators still see the same labels as one process does."""
    tokens, targets, mask = batch
    logits = model(tokens).flatten(0, 1)
    if sample:
        targets = (logits.detach().argmax(-1) + 1) % VOCAB
    losses = nn.functional.cross_entropy(logits, targets.flatten(), reduction="none")
    return (losses * mask.flatten()).sum()


def _data() -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (13, 6), generator=generator)
    targets = torch.randint(0, VOCAB, (13, 6), generator=generator)
    mask = torch.ones(13, 6)
    mask[::3, 4:] = 0  # padding
    return [(tokens[s : s + 3], targets[s : s + 3], mask[s : s + 3]) for s in range(0, 13, 3)]


def _model() -> nn.Module:
    torch.manual_seed(1)
    return TinySequenceModel(VOCAB).double()


# Option sets; "one-batch" leaves rank 1 without any batch.
OPTIONS = {
    "kfac": dict(method="kfac", fisher="empirical"),
    "ekfac": dict(method="ekfac", fisher="empirical"),
    "diagonal": dict(method="diagonal", fisher="empirical"),
    "identity": dict(method="identity"),
    "true-fisher-samples": dict(method="ekfac", fisher="true", samples=2),
    "no-bias": dict(method="ekfac", fisher="empirical", bias=False),
    "modules": dict(method="kfac", fisher="empirical", modules=["mixer", "head"]),
    "one-batch": dict(method="ekfac", fisher="empirical"),
}


def _fit(name: str, reducer=None):
    """The fit of option ``name`` on this rank's share: batch ``k`` on rank ``k mod N``."""
    data = _data()[:1] if name == "one-batch" else _data()
    if reducer is not None:
        data = data[reducer.rank :: reducer.world_size]
    return fit_curvature(
        _model(), data, _loss, mask_fn=_mask, dtype=torch.float64, reducer=reducer, **OPTIONS[name]
    )


def _fit_every_option(workers: Workers, directory) -> None:
    results = {name: _fit(name, workers) for name in OPTIONS}
    torch.save(results, directory / f"rank{workers.rank}.pt")


def _products(curvature, probes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Basis-free views of a curvature: ``H G`` and ``(H + λI)⁻¹ G`` on fixed probes."""
    products = {f"{name}@": value for name, value in (curvature @ probes).items()}
    inverse = curvature.inverse_hvp(probes, damping_factor=0.1)
    products.update({f"{name}^-1": value for name, value in inverse.items()})
    return products


@pytest.fixture(scope="module")
def two_rank_fits(tmp_path_factory):
    directory = tmp_path_factory.mktemp("distributed_fit")
    run_on_ranks(_fit_every_option, 2, directory, directory)
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.mark.parametrize("option", list(OPTIONS))
def test_two_ranks_fit_what_one_process_fits(two_rank_fits, option: str) -> None:
    single = _fit(option)
    first, second = (fits[option] for fits in two_rank_fits)
    assert first.method == single.method
    assert first.metadata == second.metadata == single.metadata
    # Both ranks hold the very same tensors (decomposed on one rank, broadcast).
    for name, module in first.modules.items():
        assert module.spec == single.modules[name].spec
        for part, tensor in module.tensors().items():
            assert torch.equal(tensor, second.modules[name].tensors()[part])
    generator = torch.Generator().manual_seed(2)
    probes = {
        name: torch.randn(module.spec.d_out, module.spec.d_in, dtype=torch.float64,
                          generator=generator)
        for name, module in single.modules.items()
    }  # fmt: skip
    expected = _products(single, probes)
    for key, value in _products(first, probes).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-9, atol=1e-12)
    for name, module in single.modules.items():
        torch.testing.assert_close(
            first.modules[name].eigenvalues(), module.eigenvalues(), rtol=1e-9, atol=1e-12
        )


def test_a_reducer_that_is_not_one_is_refused_before_any_work() -> None:
    def loss_never_called(model, batch, sample=False):
        raise AssertionError("the fit read data")

    with pytest.raises(TypeError, match="Invalid reducer: str"):
        fit_curvature(_model(), _data(), loss_never_called, reducer="gloo")
