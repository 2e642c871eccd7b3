"""Gradient-store build and scoring throughput (examples/s) and peak memory vs bergson, kronfluence.

Workloads (CPU, one torch thread, same model weights and data for every library):

- ``gpt2``: a 2-layer Hugging Face GPT-2 (d 64, vocab 257, random weights, its default
  ``gelu_new``) on 64-byte snippets of Python's stdlib; per-sequence gradients of the four
  ``Conv1D`` layers per block, projected to ``p × p`` per module (both sides, as bergson's
  per-module projection; bergson Rademacher, kronlab its default orthogonal kind, whose QR per
  side is a few ms of set-up per build; kronlab also keeps the bias column), float32.
  *Build*: kronlab ``build`` vs bergson ``collect_gradients`` (its index build), batch 32,
  alternating for ``--rounds`` rounds in one process (the order flips every round); the figure
  is the median of the per-round ratios, examples/s the median per library (wall clock; the
  ratios are also given by process CPU time, which leaves out the time other jobs on a shared
  machine hold the CPU: every library runs in this one single-threaded process). bergson runs twice
  per round: on the model as given (all parameters trainable) and frozen as its own CLI freezes
  it (only the input embeddings trainable, which skips most weight gradients); the floor is
  judged against the faster of the two. (kronlab needs no freeze: its gradients with respect
  to the tracked outputs never form a parameter gradient.)
  The "floor" row is the model alone: forward + backward to the tracked outputs, parameters
  trainable, no hooks, no projection, no store.
  Two more model variants run in the same rounds, each with all four rows (``BUILD_VARIANTS``):
  *fused*, the same model with kronlab's opt-in ``fused_activations=True`` (HF's unfused
  ``gelu_new`` run as torch's fused ``F.gelu(approximate="tanh")``), with bergson and the
  model-only row given the same swapped model; and *tanh*, the GPT-2 config with
  ``activation_function="gelu_pytorch_tanh"`` (HF's fused GELU, the same function up to
  rounding, same weights) for every library, each on its default path.
  *Score*: kronlab fit (EK-FAC) + apply + score of 8 queries against the store; bergson
  ``Attributor`` over its index (query gradients + inner products, no preconditioner);
  kronfluence EK-FAC fit + pairwise scores on a copy of the model whose ``Conv1D`` layers are
  ``nn.Linear`` (the same function: kronfluence does not track ``Conv1D``).
- ``digits``: the digits MLP (64 → 128 → 128 → 10). bergson needs a Hugging Face causal LM, so
  it is not run here. kronlab build + fit + apply + score vs kronfluence EK-FAC fit + pairwise
  scores (kronfluence has no gradient store: it recomputes training gradients when scoring).

Each workload runs in its own subprocess (``--child``). Times exclude imports and model setup;
"peak MB" is the rise of the process's peak RSS during the timed stage (``VmHWM``, reset first;
the largest over rounds).

    PYTHONPATH=src python -m benchmarks.attribution_throughput \
        [--rounds 11] [--write attribution.md]

``--breakdown BATCHES`` instead splits kronlab's GPT-2 build time per batch of 32 (process CPU
time, the variants interleaved batch by batch, medians): the model alone, kronlab's
per-example pass with its projections, the same pass with the projected products replaced by
zeros (hooks, bookkeeping, no projection), and the projection ops alone, re-run on the
recorded tensors of one batch (outside the pass: no model work in between); then the model
alone and kronlab's pass on a copy of the model with the fused-activation swap in place.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
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
    started, cpu_started = time.perf_counter(), time.process_time()
    stage()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": _status("VmHWM") - before}


# ---- workloads ------------------------------------------------------------------------------


def gpt2_model(activation: str = "gelu_new"):
    """The benchmark GPT-2; ``activation`` is its HF ``activation_function`` (the weights do not
    depend on it: same seed, same parameter shapes)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=257,
        n_positions=LENGTH,
        n_embd=64,
        n_layer=2,
        n_head=4,
        activation_function=activation,
    )
    return GPT2LMHeadModel(config).eval()


