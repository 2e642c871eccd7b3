"""Fit K-FAC / EK-FAC / diagonal curvature of a model on a dataset with module hooks.

Pass 1 accumulates ``A = mean a aᵀ`` and ``S = mean g gᵀ`` (float64) and eigendecomposes them
with :func:`kronlab.linalg.eigh`; EK-FAC's pass 2 measures
``Λ_ij = mean_i (Q_Sᵀ G_i Q_A)_ij²`` from per-example gradients projected onto the eigenbases
(George et al. 2018, EK-FAC; Grosse et al. 2023 for influence functions).

The same fit runs on one process or on several ``torch.distributed`` ranks: every sum it forms
goes through a :class:`~kronlab.attribution.distributed.Reducer` (a no-op for one process, an
all-reduce across ranks) before any division, so the options and the result do not depend on
the number of ranks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kronlab.attribution.curvature import Curvature, ModuleCurvature
from kronlab.attribution.distributed import Reducer, Workers
from kronlab.curvature import (
    KroneckerStatistics,
    LayerSpec,
    LossFn,
    bias_in_curvature,
    example_gradients,
    find_modules,
    includes_bias,
    layer_batches,
    layer_spec,
)
from kronlab.linalg import eigh
from kronlab.optim.validation import check_choice, check_loss_fn, check_module, check_range

FIT_METHODS = ("kfac", "ekfac", "diagonal", "identity")
FISHER_TYPES = ("true", "empirical")
MaskFn = Callable[[Any], torch.Tensor | None]
# Rank r seeds its label draws with seed + r · stride: independent draws on every rank.
_RANK_SEED_STRIDE = 1_000_003


def fit_curvature(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[..., torch.Tensor],
    method: str = "ekfac",
    modules: str | list[str] | None = None,
    fisher: str = "true",
    *,
    mask_fn: MaskFn | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    samples: int = 1,
    progress: bool = False,
    bias: bool = True,
    reducer: Reducer | None = None,
) -> Curvature:
    """Fit the curvature of ``model`` on ``data`` (an iterable of batches, read once per pass).

    ``loss_fn(model, batch)`` returns the **sum** of per-example losses. With ``fisher="true"``
    (the default, a Gauss–Newton estimate) it is called as ``loss_fn(model, batch, sample=True)``
    and must draw targets from the model's own predictive distribution (see
    :func:`kronlab.attribution.cross_entropy_loss`); ``"empirical"`` uses the data's labels.
    ``mask_fn(batch)`` gives the ``(n, T)`` padding mask (default: ``batch["attention_mask"]``
    when the batch is a mapping that has one). Factors are stored in ``dtype``; label sampling
    uses a private generator seeded with ``seed``; ``samples`` > 1 draws that many label sets per
    example for the true Fisher (each pass reads ``data`` that many times), which lowers the
    Monte Carlo noise of ``S`` and of EK-FAC's eigenvalues. ``bias=False`` leaves the tracked
    layers' biases out of the curvature (and out of the gradients scored against it).

    ``reducer`` fits across processes: with the :class:`~kronlab.attribution.distributed.Workers`
    of a ``torch.distributed`` process group, ``data`` is this rank's share of the batches, every
    sum and count is all-reduced before any division and the eigendecompositions are spread over
    the ranks and broadcast, so every rank returns the curvature one process fits on all the data
    (up to summation order), with the same options. Each rank draws its true-Fisher labels from
    its own generator (seeded ``seed + 1000003 · rank``; rank 0 draws as one process does).
    """
    check_module("model", model)
    check_loss_fn("loss_fn", loss_fn)
    reducer = Workers() if reducer is None else reducer
    if not isinstance(reducer, Reducer):
        raise TypeError(
            f"Invalid reducer: {type(reducer).__name__} (allowed: None or a Reducer such as "
            "kronlab.attribution.distributed.Workers)"
        )
    if not bias:
        with bias_in_curvature(False):
            return fit_curvature(
                model, data, loss_fn, method, modules, fisher, mask_fn=mask_fn, dtype=dtype,
                seed=seed, samples=samples, progress=progress, reducer=reducer,
            )  # fmt: skip
    check_choice("method", method, FIT_METHODS)
    check_choice("fisher", fisher, FISHER_TYPES)
    check_range("samples", samples, 1, integer=True)
    if samples > 1 and fisher != "true":
        raise ValueError(f"Invalid samples: {samples} (allowed: 1 unless fisher='true')")
    tracked = find_modules(model, modules)
    specs = {name: _spec(module) for name, module in tracked.items()}
    if method == "identity":
        return Curvature(
            "identity",
            {name: _identity(spec, dtype) for name, spec in specs.items()},
            {"fisher": None, "num_examples": 0, "bias": includes_bias()},
        )
    fitting_loss = _fitting_loss(loss_fn, fisher)
    masks = mask_fn or default_mask

    def batches(description: str) -> Iterable[Any]:
        for _ in range(int(samples)):
            yield from tqdm(data, desc=description, disable=not progress, leave=False)

    def squares(description: str, projections: dict) -> tuple[dict, dict[str, int]]:
        return _eigenbasis_squares(
            model, batches(description), fitting_loss, specs, tracked, masks, projections, reducer
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _RANK_SEED_STRIDE * reducer.rank)
        if method == "diagonal":
            sums, examples = squares("diagonal", {})
            fitted = {
                name: ModuleCurvature(
                    spec, corrected_eigenvalues=(sums[name] / examples[name]).to(dtype)
                )
                for name, spec in specs.items()
            }
            return Curvature("diagonal", fitted, _metadata(fisher, examples, seed, samples))
        statistics = KroneckerStatistics()
        for batch in batches("factors"):
            statistics.update(layer_batches(model, batch, fitting_loss, tracked, masks(batch)))
        statistics.sum_over_ranks(specs, reducer.all_reduce_sum)
        if statistics.batch_count == 0:
            raise ValueError("Invalid data: no batch (the iterable was empty)")
        fitted = _eigendecompose(statistics, dtype, reducer)
        examples = statistics.example_counts
        if method == "ekfac":
            projections = {
                name: (
                    _transpose(module.output_eigenvectors),
                    _transpose(module.input_eigenvectors),
                )
                for name, module in fitted.items()
            }
            sums, examples = squares("eigenvalue correction", projections)
            for name, module in fitted.items():
                module.corrected_eigenvalues = (sums[name] / examples[name]).to(dtype)
    return Curvature(method, fitted, _metadata(fisher, examples, seed, samples))


def cross_entropy_loss(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], sample: bool = False
) -> torch.Tensor:
    """Summed cross-entropy of ``model(inputs)`` for ``batch = (inputs, targets)``.

    ``sample=True`` replaces the targets by draws from ``softmax(logits)`` (true Fisher). Logits
    may have extra token dimensions ``(n, …, classes)``; targets equal to -100 are ignored.
    """
    inputs, targets = batch
    logits = model(inputs)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    if sample:
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(flat_logits.detach().float(), -1), 1)
        flat_targets = torch.where(flat_targets == -100, flat_targets, sampled.squeeze(-1))
    return nn.functional.cross_entropy(flat_logits, flat_targets, reduction="sum")


def mse_loss(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], sample: bool = False
) -> torch.Tensor:
    """``½ Σ ‖model(x) − y‖²``; ``sample=True`` draws ``y ~ N(model(x), I)`` (true Fisher)."""
    inputs, targets = batch
    outputs = model(inputs)
    if sample:
        with torch.no_grad():
            targets = outputs.detach() + torch.randn_like(outputs)
    return 0.5 * ((outputs - targets) ** 2).sum()


def default_mask(batch: Any) -> torch.Tensor | None:
    """``batch["attention_mask"]`` for mapping batches (HF style), else ``None``."""
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        return batch["attention_mask"]
    return None


def _fitting_loss(loss_fn: Callable[..., torch.Tensor], fisher: str) -> LossFn:
    if fisher == "empirical":
        return loss_fn
    try:
        accepts_sample = "sample" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        accepts_sample = False
    if not accepts_sample:
        raise ValueError(
            "Invalid loss_fn for fisher='true': it must accept sample=True and then draw targets "
            "from the model's predictive distribution (e.g. kronlab.attribution."
            "cross_entropy_loss); or pass fisher='empirical'"
        )
    return lambda model, batch: loss_fn(model, batch, sample=True)


def _eigendecompose(
    statistics: KroneckerStatistics, dtype: torch.dtype, reducer: Reducer
) -> dict[str, ModuleCurvature]:
    """Eigendecompose every dense factor in float64: rank ``k mod world`` decomposes the
    ``k``-th factor (one batched ``eigh`` per factor size) and broadcasts it to the others."""
    factors = statistics.factors()
    dense = {(name, "output"): gradient for name, (_, gradient) in factors.items()}
    dense.update(
        {
            (name, "input"): activation
            for name, (activation, _) in factors.items()
            if not statistics.specs[name].diagonal_activation
        }
    )
    order = {key: index for index, key in enumerate(dense)}
    world, rank = reducer.world_size, reducer.rank
    by_size: dict[int, list[tuple[str, str]]] = {}
    for key, matrix in dense.items():
        if order[key] % world == rank:
            by_size.setdefault(matrix.shape[-1], []).append(key)
    pairs: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    failed = torch.zeros(len(dense), dtype=torch.float64)
    for keys in by_size.values():
        decomposition = eigh(torch.stack([dense[key] for key in keys]), float64=True)
        for index, key in enumerate(keys):
            failed[order[key]] = float(not bool(decomposition.ok[index]))
            pairs[key] = (decomposition.eigenvectors[index], decomposition.eigenvalues[index])
    # Every rank learns of a failure before any broadcast, so all of them raise.
    reducer.all_reduce_sum(failed)
    for key, index in order.items():
        if failed[index]:
            side = "S" if key[1] == "output" else "A"
            raise ValueError(f"eigendecomposition of {side} failed for module {key[0]!r}")
    for key, index in order.items():
        if world > 1:
            pairs[key] = _broadcast_pair(pairs.get(key), dense[key], index % world, reducer)
        vectors, values = pairs[key]
        # Contiguous, as after a save/load round trip, so products are bit-identical.
        pairs[key] = (vectors.to(dtype).contiguous(), values)
    fitted = {}
    for name, (activation, _) in factors.items():
        output_vectors, output_values = pairs[(name, "output")]
        # Embeddings: A is diagonal, so its eigenbasis is the identity (None).
        input_vectors, input_values = pairs.get((name, "input"), (None, activation))
        # Round-off can leave tiny negative eigenvalues of a PSD matrix; they are zero.
        fitted[name] = ModuleCurvature(
            statistics.specs[name],
            output_eigenvectors=output_vectors,
            input_eigenvectors=input_vectors,
            output_eigenvalues=output_values.clamp_min(0).to(dtype),
            input_eigenvalues=input_values.clamp_min(0).to(dtype),
        )
    return fitted


def _broadcast_pair(
    pair: tuple[torch.Tensor, torch.Tensor] | None,
    matrix: torch.Tensor,
    owner: int,
    reducer: Reducer,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvectors, eigenvalues)`` of ``matrix`` as rank ``owner`` computed them."""
    if pair is None:  # not this rank's: room for the owner's result
        size = matrix.shape[-1]
        pair = (matrix.new_empty(size, size), matrix.new_empty(size))
    vectors, values = (part.contiguous() for part in pair)
    return reducer.broadcast_tensor(vectors, owner), reducer.broadcast_tensor(values, owner)


