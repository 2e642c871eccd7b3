"""``report.md`` and ``top_examples.png``: each query's strongest proponents and opponents.

A proponent has a large positive score ``⟨H⁻¹ G_q, G_t⟩``: upweighting it lowers the query's
loss (Koh & Liang 2017); an opponent has the most negative score.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from kronlab.attribution.ranking import RankedScores
from kronlab.attribution.sources import AttributionTask, ExampleSet


def write_report(
    run_dir: Path,
    computed_with: dict,
    config,
    task: AttributionTask,
    ranked: RankedScores,
    dense: bool = True,
) -> list[Path]:
    """Write ``report.md`` (and ``top_examples.png`` when matplotlib is there); return paths.

    The settings stated are ``computed_with``: those the stages recorded when they produced
    the curvature and the stores that were scored (``config`` gives only the names of the
    sources and how much to show).
    """
    used = computed_with
    queries = ranked.proponents.shape[0]
    shown = min(config.report_queries, queries)
    proponents, opponents = ranked.proponents[:shown], ranked.opponents[:shown]
    scores = {
        (query, int(train)): float(value)
        for indices, values in (
            (proponents, ranked.proponent_scores),
            (opponents, ranked.opponent_scores),
        )
        for query in range(shown)
        for train, value in zip(indices[query], values[query])
    }
    stored = "`scores.npy` and `top_k.npz`" if dense else "`top_k.npz` (streamed; no scores.npy)"
    damping = f"damping {used['damping']} × mean eigenvalue"
    if used.get("damping_setting") == "auto":
        damping += " (chosen by `--damping auto`; the evidence is in fit.json)"
    lines = [
        "# kronlab attribution report",
        "",
        f"- model: `{config.model}` (weights {used['model_fingerprint']}), data: "
        f"`{config.data}` ({used['train_data_fingerprint']}), queries: `{config.queries}` "
        f"({used['query_data_fingerprint']})",
        f"- curvature: {used['method']}, {used['fisher']} Fisher (file "
        f"{used['curvature_fingerprint']}), {damping}",
        f"- compression: {used['compression']}, projection_dim: {used['projection_dim']} "
        f"({used['projection_kind']}), store dtype: {used['store_dtype']}",
        f"- scores: {stored}, {queries} queries × {ranked.num_train} training examples",
        "",
    ]
    if shown < queries:
        lines[-1:-1] = [
            f"- shown below: the first {shown} of {queries} queries (`--report-queries`); "
            "`top_k.npz` holds every query's proponents and opponents"
        ]
    for query in range(shown):
        lines.append(f"## Query {query}: {task.queries.describe(query)}{_prediction(task, query)}")
        lines.append("")
        lines.append("| rank | proponent | score | opponent | score |")
        lines.append("| ---: | --- | ---: | --- | ---: |")
        for rank, (plus, minus) in enumerate(zip(proponents[query], opponents[query]), 1):
            # By sign: a proponent has a positive score, an opponent a negative one; where a
            # query has fewer of one kind than --top-k, the cell stays empty.
            lines.append(
                f"| {rank} | {_cell(task, plus, scores[query, plus], 1)} "
                f"| {_cell(task, minus, scores[query, minus], -1)} |"
            )
        lines.append("")
    written = [run_dir / "report.md"]
    if shown and _plot(run_dir / "top_examples.png", task, scores, proponents, opponents):
        written.append(run_dir / "top_examples.png")
        lines.append("![top proponents and opponents](top_examples.png)")
    elif shown:
        lines.append("(top_examples.png not drawn: matplotlib is not installed; pip install "
                     "'kronlab[plot]')")  # fmt: skip
        warnings.warn(
            "matplotlib is not installed: top_examples.png not drawn (pip install 'kronlab[plot]')",
            RuntimeWarning,
            stacklevel=2,
        )
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return written


def _prediction(task: AttributionTask, query: int) -> str:
    """``, predicted 3 (right)`` for a labelled query (the model's arg-max class), else ``""``."""
    if task.queries.kind == "text":
        return ""
    inputs, labels = task.queries.batch(query, query + 1)
    parameter = next(task.model.parameters(), None)
    device = parameter.device if parameter is not None else inputs.device
    with torch.no_grad():
        output = task.model(inputs.to(device))
    logits = getattr(output, "logits", output)
    predicted = int(logits.argmax(-1).reshape(-1)[0])
    return f", predicted {predicted} ({'right' if predicted == int(labels[0]) else 'wrong'})"


def _cell(task: AttributionTask, index: int, score: float, sign: int) -> str:
    """``#index description | score`` when the score has the column's sign, else empty."""
    if score * sign <= 0:
        return "— | —"
    return f"#{index} {task.train.describe(index)} | {score:.4g}"


def _plot(
    path: Path,
    task: AttributionTask,
    scores: dict[tuple[int, int], float],
    proponents: np.ndarray,
    opponents: np.ndarray,
) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows, k = proponents.shape
    images = task.train.kind == "image" and task.train.tensors[0].shape[-1] == 64
    figure, axes = plt.subplots(
        rows,
        1 + 2 * k,
        figsize=(1.3 * (1 + 2 * k), 1.5 * rows) if images else (3 * (1 + 2 * k), 1.6 * rows),
        squeeze=False,
    )
    for query in range(rows):
        cells = [(task.queries, query, "query", None)]
        cells += [(task.train, int(t), "+", scores[query, int(t)]) for t in proponents[query]]
        cells += [(task.train, int(t), "−", scores[query, int(t)]) for t in opponents[query]]
        for axis, (examples, index, tag, score) in zip(axes[query], cells):
            _draw(axis, examples, index, images)
            title = f"{tag} #{index}" if score is None else f"#{index}: {score:+.2g}"
            color = "black" if score is None else "green" if score > 0 else "firebrick"
            axis.set_title(title, fontsize=7, color=color)
    figure.suptitle("query | top proponents (+) | top opponents (−)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _draw(axis, examples: ExampleSet, index: int, images: bool) -> None:
    axis.set_xticks([])
    axis.set_yticks([])
    if images:
        axis.imshow(examples.tensors[0][index].reshape(8, 8).numpy(), cmap="gray_r")
        axis.set_xlabel(examples.describe(index), fontsize=6)
    else:
        text = examples.describe(index)
        axis.text(0.02, 0.5, text[:40], fontsize=5, family="monospace", va="center", wrap=True)
