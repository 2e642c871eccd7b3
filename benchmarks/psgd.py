"""Step time of kronlab's PSGD Kron vs AdamW, the peer PSGD Kron implementations and the floor.

Run from the worktree root (peers from the ``bench`` extra installed in the same environment)::

    PYTHONPATH=src python -m benchmarks.psgd [--rounds 5] [--steps 2] [--threads 1]

Every figure is a ratio of ``optimizer.step()`` times measured in this one process (median over
rounds, every candidate timed in each round, so a shared machine's load hits all alike). Peers
are run with their preconditioner updated on every step (probability 1.0), which is what
kronlab's QUAD/Procrustes do; they keep their own defaults otherwise (all-dense float32
factors). ``kronlab f32 dense`` is the like-for-like configuration (``dtype=float32``,
``max_skew_dense=inf``); ``kronlab quad``/``procrustes`` are kronlab's defaults (bf16, the
seed's dense/diagonal rule). The FLOP floor is the products no PSGD Kron step can avoid, per
dense factor of size ``d`` on an ``m × n`` gradient: the fit's ``P·G`` and ``Pg Pgᵀ`` (``d²·n``
each), one ``d³`` factor product and the output's ``P·G`` (``d²·n``), timed with ``torch.matmul``
in float32 for the all-dense layout.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import traceback
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import (
    benchmark_mlp,
    benchmark_transformer,
    format_ratio,
    language_model_loss,
    machine_description,
    matmul_floor_seconds,
    mlp_batch,
    time_optimizer_steps,
    transformer_batch,
)
from kronlab.optim.psgd import PSGD, plan_psgd_layout

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


def _heavyball(model: nn.Module) -> torch.optim.Optimizer:
    import heavyball

    heavyball.utils.compile_mode = "default"  # no max-autotune: minutes of tuning on CPU
    return heavyball.PSGDKron(model.parameters(), lr=1e-3, preconditioner_update_probability=1.0)


def _pytorch_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    import pytorch_optimizer

    return pytorch_optimizer.Kron(
        model.parameters(), lr=1e-3, pre_conditioner_update_probability=1.0
    )


OPTIMIZERS: dict[str, OptimizerFactory] = {
    "AdamW": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3),
    "kronlab quad": lambda model: PSGD(model.parameters(), method="quad"),
    "kronlab procrustes": lambda model: PSGD(model.parameters(), method="procrustes"),
    "kronlab quad f32 dense": lambda model: PSGD(
        model.parameters(), method="quad", dtype=torch.float32, max_skew_dense=math.inf
    ),
    "kronlab procrustes f32 dense": lambda model: PSGD(
        model.parameters(), method="procrustes", dtype=torch.float32, max_skew_dense=math.inf
    ),
    "heavyball.PSGDKron": _heavyball,
    "pytorch_optimizer.Kron": _pytorch_optimizer,
}
PEERS = ("heavyball.PSGDKron", "pytorch_optimizer.Kron")
FLOOR = "FLOP floor (f32, all dense)"


def floor_products(model: nn.Module) -> list[tuple[int, int, int]]:
    """The unavoidable ``(m, k, n)`` products of one step with every factor dense."""
    shapes = []
    for param in model.parameters():
        layout = plan_psgd_layout(param.shape, math.inf, math.inf)
        rows, cols = layout.matrix_shape
        if layout.left == "dense":
            shapes += [(rows, rows, cols)] * 3 + [(rows, rows, rows)]
        if layout.right == "dense":
            shapes += [(rows, cols, cols)] * 3 + [(cols, cols, cols)]
    return shapes


def interleaved_seconds(
    candidates: dict[str, Callable[[int], float]], rounds: int, steps: int
) -> dict[str, float]:
    """Median over ``rounds`` of each candidate's mean step time, candidates interleaved.

    Interleaving spreads the load of a shared machine over every candidate alike.
    """
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, measure in candidates.items():
            samples[name].append(measure(steps))
    return {name: statistics.median(values) for name, values in samples.items()}


def run(rounds: int, steps: int) -> list[str]:
    workloads = {
        "MLP 256-512-512-10": (benchmark_mlp, mlp_batch(), nn.functional.cross_entropy),
        "transformer 4x256": (benchmark_transformer, transformer_batch(), language_model_loss),
    }
    lines = []
    for workload, (make_model, batch, loss_fn) in workloads.items():
        candidates: dict[str, Callable[[int], float]] = {}
        for name, factory in OPTIMIZERS.items():
            model = make_model()
            try:
                optimizer = factory(model)
                # warm-up (and peers' compilation) before any timing
                time_optimizer_steps(model, optimizer, batch, loss_fn, steps=1, warmup=4)
            except Exception as error:  # a peer that fails is recorded, not fatal
                traceback.print_exc()
                lines.append(f"{workload}: {name} failed: {type(error).__name__}: {error}")
                continue
            candidates[name] = functools.partial(_time_steps, model, optimizer, batch, loss_fn)
        products = floor_products(make_model())
        candidates[FLOOR] = lambda steps, products=products: matmul_floor_seconds(
            products, repeats=steps
        )
        seconds = interleaved_seconds(candidates, rounds, steps)
        peers = [seconds[name] for name in PEERS if name in seconds]
        fastest_peer = min(peers) if peers else math.nan
        lines.append(f"\n### {workload}\n")
        lines.append("| optimizer | ms/step | vs AdamW | vs fastest peer | vs floor |")
        lines.append("|---|---|---|---|---|")
        for name, value in seconds.items():
            lines.append(
                f"| {name} | {1000 * value:.2f} | {format_ratio(value, seconds['AdamW'])} | "
                f"{format_ratio(value, fastest_peer)} | {format_ratio(value, seconds[FLOOR])} |"
            )
    return lines


def _time_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
) -> float:
    return time_optimizer_steps(model, optimizer, batch, loss_fn, steps=steps, warmup=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = run(args.rounds, args.steps)
    print(f"machine: {machine_description()}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
