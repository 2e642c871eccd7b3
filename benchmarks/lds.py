"""Linear datamodeling score (LDS) of influence methods on the digits MLP / small CNN.

Protocol (Park et al. 2023; Grosse et al. 2023): train the base model on the full training
split; retrain on ``subsets`` random 50% subsets with ``seeds`` seeds each and record every
query's loss (``benchmarks/lds_training.py``, cached). A method's prediction for subset ``S`` and
query ``q`` is ``Σ_{t∈S} score(q, t)``; LDS is the Spearman correlation between predictions and
the negated measured losses across subsets, averaged over queries. All methods score the same
base model, subsets and queries in one run, and use the same damping rule (0.1 × mean
eigenvalue). Wall time is fit + score, single torch thread, in this process (kronfluence in a
subprocess in its own venv, timed inside it, imports excluded), averaged over the seeds of the
true-Fisher label draws (``--fisher-seeds``), whose Monte Carlo noise moves LDS by ~0.01-0.02.

    PYTHONPATH=src python -m benchmarks.lds --model mlp [--write lds.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from benchmarks.common import machine_description
from benchmarks.lds_training import TrainingRecipe, retrain_subsets, train
from kronlab.attribution import Curvature, cross_entropy_loss, fit_curvature, influence_scores
from kronlab.tasks.digits import digits_task

# The Python of a venv with kronfluence installed (kept out of the project's environment).
KRONFLUENCE_PYTHON = os.environ.get("KRONFLUENCE_PYTHON", "python")
DAMPING_FACTOR = 0.1


def linear_datamodeling_score(
    scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor
) -> float:
    """Mean over queries of Spearman(Σ_{t∈S_k} score(q, t), −loss_k(q)) across subsets k."""
    return float(query_spearman(scores, masks, losses).mean())


def query_spearman(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Per query, Spearman(Σ_{t∈S_k} score(q, t), −loss_k(q)) across subsets k: ``(queries,)``."""
    predictions = masks.double() @ scores.double().T  # (subsets, queries)
    return _spearman_columns(predictions, -losses.double())


def _spearman_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ranks_a = a.argsort(0).argsort(0).double()
    ranks_b = b.argsort(0).argsort(0).double()
    ranks_a -= ranks_a.mean(0)
    ranks_b -= ranks_b.mean(0)
    return (ranks_a * ranks_b).sum(0) / (ranks_a.norm(dim=0) * ranks_b.norm(dim=0))


def batches(inputs: torch.Tensor, targets: torch.Tensor, size: int) -> list:
    return [(inputs[i : i + size], targets[i : i + size]) for i in range(0, len(inputs), size)]


ScoresByDamping = tuple[dict[float, torch.Tensor], float]


def score_curvature(
    fit: Callable[[], Curvature], model, train_data, query_data, factors: list[float]
) -> ScoresByDamping:
    """Scores per damping factor; seconds = fit + scoring at the first (primary) factor."""
    started = time.perf_counter()
    curvature = fit()
    results, seconds = {}, 0.0
    for factor in factors:
        results[factor] = influence_scores(
            curvature,
            query_data,
            train_data,
            model=model,
            loss_fn=cross_entropy_loss,
            damping_factor=factor,
            progress=False,
        )
        seconds = seconds or time.perf_counter() - started
    return results, seconds


def kronlab_method(method: str, samples: int = 1) -> Callable[..., ScoresByDamping]:
    def run(model, train_data, query_data, factors: list[float], seed: int) -> ScoresByDamping:
        def fit() -> Curvature:
            return fit_curvature(
                model, train_data, cross_entropy_loss, method, seed=seed, samples=samples
            )

        return score_curvature(fit, model, train_data, query_data, factors)

    return run


def optimizer_method(
    model, train_data, query_data, factors: list[float], seed: int
) -> ScoresByDamping:
    """SOAP's own factors: one lr=0 epoch of SOAP at the trained weights."""
    from kronlab.groups.rules import LinearWeightBias, PerParameter
    from kronlab.optim import SOAP

    def fit() -> Curvature:
        optimizer = SOAP(
            None,
            model=model,
            lr=0.0,
            weight_decay=0.0,
            betas=(0.9, 0.999),
            shampoo_beta=0.999,
            precondition_frequency=1,
            eigenbasis="eigh",
            combine_params=(LinearWeightBias(), PerParameter()),
        )
        for inputs, targets in batches(*train_data_tensors(train_data), 32):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return Curvature.from_optimizer(optimizer, model)

    return score_curvature(fit, model, train_data, query_data, factors)


def train_data_tensors(data: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])