# The build comparison's model variants: name -> (HF activation_function, fused option on).
# "fused" runs the default model with kronlab's opt-in fused activations, and bergson on the
# same model with the same swap (kronlab.attribution.fused); "tanh" builds the model with HF's
# fused gelu_pytorch_tanh (the same function as gelu_new up to rounding) for both libraries.
BUILD_VARIANTS = {
    "": ("gelu_new", False),
    "fused": ("gelu_new", True),
    "tanh": ("gelu_pytorch_tanh", False),
}


def gpt2_tokens() -> torch.Tensor:
    from kronlab.tasks.text import encode_bytes, stdlib_text

    texts = stdlib_text(GPT2_SEQUENCES + GPT2_QUERIES, LENGTH, seed=5, min_length=LENGTH)
    tokens, mask = encode_bytes(texts, LENGTH)
    full = mask.all(1)  # only full-length snippets: no padding, so every library does the same
    return tokens[full]


def _gpt2_task(activation: str = "gelu_new"):
    from kronlab.attribution.sources import AttributionTask, ExampleSet, language_model_loss

    tokens = gpt2_tokens()
    train, queries = tokens[:-GPT2_QUERIES], tokens[-GPT2_QUERIES:]
    return AttributionTask(
        gpt2_model(activation),
        language_model_loss,
        ExampleSet((train, torch.ones_like(train, dtype=torch.bool)), "text", [""] * len(train)),
        ExampleSet((queries, torch.ones_like(queries, dtype=torch.bool)), "text"),
    )


def _gpt2_config(method: str):
    """The GPT-2 store settings every kronlab GPT-2 row uses (p, modules, batching)."""
    from kronlab.attribution.pipeline import AttributionConfig

    return AttributionConfig(
        projection_dim=PROJECTION_DIM,
        modules=("transformer.h.*",),
        batch_size=32,
        chunk_rows=64,
        num_queries=GPT2_QUERIES,
        method=method,
        report_queries=0,
    )


def kronlab_gpt2_build(
    directory: Path, activation: str = "gelu_new", fused: bool = False
) -> Callable[[], object]:
    """A fresh kronlab build of the GPT-2 store into ``directory`` (model and data set up);
    ``fused``: with the opt-in ``fused_activations``."""
    from kronlab.attribution.pipeline import AttributionRun

    task = _gpt2_task(activation)
    config = _gpt2_config("kfac")
    run = AttributionRun(directory, config, task=task, show_progress=False, fused_activations=fused)
    run.task  # noqa: B018  (model placed before the clock starts)
    return run.build


def bergson_gpt2_build(
    directory: Path, frozen: bool = False, activation: str = "gelu_new", fused: bool = False
) -> Callable[[], object]:
    """A fresh bergson ``collect_gradients`` index build into ``directory``. ``frozen``: the
    model frozen as bergson's own CLI does (``bergson/utils/worker_utils.py``: everything but
    the input embeddings), so its backward skips most weight gradients. ``fused``: bergson gets
    the model with kronlab's fused-activation swap in place, as kronlab's fused build runs it."""
    from bergson import GradientProcessor, IndexConfig, collect_gradients
    from datasets import Dataset

    from kronlab.attribution.fused import fused_activations

    tokens = gpt2_tokens()[:-GPT2_QUERIES]
    data = Dataset.from_dict({"input_ids": tokens.tolist()})
    model = gpt2_model(activation)
    if frozen:
        model.requires_grad_(False)
        model.get_input_embeddings().requires_grad_(True)
    batches = [list(range(i, min(i + 32, len(tokens)))) for i in range(0, len(tokens), 32)]
    config = IndexConfig(run_path=str(directory), projection_dim=PROJECTION_DIM, drop_columns=False)
    processor = GradientProcessor(projection_dim=PROJECTION_DIM)

    def build() -> None:
        with fused_activations(model) if fused else contextlib.nullcontext():
            collect_gradients(model, data, processor, config, batches=batches)

    return build


