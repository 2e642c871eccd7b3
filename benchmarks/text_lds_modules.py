"""Text LDS of ``kronlab attribute``'s default tracked modules (every trackable module outside
attention) against tracking all of them and against the MLP and head alone.

Same model, retraining cache and paired statistics as ``benchmarks/text_lds_damping.py``; at the
default damping factor and at 0.1, K-FAC and EK-FAC, one fit per true-Fisher label seed.

    PYTHONPATH=src:. nice -n 10 python -m benchmarks.text_lds_modules --variant linear
"""

from __future__ import annotations

import os

import torch

from benchmarks.common import machine_description
from benchmarks.damping_lds import DEFAULT_FACTOR, Sweep, run_sweep, sweep_parser
from benchmarks.text_lds import TextSetup, batches, corpus, module_sets, retrain, train_model
from benchmarks.text_lds_damping import METHODS, _token_mask
from kronlab.attribution import Curvature, fit_curvature, influence_scores
from kronlab.attribution.curvature import DEFAULT_DAMPING_FACTOR
from kronlab.attribution.sources import language_model_loss
from kronlab.curvature import find_modules_outside_attention


def main() -> None:
    parser = sweep_parser(__doc__.split("\n")[0], queries=96, fisher_seeds=4)
    parser.add_argument("--variant", choices=["linear", "torch"], default="linear")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    setup = TextSetup(queries=arguments.queries)
    truth = retrain(arguments.variant, setup, arguments.subsets, arguments.seeds)
    (tokens, mask), (query_tokens, query_mask) = corpus(setup)
    model = train_model(arguments.variant, tokens, mask, 0, setup)
    train_data = batches(tokens, mask, 64)
    query_data = batches(query_tokens, query_mask, 64)
    factors = sorted({DEFAULT_DAMPING_FACTOR, DEFAULT_FACTOR})
    sets = {
        "default (outside attention)": list(find_modules_outside_attention(model)),
        "all": None,
        "MLP + head": module_sets(arguments.variant)["MLP + head"],
    }

    def score(curvature: Curvature, factor: float) -> torch.Tensor:
        return influence_scores(
            curvature, query_data, train_data, model=model, loss_fn=language_model_loss,
            damping_factor=factor, mask_fn=_token_mask, progress=False,
        )  # fmt: skip

    sweeps: dict[str, Sweep] = {}
    for tracked, modules in sets.items():
        for method, label in METHODS:

            def fit(seed: int, method: str = method, modules=modules) -> Curvature:
                return fit_curvature(
                    model, train_data, language_model_loss, method, modules=modules,
                    seed=seed, mask_fn=_token_mask,
                )  # fmt: skip

            sweeps[f"{label}, {tracked}"] = run_sweep(
                fit, score, None, truth, factors, arguments.fisher_seeds
            )
    default = next(iter(sets))
    print(
        f"#### text `{arguments.variant}`: default tracked modules "
        f"({', '.join(sets[default])})\n\n"
        f"Machine: {machine_description()}, 1-minute load {os.getloadavg()[0]:.0f}.\n"
    )
    print("| method | against | " + " | ".join(f"Δ LDS @ {f:g}" for f in factors) + " |")
    print("|---|---|" + "---:|" * len(factors))
    for _, label in METHODS:
        sweep = sweeps[f"{label}, {default}"]
        for other in list(sets)[1:]:
            reference = sweeps[f"{label}, {other}"]
            cells = []
            for factor in factors:
                mean, error = sweep.paired(sweep.column(factor), reference.column(factor))
                cells.append(f"{mean:+.4f} ± {error:.4f}")
            print(f"| {label} | {other} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
