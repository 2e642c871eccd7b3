"""Eager step time of two source trees of kronlab, A/B in one run.

Run from the worktree root, with a checkout of the baseline elsewhere::

    python -m benchmarks.eager_ab BASELINE_SRC src --rounds 60 --threads 1

Two worker processes, one importing kronlab from each tree, step every registered kronlab
optimizer (``kronlab.optim.registry``, as ``create_optimizer`` builds it; torch's baselines
left out) on a fixed gradient of the benchmark MLP and of the 4-layer benchmark transformer
(``benchmarks.common``), and of ``tiny``, 13 ``Linear(32, 32)`` layers, where the per-tensor
overhead of a step (not its arithmetic) dominates; the driver asks them for a round alternately
(the order flipping each round), so both see the same load. ``--only`` restricts the
optimizers, ``--models`` the models (comma- or space-separated).
``--clock thread`` times with ``time.thread_time`` (CPU time of the stepping thread, which other
jobs on a shared machine do not inflate; with one torch thread every kernel runs on it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_BASELINES = ("adam", "adamw", "sgd")
MODELS = ("tiny", "mlp", "transformer")


def worker(threads: int, only: list[str] | None, models: list[str], clock_name: str) -> None:
    import torch

    from benchmarks.common import (
        benchmark_mlp,
        benchmark_transformer,
        language_model_loss,
        mlp_batch,
        transformer_batch,
    )
    from kronlab.optim.registry import available_optimizers, create_optimizer

    torch.set_num_threads(threads)
    # SIRFShampoo warns at every step that no forward pass counted the batch (fixed gradient)
    warnings.simplefilter("ignore")
    clock = time.thread_time if clock_name == "thread" else time.perf_counter

    def tiny_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(*(torch.nn.Linear(32, 32) for _ in range(13)))

    def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(64, 32, generator=generator), torch.randn(64, 32, generator=generator)

    setups = {
        "tiny": (tiny_model, tiny_batch, torch.nn.functional.mse_loss),
        "mlp": (benchmark_mlp, mlp_batch, torch.nn.functional.cross_entropy),
        "transformer": (benchmark_transformer, transformer_batch, language_model_loss),
    }
    names = [n for n in available_optimizers() if n not in TORCH_BASELINES]
    steps = {}
    for model_name in models:
        build_model, batch, loss_fn = setups[model_name]
        for name in names if only is None else [n for n in names if n in only]:
            model = build_model()
            inputs, targets = batch()
            loss_fn(model(inputs), targets).backward()
            optimizer = create_optimizer(name, model)
            optimizer.step()
            steps[f"{name} {model_name}"] = optimizer.step
    print("ready", flush=True)
    for _ in sys.stdin:
        timings = []
        for name, step in steps.items():
            started = clock()
            step()
            timings.append(f"{name.replace(' ', '/')}={clock() - started}")
        print(" ".join(timings), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="src directory of the baseline tree")
    parser.add_argument("candidate", type=Path, help="src directory of the candidate tree")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", help="registry names to time (default: all)")
    parser.add_argument(
        "--models",
        nargs="+",
        type=lambda text: text.split(","),
        default=MODELS,
        help=f"of {','.join(MODELS)} (default: all)",
    )
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.models is not MODELS:
        args.models = [model for listed in args.models for model in listed]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if args.worker:
        worker(args.threads, args.only, args.models, args.clock)
        return
    workers = {}
    for label, source in (("baseline", args.baseline), ("candidate", args.candidate)):
        environment = dict(os.environ, PYTHONPATH=f"{source.resolve()}{os.pathsep}{ROOT}")
        command = [sys.executable, "-m", "benchmarks.eager_ab", str(source), str(source)]
        options = ["--threads", str(args.threads), "--clock", args.clock]
        options += ["--models", ",".join(args.models)]
        if args.only:
            options += ["--only", *args.only]
        process = subprocess.Popen(
            [*command, "--worker", *options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=environment,
            cwd=ROOT,
        )
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        workers[label] = process
    samples: dict[str, dict[str, list[float]]] = {label: {} for label in workers}
    for index in range(args.rounds):
        order = list(workers.items()) if index % 2 else list(reversed(workers.items()))
        for label, process in order:
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write("step\n")
            process.stdin.flush()
            for item in process.stdout.readline().split():
                name, seconds = item.split("=")
                samples[label].setdefault(name, []).append(float(seconds))
    for process in workers.values():
        assert process.stdin is not None
        process.stdin.close()
        process.wait()
    print(
        "| optimizer (registry defaults) | model | baseline ms | candidate ms "
        "| candidate / baseline |"
    )
    print("|---|---|---|---|---|")
    for key, baseline in samples["baseline"].items():
        name, model = key.split("/")
        before = statistics.median(baseline)
        after = statistics.median(samples["candidate"][key])
        print(
            f"| {name} | {model} | {1e3 * before:.2f} | {1e3 * after:.2f} | {after / before:.3f}x |"
        )


if __name__ == "__main__":
    main()