def gpt2_floor(activation: str = "gelu_new", fused: bool = False) -> Callable[[], object]:
    """The model alone over the same batches: forward, then backward to the tracked outputs."""
    from kronlab.attribution.fused import fused_activations
    from kronlab.attribution.sources import language_model_loss
    from kronlab.curvature import find_modules

    tokens = gpt2_tokens()[:-GPT2_QUERIES]
    model = gpt2_model(activation)
    tracked = list(find_modules(model, ["transformer.h.*"]).values())
    real = torch.ones(32, tokens.shape[1], dtype=torch.bool)

    def run() -> None:
        with fused_activations(model) if fused else contextlib.nullcontext():
            model_passes()

    def model_passes() -> None:
        outputs: list[torch.Tensor] = []
        for start in range(0, len(tokens), 32):
            outputs.clear()
            handles = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in tracked]
            batch = tokens[start : start + 32]
            loss = language_model_loss(model, (batch, real[: len(batch)]))
            for handle in handles:
                handle.remove()
            torch.autograd.grad(loss, outputs)

    return run


def gpt2_breakdown(batches: int) -> str:
    """Per-batch split of kronlab's build time (see the module docstring, ``--breakdown``)."""
    import kronlab.curvature.per_example as per_example
    from kronlab.attribution.compression import module_projections
    from kronlab.attribution.fused import fused_activations
    from kronlab.attribution.sources import language_model_loss
    from kronlab.curvature import find_modules, layer_batches, layer_spec, per_example_gradients

    tokens = gpt2_tokens()[:-GPT2_QUERIES]
    model = gpt2_model()
    modules = find_modules(model, ["transformer.h.*"])
    shapes = {}
    for name, module in modules.items():
        spec = layer_spec(module)
        assert spec is not None
        shapes[name] = (spec.d_out, spec.d_in)
    projections = module_projections(shapes, PROJECTION_DIM, "rademacher")
    real = torch.ones(32, tokens.shape[1], dtype=torch.bool)
    data = [(tokens[s : s + 32], real) for s in range(0, len(tokens) - 31, 32)]
    project = per_example.example_gradients

    # A second copy of the model with the fused-activation swap held for the whole split.
    fused_model = gpt2_model()
    fused_modules = find_modules(fused_model, ["transformer.h.*"])

    def model_only(batch: tuple, model=model, modules=modules) -> None:
        outputs: list[torch.Tensor] = []
        hook = lambda m, i, o: outputs.append(o)  # noqa: E731
        handles = [m.register_forward_hook(hook) for m in modules.values()]
        loss = language_model_loss(model, batch)
        for handle in handles:
            handle.remove()
        torch.autograd.grad(loss, outputs)

    def kronlab(batch: tuple, model=model, modules=modules) -> None:
        per_example_gradients(model, batch, language_model_loss, modules, projections)

    def no_projection(batch: tuple) -> None:
        per_example.example_gradients = lambda layer, projection=None: layer.gradients.new_zeros(
            len(layer.gradients), PROJECTION_DIM, PROJECTION_DIM
        )
        try:
            kronlab(batch)
        finally:
            per_example.example_gradients = project

    def projection_ops(batch: tuple) -> None:
        for layer in recorded:
            project(layer, projections[layer.name])

    recorded = list(layer_batches(model, data[0], language_model_loss, modules))
    variants = {
        "model only": model_only,
        "kronlab per-example pass": kronlab,
        "same, projections replaced by zeros": no_projection,
        "projection ops alone (one batch's recorded tensors)": projection_ops,
        "model only, fused activations": functools.partial(
            model_only, model=fused_model, modules=fused_modules
        ),
        "kronlab per-example pass, fused activations": functools.partial(
            kronlab, model=fused_model, modules=fused_modules
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with fused_activations(fused_model):
        for index in range(batches + len(data)):  # the first pass over the data warms up
            batch = data[index % len(data)]
            order = list(variants) if index % 2 == 0 else list(variants)[::-1]
            for name in order:
                started = time.process_time()
                variants[name](batch)
                if index >= len(data):
                    seconds[name].append(time.process_time() - started)
    base = statistics.median(seconds["model only"])
    lines = ["| per batch of 32 | ms (median) | vs model only |", "|---|---|---|"]
    for name, values in seconds.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median * 1e3:.2f} | {median / base:.3f}x |")
    return "\n".join(lines) + "\n"


def _build_stages() -> dict[str, Callable[[Path], Callable[[], object]]]:
    """Every build row, keyed ``library`` or ``library_variant`` (see ``BUILD_VARIANTS``)."""
    stages: dict[str, Callable[[Path], Callable[[], object]]] = {}
    for variant, (activation, fused) in BUILD_VARIANTS.items():
        suffix = f"_{variant}" if variant else ""
        options = {"activation": activation, "fused": fused}
        stages["kronlab" + suffix] = functools.partial(kronlab_gpt2_build, **options)
        stages["bergson" + suffix] = functools.partial(bergson_gpt2_build, **options)
        stages["bergson_frozen" + suffix] = functools.partial(
            bergson_gpt2_build, frozen=True, **options
        )
        stages["floor" + suffix] = lambda directory, options=options: gpt2_floor(**options)
    return stages


def gpt2_builds(rounds: int = 11) -> dict:
    """kronlab and bergson builds (and the model-only floor) of every model variant, all
    alternating in one process."""
    examples = len(gpt2_tokens()) - GPT2_QUERIES
    stages = _build_stages()
    seconds: dict[str, list[float]] = {name: [] for name in stages}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in stages}
    peaks: dict[str, float] = dict.fromkeys(stages, 0.0)
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(rounds + 1):  # round 0 warms up every library, not counted
            order = list(stages) if round_index % 2 == 0 else list(stages)[::-1]
            for name in order:
                stage = stages[name](Path(scratch) / f"{name}-{round_index}")
                measured = timed(stage)
                if round_index > 0:
                    seconds[name].append(measured["seconds"])
                    cpu_seconds[name].append(measured["cpu_seconds"])
                    peaks[name] = max(peaks[name], measured["peak_mb"])
    results: dict = {}
    for name in stages:
        median = statistics.median(seconds[name])
        results[name] = {
            "examples": examples,
            "build": {"seconds": median, "peak_mb": peaks[name]},
            "rounds": seconds[name],
        }
    for variant in BUILD_VARIANTS:
        suffix = f"_{variant}" if variant else ""
        for name, key in (("bergson", "ratios"), ("bergson_frozen", "ratios_frozen")):
            for clock, times in (("", seconds), ("_cpu", cpu_seconds)):
                results[key + suffix + clock] = [
                    b / k for b, k in zip(times[name + suffix], times["kronlab" + suffix])
                ]
    return results


