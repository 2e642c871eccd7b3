"""SIRFShampoo step time against the peers ``sirfshampoo`` and ``singd``, AdamW and the FLOP floor.

Run from the repository root (peers from the ``bench`` extra)::

    PYTHONPATH=src python -m benchmarks.sirfshampoo [--steps 10] [--rounds 3] [--threads 1]

Model: the benchmark MLP 256 → 512 → 512 → 10 (batch 256), one preconditioner per parameter
(sirfshampoo's grouping; one more row groups each Linear's weight and bias, SINGD's grouping),
factors updated every step (``T = 1``). Every figure is a ratio measured
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
from kronlab.groups import LinearWeightBias, PerParameter
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


def host_reads_per_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch, loss_fn
) -> float:
    """Device→host scalar reads (``.item()``, ``bool(tensor)``: ``aten::_local_scalar_dense``)
    per ``step()``: each one is a synchronization on a GPU, however cheap on a CPU."""
    inputs, targets = batch
    steps = 3
    counted = 0
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            optimizer.step()
        counted += sum(
            event.count
            for event in profile.key_averages()
            if event.key == "aten::_local_scalar_dense"
        )
    return counted / steps


def candidates(structure: str) -> dict[str, Callable[[nn.Module], torch.optim.Optimizer | None]]:
    """Optimizer builders for one structure; a peer that cannot be built maps to ``None``."""

    def kronlab_default(model: nn.Module) -> torch.optim.Optimizer:
        return SIRFShampoo(model, structures=structure)

    def kronlab_no_check(model: nn.Module) -> torch.optim.Optimizer:
        return SIRFShampoo(model, structures=structure, on_nonfinite_grad="ignore")

    def kronlab_weight_bias(model: nn.Module) -> torch.optim.Optimizer:
        rules = (LinearWeightBias(), PerParameter())
        return SIRFShampoo(model, structures=structure, combine_params=rules)

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
        "kronlab (LinearWeightBias grouping)": kronlab_weight_bias,
        "sirfshampoo.SIRFShampoo": peer_sirfshampoo,
        "singd.SINGD (T=1)": peer_singd,
        "torch.optim.AdamW": adamw,
    }


def measure(structure: str, steps: int, rounds: int) -> dict[str, list[tuple[float, float]] | str]:
    """Per-round (step, iteration) seconds per optimizer, or the error a peer raised."""
    batch = mlp_batch()
    loss_fn = nn.functional.cross_entropy
    samples: dict[str, list[tuple[float, float]] | str] = {}
    for _ in range(rounds):
        for name, build in candidates(structure).items():
            if isinstance(samples.get(name), str):
                continue
            model = benchmark_mlp()
            try:
                optimizer = build(model)
                if optimizer is None:
                    samples[name] = "structure not supported by the peer"
                    continue
                step = time_optimizer_steps(model, optimizer, batch, loss_fn, steps=steps)
                iteration = iteration_seconds(model, optimizer, batch, loss_fn, steps)
            except Exception as error:  # record a peer's failure instead of its figure
                samples[name] = f"{type(error).__name__}: {error}"[:160]
                continue
            samples.setdefault(name, []).append((step, iteration))  # type: ignore[union-attr]
    return samples


def median_ratio(
    ours: list[tuple[float, float]], row: list[tuple[float, float]], index: int
) -> str:
    """Median over rounds of the ratio measured within each round (robust to load drift)."""
    return f"{statistics.median(a[index] / b[index] for a, b in zip(ours, row)):.2f}x"


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
    loss_fn = nn.functional.cross_entropy
    for structure in args.structures.split(","):
        results = measure(structure, args.steps, args.rounds)
        ours = results["kronlab"]
        print(
            f"\nstructures={structure!r}: median ms over rounds; ratios = kronlab (default) / row,"
        )
        print("median of the per-round ratios")
        print(
            f"{'optimizer':40s} {'step ms':>9s} {'iter ms':>9s} {'ours/row step':>14s} "
            f"{'ours/row iter':>14s}"
        )
        for name, value in results.items():
            if isinstance(value, str):
                print(f"{name:40s} failed or n/a: {value}")
                continue
            step = statistics.median(v[0] for v in value)
            iteration = statistics.median(v[1] for v in value)
            ratios = ("n/a", "n/a")
            if not isinstance(ours, str):
                ratios = (median_ratio(ours, value, 0), median_ratio(ours, value, 1))
            print(
                f"{name:40s} {step * 1e3:9.1f} {iteration * 1e3:9.1f} {ratios[0]:>14s} "
                f"{ratios[1]:>14s}"
            )
        if structure == "dense" and not isinstance(ours, str):
            step = statistics.median(v[0] for v in ours)
            print(f"kronlab step / FLOP floor: {format_ratio(step, floor)}")
            print("host reads (syncs on a GPU) per step:")
            for name, build in candidates(structure).items():
                model = benchmark_mlp()
                optimizer = build(model)
                if optimizer is not None and not isinstance(results.get(name), str):
                    reads = host_reads_per_step(model, optimizer, mlp_batch(), loss_fn)
                    print(f"  {name:40s} {reads:.0f}")


if __name__ == "__main__":
    main()
