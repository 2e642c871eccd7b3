"""Why SIRFShampoo trails on the character-level LM: its defaults, or the method?

Run from the repository root (the peer row needs the ``bench`` extra)::

    PYTHONPATH=src python -m benchmarks.sirfshampoo_lag [--steps 50] [--out kronlab-bench]

Every row is one ``charlm`` run (seed 0, the convergence benchmark's schedule and weight decay)
of kronlab's SIRFShampoo with one setting changed from its digits-tuned entry (lr 0.01,
beta2 0.2, lam 0.1, T 1, weight and bias of a linear layer in one factor pair), next to AdamW at
its default lr. Runs are cached in ``--out`` like the benchmark's own (``charlm/runs``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch import nn

from kronlab.bench.optimizers import OptimizerSpec, kronlab_spec, resolve
from kronlab.bench.runner import RunKey, load_cached, store, train_run
from kronlab.bench.tasks import load_convergence_task
from kronlab.groups import LinearWeightBias, PerParameter
from kronlab.optim import SIRFShampoo

REGISTRY = {"lr": 0.01, "beta2": 0.2, "lam": 0.1, "T": 1}
PAPER = {"lr": 1e-3, "beta2": 0.01, "lam": 1e-3, "T": 1}  # the class's (and the peer's) defaults
VARIANTS: dict[str, dict[str, Any]] = {
    "registry": {},
    "lr/3": {"lr": REGISTRY["lr"] / 3},
    "lr*3": {"lr": REGISTRY["lr"] * 3},
    "beta2 0.05": {"beta2": 0.05},
    "beta2 0.5": {"beta2": 0.5},
    "lam 0.01": {"lam": 0.01},
    "lam 1": {"lam": 1.0},
    "T 10": {"T": 10},
    "class defaults": PAPER,
    "beta2 0.5 lr*3": {"beta2": 0.5, "lr": REGISTRY["lr"] * 3},
}


def sirf_spec(name: str, settings: dict[str, Any]) -> OptimizerSpec:
    chosen = {**REGISTRY, **settings}

    def factory(model: nn.Module, lr: float) -> SIRFShampoo:
        return SIRFShampoo(
            model,
            lr=lr,
            beta2=chosen["beta2"],
            lam=chosen["lam"],
            T=chosen["T"],
            combine_params=(LinearWeightBias(), PerParameter()),
        )

    return OptimizerSpec(name, factory, chosen["lr"], "sirfshampoo")


def run(spec: OptimizerSpec, steps: int, out: Path) -> float:
    key = RunKey("charlm", spec.name, spec.default_lr, 0, steps)
    record = load_cached(out, key)
    if record is None:
        record = train_run(load_convergence_task("charlm"), spec, key)
        store(out, record, key)
    return record.final_val_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("kronlab-bench"))
    parser.add_argument("--peer", action="store_true", help="add sirfshampoo's own release")
    parser.add_argument(
        "--only", help="comma-separated variant labels to run, in this order (default: all)"
    )
    args = parser.parse_args()
    labels = args.only.split(",") if args.only else list(VARIANTS)
    unknown = sorted(set(labels) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; available: {list(VARIANTS)}")
    rows = [("adamw (lr 3e-3)", run(kronlab_spec("adamw"), args.steps, args.out))]
    for label in labels:
        settings = VARIANTS[label]
        name = "sirf-" + label.replace(" ", "").replace("/", "div").replace("*", "x")
        rows.append((f"sirfshampoo {label}", run(sirf_spec(name, settings), args.steps, args.out)))
    if args.peer:
        peer = resolve("sirfshampoo_peer")
        rows.append(("sirfshampoo package, its defaults", run(peer, args.steps, args.out)))
    print(f"charlm, {args.steps} steps, seed 0: final validation loss (nats/byte)\n")
    print("| run | val loss |\n| --- | --- |")
    for label, loss in rows:
        print(f"| {label} | {loss:.4f} |")


if __name__ == "__main__":
    main()