def kronlab_gpt2_score() -> dict:
    """kronlab fit (EK-FAC) + apply + score of the GPT-2 queries against a fresh store."""
    from kronlab.attribution.pipeline import AttributionRun

    task = _gpt2_task()
    config = _gpt2_config("ekfac")
    with tempfile.TemporaryDirectory() as directory:
        run = AttributionRun(directory, config, task=task, show_progress=False)
        run.task  # noqa: B018  (model placed before the clock starts)
        result = {"examples": len(task.train)}
        for stage in ("build", "fit", "apply", "score"):
            result[stage] = timed(getattr(run, stage))
    return result


def bergson_gpt2_score() -> dict:
    """bergson: index build (untimed), then query gradients + scores with ``Attributor``."""
    from bergson import Attributor
    from bergson.config import IndexConfig

    tokens = gpt2_tokens()
    queries = tokens[-GPT2_QUERIES:]
    with tempfile.TemporaryDirectory() as scratch:
        bergson_gpt2_build(Path(scratch) / "index")()
        index = IndexConfig(run_path=str(Path(scratch) / "index")).partial_run_path
        model = gpt2_model()

        def score() -> None:
            attributor = Attributor(index, device="cpu")
            with attributor.trace(model.base_model, k=None) as result:
                logits = model(queries).logits[:, :-1]
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), queries[:, 1:].reshape(-1)
                ).backward()
                model.zero_grad()
            assert result.scores.shape == (GPT2_QUERIES, len(tokens) - GPT2_QUERIES)

        return {"examples": len(tokens) - GPT2_QUERIES, "score": timed(score)}