def _eigenbasis_squares(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: LossFn,
    specs: Mapping[str, LayerSpec],
    tracked: dict[str, nn.Module],
    masks: MaskFn,
    projections: dict,
    reducer: Reducer,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``Σ_i (P_S G_i P_Aᵀ)²`` (float64) and the example count per module, over all ranks.

    ``P_S``, ``P_A`` are square (eigenbases) or absent, so each sum is ``(d_out, d_in)``.
    """
    squares: dict[str, torch.Tensor] = {}
    examples: dict[str, int] = dict.fromkeys(tracked, 0)
    batches = 0
    for batch in data:
        batches += 1
        per_example: dict[str, torch.Tensor] = {}
        for layer in layer_batches(model, batch, loss_fn, tracked, masks(batch)):
            contribution = example_gradients(layer, projections.get(layer.name))
            previous = per_example.get(layer.name)
            per_example[layer.name] = contribution if previous is None else previous + contribution
        for name, gradients in per_example.items():
            total = gradients.double().square().sum(0)
            squares[name] = total if name not in squares else squares[name] + total
            examples[name] += gradients.shape[0]
    counts = torch.tensor([batches, *examples.values()], dtype=torch.float64)
    batches, *totals = reducer.all_reduce_sum(counts).long().tolist()
    if batches == 0:
        raise ValueError("Invalid data: no batch (the iterable was empty)")
    examples = dict(zip(examples, totals))
    missing = [name for name, count in examples.items() if count == 0]
    if missing:
        raise ValueError(f"tracked modules received no gradient: {missing}")
    for name, spec in specs.items():
        if name not in squares:  # this rank read no batch
            squares[name] = torch.zeros(spec.d_out, spec.d_in, dtype=torch.float64)
        reducer.all_reduce_sum(squares[name])
        if not torch.isfinite(squares[name]).all():
            raise ValueError(f"non-finite per-example gradients for module {name!r}")
    return squares, examples


def _identity(spec: LayerSpec, dtype: torch.dtype) -> ModuleCurvature:
    return ModuleCurvature(
        spec, corrected_eigenvalues=torch.ones(spec.d_out, spec.d_in, dtype=dtype)
    )


def _spec(module: nn.Module) -> LayerSpec:
    spec = layer_spec(module)
    assert spec is not None  # find_modules keeps trackable modules only
    return spec


def _transpose(matrix: torch.Tensor | None) -> torch.Tensor | None:
    return None if matrix is None else matrix.transpose(0, 1)


def _metadata(fisher: str, examples: Mapping[str, int], seed: int, samples: int) -> dict[str, Any]:
    from kronlab import __version__

    return {
        "fisher": fisher,
        "num_examples": max(examples.values(), default=0) // samples,
        "seed": seed,
        "samples": samples,
        "bias": includes_bias(),
        "kronlab_version": __version__,
    }
