"""Evidence for registry defaults: a candidate setting against the registered one, over seeds.

Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m benchmarks.registry_defaults \
        [--tasks digits-mlp,digits-cnn] [--seeds 3] [--steps N] [--out kronlab-bench]

Each row is the convergence benchmark's quick profile (no learning-rate grid, the task's short
budget unless ``--steps``) at seeds ``0 … seeds-1``: the registry entry as it stands and each
candidate change to it, next to AdamW. Runs are cached in ``--out`` like the benchmark's own.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from torch import nn

import kronlab.optim  # noqa: F401  (registers the optimizers)
from kronlab.bench.optimizers import OptimizerSpec, kronlab_spec
from kronlab.bench.protocol import OptimizerResult
from kronlab.bench.report import format_table, summarize
from kronlab.bench.runner import RunKey, load_cached, store, train_run
from kronlab.bench.tasks import load_convergence_task
from kronlab.groups import LinearWeightBias, PerParameter
from kronlab.optim import SIRFShampoo


def _sirfshampoo(beta2: float) -> Callable[[nn.Module, float], SIRFShampoo]:
    def factory(model: nn.Module, lr: float) -> SIRFShampoo:
        return SIRFShampoo(
            model, lr=lr, beta2=beta2, lam=0.1, combine_params=(LinearWeightBias(), PerParameter())
        )

    return factory


def candidates() -> list[OptimizerSpec]:
    """The registry entries and the changes to them that earlier one-seed runs suggested."""
    soap = kronlab_spec("soap")
    return [
        kronlab_spec("adamw"),
        soap,
        OptimizerSpec("soap_lr0.01", soap.factory, 1e-2, "soap"),
        kronlab_spec("sirfshampoo"),
        OptimizerSpec("sirfshampoo_beta2_0.5", _sirfshampoo(0.5), 0.01, "sirfshampoo"),
    ]


def run(task: str, spec: OptimizerSpec, seeds: int, steps: int, out: Path) -> OptimizerResult:
    definition = load_convergence_task(task)
    result = OptimizerResult(spec.name, spec.algorithm, best_lr=spec.default_lr)
    for seed in range(seeds):
        key = RunKey(task, spec.name, spec.default_lr, seed, steps)
        record = load_cached(out, key)
        if record is None:
            record = train_run(definition, spec, key, show_progress=False)
            store(out, record, key)
        result.runs.append(record)
    result.grid[spec.default_lr] = result.runs[0].final_val_loss
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="digits-mlp,digits-cnn")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="override the tasks' quick budgets")
    parser.add_argument("--out", type=Path, default=Path("kronlab-bench"))
    args = parser.parse_args()
    for task in args.tasks.split(","):
        steps = args.steps or load_convergence_task(task).quick_steps
        results = [run(task, spec, args.seeds, steps, args.out) for spec in candidates()]
        print(f"\n{task}: {steps} steps, seeds 0-{args.seeds - 1}, default lr of each row")
        print(format_table(summarize(results)))
        for result in results:
            finals = ", ".join(f"{run.final_val_loss:.4f}" for run in result.runs)
            print(f"  {result.name}: per seed {finals}")


if __name__ == "__main__":
    main()