def _linear_gpt2():
    """The benchmark GPT-2 with each block's ``Conv1D`` replaced by the equal ``nn.Linear``."""
    from torch import nn

    model = gpt2_model()
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D":
            continue
        linear = nn.Linear(*module.weight.shape)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)
            linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model


def kronfluence_gpt2() -> dict:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    model = _linear_gpt2()
    tracked = [name for name, _ in model.named_modules() if name.startswith("transformer.h.")]
    tracked = [n for n in tracked if isinstance(model.get_submodule(n), torch.nn.Linear)]

    class LanguageModelTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            (tokens,) = batch
            logits = model(tokens, use_cache=False).logits[:, :-1]
            logits = logits.reshape(-1, logits.shape[-1])
            targets = tokens[:, 1:].reshape(-1)
            if sample:
                with torch.no_grad():
                    targets = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)
            return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return tracked

    tokens = gpt2_tokens()
    train = TensorDataset(tokens[:-GPT2_QUERIES])
    queries = TensorDataset(tokens[-GPT2_QUERIES:])
    task = LanguageModelTask()
    model = prepare_model(model, task)
    with tempfile.TemporaryDirectory() as directory:
        analyzer = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=directory)
        fit = timed(
            lambda: analyzer.fit_all_factors(
                "ekfac", train, per_device_batch_size=32, factor_args=FactorArguments("ekfac")
            )
        )
        score = timed(
            lambda: analyzer.compute_pairwise_scores(
                "scores",
                "ekfac",
                queries,
                train,
                per_device_query_batch_size=GPT2_QUERIES,
                per_device_train_batch_size=32,
                score_args=ScoreArguments(damping_factor=None),
            )
        )
    return {"examples": len(train), "fit": fit, "score": score}


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
    ("kronlab", "gpt2"): kronlab_gpt2_score,
    ("bergson", "gpt2"): bergson_gpt2_score,
    ("kronfluence", "gpt2"): kronfluence_gpt2,
    ("kronlab", "digits"): kronlab_digits,
    ("kronfluence", "digits"): kronfluence_digits,
}


# ---- parent ---------------------------------------------------------------------------------


def run_child(library: str, workload: str, python: str, rounds: int) -> dict:
    command = [python, "-m", "benchmarks.attribution_throughput", "--child", library, workload]
    command += ["--rounds", str(rounds)]
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


VARIANT_LABELS = {
    "": "HF gelu_new (the model as configured)",
    "fused": "gelu_new, fused option (kronlab fused_activations=True; bergson and the model "
    "row on the same swapped model)",
    "tanh": "GPT-2 config activation_function='gelu_pytorch_tanh' (both libraries)",
}


def _variant_rows(builds: dict, rounds: int) -> list[str]:
    """Table rows of the extra build variants (the default's rows are written inline)."""
    lines = []
    for variant in BUILD_VARIANTS:
        if not variant or f"kronlab_{variant}" not in builds:
            continue
        label = {"fused": "fused activations", "tanh": "gelu_pytorch_tanh config"}[variant]
        for name, what in (
            ("kronlab", f"build, {label} (median of {rounds})"),
            ("bergson", f"build, {label} (median of {rounds})"),
            ("bergson_frozen", f"build, {label}, frozen as its CLI does (median of {rounds})"),
            ("floor", f"{label}: forward + backward to tracked outputs"),
        ):
            result = builds[f"{name}_{variant}"]
            library = "model only" if name == "floor" else name.split("_")[0]
            lines.append(
                f"| | {library} | {what} | {rate(result, 'build')} | {peak(result, 'build')} |"
            )
    return lines


