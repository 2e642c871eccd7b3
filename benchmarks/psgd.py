"""Step time of kronlab's PSGD Kron vs AdamW, the peer PSGD Kron implementations and the floor.

Run from the worktree root (peers from the ``bench`` extra installed in the same environment)::

    PYTHONPATH=src python -m benchmarks.psgd [--rounds 5] [--steps 2] [--threads 1]
        [--workloads mlp transformer] [--clock wall|cpu]

Every figure is a ratio of ``optimizer.step()`` times measured in this one process (median over
rounds, every candidate timed in each round, so a shared machine's load hits all alike;
``--clock cpu`` times this thread's CPU time instead of wall time, which waiting for a core on
an oversubscribed machine does not inflate). Peers
are run with their preconditioner updated on every step (probability 1.0), which is what
kronlab's QUAD/Procrustes do. Configurations, each compared with the fastest peer of its own
configuration:

* ``default``: kronlab's defaults (bf16 preconditioner state, the seed's dense/diagonal rule
  ``max_skew_dense=1.0``) vs the peers set to the same layout and dtype: ``memory_save_mode=
  "smart_one_diag"`` (both peers: the larger axis of a non-square matrix diagonal, 1-D diagonal,
  which is kronlab's rule on 2-D parameters) with bf16 factors (heavyball ``q_dtype`` and
  ``storage_dtype``; pytorch_optimizer ``precondition_dtype`` and ``mu_dtype``). The layouts
  are read back from each optimizer's state and printed.
* ``f32 dense``: every factor dense, float32: kronlab ``dtype=float32, max_skew_dense=inf`` vs
  the peers at their own defaults (all dense, float32).

Both peers are also run at kronlab's layout in float32 (``kronlab layout f32``): on CPUs whose
bf16 GEMMs are slower than float32 ones, that is the peers' fastest configuration with this
layout, and the last column compares every row with the fastest peer row of any configuration.

The FLOP floors are the products no PSGD Kron step can avoid, per dense factor of size ``d`` on
an ``m × n`` gradient (``n`` the other axis): the fit's ``P·G`` and ``Pg Pgᵀ`` and the output's
``P·G`` (``d²·n`` each) and one factor product (``d²·min(d, n)``), timed with ``torch.matmul``
in float32 for the all-dense layout and for kronlab's default layout.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

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
KRONLAB_LAYOUT = {"memory_save_mode": "smart_one_diag"}


def _heavyball(model: nn.Module, **options: object) -> torch.optim.Optimizer:
    import heavyball

    heavyball.utils.compile_mode = "default"  # no max-autotune: minutes of tuning on CPU
    return heavyball.PSGDKron(
        model.parameters(), lr=1e-3, preconditioner_update_probability=1.0, **options
    )


def _pytorch_optimizer(model: nn.Module, **options: object) -> torch.optim.Optimizer:
    import pytorch_optimizer

    return pytorch_optimizer.Kron(
        model.parameters(), lr=1e-3, pre_conditioner_update_probability=1.0, **options
    )


@dataclass(frozen=True)
class Candidate:
    factory: OptimizerFactory
    configuration: str | None  # None: not compared (AdamW)
    peer: bool = False


DEFAULT, DENSE, PEER_F32 = "default", "f32 dense", "kronlab layout f32"
BF16_PEERS = {"q_dtype": "bfloat16", "storage_dtype": "bfloat16"}
CANDIDATES: dict[str, Candidate] = {
    "AdamW": Candidate(lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3), None),
    "kronlab quad": Candidate(lambda model: PSGD(model.parameters(), method="quad"), DEFAULT),
    "kronlab procrustes": Candidate(
        lambda model: PSGD(model.parameters(), method="procrustes"), DEFAULT
    ),
    "heavyball.PSGDKron (kronlab layout, bf16)": Candidate(
        functools.partial(_heavyball, **KRONLAB_LAYOUT, **BF16_PEERS), DEFAULT, peer=True
    ),
    "pytorch_optimizer.Kron (kronlab layout, bf16)": Candidate(
        functools.partial(
            _pytorch_optimizer,
            **KRONLAB_LAYOUT,
            precondition_dtype=torch.bfloat16,
            mu_dtype=torch.bfloat16,
        ),
        DEFAULT,
        peer=True,
    ),
    "heavyball.PSGDKron (kronlab layout, f32)": Candidate(
        functools.partial(_heavyball, **KRONLAB_LAYOUT), PEER_F32, peer=True
    ),
    "pytorch_optimizer.Kron (kronlab layout, f32)": Candidate(
        functools.partial(_pytorch_optimizer, **KRONLAB_LAYOUT), PEER_F32, peer=True
    ),
    "kronlab quad f32 dense": Candidate(
        lambda model: PSGD(
            model.parameters(), method="quad", dtype=torch.float32, max_skew_dense=math.inf
        ),
        DENSE,
    ),
    "kronlab procrustes f32 dense": Candidate(
        lambda model: PSGD(
            model.parameters(), method="procrustes", dtype=torch.float32, max_skew_dense=math.inf
        ),
        DENSE,
    ),
    "heavyball.PSGDKron (defaults: all dense, f32)": Candidate(_heavyball, DENSE, peer=True),
    "pytorch_optimizer.Kron (defaults: all dense, f32)": Candidate(
        _pytorch_optimizer, DENSE, peer=True
    ),
}
FLOORS = {"FLOP floor (f32, all dense)": math.inf, "FLOP floor (f32, kronlab layout)": 1.0}


def floor_products(model: nn.Module, max_skew_dense: float) -> list[tuple[int, int, int]]:
    """The unavoidable ``(m, k, n)`` products of one step at the given dense/diagonal rule."""
    shapes = []
    for param in model.parameters():
        layout = plan_psgd_layout(param.shape, math.inf, max_skew_dense)
        rows, cols = layout.matrix_shape
        if layout.left == "dense":
            shapes += [(rows, rows, cols)] * 3 + [(rows, rows, min(rows, cols))]
        if layout.right == "dense":
            shapes += [(rows, cols, cols)] * 3 + [(min(rows, cols), cols, cols)]
    return shapes


def factor_layout(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> str:
    """``[kind, …] dtype`` of one parameter's factors, read from the optimizer's state."""
    state = optimizer.state[param]
    if isinstance(optimizer, PSGD):
        factors = [
            state[f"{side}_factor"] for side in ("left", "right") if f"{side}_factor" in state
        ]
        kinds = ["dense" if factor.ndim == 2 else "diagonal" for factor in factors]
    elif "Q" in state:  # pytorch_optimizer.Kron: one (d, d) or (d,) tensor per axis
        factors = state["Q"]
        kinds = ["dense" if factor.ndim == 2 else "diagonal" for factor in factors]
    else:  # heavyball: [(triangle shape or None, stored tensor), …] per axis, per bucket entry
        entry = next(iter(state.values()))
        stored = next(value for key, value in entry.items() if key.startswith("scale_by_psgd_Q"))
        factors = [tensor for _, tensor in stored]
        kinds = ["diagonal" if shape is None else "dense" for shape, _ in stored]
    dtypes = sorted({str(factor.dtype).removeprefix("torch.") for factor in factors})
    return f"[{', '.join(kinds)}] {'/'.join(dtypes)}"


def layout_report(
    model_params: dict[str, list[tuple[str, nn.Parameter]]],
    optimizers: dict[str, torch.optim.Optimizer],
    names: list[str],
) -> list[str]:
    """Per parameter, the factor kinds and dtypes of each optimizer in ``names``."""
    lines = ["| parameter | shape | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    mismatches = 0
    seen: set[tuple] = set()
    for index, (param_name, param) in enumerate(model_params[names[0]]):
        cells = [factor_layout(optimizers[n], model_params[n][index][1]) for n in names]
        kinds = {cell.split("]")[0] for cell in cells}
        mismatches += len(kinds) > 1
        row = (tuple(param.shape), tuple(cells))
        if row not in seen:  # one line per distinct shape and layout
            seen.add(row)
            shape = "x".join(map(str, param.shape))
            lines.append(f"| {param_name} | {shape} | " + " | ".join(cells) + " |")
    lines.append(f"\nfactor kinds differ on {mismatches} parameters")
    return lines


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


WORKLOADS = {
    "mlp": ("MLP 256-512-512-10", benchmark_mlp, mlp_batch, nn.functional.cross_entropy),
    "transformer": (
        "transformer 4x256",
        benchmark_transformer,
        transformer_batch,
        language_model_loss,
    ),
}


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def run(rounds: int, steps: int, workloads: list[str], clock: str = "wall") -> list[str]:
    lines = []
    for key in workloads:
        workload, make_model, make_batch, loss_fn = WORKLOADS[key]
        batch = make_batch()
        candidates: dict[str, Callable[[int], float]] = {}
        optimizers: dict[str, torch.optim.Optimizer] = {}
        model_params: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, candidate in CANDIDATES.items():
            model = make_model()
            try:
                optimizer = candidate.factory(model)
                # warm-up (and peers' compilation) before any timing
                time_optimizer_steps(model, optimizer, batch, loss_fn, steps=1, warmup=4)
            except Exception as error:  # a peer that fails is recorded, not fatal
                traceback.print_exc()
                lines.append(f"{workload}: {name} failed: {type(error).__name__}: {error}")
                continue
            optimizers[name], model_params[name] = optimizer, list(model.named_parameters())
            candidates[name] = functools.partial(
                _time_steps, model, optimizer, batch, loss_fn, CLOCKS[clock]
            )
        for floor, max_skew_dense in FLOORS.items():
            candidates[floor] = functools.partial(
                _floor_seconds, floor_products(make_model(), max_skew_dense), CLOCKS[clock]
            )
        lines.append(f"\n### {workload}\n")
        matched = [name for name in optimizers if CANDIDATES[name].configuration == DEFAULT]
        lines += layout_report(model_params, optimizers, matched)
        seconds = interleaved_seconds(candidates, rounds, steps)
        lines += ["", *_table(seconds)]
    return lines


def _table(seconds: dict[str, float]) -> list[str]:
    peers = [name for name in seconds if name in CANDIDATES and CANDIDATES[name].peer]
    fastest_any = min((seconds[name] for name in peers), default=math.nan)
    lines = [
        "| optimizer | configuration | ms/step | vs AdamW | vs fastest peer, same configuration |"
        " vs fastest peer, any configuration | vs floor (all dense) | vs floor (kronlab layout) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    floors = list(FLOORS)
    for name, value in seconds.items():
        configuration = CANDIDATES[name].configuration if name in CANDIDATES else None
        same = [seconds[peer] for peer in peers if CANDIDATES[peer].configuration == configuration]
        fastest_same = min(same, default=math.nan)
        lines.append(
            f"| {name} | {configuration or '—'} | {1000 * value:.2f} | "
            f"{format_ratio(value, seconds['AdamW'])} | {format_ratio(value, fastest_same)} | "
            f"{format_ratio(value, fastest_any)} | {format_ratio(value, seconds[floors[0]])} | "
            f"{format_ratio(value, seconds[floors[1]])} |"
        )
    return lines


def _floor_seconds(
    products: list[tuple[int, int, int]], clock: Callable[[], float], steps: int
) -> float:
    return matmul_floor_seconds(products, repeats=steps, clock=clock)


def _time_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    clock: Callable[[], float],
    steps: int,
) -> float:
    return time_optimizer_steps(
        model, optimizer, batch, loss_fn, steps=steps, warmup=0, clock=clock
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument(
        "--clock", choices=list(CLOCKS), default="wall", help="wall time or this thread's CPU time"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = run(args.rounds, args.steps, args.workloads, args.clock)
    print(f"machine: {machine_description()}, clock: {args.clock}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
