"""LDS of compressed gradient stores against uncompressed ones, on the digits MLP or CNN.

Reuses the influence issue's LDS protocol (``benchmarks/lds.py``: same base model, the same 50
random 50% subsets × 2 seeds retrained and cached, the same 200 queries). Each mode
(curvature × compression × projection kind) runs the full ``kronlab attribute`` pipeline
(build → fit → apply → score) in a temporary run directory at every ``p``; ratios are against
the uncompressed run (``p = 0``) of the same curvature and compression.

Spread: the headline LDS uses the pipeline's projections (identifiers ``<module>/left|right``)
and Fisher seed 0. Every compressed row is the uncompressed row of the same mode projected per
module (``P_S X P_Aᵀ``, with ``X`` the stored ``G_t``, ``H⁻¹G_q``, or their whitened forms), so
the script re-projects the ``p = 0`` rows in-process with other identifiers (checked to
reproduce the pipeline's scores for the pipeline's own identifiers), for each Fisher seed (the
true-Fisher label draws), and reports the ratio's median and range over all of them.

    PYTHONPATH=src:. python -m benchmarks.attribution_lds [--model cnn --subsets 30] [--write FILE]

The table of this benchmark chose the default ``projection_dim`` and ``compression``
(BENCHMARKS.md, "Gradient store and attribution pipeline").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_description
from benchmarks.lds import linear_datamodeling_score
from benchmarks.lds_training import HIDDEN, TrainingRecipe, retrain_subsets, train
from kronlab.attribution.compression import projected_side
from kronlab.attribution.pipeline import AttributionConfig, AttributionRun
from kronlab.attribution.sources import AttributionTask, ExampleSet, classification_loss
from kronlab.attribution.store import GradientStore, StoreSettings
from kronlab.linalg import random_projection
from kronlab.tasks.digits import digits_task

# (curvature, compression): the projection kinds are crossed with every one of them.
MODES = (
    ("ekfac", "project"),
    ("ekfac", "whitened"),
    ("kfac", "project"),
    ("kfac", "folded"),
    ("kfac", "whitened"),
)
KINDS = ("rademacher", "orthogonal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="the MLP's width")
    parser.add_argument("--subsets", type=int, default=50, help="retrained random halves")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dims", default="16,32,64")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--modes", default=",".join(f"{m}-{c}" for m, c in MODES))
    parser.add_argument("--fisher-seeds", default="0,1,2", help="true-Fisher label draws")
    parser.add_argument("--projection-seeds", type=int, default=8, help="draws per Fisher seed")
    parser.add_argument("--write", type=Path, default=None, help="append the table (markdown)")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    recipe = TrainingRecipe()
    # The same caches as benchmarks/lds.py (50 subsets) and benchmarks/damping_lds.py (others).
    suffix = "" if arguments.subsets == 50 else f"_{arguments.subsets}"
    if arguments.model == "mlp" and arguments.hidden != HIDDEN:
        suffix += f"_hidden{arguments.hidden}"
    retrained = retrain_subsets(
        arguments.model,
        subsets=arguments.subsets,
        seeds=2,
        queries=arguments.queries,
        recipe=recipe,
        cache=Path(tempfile.gettempdir()) / f"kronlab_lds_{arguments.model}{suffix}.pt",
        hidden=arguments.hidden,
    )
    data = digits_task(arguments.model)
    model = train(
        arguments.model, data.train_inputs, data.train_targets, 0, recipe, arguments.hidden
    )
    task = AttributionTask(
        model,
        classification_loss,
        ExampleSet((data.train_inputs, data.train_targets), "image"),
        ExampleSet(
            (data.test_inputs[: arguments.queries], data.test_targets[: arguments.queries]),
            "image",
        ),
    )

    def lds(scores: torch.Tensor) -> float:
        return linear_datamodeling_score(scores, retrained["masks"], retrained["losses"])

    dims = [int(d) for d in arguments.dims.split(",")]
    kinds = arguments.kinds.split(",")
    modes = [tuple(mode.split("-")) for mode in arguments.modes.split(",")]
    fisher_seeds = [int(s) for s in arguments.fisher_seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:

        def pipeline(method: str, compression: str, kind: str, p: int, seed: int):
            config = AttributionConfig(
                method=method,
                compression=compression,
                projection_dim=p,
                projection_kind=kind,
                num_queries=arguments.queries,
                batch_size=128,
                report_queries=0,
                seed=seed,
                damping=0.1,  # the factor its BENCHMARKS.md figures were taken with
            )
            run = AttributionRun(
                Path(scratch) / f"{method}-{compression}-{kind}-{p}-{seed}",
                config,
                task=task,
                show_progress=False,
            )
            started = time.perf_counter()
            scores = torch.from_numpy(np.array(run.run()))
            seconds = time.perf_counter() - started
            train_store = GradientStore.open(run.train_store_dir)
            return run, scores, train_store, seconds

        for method, compression in modes:
            # Uncompressed rows of every Fisher seed: the base of the re-projected spread.
            uncompressed = {}
            for seed in fisher_seeds:
                run, scores, store, seconds = pipeline(method, compression, "rademacher", 0, seed)
                queries = GradientStore.open(run.query_store_dir).read()
                uncompressed[seed] = (store.read(), queries, store.settings, lds(scores))
            base_lds = uncompressed[fisher_seeds[0]][3]
            width = uncompressed[fisher_seeds[0]][2].row_width
            # At p = 0 the "spread" column holds the uncompressed LDS of every Fisher seed.
            seed_values = [uncompressed[seed][3] for seed in fisher_seeds]
            rows.append(
                (method, compression, "–", 0, width, width, base_lds, 1.0, seed_values, seconds)
            )
            print(f"{method} {compression} p=0: LDS {base_lds:.4f}", flush=True)
            for kind in kinds:
                for p in dims:
                    run, scores, store, seconds = pipeline(method, compression, kind, p, 0)
                    headline = lds(scores)
                    train_rows, query_rows, settings, _ = uncompressed[fisher_seeds[0]]
                    again = (
                        reprojected(query_rows, settings, kind, p, "")
                        @ reprojected(train_rows, settings, kind, p, "").T
                    )
                    # Re-projection must be the pipeline's estimator, or the spread means nothing.
                    tolerance = 1e-3 * scores.abs().max().item()
                    torch.testing.assert_close(again.float(), scores, rtol=1e-3, atol=tolerance)
                    ratios = []
                    for seed in fisher_seeds:
                        train_rows, query_rows, settings, seed_lds = uncompressed[seed]
                        for draw in range(arguments.projection_seeds):
                            salt = "" if draw == 0 else f"#{draw}"
                            sketched = (
                                reprojected(query_rows, settings, kind, p, salt)
                                @ reprojected(train_rows, settings, kind, p, salt).T
                            )
                            ratios.append(lds(sketched) / seed_lds)
                    rows.append(
                        (
                            method,
                            compression,
                            kind,
                            p,
                            store.row_width,
                            width,
                            headline,
                            headline / base_lds,
                            ratios,
                            seconds,
                        )
                    )
                    print(
                        f"{method} {compression} {kind} p={p}: LDS {headline:.4f} "
                        f"({headline / base_lds:.2f}x; median {statistics.median(ratios):.2f}x, "
                        f"{min(ratios):.2f}-{max(ratios):.2f})",
                        flush=True,
                    )
    table = format_table(rows, arguments, fisher_seeds)
    print(table)
    if arguments.write is not None:
        with arguments.write.open("a") as handle:
            handle.write(table + "\n")


def reprojected(
    rows: torch.Tensor, settings: StoreSettings, kind: str, p: int, salt: str
) -> torch.Tensor:
    """Uncompressed rows ``X`` → ``P_S X P_Aᵀ`` per module, as the pipeline would store them.

    ``salt=""`` regenerates the pipeline's own matrices; any other salt draws new ones.
    """
    parts = []
    for block, (start, stop) in zip(
        settings.modules, settings.column_ranges().values(), strict=True
    ):
        d_out, d_in = block.shape
        blocks = rows[:, start:stop].double().reshape(-1, d_out, d_in)
        if projected_side(d_out, p) != d_out:
            left = random_projection(f"{block.name}/left{salt}", (p, d_out), kind, torch.float64)
            blocks = left @ blocks
        if projected_side(d_in, p) != d_in:
            right = random_projection(f"{block.name}/right{salt}", (p, d_in), kind, torch.float64)
            blocks = blocks @ right.T
        parts.append(blocks.flatten(1))
    return torch.cat(parts, dim=1)


def format_table(rows: list, arguments: argparse.Namespace, fisher_seeds: list[int]) -> str:
    draws = arguments.projection_seeds
    model = (
        f"MLP (hidden {arguments.hidden}"
        if arguments.model == "mlp"
        else "CNN (conv 16-16, linear 256 → 10"
    )
    flags = " ".join(
        f"--{name.replace('_', '-')} {getattr(arguments, name)}"
        for name in ("model", "hidden", "subsets", "dims", "kinds", "modes")
    )
    lines = [
        f"### LDS of compressed stores, digits {model}; {arguments.subsets} subsets × 2 seeds, "
        f"{arguments.queries} queries)",
        "",
        f"Command: `PYTHONPATH=src:. python -m benchmarks.attribution_lds {flags}`  ",
        f"Machine: {machine_description()} (shared, noisy; one torch thread).",
        "",
        "LDS and ratio: the pipeline run (Fisher seed 0, the pipeline's projections). Spread: "
        f"ratio to the same seed's uncompressed LDS over {len(fisher_seeds)} Fisher seeds × "
        f"{draws} projection draws, median [min, max].",
        "",
        "| curvature | compression | projection | p | floats / row (vs full) | LDS "
        "| LDS / uncompressed | spread | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, compression, kind, p, width, full, lds, ratio, ratios, seconds in rows:
        spread = (
            f"LDS over Fisher seeds {min(ratios):.4f}–{max(ratios):.4f}"
            if p == 0
            else f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]"
        )
        lines.append(
            f"| {method} | {compression} | {kind} | {p} | {width} ({width / full:.2f}) "
            f"| {lds:.4f} | {ratio:.2f} | {spread} | {seconds:.1f} |"
        )
    lines.append("")
    # The default's criterion: LDS within 5% of uncompressed, by the pipeline run and by the
    # median draw (the worst draw is shown for the risk).
    within = {}
    for method, compression, kind, p, _, _, _, ratio, ratios, _ in rows:
        if p and ratio >= 0.95 and statistics.median(ratios) >= 0.95:
            within.setdefault((method, compression, kind), (p, min(ratios)))
    for method, compression, kind in dict.fromkeys(row[:3] for row in rows if row[3]):
        found = within.get((method, compression, kind))
        verdict = (
            f"smallest p = {found[0]} (worst draw {found[1]:.2f}x)"
            if found
            else "none of the measured p"
        )
        lines.append(f"- within 5% of uncompressed, {method} {compression} {kind}: {verdict}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