def _build_verdicts(builds: dict, variant: str) -> list[str]:
    """Ratio lines and the floor's verdict for one model variant of the build comparison."""
    suffix = f"_{variant}" if variant else ""
    if "ratios" + suffix not in builds:
        return []
    lines = ["", f"{VARIANT_LABELS[variant]}:"]
    medians: dict[str, float] = {}
    cpu_medians: dict[str, float] = {}
    for key, label in (("ratios", "bergson as given"), ("ratios_frozen", "bergson frozen")):
        ratios = sorted(builds[key + suffix])
        medians[key] = statistics.median(ratios)
        lines.append(
            f"- build throughput vs {label}: "
            f"median {medians[key]:.2f}x over {len(ratios)} interleaved rounds (range "
            f"{ratios[0]:.2f}–{ratios[-1]:.2f}x; {sum(r >= 1.5 for r in ratios)}/"
            f"{len(ratios)} rounds ≥ 1.5x)"
        )
        cpu = sorted(builds.get(key + suffix + "_cpu", []))
        if cpu:
            cpu_medians[key] = statistics.median(cpu)
            lines.append(
                f"  - by process CPU time (not counting time the other jobs on the 2 cores "
                f"held the CPU): median {cpu_medians[key]:.2f}x (range {cpu[0]:.2f}–"
                f"{cpu[-1]:.2f}x)"
            )
    # The floor is judged against the faster bergson configuration (the smaller ratio).
    faster = min(medians, key=lambda key: medians[key])
    verdict = "met" if medians[faster] >= 1.5 else "MISSED"
    by_cpu = ""
    if cpu_medians:
        cpu_faster = min(cpu_medians, key=lambda key: cpu_medians[key])
        cpu_verdict = "met" if cpu_medians[cpu_faster] >= 1.5 else "MISSED"
        by_cpu = f"; by CPU time {cpu_medians[cpu_faster]:.2f}x → {cpu_verdict}"
    lines.append(
        f"- floor build throughput ≥ 1.5 × bergson (CPU), against the faster bergson "
        f"configuration ({'frozen' if faster == 'ratios_frozen' else 'as given'}): "
        f"{medians[faster]:.2f}x → {verdict}{by_cpu}"
    )
    floor_seconds = builds["floor" + suffix]["build"]["seconds"]
    seconds = {name: builds[name + suffix]["build"]["seconds"] for name in BUILD_ROWS}
    lines.append(
        f"- time vs the model alone (forward + backward to the tracked outputs, parameters "
        f"trainable): bergson {seconds['bergson'] / floor_seconds:.2f}x, bergson frozen "
        f"{seconds['bergson_frozen'] / floor_seconds:.2f}x, kronlab "
        f"{seconds['kronlab'] / floor_seconds:.2f}x"
    )
    if variant:
        default = builds["kronlab"]["build"]["seconds"]
        lines.append(
            f"- kronlab build time of the default model / this variant's: "
            f"{default / seconds['kronlab']:.2f}x; bergson frozen: "
            f"{builds['bergson_frozen']['build']['seconds'] / seconds['bergson_frozen']:.2f}x"
        )
    return lines


BUILD_ROWS = ("kronlab", "bergson", "bergson_frozen")


