"""Eager step time of two source trees of kronlab, A/B in one run.

Run from the worktree root, with a checkout of the baseline elsewhere::

    python -m benchmarks.eager_ab BASELINE_SRC src --rounds 60 --threads 1

Two worker processes, one importing kronlab from each tree, step Muon (NS bfloat16, so both
trees run the same dtype), PSGD and SOAP on the benchmark MLP's fixed gradient; the driver asks
them for a round alternately (the order flipping each round), so both see the same load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(threads: int) -> None:
    import torch
    from torch import nn

    from benchmarks.common import benchmark_mlp, mlp_batch
    from kronlab.optim import PSGD, SOAP, Muon

    torch.set_num_threads(threads)
    builds = {
        "Muon": lambda m: Muon(None, model=m, ns_dtype=torch.bfloat16),
        "PSGD": lambda m: PSGD(m.parameters()),
        "SOAP": lambda m: SOAP(m.parameters()),
    }
    steps = {}
    for name, build in builds.items():
        model = benchmark_mlp()
        inputs, targets = mlp_batch()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer = build(model)
        optimizer.step()
        steps[name] = optimizer.step
    print("ready", flush=True)
    for _ in sys.stdin:
        timings = []
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            timings.append(f"{name}={time.perf_counter() - started}")
        print(" ".join(timings), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="src directory of the baseline tree")
    parser.add_argument("candidate", type=Path, help="src directory of the candidate tree")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.threads)
        return
    workers = {}
    for label, source in (("baseline", args.baseline), ("candidate", args.candidate)):
        environment = dict(os.environ, PYTHONPATH=f"{source.resolve()}{os.pathsep}{ROOT}")
        command = [sys.executable, "-m", "benchmarks.eager_ab", str(source), str(source)]
        process = subprocess.Popen(
            [*command, "--worker", "--threads", str(args.threads)],
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
    print("| optimizer (eager, defaults) | baseline ms | candidate ms | candidate / baseline |")
    print("|---|---|---|---|")
    for name, baseline in samples["baseline"].items():
        before = statistics.median(baseline)
        after = statistics.median(samples["candidate"][name])
        print(f"| {name} | {1e3 * before:.2f} | {1e3 * after:.2f} | {after / before:.2f}x |")


if __name__ == "__main__":
    main()
