"""LDS against the damping factor and the tracked modules on the text benchmark, with spread.

The model, corpus and retraining of ``benchmarks/text_lds.py`` (one variant per run), with more
held-out queries by default (``--queries 96``) so that paired differences can be told from
noise. For every tracked-module set and method (K-FAC, EK-FAC), each true-Fisher label seed fits
its own curvature, every damping factor scores it, and ``damping="auto"`` chooses from it (on
the pipeline's probe: a seeded sample of the training sequences). Tables from
:mod:`benchmarks.damping_lds`: LDS per factor (mean ± std over label seeds), differences
against 0.1 (mean ± standard error over queries), where auto lands and its cost; then the
tracked-module sets against each other at the same factor.

    PYTHONPATH=src:. python -m benchmarks.text_lds_damping --variant linear --fisher-seeds 4
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.common import machine_description
from benchmarks.damping_lds import (
    DEFAULT_FACTOR,
    FACTORS,
    Sweep,
    run_sweep,
    sweep_parser,
    sweep_tables,
)
from benchmarks.text_lds import TextSetup, batches, corpus, module_sets, retrain, train_model
from kronlab.attribution import Curvature, fit_curvature, influence_scores
from kronlab.attribution.curvature import DEFAULT_DAMPING_FACTOR
from kronlab.attribution.damping_selection import (
    DampingSelection,
    probe_batches,
    select_damping_factor,
)
from kronlab.attribution.examples import ExampleSet
from kronlab.attribution.sources import language_model_loss

METHODS = (("kfac", "K-FAC"), ("ekfac", "EK-FAC"))


def _token_mask(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return batch[1]


def modules_table(variant: str, sweeps: dict[str, Sweep], factors: list[float]) -> list[str]:
    """Each tracked-module set against the one before it (the sets are nested): what adding
    those modules does at the same factor, paired over queries (mean ± standard error)."""
    sets = list(module_sets(variant))
    lines = [
        "| method | tracked | against | " + " | ".join(f"Δ LDS @ {f:g}" for f in factors) + " |",
        "|---|---|---|" + "---:|" * len(factors),
    ]
    for _, label in METHODS:
        for smaller, tracked in zip(sets, sets[1:]):
            sweep, reference = sweeps[f"{label}, {tracked}"], sweeps[f"{label}, {smaller}"]
            cells = []
            for factor in factors:
                mean, error = sweep.paired(sweep.column(factor), reference.column(factor))
                cells.append(f"{mean:+.4f} ± {error:.4f}")
            lines.append(f"| {label} | {tracked} | {smaller} | " + " | ".join(cells) + " |")
    return lines


@dataclass
class TextInputs:
    """The trained model, its data and the retraining ground truth of one text variant."""

    arguments: argparse.Namespace
    setup: TextSetup
    truth: dict[str, torch.Tensor]
    model: torch.nn.Module
    tokens: tuple[torch.Tensor, torch.Tensor]
    train_data: list
    query_data: list

    def score(self, curvature: Curvature, factor: float) -> torch.Tensor:
        return influence_scores(
            curvature, self.query_data, self.train_data, model=self.model,
            loss_fn=language_model_loss, damping_factor=factor, mask_fn=_token_mask,
            progress=False,
        )  # fmt: skip

    def fitter(self, method: str, modules: list[str] | None) -> Callable[[int], Curvature]:
        def fit(seed: int) -> Curvature:
            return fit_curvature(
                self.model, self.train_data, language_model_loss, method, modules=modules,
                seed=seed, mask_fn=_token_mask,
            )  # fmt: skip

        return fit


def text_inputs(description: str) -> TextInputs:
    """Parse the sweep's options (``--variant`` too), then train and retrain (cached)."""
    parser = sweep_parser(description, queries=96, fisher_seeds=4)
    parser.add_argument("--variant", choices=["linear", "torch"], default="linear")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    setup = TextSetup(queries=arguments.queries)
    truth = retrain(arguments.variant, setup, arguments.subsets, arguments.seeds)
    (tokens, mask), (query_tokens, query_mask) = corpus(setup)
    model = train_model(arguments.variant, tokens, mask, 0, setup)
    return TextInputs(
        arguments, setup, truth, model, (tokens, mask), batches(tokens, mask, 64),
        batches(query_tokens, query_mask, 64),
    )  # fmt: skip


def main() -> None:
    inputs = text_inputs(__doc__.split("\n")[0])
    arguments, model, truth = inputs.arguments, inputs.model, inputs.truth
    setup = inputs.setup
    examples = ExampleSet(inputs.tokens, "text")

    def select(curvature: Curvature, seed: int) -> DampingSelection:
        probe = probe_batches(examples, seed)
        return select_damping_factor(
            curvature, model, probe, language_model_loss, seed=seed, mask_fn=_token_mask
        )

    sweeps: dict[str, Sweep] = {}
    for tracked, modules in module_sets(arguments.variant).items():
        for method, label in METHODS:
            fit = inputs.fitter(method, modules)
            name = f"{label}, {tracked}"
            sweeps[name] = run_sweep(
                fit, inputs.score, select, truth, FACTORS, arguments.fisher_seeds
            )
            print(f"{name}: {sweeps[name].lds().mean(0).tolist()}", flush=True)
    title = f"text `{arguments.variant}`"
    lines = [
        f"#### {title} ({arguments.subsets} subsets × {arguments.seeds} seeds, "
        f"{setup.queries} queries, {setup.train} training sequences; "
        f"{arguments.fisher_seeds} true-Fisher label seeds)",
        "",
        f"Command: `PYTHONPATH=src:. nice -n 10 python -m benchmarks.text_lds_damping "
        f"--variant {arguments.variant} --fisher-seeds {arguments.fisher_seeds}`  ",
        f"Machine: {machine_description()}, shared with other jobs (1-minute load "
        f"{os.getloadavg()[0]:.0f}); retraining took {float(truth['seconds']):.0f} s (cached).",
        "",
        *sweep_tables(title, sweeps),
        "",
        *modules_table(arguments.variant, sweeps, [DEFAULT_DAMPING_FACTOR, DEFAULT_FACTOR]),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