def format_table(results: dict, python: str, rounds: int) -> str:
    from benchmarks.common import machine_description

    builds = results[("kronlab+bergson", "gpt2")]
    k_build = builds.get("kronlab", builds)
    b_build = builds.get("bergson", builds)
    bf_build = builds.get("bergson_frozen", builds)
    floor = builds.get("floor", builds)
    k_gpt, b_gpt, f_gpt = (
        results[(name, "gpt2")] for name in ("kronlab", "bergson", "kronfluence")
    )
    k_dig, f_dig = results[("kronlab", "digits")], results[("kronfluence", "digits")]
    seqs = k_build.get("examples", "?")
    lines = [
        f"### Gradient-store throughput (CPU, p = {PROJECTION_DIM} per module)",
        "",
        f"Command: `PYTHONPATH=src {python} -m benchmarks.attribution_throughput "
        f"--rounds {rounds}`  ",
        f"Machine: {machine_description()}; 2 cores shared with other jobs (noisy): ratios are "
        "within one run.",
        "",
        "| workload | library | stage | examples/s | peak MB (rise) |",
        "|---|---|---|---|---|",
        f"| GPT-2 2×64, {seqs} seqs × {LENGTH} tokens | kronlab | build "
        f"(median of {rounds}) | {rate(k_build, 'build')} | {peak(k_build, 'build')} |",
        f"| | bergson | build (collect_gradients, median of {rounds}) "
        f"| {rate(b_build, 'build')} | {peak(b_build, 'build')} |",
        f"| | bergson | build (model frozen as bergson's CLI does, median of {rounds}) "
        f"| {rate(bf_build, 'build')} | {peak(bf_build, 'build')} |",
        f"| | model only | forward + backward to tracked outputs | {rate(floor, 'build')} "
        f"| {peak(floor, 'build')} |",
        *_variant_rows(builds, rounds),
        f"| | kronlab | fit (EK-FAC) | {rate(k_gpt, 'fit')} | {peak(k_gpt, 'fit')} |",
        f"| | kronlab | apply + score ({GPT2_QUERIES} queries) | {rate(k_gpt, 'apply', 'score')} "
        f"| {peak(k_gpt, 'apply', 'score')} |",
        f"| | bergson | score ({GPT2_QUERIES} queries, Attributor, no preconditioner) "
        f"| {rate(b_gpt, 'score')} | {peak(b_gpt, 'score')} |",
        f"| | kronfluence | fit (EK-FAC) | {rate(f_gpt, 'fit')} | {peak(f_gpt, 'fit')} |",
        f"| | kronfluence | pairwise scores ({GPT2_QUERIES} queries) | {rate(f_gpt, 'score')} "
        f"| {peak(f_gpt, 'score')} |",
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
    for variant in BUILD_VARIANTS:
        lines.extend(_build_verdicts(builds, variant))
    if all("error" not in r for r in (k_gpt, f_gpt)) and "score" in f_gpt:
        ours = sum(k_gpt[s]["seconds"] for s in ("build", "apply", "score"))
        lines.append(
            f"- GPT-2 scoring, kronlab build+apply+score vs kronfluence pairwise: "
            f"{f_gpt['score']['seconds'] / ours:.2f}x faster"
        )
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
    parser.add_argument("--rounds", type=int, default=11, help="interleaved GPT-2 build rounds")
    parser.add_argument("--write", type=Path, default=None, help="append the table (markdown)")
    parser.add_argument(
        "--breakdown", type=int, default=0, metavar="BATCHES", help="only split the build time"
    )
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    if arguments.breakdown:
        print(gpt2_breakdown(arguments.breakdown))
        return
    if arguments.child:
        child = CHILDREN[tuple(arguments.child)]
        outcome = child(arguments.rounds) if child is gpt2_builds else child()
        print(json.dumps(outcome))
        return
    results = {}
    for library, workload in CHILDREN:
        results[(library, workload)] = run_child(
            library, workload, arguments.python, arguments.rounds
        )
        print(library, workload, results[(library, workload)], flush=True)
    table = format_table(results, arguments.python, arguments.rounds)
    print(table)
    if arguments.write is not None:
        with arguments.write.open("a") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
