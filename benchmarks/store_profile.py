"""Where a store build's time goes on ``tiny-gpt``: its FLOP floor and the model's own passes.

CPU time per example (``time.process_time``, one thread: other jobs on a shared machine do not
change it, unlike wall time) of each piece of the build path on 64-byte windows of
standard-library source, batch 64, p = 16 per side:

- ``forward``: the model's loss, no graph; ``training step``: forward + backward into every
  parameter's ``.grad`` (what one step of training costs);
- ``hooked forward + output gradients``: the forward with the recording hooks and the
  backward to the tracked modules' outputs only (no parameter gradient);
- ``per-example projected``: the same plus ``Σ_t (P_S g_t)(P_A a_t)ᵀ`` per module;
- ``rows + write``: the same, flattened to rows and written as a committed chunk (float32
  encoding, CRC-32, positioned write).

The FLOP floor is the time of the build's unavoidable matrix products alone, each timed with
``torch.mm`` / ``torch.bmm`` on its own shape: forward GEMMs of every ``nn.Linear`` and the
attention products, backward input-gradient GEMMs (attention backward: twice its forward), and
the projections. Elementwise work (GELU, softmax, layer norms, cross-entropy) is left out.

    PYTHONPATH=src python -m benchmarks.store_profile
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import machine_description, time_callable
from benchmarks.store_scale import WINDOW, write_windows
from kronlab.attribution.compression.projection import projected_side
from kronlab.attribution.config import AttributionConfig
from kronlab.attribution.pipeline import AttributionRun
from kronlab.attribution.store import flatten_blocks
from kronlab.curvature import per_example_gradients
from kronlab.curvature.hooks import layer_batches
from kronlab.tasks.text import TinyGPT


def gemm_shapes(model: TinyGPT, batch: int, p: int) -> list[tuple[str, tuple[int, ...]]]:
    """``(what, (b, m, k, n))``: every matrix product of one build batch (``b`` batched)."""
    tokens = batch * WINDOW
    config = model.config
    shapes = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            d_in, d_out = module.in_features, module.out_features
            shapes.append(("forward", (1, tokens, d_in, d_out)))
            shapes.append(("backward", (1, tokens, d_out, d_in)))
    head = config.d_model // config.heads
    for _ in range(config.layers):
        scores = (batch * config.heads, WINDOW, head, WINDOW)
        mixed = (batch * config.heads, WINDOW, WINDOW, head)
        shapes += [("forward", scores), ("forward", mixed)]
        shapes += [("backward", scores), ("backward", mixed)] * 2
    return shapes


def projection_shapes(
    shapes: dict[str, tuple[int, int]], embeddings: set[str], batch: int, p: int
) -> list[tuple[str, tuple[int, ...]]]:
    """The projections' products: ``g_t P_Sᵀ``, ``a_t P_Aᵀ`` (each only where the side is
    compressed; embeddings: a column gather, no product) and ``Σ_t`` per example."""
    tokens = batch * WINDOW
    products = []
    for name, (d_out, d_in) in shapes.items():
        p_out, p_in = projected_side(d_out, p), projected_side(d_in, p)
        if p_out < d_out:
            products.append(("projection", (1, tokens, d_out, p_out)))
        if p_in < d_in and name not in embeddings:
            products.append(("projection", (1, tokens, d_in, p_in)))
        products.append(("projection", (batch, p_out, WINDOW, p_in)))
    return products


def floor_seconds(shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, tuple[float, float]]:
    """``{what: (FLOPs, CPU seconds)}`` of the products, each timed on its own shape."""
    totals: dict[str, tuple[float, float]] = {}
    for what, (b, m, k, n) in shapes:
        left, right = torch.randn(b, m, k), torch.randn(b, k, n)
        seconds = time_callable(
            lambda left=left, right=right: torch.bmm(left, right),
            warmup=1,
            clock=time.process_time,
        )
        flops, time_so_far = totals.get(what, (0.0, 0.0))
        totals[what] = (flops + 2.0 * b * m * k * n, time_so_far + seconds)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--projection-dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    batch_size, p = arguments.batch_size, arguments.projection_dim
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        write_windows(root / "train.jsonl", arguments.examples)
        write_windows(root / "queries.jsonl", 4, offset=10**7)
        config = AttributionConfig(
            model="tiny-gpt",
            data=str(root / "train.jsonl"),
            queries=str(root / "queries.jsonl"),
            num_queries=4,
            projection_dim=p,
            batch_size=batch_size,
            chunk_rows=arguments.examples,
            length=WINDOW,
            modules=("*",),  # every module, as recorded
            compression="project",
        )
        run = AttributionRun(root / "run", config, show_progress=False)
        task, modules = run.task, run._modules()
        projections = run._projections()
        settings = run.train_settings()
        model, loss_fn, examples = task.model, task.loss_fn, task.train
        batches = [
            examples.batch(start, start + batch_size)
            for start in range(0, arguments.examples, batch_size)
        ]
        store = run._open_for_writing("build", settings, arguments.examples, resume=False)

        def forward() -> None:
            with torch.no_grad():
                for batch in batches:
                    loss_fn(model, batch)

        def training_step() -> None:
            for batch in batches:
                loss_fn(model, batch).backward()
                model.zero_grad(set_to_none=True)

        def hooked() -> None:
            for batch in batches:
                for _ in layer_batches(model, batch, loss_fn, dict(modules)):
                    pass

        def projected() -> list[dict[str, torch.Tensor]]:
            return [
                per_example_gradients(model, batch, loss_fn, modules, projections)
                for batch in batches
            ]

        def rows_and_write() -> None:
            rows = [flatten_blocks(blocks, settings) for blocks in projected()]
            store.uncommit([0])
            store.write_chunk(0, torch.cat(rows))

        pieces = {
            "forward": forward,
            "training step (forward + backward)": training_step,
            "hooked forward + output gradients": hooked,
            "per-example projected": projected,
            "rows + write (encode, CRC-32)": rows_and_write,
        }
        for work in pieces.values():
            work()  # warm-up
        measured = dict.fromkeys(pieces, 0.0)
        for _ in range(arguments.repeats):  # interleaved, so drifting load hits all alike
            for name, work in pieces.items():
                seconds = time_callable(work, repeats=1, warmup=0, clock=time.process_time)
                measured[name] += seconds / arguments.repeats
    embeddings = {name for name, module in modules.items() if isinstance(module, nn.Embedding)}
    floor = floor_seconds(
        gemm_shapes(model, batch_size, p)
        + projection_shapes(run._gradient_shapes(), embeddings, batch_size, p)
    )
    report(measured, floor, arguments)


def report(
    measured: dict[str, float], floor: dict[str, tuple[float, float]], arguments: argparse.Namespace
) -> None:
    count = arguments.examples
    flops = sum(value[0] for value in floor.values()) / arguments.batch_size
    floor_time = sum(value[1] for value in floor.values()) / arguments.batch_size
    step = measured["training step (forward + backward)"] / count
    lines = [
        f"Command: `PYTHONPATH=src python -m benchmarks.store_profile --examples {count}`  ",
        f"Machine: {machine_description()}; CPU time per example (process_time)",
        "",
        "| piece | ms CPU / example | examples per CPU-s | / training step | / FLOP floor |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, seconds in measured.items():
        per_example = seconds / count
        lines.append(
            f"| {name} | {per_example * 1e3:.3f} | {1 / per_example:,.0f} | "
            f"{per_example / step:.2f}x | {per_example / floor_time:.2f}x |"
        )
    lines.append(
        f"| FLOP floor: the products alone ({flops / 1e6:.1f} MFLOP) | {floor_time * 1e3:.3f} | "
        f"{1 / floor_time:,.0f} | {floor_time / step:.2f}x | 1.00x |"
    )
    lines += [
        "",
        "| products | MFLOP / example | ms CPU / example | GFLOP/s |",
        "|---|---:|---:|---:|",
    ]
    for what, (total, seconds) in floor.items():
        lines.append(
            f"| {what} | {total / arguments.batch_size / 1e6:.2f} | "
            f"{seconds / arguments.batch_size * 1e3:.3f} | {total / seconds / 1e9:.0f} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
