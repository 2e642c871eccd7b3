"""LDS against the damping factor on the digits benchmark, and where ``damping="auto"`` lands.

Same protocol and cached retraining as ``benchmarks/lds.py`` (digits MLP or CNN, random halves ×
seeds); every factor scores the same fitted curvature, ``λ = factor × mean eigenvalue`` per
module. Each true-Fisher label seed fits its own curvature, so the spread over seeds is the
Monte Carlo noise of the fit; differences between factors are paired (same fit, same queries)
and their standard error is taken over queries. ``auto`` is
:func:`kronlab.attribution.damping_selection.select_damping_factor` on the pipeline's probe (a
seeded sample of 256 training examples), timed against fit + scoring. The text benchmark's
sweep is ``benchmarks/text_lds_damping.py``; both share :func:`run_sweep` and the tables.

    PYTHONPATH=src:. python -m benchmarks.damping_lds --model mlp --subsets 30 --fisher-seeds 5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import machine_description
from benchmarks.lds import batches, query_spearman
from benchmarks.lds_training import TrainingRecipe, retrain_subsets, train
from kronlab.attribution import Curvature, cross_entropy_loss, fit_curvature, influence_scores
from kronlab.attribution.damping_selection import (
    DampingSelection,
    probe_batches,
    select_damping_factor,
)
from kronlab.attribution.examples import ExampleSet
from kronlab.tasks.digits import digits_task

FACTORS = [1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0]
DEFAULT_FACTOR = 0.1


@dataclass
class Sweep:
    """Per label seed: per-query Spearman ``(seeds, factors, queries)``, the auto choice and
    the seconds of fit, scoring (one factor) and selection."""

    factors: list[float]
    per_query: torch.Tensor
    chosen: list[float] = field(default_factory=list)
    fit_seconds: list[float] = field(default_factory=list)
    score_seconds: list[float] = field(default_factory=list)
    select_seconds: list[float] = field(default_factory=list)

    def lds(self) -> torch.Tensor:
        """``(seeds, factors)`` LDS."""
        return self.per_query.mean(-1)

    def auto_lds(self) -> torch.Tensor:
        """``(seeds,)`` LDS at each seed's chosen factor."""
        rows = [self.factors.index(factor) for factor in self.chosen]
        return torch.stack([self.lds()[seed, row] for seed, row in enumerate(rows)])

    def paired(self, column: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
        """Mean and standard error over queries of ``column − reference`` (each ``(seeds,
        queries)``, averaged over seeds first)."""
        difference = (column - reference).mean(0)
        return float(difference.mean()), float(difference.std() / len(difference) ** 0.5)

    def column(self, factor: float) -> torch.Tensor:
        return self.per_query[:, self.factors.index(factor)]

    def auto_column(self) -> torch.Tensor:
        rows = [self.factors.index(factor) for factor in self.chosen]
        return torch.stack([self.per_query[seed, row] for seed, row in enumerate(rows)])


def run_sweep(
    fit: Callable[[int], Curvature],
    score: Callable[[Curvature, float], torch.Tensor],
    select: Callable[[Curvature, int], DampingSelection] | None,
    truth: dict[str, torch.Tensor],
    factors: list[float],
    seeds: int,
) -> Sweep:
    """Fit once per label seed, score every factor, run the selection (if any)."""
    rows = []
    sweep = Sweep(factors, torch.empty(0))
    for seed in range(seeds):
        started = time.perf_counter()
        curvature = fit(seed)
        sweep.fit_seconds.append(time.perf_counter() - started)
        per_factor = []
        for factor in factors:
            started = time.perf_counter()
            scores = score(curvature, factor)
            if factor == DEFAULT_FACTOR:
                sweep.score_seconds.append(time.perf_counter() - started)
            per_factor.append(query_spearman(scores, truth["masks"], truth["losses"]))
        rows.append(torch.stack(per_factor))
        if select is not None:
            started = time.perf_counter()
            sweep.chosen.append(select(curvature, seed).factor)
            sweep.select_seconds.append(time.perf_counter() - started)
    sweep.per_query = torch.stack(rows)
    return sweep


def lds_table(label: str, sweeps: dict[str, Sweep]) -> list[str]:
    """LDS per factor (mean ± std over label seeds), then auto."""
    factors = next(iter(sweeps.values())).factors
    lines = [
        f"| {label} | " + " | ".join(f"{f:g}" for f in factors) + " | auto |",
        "|---|" + "---:|" * (len(factors) + 1),
    ]
    for name, sweep in sweeps.items():
        lds = sweep.lds()
        cells = [f"{m:.4f} ± {s:.4f}" for m, s in zip(lds.mean(0).tolist(), lds.std(0).tolist())]
        auto = sweep.auto_lds() if sweep.chosen else None
        auto_cell = "–" if auto is None else f"{auto.mean():.4f} ± {auto.std():.4f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {auto_cell} |")
    return lines


