"""kronfluence EK-FAC on the LDS benchmark's base model (run in kronfluence's own venv).

Invoked by ``benchmarks/lds.py`` as a subprocess: reads the base model's state dict, fits
kronfluence's EK-FAC factors (true Fisher, its defaults) and computes pairwise scores with the
same damping rule as kronlab (0.1 × mean eigenvalue, ``damping_factor=None``). Writes the scores
and the fit / score wall times (imports and model loading excluded) to ``--output``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import ConcatDataset, TensorDataset

from benchmarks.lds_training import make_model
from kronlab.tasks.digits import digits_task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["mlp", "cnn"], required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--queries", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0, help="seeds the true-Fisher label draws")
    parser.add_argument(
        "--fisher-samples",
        type=int,
        default=1,
        help="fit the factors on this many copies of the training set (independent label draws)",
    )
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(arguments.seed)

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model: nn.Module, sample: bool = False):
            inputs, targets = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    probabilities = torch.softmax(logits.detach(), -1)
                    targets = torch.multinomial(probabilities, 1).squeeze(-1)
            return nn.functional.cross_entropy(logits, targets, reduction="sum")

        def compute_measurement(self, batch, model: nn.Module):
            inputs, targets = batch
            return nn.functional.cross_entropy(model(inputs), targets, reduction="sum")

    task_data = digits_task(arguments.model)
    model = make_model(arguments.model, 0)
    model.load_state_dict(torch.load(arguments.state, weights_only=True))
    train = TensorDataset(task_data.train_inputs, task_data.train_targets)
    queries = TensorDataset(
        task_data.test_inputs[: arguments.queries], task_data.test_targets[: arguments.queries]
    )
    task = ClassificationTask()
    with tempfile.TemporaryDirectory() as output_dir:
        started = time.perf_counter()
        model = prepare_model(model, task)
        analyzer = Analyzer("lds", model, task, cpu=True, disable_tqdm=True, output_dir=output_dir)
        # K copies = K true-Fisher label draws per example for covariances and eigenvalues.
        fit_data = ConcatDataset([train] * arguments.fisher_samples)
        analyzer.fit_all_factors(
            "ekfac",
            fit_data,
            per_device_batch_size=arguments.batch_size,
            factor_args=FactorArguments(strategy="ekfac"),
        )
        fitted = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "scores",
            "ekfac",
            queries,
            train,
            per_device_query_batch_size=arguments.batch_size,
            per_device_train_batch_size=arguments.batch_size,
            score_args=ScoreArguments(damping_factor=None),
        )
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
        finished = time.perf_counter()
    torch.save(
        {
            "scores": scores.float(),
            "fit_seconds": fitted - started,
            "score_seconds": finished - fitted,
        },
        arguments.output,
    )


if __name__ == "__main__":
    main()
