"""Linear datamodeling score (LDS) of influence methods on the digits MLP / small CNN.

Protocol (Park et al. 2023; Grosse et al. 2023): train the base model on the full training
split; retrain on ``subsets`` random 50% subsets with ``seeds`` seeds each and record every
query's loss (``benchmarks/lds_training.py``, cached). A method's prediction for subset ``S`` and
query ``q`` is ``Σ_{t∈S} score(q, t)``; LDS is the Spearman correlation between predictions and
the negated measured losses across subsets, averaged over queries. All methods score the same
base model, subsets and queries in one run, and use the same damping rule (0.1 × mean
eigenvalue). Wall time is fit + score, single torch thread, in this process (kronfluence in a
subprocess in its own venv, timed inside it, imports excluded).

    PYTHONPATH=src python -m benchmarks.lds --model mlp [--write benchmarks/results/issue-7.md]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from benchmarks.common import machine_description
from benchmarks.lds_training import TrainingRecipe, retrain_subsets, train
from kronlab.attribution import Curvature, cross_entropy_loss, fit_curvature, influence_scores
from kronlab.tasks.digits import digits_task

KRONFLUENCE_PYTHON = "/work/venvs/issue7/bin/python"
DAMPING_FACTOR = 0.1


def linear_datamodeling_score(
    scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor
) -> float:
    """Mean over queries of Spearman(Σ_{t∈S_k} score(q, t), −loss_k(q)) across subsets k."""
    predictions = masks.double() @ scores.double().T  # (subsets, queries)
    return float(_spearman_columns(predictions, -losses.double()).mean())


def _spearman_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ranks_a = a.argsort(0).argsort(0).double()
    ranks_b = b.argsort(0).argsort(0).double()
    ranks_a -= ranks_a.mean(0)
    ranks_b -= ranks_b.mean(0)
    return (ranks_a * ranks_b).sum(0) / (ranks_a.norm(dim=0) * ranks_b.norm(dim=0))


def batches(inputs: torch.Tensor, targets: torch.Tensor, size: int) -> list:
    return [(inputs[i : i + size], targets[i : i + size]) for i in range(0, len(inputs), size)]


def kronlab_method(method: str) -> Callable[..., torch.Tensor]:
    def run(model, train_data, query_data) -> torch.Tensor:
        curvature = fit_curvature(model, train_data, cross_entropy_loss, method)
        return influence_scores(
            curvature,
            query_data,
            train_data,
            model=model,
            loss_fn=cross_entropy_loss,
            damping_factor=DAMPING_FACTOR,
            progress=False,
        )

    return run


def optimizer_method(model, train_data, query_data) -> torch.Tensor:
    """SOAP's own factors: one lr=0 epoch of SOAP at the trained weights (needs issue 3)."""
    from kronlab.groups.rules import LinearWeightBias, PerParameter
    from kronlab.optim import SOAP

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
    curvature = Curvature.from_optimizer(optimizer, model)
    return influence_scores(
        curvature,
        query_data,
        train_data,
        model=model,
        loss_fn=cross_entropy_loss,
        damping_factor=DAMPING_FACTOR,
        progress=False,
    )


def train_data_tensors(data: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])


def exact_ggn_method(model, train_data, query_data) -> torch.Tensor:
    """The full damped GGN over all parameters, by brute force (the accuracy ceiling)."""
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
    damping = DAMPING_FACTOR * ggn.diagonal().mean()
    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def gradients(x, y):
        tree = per_example(params, x, y)
        return torch.cat([tree[name].reshape(len(x), -1) for name in params], 1).double()

    cholesky = torch.linalg.cholesky(ggn + damping * torch.eye(len(ggn), dtype=torch.float64))
    preconditioned = torch.cholesky_solve(gradients(query_inputs, query_targets).T, cholesky).T
    return (preconditioned @ gradients(train_inputs, train_targets).T).float()


