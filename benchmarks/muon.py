"""Muon and Spectron: step time, optimizer-state memory and loss after a fixed budget.

Run from the worktree root (the peer ``heavyball`` lives in its own venv)::

    PYTHONPATH=src python -m benchmarks.muon   # python of a venv with heavyball

Step times (4-layer d_model-256 transformer of ``benchmarks.common``) are ratios measured in this
one process. The Muon-only comparison steps the 16 hidden matrices alone, as torch.optim.Muon
supports nothing else; its floor is the Newton–Schulz matmuls (per matrix and step ``X Xᵀ``,
``A·A``, ``(bA + cA²) X``) timed with ``torch.matmul`` in the dtype the Newton–Schulz runs in.
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import (
    benchmark_mlp,
    benchmark_transformer,
    language_model_loss,
    machine_description,
    mlp_batch,
    transformer_batch,
)
from kronlab.optim import Muon, Spectron, auxiliary_parameters, optimizer_state_bytes
from kronlab.optim.hybrid import matrix_shape


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    auxiliary = auxiliary_parameters(model)
    return [p for p in model.parameters() if id(p) not in auxiliary]


def newton_schulz_floor(
    params: list[nn.Parameter], dtype: torch.dtype, steps: int = 5
) -> Callable[[], None]:
    """The Newton–Schulz matmuls alone for ``params``, with ``torch.matmul`` (to be timed)."""
    operands = []
    for param in params:
        rows, columns = sorted(matrix_shape(param))  # wide orientation: rows <= columns
        x = torch.randn(rows, columns, dtype=dtype) / math.sqrt(columns)
        gram = torch.randn(rows, rows, dtype=dtype) / rows
        operands.append((x, gram))

    def run() -> None:
        for x, gram in operands:
            for _ in range(steps):
                torch.matmul(x, x.T)
                torch.matmul(gram, gram)
                torch.matmul(gram, x)

    return run


def heavyball_muon(params: list[nn.Parameter]) -> torch.optim.Optimizer | str:
    try:
        import heavyball
    except ImportError as error:  # the peer is optional: report instead of a figure
        return f"not installed ({error})"
    # eager mode: torch.compile on CPU would time compilation and recompiles, not the algorithm
    heavyball.utils.compile_mode = None
    return heavyball.Muon(params, lr=0.02, compile_step=False)


MUON_REFERENCE = "torch.optim.Muon, hidden matrices (NS bfloat16)"
ADAMW_REFERENCE = "torch.optim.AdamW, whole model"


def contenders() -> dict[str, Callable[[nn.Module], torch.optim.Optimizer | str]]:
    return {
        "kronlab Muon, hidden matrices, NS auto (default)": lambda m: Muon(hidden_matrices(m)),
        "kronlab Muon, hidden matrices, NS bfloat16": lambda m: Muon(
            hidden_matrices(m), ns_dtype=torch.bfloat16
        ),
        "kronlab Muon, hidden matrices, NS float32": lambda m: Muon(
            hidden_matrices(m), ns_dtype=torch.float32
        ),
        MUON_REFERENCE: lambda m: torch.optim.Muon(hidden_matrices(m), lr=0.02, weight_decay=0),
        "heavyball.Muon, hidden matrices (eager)": lambda m: heavyball_muon(hidden_matrices(m)),
        ADAMW_REFERENCE: lambda m: torch.optim.AdamW(m.parameters()),
        "kronlab Muon (NS auto) + AdamW, whole model": lambda m: Muon(model=m),
        "kronlab Spectron r=0.25 + AdamW, whole model": lambda m: Spectron(
            model=m, lr=0.02, rank_fraction=0.25
        ),
        "kronlab Spectron r=0.5 + AdamW, whole model": lambda m: Spectron(
            model=m, lr=0.02, rank_fraction=0.5
        ),
    }


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple], Callable]] = {
    "transformer": (benchmark_transformer, transformer_batch, language_model_loss),
    "mlp": (benchmark_mlp, mlp_batch, nn.functional.cross_entropy),
}


def step_times(rounds: int, model_name: str = "transformer") -> dict[str, float | str]:
    """Median seconds per optimizer step, contenders interleaved round by round.

    Each contender steps its own copy of the model on one fixed gradient (computed once and
    restored before each step), so a
    round times the optimizer steps alone; interleaving makes every contender see the same load
    on a shared machine. The first round (state creation, Spectron's SVD) is not counted.
    """
    make_model, make_batch, loss_fn = MODELS[model_name]
    inputs, targets = make_batch()
    steppers: dict[str, Callable[[], object]] = {}
    preparers: dict[str, Callable[[], object]] = {}
    results: dict[str, float | str] = {}
    for name, build in contenders().items():
        model = make_model()
        try:
            optimizer = build(model)
        except Exception as error:  # noqa: BLE001 - a peer failing is a result to record
            optimizer = f"failed: {type(error).__name__}: {error}"
        if isinstance(optimizer, str):
            results[name] = optimizer
            continue
        loss_fn(model(inputs), targets).backward()
        gradients = [(p, p.grad.clone()) for p in model.parameters() if p.grad is not None]
        # some peers consume or clear .grad in step(): restore it, outside the timer
        preparers[name] = lambda gradients=gradients: [
            setattr(p, "grad", g.clone()) for p, g in gradients
        ]
        steppers[name] = optimizer.step
    matrices = hidden_matrices(make_model())
    steppers["NS floor, float32 matmuls"] = newton_schulz_floor(matrices, torch.float32)
    steppers["NS floor, bfloat16 matmuls"] = newton_schulz_floor(matrices, torch.bfloat16)
    samples: dict[str, list[float]] = {name: [] for name in steppers}
    for round_index in range(rounds + 1):
        for name, step in list(steppers.items()):
            preparers.get(name, lambda: None)()
            started = time.perf_counter()
            try:
                step()
            except Exception as error:  # noqa: BLE001 - a peer crashing is a result to record
                results[name] = f"crashed: {type(error).__name__}: {error}"
                del steppers[name]
                continue
            if round_index > 0:
                samples[name].append(time.perf_counter() - started)
    for name, values in samples.items():
        if values and name not in results:
            results[name] = statistics.median(values)
    return results


def state_memory() -> list[tuple[str, int, int]]:
    """(name, bytes for the hidden matrices, total bytes) after one step."""
    inputs, targets = transformer_batch()
    builders = {
        "AdamW": lambda m: torch.optim.AdamW(m.parameters()),
        "Muon + AdamW": lambda m: Muon(model=m),
        "Spectron r=0.25 + AdamW": lambda m: Spectron(model=m, rank_fraction=0.25),
        "Spectron r=0.5 + AdamW": lambda m: Spectron(model=m, rank_fraction=0.5),
    }
    rows = []
    for name, build in builders.items():
        model = benchmark_transformer()
        optimizer = build(model)
        language_model_loss(model(inputs), targets).backward()
        optimizer.step()
        total = optimizer_state_bytes(optimizer)
        matrices = {id(p) for p in hidden_matrices(model)}
        matrix_bytes = sum(
            _bytes(optimizer.state[p])
            for p in model.parameters()
            if id(p) in matrices and p in optimizer.state
        )
        rows.append((name, matrix_bytes, total))
    return rows


def _bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


def text_tokens() -> torch.Tensor:
    """Bytes of a few stdlib modules' source: a learnable, download-free token stream."""
    import json.decoder
    import textwrap

    modules = (argparse, inspect, json.decoder, textwrap)
    source = "".join(inspect.getsource(module) for module in modules)
    return torch.tensor(list(source.encode("utf-8")), dtype=torch.long)


def loss_after_budget(steps: int, batch_size: int = 8, context: int = 64) -> list[tuple]:
    """Train loss (mean of the last 10 steps) and held-out loss after ``steps`` steps."""
    tokens = text_tokens()
    split = int(0.9 * len(tokens))
    train, held_out = tokens[:split], tokens[split:]
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(train) - context - 1, (steps, batch_size), generator=generator)
    eval_offsets = torch.arange(0, len(held_out) - context - 1, context)[:64]

    def windows(stream: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = offsets[:, None] + torch.arange(context + 1)
        chunk = stream[index]
        return chunk[:, :-1], chunk[:, 1:]

    builders = {
        "AdamW lr 3e-3": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3),
        "Muon lr 0.02": lambda m: Muon(model=m, lr=0.02, adamw_lr=3e-3),
        "Spectron r=0.25 lr 0.02": lambda m: Spectron(
            model=m, lr=0.02, rank_fraction=0.25, adamw_lr=3e-3
        ),
        "Spectron r=0.5 lr 0.02": lambda m: Spectron(
            model=m, lr=0.02, rank_fraction=0.5, adamw_lr=3e-3
        ),
    }
    rows = []
    for name, build in builders.items():
        model = benchmark_transformer()
        optimizer = build(model)
        losses = []
        started = time.perf_counter()
        for offsets in starts:
            inputs, targets = windows(train, offsets)
            optimizer.zero_grad(set_to_none=True)
            loss = language_model_loss(model(inputs), targets)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        elapsed = time.perf_counter() - started
        eval_inputs, eval_targets = windows(held_out, eval_offsets)
        with torch.no_grad():
            held_out_loss = language_model_loss(model(eval_inputs), eval_targets).item()
        rows.append((name, sum(losses[-10:]) / 10, held_out_loss, elapsed))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median taken)")
    parser.add_argument("--train-steps", type=int, default=30, help="fixed training budget")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="transformer",
        help="model of the step-time table (the memory and loss tables use the transformer)",
    )
    parser.add_argument(
        "--step-times-only", action="store_true", help="skip the memory and loss tables"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine_description()}")
    print(f"command: {' '.join(sys.argv)}\n")

    times = step_times(args.rounds, args.model)

    def ratio(seconds: float, key: str) -> str:
        other = times.get(key)
        return f"{seconds / other:.2f}x" if isinstance(other, float) else "n/a"

    print(
        "| optimizer step (median) | ms | vs torch.optim.Muon | vs NS floor (same dtype) "
        "| vs AdamW |"
    )
    print("|---|---|---|---|---|")
    for name, seconds in times.items():
        if isinstance(seconds, str):
            print(f"| {name} | {seconds} | | | |")
            continue
        floor = f"NS floor, {'float32' if 'float32' in name else 'bfloat16'} matmuls"
        # the floor is the hidden matrices' Newton–Schulz: whole-model rows have no floor ratio,
        # nor has "auto", whose dtype differs per shape
        has_floor = "hidden matrices" in name and "auto" not in name
        print(
            f"| {name} | {1e3 * seconds:.1f} | {ratio(seconds, MUON_REFERENCE)} | "
            f"{ratio(seconds, floor) if has_floor else ''} | "
            f"{ratio(seconds, ADAMW_REFERENCE)} |"
        )

    if args.step_times_only:
        return
    print("\n| optimizer state after one step | hidden matrices (MiB) | total (MiB) |")
    print("|---|---|---|")
    for name, matrix_bytes, total in state_memory():
        print(f"| {name} | {matrix_bytes / 2**20:.2f} | {total / 2**20:.2f} |")

    print(
        f"\n| {args.train_steps} steps, byte-level LM on stdlib source | train loss (last 10) "
        "| held-out loss | seconds |"
    )
    print("|---|---|---|---|")
    for name, train_loss, held_out_loss, seconds in loss_after_budget(args.train_steps):
        print(f"| {name} | {train_loss:.3f} | {held_out_loss:.3f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
