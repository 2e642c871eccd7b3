"""``report.md`` and ``top_examples.png``: each query's strongest proponents and opponents.

A proponent has a large positive score ``⟨H⁻¹ G_q, G_t⟩``: upweighting it lowers the query's
loss (Koh & Liang 2017); an opponent has the most negative score. The report says how the
scores scale (see :func:`scale_note`); the figure keeps a bounded width, with texts wrapped.
"""

from __future__ import annotations

import textwrap
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
        f"- scores: {stored}, {queries} queries × {ranked.num_train} training examples, "
        f"normalize: {used.get('normalize', 'none')}",
        "",
        scale_note(ranked, used.get("normalize", "none")),
        "",
    ]
    if shown < queries:
        lines[-3:-3] = [
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


def scale_note(ranked: RankedScores, normalize: str) -> str:
    """How to read the scores' scale, with the spread of the largest ``|score|`` per query."""
    largest = np.maximum(
        np.abs(ranked.proponent_scores[:, 0]), np.abs(ranked.opponent_scores[:, 0])
    )
    low, high = float(largest.min()), float(largest.max())
    spread = f"here the largest |score| per query runs from {low:.2g} to {high:.2g}"
    if low > 0:
        spread += f" (a factor {high / low:.2g})"
    if normalize == "cosine":
        return (
            "Reading the scores: each is a cosine ⟨q, t⟩ / (‖q‖ ‖t‖) of the stored query and "
            "training rows (`--normalize cosine`), in [-1, 1] and comparable across queries; "
            f"{spread}."
        )
    note = (
        "Reading the scores: a score is ⟨H⁻¹G_q, G_t⟩ (as stored: projected, or whitened with "
        "--compression whitened); it grows with the size of the query's gradient (a query the "
        "model gets confidently right has a small one, a wrong one a large one) and of the "
        "training example's (badly fit examples, long texts), so scores of different queries "
        f"differ by orders of magnitude: {spread}. Compare training examples within a query, "
        "not scores across queries. "
    )
    if normalize == "train":
        return note + (
            "These scores are divided by each training row's norm (`--normalize train`): the "
            "ranking follows the direction of a training example's gradient, not its size; "
            "`--normalize cosine` also divides by the query's norm, for scores in [-1, 1]."
        )
    return note + (
        "`--normalize train` divides each score by the training row's norm (the ranking then "
        "follows the direction of a training example's gradient, not its size); "
        "`--normalize cosine` also by the query's, for scores in [-1, 1] comparable across "
        "queries."
    )


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


# The figure's bounds: at most this many examples per side (report.md lists all of them),
# and a fixed width for texts, wrapped to these many characters per line.
PLOT_PER_SIDE = 6
TEXT_FIGURE_INCHES = 12.0
PLOT_DPI = 110
_WRAP = {"query": 44, "example": 64}
_LINES = {"query": 12, "example": 3}
_FONT = 6  # points; a monospace line is about 1.35 × this tall


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
    top_k = proponents.shape[1]
    per_side = min(top_k, PLOT_PER_SIDE)
    proponents, opponents = proponents[:, :per_side], opponents[:, :per_side]
    images = task.train.kind == "image" and task.train.tensors[0].shape[-1] == 64
    figure = (_image_grid if images else _text_columns)(plt, task, scores, proponents, opponents)
    title = "query | top proponents (+) | top opponents (−)"
    if per_side < top_k:
        title += f" (the first {per_side} of {top_k} of each; report.md lists all)"
    figure.suptitle(title, fontsize=9)
    figure.savefig(path, dpi=PLOT_DPI)
    plt.close(figure)
    return True


def _image_grid(plt, task: AttributionTask, scores: dict, proponents, opponents):
    """One row per query: the query's image, then each proponent's and opponent's."""
    rows, k = proponents.shape
    figure, axes = plt.subplots(
        rows, 1 + 2 * k, figsize=(1.3 * (1 + 2 * k), 1.5 * rows), squeeze=False
    )
    for query in range(rows):
        cells = [(task.queries, query, None)]
        cells += [(task.train, int(t), scores[query, int(t)]) for t in proponents[query]]
        cells += [(task.train, int(t), scores[query, int(t)]) for t in opponents[query]]
        for axis, (examples, index, score) in zip(axes[query], cells):
            axis.set_xticks([])
            axis.set_yticks([])
            axis.imshow(examples.tensors[0][index].reshape(8, 8).numpy(), cmap="gray_r")
            axis.set_xlabel(examples.describe(index), fontsize=6)
            title = f"query #{index}" if score is None else f"#{index}: {score:+.2g}"
            axis.set_title(title, fontsize=7, color=_color(score))
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    return figure


def _text_columns(plt, task: AttributionTask, scores: dict, proponents, opponents):
    """One row per query, three columns of bounded width: the query's text, its proponents,
    its opponents, each entry a title line and the text wrapped (never cut mid-line)."""
    rows = proponents.shape[0]
    blocks = []
    for query in range(rows):
        query_block = [(f"query #{query}", None, _wrapped(task.queries, query, "query"))]
        sides = [
            [
                (f"#{int(t)}: {scores[query, int(t)]:+.3g}", scores[query, int(t)],
                 _wrapped(task.train, int(t), "example"))
                for t in indices[query]
            ]
            for indices in (proponents, opponents)
        ]  # fmt: skip
        blocks.append([query_block, *sides])
    heights = [max(sum(1 + len(lines) for _, _, lines in column) for column in row) + 1
               for row in blocks]  # fmt: skip
    line_inches = 1.35 * _FONT / 72
    figure, axes = plt.subplots(
        rows,
        3,
        figsize=(TEXT_FIGURE_INCHES, 0.5 + line_inches * sum(heights)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights, "width_ratios": (3, 4, 4)},
    )
    for axes_row, row, height in zip(axes, blocks, heights):
        for axis, column in zip(axes_row, row):
            axis.set_xticks([])
            axis.set_yticks([])
            line = 0
            for title, score, lines in column:
                for text, color, weight in [(title, _color(score), "bold")] + [
                    (text, "black", "normal") for text in lines
                ]:
                    axis.text(0.01, 1 - (line + 0.5) / height, text, fontsize=_FONT,
                              family="monospace", color=color, weight=weight, va="center",
                              transform=axis.transAxes, parse_math=False)  # fmt: skip
                    line += 1
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / figure.get_figheight()))
    return figure


def _wrapped(examples: ExampleSet, index: int, role: str) -> list[str]:
    """An example's text (a vector's description), newlines shown as ↵, wrapped to the
    column's width; past the role's line budget the last line ends in …"""
    text = examples.text(index) if examples.kind == "text" else examples.describe(index)
    text = " ".join(text.replace("\n", " ↵ ").split())
    lines = textwrap.wrap(text, _WRAP[role], break_long_words=True) or [""]
    if len(lines) > _LINES[role]:
        lines = lines[: _LINES[role]]
        lines[-1] = lines[-1][: _WRAP[role] - 1] + "…"
    return lines


def _color(score: float | None) -> str:
    return "black" if score is None else "green" if score > 0 else "firebrick"
