"""SIRFShampoo step time against the peers ``sirfshampoo`` and ``singd``, AdamW and the FLOP floor.

Run from the repository root (peers from the ``bench`` extra)::

    PYTHONPATH=src python -m benchmarks.sirfshampoo [--steps 10] [--rounds 3] [--threads 1]

Model: the benchmark MLP 256 → 512 → 512 → 10 (batch 256), one preconditioner per parameter
(the peers' grouping), factors updated every step (``T = 1``). Every figure is a ratio measured
in this process; optimizers are timed in interleaved rounds and the median ratio is reported.

* *step*: ``optimizer.step()`` alone. SINGD does part of its work in backward hooks, so for it
  (and for every row, for comparison) the *iteration* time (forward + backward + step) is given too.
* *floor*: the matrix products SIRFShampoo cannot avoid per step, timed with ``torch.matmul``:
  per factor ``K_nᵀ·G``, ``Π(GK GKᵀ)``, ``K_nᵀK_n``, ``K_n·m_n`` and two products to precondition.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import (
    benchmark_mlp,
    format_ratio,
    machine_description,
    matmul_floor_seconds,
    mlp_batch,
    time_optimizer_steps,
)
from kronlab.optim import SIRFShampoo

PEER_STRUCTURES = {"dense": "dense", "diagonal": "diagonal", "block_diagonal:30": "block30diagonal"}


def unavoidable_products(model: nn.Module) -> list[tuple[int, int, int]]:
    """``(m, k, n)`` of the products of one dense SIRFShampoo step with per-parameter factors."""
    shapes = []
    for param in model.parameters():
        numel = param.numel()
        for dim in param.shape:
            rest = numel // dim
            shapes += [(dim, dim, rest), (dim, rest, dim), (dim, dim, dim), (dim, dim, dim)]
            shapes += [(dim, dim, rest)] * 2
    return shapes


def iteration_seconds(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch, loss_fn, steps: int
) -> float:
    inputs, targets = batch
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def candidates(structure: str) -> dict[str, Callable[[nn.Module], torch.optim.Optimizer | None]]:
    """Optimizer builders for one structure; a peer that cannot be built maps to ``None``."""

    def kronlab_default(model: nn.Module) -> torch.optim.Optimizer:
        return SIRFShampoo(model, structures=structure)

    def kronlab_no_check(model: nn.Module) -> torch.optim.Optimizer:
        return SIRFShampoo(model, structures=structure, on_nonfinite_grad="ignore")

    def peer_sirfshampoo(model: nn.Module) -> torch.optim.Optimizer | None:
        if structure != "dense":  # sirfshampoo 0.0.1 supports only dense factors
            return None
        from sirfshampoo import SIRFShampoo as PeerSIRFShampoo

        return PeerSIRFShampoo(model)

    def peer_singd(model: nn.Module) -> torch.optim.Optimizer:
        from singd.optim.optimizer import SINGD

        peer = PEER_STRUCTURES[structure]
        return SINGD(model, T=1, structures=(peer, peer), warn_unsupported=False)

    def adamw(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=1e-3)

    return {
        "kronlab": kronlab_default,
        "kronlab (on_nonfinite_grad='ignore')": kronlab_no_check,
        "sirfshampoo.SIRFShampoo": peer_sirfshampoo,
        "singd.SINGD (T=1)": peer_singd,
        "torch.optim.AdamW": adamw,
    }


def measure(structure: str, steps: int, rounds: int) -> dict[str, tuple[float, float] | str]:
    """Median (step, iteration) seconds per optimizer over interleaved rounds, or an error."""
    batch = mlp_batch()
    loss_fn = nn.functional.cross_entropy
    samples: dict[str, list[tuple[float, float]]] = {}
    errors: dict[str, str] = {}
    for _ in range(rounds):
        for name, build in candidates(structure).items():
            if name in errors:
                continue
            model = benchmark_mlp()
            try:
                optimizer = build(model)
                if optimizer is None:
                    errors[name] = "structure not supported by the peer"
                    continue
                step = time_optimizer_steps(model, optimizer, batch, loss_fn, steps=steps)
                iteration = iteration_seconds(model, optimizer, batch, loss_fn, steps)
            except Exception as error:  # record a peer's failure instead of its figure
                errors[name] = f"{type(error).__name__}: {error}"[:160]
                continue
            samples.setdefault(name, []).append((step, iteration))
    results: dict[str, tuple[float, float] | str] = dict(errors)
    for name, pairs in samples.items():
        results[name] = (
            statistics.median(p[0] for p in pairs),
            statistics.median(p[1] for p in pairs),
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--structures", default="dense,diagonal,block_diagonal:30")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine_description()}")
    floor = matmul_floor_seconds(unavoidable_products(benchmark_mlp()), repeats=5)
    print(f"dense FLOP floor (torch.matmul of the unavoidable products): {floor * 1e3:.1f} ms")
    for structure in args.structures.split(","):
        results = measure(structure, args.steps, args.rounds)
        ours = results["kronlab"]
        print(f"\nstructures={structure!r}  (ratios: kronlab default / row, step | iteration)")
        print(
            f"{'optimizer':40s} {'step ms':>9s} {'iter ms':>9s} {'ours/row step':>14s} "
            f"{'ours/row iter':>14s}"
        )
        for name, value in results.items():
            if isinstance(value, str):
                print(f"{name:40s} failed or n/a: {value}")
                continue
            step, iteration = value
            step_ratio = format_ratio(ours[0], step) if not isinstance(ours, str) else "n/a"
            iter_ratio = format_ratio(ours[1], iteration) if not isinstance(ours, str) else "n/a"
            print(
                f"{name:40s} {step * 1e3:9.1f} {iteration * 1e3:9.1f} {step_ratio:>14s} "
                f"{iter_ratio:>14s}"
            )
        if structure == "dense" and not isinstance(ours, str):
            print(f"kronlab step / FLOP floor: {format_ratio(ours[0], floor)}")


if __name__ == "__main__":
    main()