def exact_ggn_method(
    model, train_data, query_data, factors: list[float], seed: int
) -> ScoresByDamping:
    """The full damped GGN over all parameters, by brute force (the accuracy ceiling)."""
    started = time.perf_counter()
    params = {name: p.detach() for name, p in model.named_parameters()}
    train_inputs, train_targets = train_data_tensors(train_data)
    query_inputs, query_targets = train_data_tensors(query_data)

    def logits(parameters, x):
        return functional_call(model, parameters, (x[None],))[0]

    def example_loss(parameters, x, y):
        return nn.functional.cross_entropy(logits(parameters, x)[None], y[None])

    ggn = 0
    for start in range(0, len(train_inputs), 256):
        x = train_inputs[start : start + 256]
        jacobian = vmap(jacrev(logits), in_dims=(None, 0))(params, x)
        jacobian = torch.cat(
            [jacobian[name].reshape(len(x), -1, params[name].numel()) for name in params], -1
        )
        probabilities = torch.softmax(model(x), -1).detach()
        weighted = probabilities[:, :, None] * (
            jacobian - (probabilities[:, :, None] * jacobian).sum(1, keepdim=True)
        )
        ggn = ggn + torch.einsum("ncp,ncq->pq", jacobian.double(), weighted.double())
    ggn = ggn / len(train_inputs)
    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def gradients(x, y):
        tree = per_example(params, x, y)
        return torch.cat([tree[name].reshape(len(x), -1) for name in params], 1).double()

    query_gradients = gradients(query_inputs, query_targets)
    train_gradients = gradients(train_inputs, train_targets)
    identity = torch.eye(len(ggn), dtype=torch.float64)
    results, seconds = {}, 0.0
    for factor in factors:
        damping = factor * ggn.diagonal().mean()  # 0.1 × mean eigenvalue = 0.1 × trace / P
        cholesky = torch.linalg.cholesky(ggn + damping * identity)
        preconditioned = torch.cholesky_solve(query_gradients.T, cholesky).T
        results[factor] = (preconditioned @ train_gradients.T).float()
        seconds = seconds or time.perf_counter() - started
    return results, seconds


def kronfluence_method(
    kind: str, model: nn.Module, queries: int, seed: int, samples: int = 1
) -> ScoresByDamping:
    """kronfluence's EK-FAC with its heuristic damping (0.1 × mean eigenvalue per module); its
    explicit ``damping_factor`` is one absolute value for all modules, so no relative sweep.
    ``samples`` > 1 fits its factors on that many copies of the training set, each copy with its
    own label draws: kronfluence's equivalent of kronlab's ``samples`` true-Fisher draws."""
    with tempfile.TemporaryDirectory() as directory:
        state, output = Path(directory) / "state.pt", Path(directory) / "scores.pt"
        torch.save(model.state_dict(), state)
        command = [
            KRONFLUENCE_PYTHON, "-m", "benchmarks.lds_kronfluence", "--model", kind,
            "--state", str(state), "--queries", str(queries), "--output", str(output),
            "--seed", str(seed), "--fisher-samples", str(samples),
        ]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(completed.stderr[-2000:])
        result = torch.load(output, weights_only=True)
    seconds = result["fit_seconds"] + result["score_seconds"]
    return {DAMPING_FACTOR: result["scores"]}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--sweep",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[0.01, 0.03, 0.1, 0.3],
        help="damping factors for the 'best LDS' column (timing uses 0.1)",
    )
    parser.add_argument("--fisher-seeds", type=int, default=3)
    parser.add_argument(
        "--fisher-samples",
        type=int,
        default=1,
        help="true-Fisher label draws per example for every sampled method, kronfluence included "
        "(kronlab: fit_curvature(samples=K); kronfluence: factors fitted on K copies of the "
        "training set). With 1, an extra 'EK-FAC, 4 Fisher samples' row is shown.",
    )
    parser.add_argument("--write", type=Path, default=None, help="append the table (markdown)")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    recipe = TrainingRecipe()
    retrained = retrain_subsets(
        arguments.model,
        subsets=arguments.subsets,
        seeds=arguments.seeds,
        queries=arguments.queries,
        recipe=recipe,
        cache=Path(tempfile.gettempdir()) / f"kronlab_lds_{arguments.model}.pt",
    )
    task = digits_task(arguments.model)
    model = train(arguments.model, task.train_inputs, task.train_targets, 0, recipe)
    train_data = batches(task.train_inputs, task.train_targets, arguments.batch_size)
    query_data = batches(
        task.test_inputs[: arguments.queries],
        task.test_targets[: arguments.queries],
        arguments.batch_size,
    )

    factors = [DAMPING_FACTOR] + [f for f in arguments.sweep if f != DAMPING_FACTOR]
    samples = arguments.fisher_samples
    methods: dict[str, Callable[..., ScoresByDamping]] = {
        "identity (gradient dot product)": kronlab_method("identity"),
        "diagonal": kronlab_method("diagonal", samples=samples),
        "K-FAC": kronlab_method("kfac", samples=samples),
        "EK-FAC": kronlab_method("ekfac", samples=samples),
        "EK-FAC, 4 Fisher samples": kronlab_method("ekfac", samples=4),
        "optimizer curvature (SOAP factors)": optimizer_method,
        "exact damped GGN": exact_ggn_method,
        "kronfluence EK-FAC": lambda model, *_, seed: kronfluence_method(
            arguments.model, model, arguments.queries, seed, samples
        ),
    }
    if samples != 1:  # every sampled method already draws `samples` labels
        del methods["EK-FAC, 4 Fisher samples"]
    # These draw true-Fisher labels: report the mean (± std) over seeds of the label draws.
    stochastic = {"diagonal", "K-FAC", "EK-FAC", "EK-FAC, 4 Fisher samples", "kronfluence EK-FAC"}
    rows: list[Row] = []
    for name, method in methods.items():
        seeds = range(arguments.fisher_seeds) if name in stochastic else range(1)
        try:
            runs = [method(model, train_data, query_data, factors, seed=seed) for seed in seeds]
        except (ImportError, ValueError, RuntimeError, OSError) as error:
            rows.append(Row(name, note=f"not run: {type(error).__name__}: {error}"))
            continue
        lds = torch.tensor(
            [
                [
                    linear_datamodeling_score(scores[f], retrained["masks"], retrained["losses"])
                    for f in factors
                    if f in scores
                ]
                for scores, _ in runs
            ]
        )  # (seeds, factors run)
        mean = lds.mean(0)
        best = int(mean.argmax()) if lds.shape[1] > 1 else None
        row = Row(
            name,
            lds=float(mean[0]),
            lds_std=float(lds[:, 0].std()) if len(runs) > 1 else None,
            best_lds=None if best is None else float(mean[best]),
            best_factor=None if best is None else factors[best],
            seconds=sum(seconds for _, seconds in runs) / len(runs),
            runs=len(runs),
        )
        rows.append(row)
        print(f"{name:40s} LDS {row.lds:.4f} ± {row.lds_std or 0:.4f} (best {row.best_lds}"
              f" at {row.best_factor})  {row.seconds:7.2f} s", flush=True)  # fmt: skip

    table = format_table(arguments, rows, float(retrained["seconds"]), factors)
    print(table)
    if arguments.write is not None:
        with arguments.write.open("a") as handle:
            handle.write(table + "\n")


