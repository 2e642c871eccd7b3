"""LDS against the damping factor on the digits benchmark (kronlab K-FAC and EK-FAC).

Same protocol and cached retraining as ``benchmarks/lds.py`` (digits MLP or CNN, random halves ×
seeds); every factor scores the same fitted curvature, ``λ = factor × mean eigenvalue`` per
module. The text benchmark's sweep is part of ``benchmarks/text_lds.py``.

    PYTHONPATH=src:. python -m benchmarks.damping_lds --model mlp --subsets 30
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import machine_description
from benchmarks.lds import batches, kronlab_method, linear_datamodeling_score
from benchmarks.lds_training import TrainingRecipe, retrain_subsets, train
from kronlab.tasks.digits import digits_task

FACTORS = [1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--subsets", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--fisher-seeds", type=int, default=2)
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
    lines = [
        f"#### LDS vs damping factor, digits {arguments.model.upper()} ({arguments.subsets} "
        f"subsets × {arguments.seeds} seeds, {arguments.queries} queries; mean over "
        f"{arguments.fisher_seeds} true-Fisher label seeds)",
        "",
        f"Command: `PYTHONPATH=src:. nice -n 10 python -m benchmarks.damping_lds --model "
        f"{arguments.model} --subsets {arguments.subsets}`  ",
        f"Machine: {machine_description()}, shared with other jobs.",
        "",
        "| method | " + " | ".join(f"{f:g}" for f in FACTORS) + " |",
        "|---|" + "---:|" * len(FACTORS),
    ]
    for method in ("kfac", "ekfac"):
        totals = torch.zeros(len(FACTORS))
        for seed in range(arguments.fisher_seeds):
            scores, _ = kronlab_method(method)(model, train_data, query_data, FACTORS, seed=seed)
            totals += torch.tensor(
                [
                    linear_datamodeling_score(scores[f], truth["masks"], truth["losses"])
                    for f in FACTORS
                ]
            )
        means = totals / arguments.fisher_seeds
        lines.append(f"| {method} | " + " | ".join(f"{v:.4f}" for v in means.tolist()) + " |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
