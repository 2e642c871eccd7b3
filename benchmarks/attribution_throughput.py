"""Gradient-store build and scoring throughput (examples/s) and peak memory vs bergson, kronfluence.

Workloads (CPU, one torch thread, same model weights and data for every library):

- ``gpt2``: a 2-layer Hugging Face GPT-2 (d 64, vocab 257, random weights) on 64-byte snippets of
  Python's stdlib; per-sequence gradients of the four ``Conv1D`` layers per block, projected to
  ``p × p`` per module. kronlab ``build`` vs bergson ``collect_gradients`` (its index build).
  kronfluence tracks only ``nn.Linear`` / ``nn.Conv2d``, not GPT-2's ``Conv1D``: not run here.
- ``digits``: the digits MLP (64 → 128 → 128 → 10). bergson needs a Hugging Face causal LM, so
  it is not run here. kronlab build + fit + apply + score vs kronfluence EK-FAC fit + pairwise
  scores (kronfluence has no gradient store: it recomputes training gradients when scoring).

Each workload runs in its own subprocess (``--child``); on GPT-2 the kronlab and bergson builds
alternate for three rounds in one process and each keeps its fastest (the machine is shared).
Times exclude imports and model setup; "peak MB" is the rise of the process's peak RSS during the
timed stage (``VmHWM``, reset first).

    PYTHONPATH=src /work/venvs/issue8/bin/python -m benchmarks.attribution_throughput \
        [--write benchmarks/results/issue-8.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

PROJECTION_DIM = 16
GPT2_SEQUENCES, GPT2_QUERIES, LENGTH = 512, 8, 64


def _reset_peak() -> float:
    """Reset the kernel's peak-RSS counter; return the current RSS in MB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status("VmRSS")


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(stage: Callable[[], object]) -> dict[str, float]:
    before = _reset_peak()
    started = time.perf_counter()
    stage()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_mb": _status("VmHWM") - before}


# ---- workloads ------------------------------------------------------------------------------


def gpt2_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=257, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


def gpt2_tokens() -> torch.Tensor:
    from kronlab.tasks.text import encode_bytes, stdlib_text

    texts = stdlib_text(GPT2_SEQUENCES + GPT2_QUERIES, LENGTH, seed=5, min_length=LENGTH)
    tokens, mask = encode_bytes(texts, LENGTH)
    full = mask.all(1)  # only full-length snippets: no padding, so every library does the same
    return tokens[full]


def kronlab_gpt2_build(directory: Path) -> Callable[[], object]:
    """A fresh kronlab build of the GPT-2 store into ``directory`` (model and data set up)."""
    from kronlab.attribution.pipeline import AttributionConfig, AttributionRun
    from kronlab.attribution.sources import AttributionTask, ExampleSet, language_model_loss

    tokens = gpt2_tokens()
    train, queries = tokens[:-GPT2_QUERIES], tokens[-GPT2_QUERIES:]
    task = AttributionTask(
        gpt2_model(),
        language_model_loss,
        ExampleSet((train, torch.ones_like(train, dtype=torch.bool)), "text", [""] * len(train)),
        ExampleSet((queries, torch.ones_like(queries, dtype=torch.bool)), "text"),
    )
    config = AttributionConfig(
        projection_dim=PROJECTION_DIM,
        modules=("transformer.h.*",),
        batch_size=32,
        chunk_rows=64,
        num_queries=GPT2_QUERIES,
        method="kfac",
        report_queries=0,
    )
    run = AttributionRun(directory, config, task=task, show_progress=False)
    run.task  # noqa: B018  (model placed before the clock starts)
    return run.build


def bergson_gpt2_build(directory: Path) -> Callable[[], object]:
    """A fresh bergson ``collect_gradients`` index build into ``directory``."""
    from bergson import GradientProcessor, IndexConfig, collect_gradients
    from datasets import Dataset

    tokens = gpt2_tokens()[:-GPT2_QUERIES]
    data = Dataset.from_dict({"input_ids": tokens.tolist()})
    model = gpt2_model()
    batches = [list(range(i, min(i + 32, len(tokens)))) for i in range(0, len(tokens), 32)]
    config = IndexConfig(run_path=str(directory), projection_dim=PROJECTION_DIM, drop_columns=False)
    processor = GradientProcessor(projection_dim=PROJECTION_DIM)
    return lambda: collect_gradients(model, data, processor, config, batches=batches)


def gpt2_builds(rounds: int = 3) -> dict:
    """Alternate kronlab and bergson builds in one process; keep each one's fastest round."""
    results: dict[str, dict] = {}
    examples = len(gpt2_tokens()) - GPT2_QUERIES
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(rounds):
            for name, prepare in (("kronlab", kronlab_gpt2_build), ("bergson", bergson_gpt2_build)):
                stage = prepare(Path(scratch) / f"{name}-{round_index}")
                measured = timed(stage)
                best = results.get(name)
                if best is None or measured["seconds"] < best["build"]["seconds"]:
                    peak_mb = max(measured["peak_mb"], best["build"]["peak_mb"] if best else 0)
                    results[name] = {"examples": examples, "build": {**measured}}
                    results[name]["build"]["peak_mb"] = peak_mb
    return results


def _digits_task():
    from kronlab.attribution.sources import load_task

    with tempfile.TemporaryDirectory() as cache:
        return load_task("digits-mlp", "digits", num_queries=16, cache_dir=Path(cache))


def kronlab_digits() -> dict:
    from kronlab.attribution.pipeline import AttributionConfig, AttributionRun

    task = _digits_task()
    config = AttributionConfig(
        projection_dim=PROJECTION_DIM, batch_size=128, num_queries=16, report_queries=0
    )
    with tempfile.TemporaryDirectory() as directory:
        run = AttributionRun(directory, config, task=task, show_progress=False)
        result = {"examples": len(task.train)}
        for stage in ("build", "fit", "apply", "score"):
            result[stage] = timed(getattr(run, stage))
    return result