def kronfluence_method(kind: str, model: nn.Module, queries: int) -> tuple[torch.Tensor, float]:
    with tempfile.TemporaryDirectory() as directory:
        state, output = Path(directory) / "state.pt", Path(directory) / "scores.pt"
        torch.save(model.state_dict(), state)
        command = [
            KRONFLUENCE_PYTHON, "-m", "benchmarks.lds_kronfluence", "--model", kind,
            "--state", str(state), "--queries", str(queries), "--output", str(output),
        ]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(completed.stderr[-2000:])
        result = torch.load(output, weights_only=True)
    return result["scores"], result["fit_seconds"] + result["score_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
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
        cache=Path(f"/tmp/kronlab_lds_{arguments.model}.pt"),
    )
    task = digits_task(arguments.model)
    model = train(arguments.model, task.train_inputs, task.train_targets, 0, recipe)
    train_data = batches(task.train_inputs, task.train_targets, arguments.batch_size)
    query_data = batches(
        task.test_inputs[: arguments.queries],
        task.test_targets[: arguments.queries],
        arguments.batch_size,
    )

    methods: dict[str, Callable[..., torch.Tensor]] = {
        "identity (gradient dot product)": kronlab_method("identity"),
        "diagonal": kronlab_method("diagonal"),
        "K-FAC": kronlab_method("kfac"),
        "EK-FAC": kronlab_method("ekfac"),
        "optimizer curvature (SOAP factors)": optimizer_method,
        "exact damped GGN": exact_ggn_method,
    }
    rows: list[tuple[str, float | None, float | None, str]] = []
    for name, method in methods.items():
        started = time.perf_counter()
        try:
            scores = method(model, train_data, query_data)
        except (ImportError, ValueError) as error:
            rows.append((name, None, None, f"not run: {type(error).__name__}: {error}"))
            continue
        seconds = time.perf_counter() - started
        lds = linear_datamodeling_score(scores, retrained["masks"], retrained["losses"])
        rows.append((name, lds, seconds, ""))
        print(f"{name:40s} LDS {lds:.4f}  {seconds:7.2f} s", flush=True)
    try:
        scores, seconds = kronfluence_method(arguments.model, model, arguments.queries)
        lds = linear_datamodeling_score(scores, retrained["masks"], retrained["losses"])
        rows.append(("kronfluence EK-FAC", lds, seconds, ""))
        print(f"{'kronfluence EK-FAC':40s} LDS {lds:.4f}  {seconds:7.2f} s", flush=True)
    except (OSError, RuntimeError) as error:
        rows.append(("kronfluence EK-FAC", None, None, f"failed: {error}"))

    table = format_table(arguments, rows, float(retrained["seconds"]))
    print(table)
    if arguments.write is not None:
        with arguments.write.open("a") as handle:
            handle.write(table + "\n")


def format_table(arguments: argparse.Namespace, rows: list, retrain_seconds: float) -> str:
    results = {name: (lds, seconds) for name, lds, seconds, _ in rows}
    kronfluence_lds, kronfluence_seconds = results.get("kronfluence EK-FAC", (None, None))
    exact_lds = results.get("exact damped GGN", (None, None))[0]
    lines = [
        f"### LDS, digits {arguments.model.upper()} ({arguments.subsets} subsets × "
        f"{arguments.seeds} seeds, {arguments.queries} queries)",
        "",
        f"Command: `PYTHONPATH=src python -m benchmarks.lds --model {arguments.model}`  ",
        f"Machine: {machine_description()} (shared, noisy); retraining took "
        f"{retrain_seconds:.0f} s (cached).",
        "",
        "| method | LDS | fit+score s | LDS / exact GGN | time / kronfluence |",
        "|---|---|---|---|---|",
    ]
    for name, lds, seconds, note in rows:
        if lds is None:
            lines.append(f"| {name} | – | – | – | {note} |")
            continue
        ratio_exact = f"{lds / exact_lds:.2f}" if exact_lds else "–"
        ratio_time = f"{seconds / kronfluence_seconds:.2f}x" if kronfluence_seconds else "–"
        lines.append(f"| {name} | {lds:.4f} | {seconds:.2f} | {ratio_exact} | {ratio_time} |")
    ekfac_lds, ekfac_seconds = results.get("EK-FAC", (None, None))
    if None not in (ekfac_lds, kronfluence_lds, exact_lds):
        floors = [
            ("EK-FAC LDS ≥ kronfluence − 0.02", ekfac_lds >= kronfluence_lds - 0.02,
             f"{ekfac_lds:.4f} vs {kronfluence_lds - 0.02:.4f}"),
            ("EK-FAC LDS ≥ 0.9 × exact GGN", ekfac_lds >= 0.9 * exact_lds,
             f"{ekfac_lds / exact_lds:.2f}"),
            ("EK-FAC fit+score ≤ 0.7 × kronfluence", ekfac_seconds <= 0.7 * kronfluence_seconds,
             f"{ekfac_seconds / kronfluence_seconds:.3f}x"),
        ]  # fmt: skip
        lines += [""] + [
            f"- {label}: {value} → {'met' if met else 'MISSED'}" for label, met, value in floors
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
