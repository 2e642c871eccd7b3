"""LDS of compressed gradient stores (p = 16, 32, 64) against uncompressed, on the digits MLP.

Reuses the influence issue's LDS protocol (``benchmarks/lds.py``: same base model, the same 50
random 50% subsets × 2 seeds retrained and cached, the same 200 queries). Each variant runs the
full ``kronlab attribute`` pipeline (build → fit → apply → score) in a temporary run directory:
EK-FAC and K-FAC with projection after the inverse curvature, and K-FAC with the projection
folded into ``(F + δ)^{-1/2}``. Ratios are against the uncompressed store of the same variant.

    PYTHONPATH=src python -m benchmarks.attribution_lds [--write benchmarks/results/issue-8.md]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_description
from benchmarks.lds import linear_datamodeling_score
from benchmarks.lds_training import TrainingRecipe, retrain_subsets, train
from kronlab.attribution.pipeline import AttributionConfig, AttributionRun
from kronlab.attribution.sources import AttributionTask, ExampleSet, classification_loss
from kronlab.attribution.store import GradientStore
from kronlab.tasks.digits import digits_task

VARIANTS = (("ekfac", "project"), ("kfac", "project"), ("kfac", "folded"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dims", default="0,16,32,64")
    parser.add_argument("--write", type=Path, default=None, help="append the table (markdown)")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    recipe = TrainingRecipe()
    retrained = retrain_subsets(
        "mlp",
        subsets=50,
        seeds=2,
        queries=arguments.queries,
        recipe=recipe,
        cache=Path("/tmp/kronlab_lds_mlp.pt"),
    )
    data = digits_task("mlp")
    model = train("mlp", data.train_inputs, data.train_targets, 0, recipe)
    task = AttributionTask(
        model,
        classification_loss,
        ExampleSet((data.train_inputs, data.train_targets), "image"),
        ExampleSet(
            (data.test_inputs[: arguments.queries], data.test_targets[: arguments.queries]),
            "image",
        ),
    )
    dims = [int(d) for d in arguments.dims.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for method, compression in VARIANTS:
            for p in dims:
                config = AttributionConfig(
                    method=method,
                    compression=compression,
                    projection_dim=p,
                    num_queries=arguments.queries,
                    batch_size=128,
                    report_queries=0,
                )
                started = time.perf_counter()
                run = AttributionRun(
                    Path(scratch) / f"{method}-{compression}-{p}",
                    config,
                    task=task,
                    show_progress=False,
                )
                scores = torch.from_numpy(np.array(run.run()))
                seconds = time.perf_counter() - started
                width = GradientStore.open(run.train_store_dir).row_width
                lds = linear_datamodeling_score(scores, retrained["masks"], retrained["losses"])
                rows.append((method, compression, p, width, lds, seconds))
                print(f"{method} {compression} p={p}: LDS {lds:.4f} width {width}", flush=True)
    table = format_table(rows, arguments.queries)
    print(table)
    if arguments.write is not None:
        with arguments.write.open("a") as handle:
            handle.write(table + "\n")


def format_table(rows: list, queries: int) -> str:
    reference = {(m, c): (lds, width) for m, c, p, width, lds, _ in rows if p == 0}
    lines = [
        f"### LDS of compressed stores, digits MLP (hidden 32; 50 subsets × 2 seeds, {queries} "
        "queries)",
        "",
        "Command: `PYTHONPATH=src python -m benchmarks.attribution_lds`  ",
        f"Machine: {machine_description()} (shared, noisy; one torch thread).",
        "",
        "| curvature | compression | p | floats / row (vs full) | LDS | LDS / uncompressed | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, compression, p, width, lds, seconds in rows:
        base_lds, base_width = reference.get((method, compression), (None, None))
        ratio = f"{lds / base_lds:.2f}" if base_lds else "–"
        share = f"{width} ({width / base_width:.2f})" if base_width else str(width)
        lines.append(
            f"| {method} | {compression} | {p} | {share} | {lds:.4f} | {ratio} | {seconds:.1f} |"
        )
    ekfac = {p: lds for m, c, p, _, lds, _ in rows if (m, c) == ("ekfac", "project")}
    if 0 in ekfac and 32 in ekfac:
        met = ekfac[32] >= 0.9 * ekfac[0]
        lines += [
            "",
            f"- floor LDS(p=32) ≥ 0.9 × uncompressed (EK-FAC, projection last): "
            f"{ekfac[32] / ekfac[0]:.2f} → {'met' if met else 'MISSED'}",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