@dataclass
class Row:
    name: str
    lds: float | None = None
    best_lds: float | None = None
    best_factor: float | None = None
    seconds: float | None = None
    runs: int = 0
    lds_std: float | None = None
    note: str = ""


def format_table(
    arguments: argparse.Namespace, rows: list[Row], retrain_seconds: float, factors: list[float]
) -> str:
    results = {row.name: row for row in rows if row.lds is not None}
    kronfluence = results.get("kronfluence EK-FAC")
    exact = results.get("exact damped GGN")
    lines = [
        f"### LDS, digits {arguments.model.upper()} ({arguments.subsets} subsets × "
        f"{arguments.seeds} seeds, {arguments.queries} queries)",
        "",
        f"Command: `PYTHONPATH=src python -m benchmarks.lds --model {arguments.model}"
        f" --fisher-samples {arguments.fisher_samples}`  ",
        f"Machine: {machine_description()} (shared, noisy); retraining took "
        f"{retrain_seconds:.0f} s (cached).",
        "",
        f"| method | LDS (damping {DAMPING_FACTOR} × mean eig.; mean ± std over "
        f"{arguments.fisher_seeds} label-sampling seeds) | best LDS over "
        f"{', '.join(map(str, sorted(factors)))} | fit+score s | LDS / exact GGN | "
        "time / kronfluence |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.lds is None:
            lines.append(f"| {row.name} | – | – | – | – | {row.note} |")
            continue
        ratio_exact = f"{row.lds / exact.lds:.2f}" if exact else "–"
        ratio_time = f"{row.seconds / kronfluence.seconds:.3f}x" if kronfluence else "–"
        best = "–" if row.best_lds is None else f"{row.best_lds:.4f} ({row.best_factor})"
        spread = "" if row.lds_std is None else f" ± {row.lds_std:.4f}"
        lines.append(
            f"| {row.name} | {row.lds:.4f}{spread} | {best} | "
            f"{row.seconds:.2f} | {ratio_exact} | {ratio_time} |"
        )
    ekfac = results.get("EK-FAC")
    if ekfac and kronfluence and exact:
        floors = [
            ("EK-FAC LDS ≥ kronfluence − 0.02", ekfac.lds >= kronfluence.lds - 0.02,
             f"{ekfac.lds:.4f} vs {kronfluence.lds - 0.02:.4f}"),
            ("EK-FAC LDS ≥ 0.9 × exact GGN", ekfac.lds >= 0.9 * exact.lds,
             f"{ekfac.lds / exact.lds:.3f}"),
            ("EK-FAC fit+score ≤ 0.7 × kronfluence", ekfac.seconds <= 0.7 * kronfluence.seconds,
             f"{ekfac.seconds / kronfluence.seconds:.3f}x"),
        ]  # fmt: skip
        lines += [""] + [
            f"- {label}: {value} → {'met' if met else 'MISSED'}" for label, met, value in floors
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