def paired_table(label: str, sweeps: dict[str, Sweep]) -> list[str]:
    """Paired LDS differences against the default factor (mean ± s.e. over queries)."""
    factors = next(iter(sweeps.values())).factors
    lines = [
        f"| {label}: LDS − LDS @ {DEFAULT_FACTOR:g} | "
        + " | ".join(f"{f:g}" for f in factors if f != DEFAULT_FACTOR)
        + " |",
        "|---|" + "---:|" * (len(factors) - 1),
    ]
    for name, sweep in sweeps.items():
        reference = sweep.column(DEFAULT_FACTOR)
        cells = []
        for factor in factors:
            if factor != DEFAULT_FACTOR:
                mean, error = sweep.paired(sweep.column(factor), reference)
                cells.append(f"{mean:+.4f} ± {error:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def auto_table(label: str, sweeps: dict[str, Sweep]) -> list[str]:
    """Where auto lands: its choices, its LDS against 0.1 and the best fixed factor, its cost."""
    lines = [
        f"| {label} | auto's factor per label seed | auto − @0.1 | best fixed factor | "
        "auto − best fixed | selection s | fit s | score s (one factor) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, sweep in sweeps.items():
        if not sweep.chosen:
            continue
        best = sweep.factors[int(sweep.lds().mean(0).argmax())]
        versus_default = sweep.paired(sweep.auto_column(), sweep.column(DEFAULT_FACTOR))
        versus_best = sweep.paired(sweep.auto_column(), sweep.column(best))
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        lines.append(
            f"| {name} | {', '.join(f'{f:g}' for f in sweep.chosen)} | "
            f"{versus_default[0]:+.4f} ± {versus_default[1]:.4f} | {best:g} | "
            f"{versus_best[0]:+.4f} ± {versus_best[1]:.4f} | {mean(sweep.select_seconds):.2f} | "
            f"{mean(sweep.fit_seconds):.2f} | {mean(sweep.score_seconds):.2f} |"
        )
    return lines


def sweep_tables(label: str, sweeps: dict[str, Sweep]) -> list[str]:
    """The three tables of a sweep: LDS per factor, paired against 0.1, where auto lands."""
    return [
        *lds_table(label, sweeps),
        "",
        *paired_table(label, sweeps),
        "",
        *auto_table(label, sweeps),
    ]


def sweep_parser(description: str, queries: int, fisher_seeds: int) -> argparse.ArgumentParser:
    """The options both sweeps share: retraining size, queries and label seeds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--subsets", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=queries)
    parser.add_argument("--fisher-seeds", type=int, default=fisher_seeds)
    return parser


def main() -> None:
    parser = sweep_parser(__doc__.split("\n")[0], queries=200, fisher_seeds=5)
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    recipe = TrainingRecipe()
    truth = retrain_subsets(
        arguments.model,
        subsets=arguments.subsets,
        seeds=arguments.seeds,
        queries=arguments.queries,
        recipe=recipe,
        cache=Path(tempfile.gettempdir()) / f"kronlab_lds_{arguments.model}_{arguments.subsets}.pt",
    )
    task = digits_task(arguments.model)
    model = train(arguments.model, task.train_inputs, task.train_targets, 0, recipe)
    train_data = batches(task.train_inputs, task.train_targets, 128)
    query_data = batches(
        task.test_inputs[: arguments.queries], task.test_targets[: arguments.queries], 128
    )
    examples = ExampleSet((task.train_inputs, task.train_targets), "image")

    def score(curvature: Curvature, factor: float) -> torch.Tensor:
        return influence_scores(
            curvature, query_data, train_data, model=model, loss_fn=cross_entropy_loss,
            damping_factor=factor, progress=False,
        )  # fmt: skip

    def select(curvature: Curvature, seed: int) -> DampingSelection:
        probe = probe_batches(examples, seed)
        return select_damping_factor(curvature, model, probe, cross_entropy_loss, seed=seed)

    sweeps = {}
    for method, label in (("kfac", "K-FAC"), ("ekfac", "EK-FAC")):

        def fit(seed: int, method: str = method) -> Curvature:
            return fit_curvature(model, train_data, cross_entropy_loss, method, seed=seed)

        sweeps[label] = run_sweep(fit, score, select, truth, FACTORS, arguments.fisher_seeds)
        print(f"{label}: LDS per factor {sweeps[label].lds().mean(0).tolist()}", flush=True)
    name = f"digits {arguments.model.upper()}"
    lines = [
        f"#### {name} ({arguments.subsets} subsets × {arguments.seeds} seeds, "
        f"{arguments.queries} queries; {arguments.fisher_seeds} true-Fisher label seeds)",
        "",
        f"Command: `PYTHONPATH=src:. nice -n 10 python -m benchmarks.damping_lds --model "
        f"{arguments.model} --subsets {arguments.subsets} --fisher-seeds "
        f"{arguments.fisher_seeds}`  ",
        f"Machine: {machine_description()}, shared with other jobs.",
        "",
        *sweep_tables(name, sweeps),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