def kronfluence_digits() -> dict:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch import nn
    from torch.utils.data import TensorDataset

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, targets = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    targets = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)
            return nn.functional.cross_entropy(logits, targets, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, targets = batch
            return nn.functional.cross_entropy(model(inputs), targets, reduction="sum")

    task = _digits_task()
    train = TensorDataset(*task.train.tensors)
    queries = TensorDataset(*task.queries.tensors)
    model = prepare_model(task.model, ClassificationTask())
    with tempfile.TemporaryDirectory() as directory:
        analyzer = Analyzer(
            "bench", model, ClassificationTask(), cpu=True, disable_tqdm=True, output_dir=directory
        )
        fit = timed(
            lambda: analyzer.fit_all_factors(
                "ekfac",
                train,
                per_device_batch_size=128,
                factor_args=FactorArguments(strategy="ekfac"),
            )
        )
        score = timed(
            lambda: analyzer.compute_pairwise_scores(
                "scores",
                "ekfac",
                queries,
                train,
                per_device_query_batch_size=16,
                per_device_train_batch_size=128,
                score_args=ScoreArguments(damping_factor=None),
            )
        )
    return {"examples": len(train), "fit": fit, "score": score}


CHILDREN = {
    ("kronlab+bergson", "gpt2"): gpt2_builds,
    ("kronlab", "digits"): kronlab_digits,
    ("kronfluence", "digits"): kronfluence_digits,
}


# ---- parent ---------------------------------------------------------------------------------


def run_child(library: str, workload: str, python: str) -> dict:
    command = [python, "-m", "benchmarks.attribution_throughput", "--child", library, workload]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1][:200]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def rate(result: dict, *stages: str) -> str:
    if "error" in result or any(stage not in result for stage in stages):
        return "–"
    seconds = sum(result[stage]["seconds"] for stage in stages)
    return f"{result['examples'] / seconds:,.0f}"


def peak(result: dict, *stages: str) -> str:
    if "error" in result or any(stage not in result for stage in stages):
        return "–"
    return f"{max(result[stage]['peak_mb'] for stage in stages):.0f}"


def format_table(results: dict, python: str) -> str:
    from benchmarks.common import machine_description

    pair = results[("kronlab+bergson", "gpt2")]
    k_gpt = pair.get("kronlab", pair)
    b_gpt = pair.get("bergson", pair)
    k_dig, f_dig = results[("kronlab", "digits")], results[("kronfluence", "digits")]
    lines = [
        f"### Gradient-store throughput (CPU, p = {PROJECTION_DIM} per module)",
        "",
        f"Command: `PYTHONPATH=src {python} -m benchmarks.attribution_throughput`  ",
        f"Machine: {machine_description()}; 2 cores shared with other jobs (noisy): ratios are "
        "within one run.",
        "",
        "| workload | library | stage | examples/s | peak MB (rise) |",
        "|---|---|---|---|---|",
        f"| GPT-2 2×64, {k_gpt.get('examples', '?')} seqs × {LENGTH} tokens | kronlab | build "
        f"| {rate(k_gpt, 'build')} | {peak(k_gpt, 'build')} |",
        f"| | bergson | build (collect_gradients) | {rate(b_gpt, 'build')} "
        f"| {peak(b_gpt, 'build')} |",
        f"| digits MLP, {k_dig.get('examples', '?')} examples, 16 queries | kronlab | build "
        f"| {rate(k_dig, 'build')} | {peak(k_dig, 'build')} |",
        f"| | kronlab | fit (EK-FAC) | {rate(k_dig, 'fit')} | {peak(k_dig, 'fit')} |",
        f"| | kronlab | apply + score | {rate(k_dig, 'apply', 'score')} "
        f"| {peak(k_dig, 'apply', 'score')} |",
        f"| | kronlab | build + apply + score | {rate(k_dig, 'build', 'apply', 'score')} | |",
        f"| | kronfluence | fit (EK-FAC) | {rate(f_dig, 'fit')} | {peak(f_dig, 'fit')} |",
        f"| | kronfluence | pairwise scores | {rate(f_dig, 'score')} | {peak(f_dig, 'score')} |",
    ]
    for name, result in results.items():
        if "error" in result:
            lines.append(f"\n- {name[0]} on {name[1]} failed: `{result['error']}`")
    if "error" not in k_gpt and "error" not in b_gpt:
        ratio = b_gpt["build"]["seconds"] / k_gpt["build"]["seconds"]
        verdict = "met" if ratio >= 1.5 else "MISSED"
        lines.append(f"\n- floor build throughput ≥ 1.5 × bergson (CPU): {ratio:.2f}x → {verdict}")
    if "error" not in k_dig and "error" not in f_dig:
        ours = sum(k_dig[s]["seconds"] for s in ("build", "apply", "score"))
        lines.append(
            f"- digits scoring, kronlab build+apply+score vs kronfluence pairwise: "
            f"{f_dig['score']['seconds'] / ours:.2f}x faster"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("LIBRARY", "WORKLOAD"))
    parser.add_argument("--python", default=sys.executable, help="interpreter with the peers")
    parser.add_argument("--write", type=Path, default=None, help="append the table (markdown)")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    if arguments.child:
        print(json.dumps(CHILDREN[tuple(arguments.child)]()))
        return
    results = {}
    for library, workload in CHILDREN:
        results[(library, workload)] = run_child(library, workload, arguments.python)
        print(library, workload, results[(library, workload)], flush=True)
    table = format_table(results, arguments.python)
    print(table)
    if arguments.write is not None:
        with arguments.write.open("a") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
