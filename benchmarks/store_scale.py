"""Gradient-store build at growing sizes: throughput, CPU time, peak memory and disk per example.

Writes ``--sizes`` 64-byte windows of standard-library source as JSONL (streamed to disk), then
runs ``kronlab attribute build`` on ``tiny-gpt`` in a fresh process per size (under ``torchrun``
with ``--ranks`` > 1) and reads its wall time, its CPU time (all ranks), its peak resident
memory (``ru_maxrss``: the largest rank) and the store's bytes on disk. Each rank runs
``--threads`` OpenMP threads (default 1: on a shared machine, more threads than free cores
spin-wait in every parallel region). Flat peak memory across sizes is what lets one
extrapolate to a million examples; examples per CPU-second is the rate of one busy core,
which the other jobs on a shared machine do not change.

    PYTHONPATH=src python -m benchmarks.store_scale --sizes 5000,20000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_description
from kronlab.tasks.text import stdlib_sources

WINDOW = 64


def write_windows(path: Path, count: int, offset: int = 0) -> None:
    """``count`` consecutive 64-byte windows of stdlib source (ASCII-safe), cycling the corpus."""
    corpus = b"".join(source.read_bytes() for source in stdlib_sources())
    corpus = corpus.decode("utf-8", errors="ignore").encode("ascii", errors="ignore")
    windows = len(corpus) // WINDOW
    with path.open("w") as handle:
        for index in range(offset, offset + count):
            start = (index % windows) * WINDOW
            text = corpus[start : start + WINDOW].decode("ascii")
            handle.write(json.dumps({"text": text}) + "\n")


def build(run_dir: Path, data: Path, queries: Path, arguments: argparse.Namespace) -> dict:
    command = [
        sys.executable, "-m", "kronlab.cli", "attribute", "build", "--run-dir", str(run_dir),
        "--model", "tiny-gpt", "--data", str(data), "--queries", str(queries),
        "--length", str(WINDOW), "--projection-dim", str(arguments.projection_dim),
        "--batch-size", str(arguments.batch_size), "--chunk-rows", str(arguments.chunk_rows),
        "--cache-dir", str(run_dir.parent / "models"), "--no-progress", "--max-store-gb", "64",
        # the figures recorded: every module, rows projected after the inverse (no fit needed)
        "--modules", "*", "--compression", "project",
    ]  # fmt: skip
    if arguments.ranks > 1:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(arguments.ranks), *command[1:],
        ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": str(arguments.threads)}
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment
    )
    # The pipe is drained only at the end: the build prints a few lines, far below its size.
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(process.stderr.read().decode()[-2000:])
    store = run_dir / "train"
    disk = sum(path.stat().st_size for path in store.rglob("*") if path.is_file())
    # wait4's usage covers the process and the ones it waited for (torchrun's ranks).
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_mib": usage.ru_maxrss / 1024,
        "disk_bytes": disk,
        "load": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="5000,20000")
    parser.add_argument("--projection-dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--target", type=int, default=1_000_000, help="extrapolate to this")
    parser.add_argument("--ranks", type=int, default=1, help="torchrun processes (one per core)")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank")
    arguments = parser.parse_args()
    sizes = [int(size) for size in arguments.sizes.split(",")]
    # This process only launches builds; its thread count is set so that the machine line
    # printed below states the builds' own.
    torch.set_num_threads(arguments.threads)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        queries = root / "queries.jsonl"
        write_windows(queries, 4, offset=10**7)
        for size in sizes:
            data = root / f"train-{size}.jsonl"
            write_windows(data, size)
            # Model training/caching happens on the first call: warm it up outside the timing.
            if not rows:
                warm = root / "warm.jsonl"
                write_windows(warm, 8)
                build(root / "warm", warm, queries, arguments)
            result = build(root / f"run-{size}", data, queries, arguments)
            result["size"] = size
            rows.append(result)
            print(result, flush=True)
    print(format_table(rows, arguments))


def format_table(rows: list[dict], arguments: argparse.Namespace) -> str:
    lines = [
        f"Command: `PYTHONPATH=src python -m benchmarks.store_scale --sizes {arguments.sizes} "
        f"--projection-dim {arguments.projection_dim} --ranks {arguments.ranks} --threads "
        f"{arguments.threads}`  ",
        f"Machine: {machine_description()} per rank (shared with other jobs, `nice -n 10`)",
        "",
        "| examples | wall s | examples/s | tokens/s | CPU s | examples per CPU-s | peak RSS MiB "
        "| disk B/example | 1-min load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        rate = row["size"] / row["seconds"]
        lines.append(
            f"| {row['size']} | {row['seconds']:.1f} | {rate:.0f} | {rate * WINDOW:.0f} | "
            f"{row['cpu_seconds']:.1f} | {row['size'] / row['cpu_seconds']:.0f} | "
            f"{row['peak_mib']:.0f} | {row['disk_bytes'] / row['size']:.0f} | {row['load']:.1f} |"
        )
    first, last = rows[0], rows[-1]
    if last["cpu_seconds"] <= first["cpu_seconds"] or last["seconds"] <= first["seconds"]:
        lines += ["", "The sizes are too close for a marginal rate: measure sizes further apart."]
        return "\n".join(lines)
    # Marginal rates between the two sizes remove start-up (imports, model load) from the rate.
    marginal = (last["size"] - first["size"]) / (last["seconds"] - first["seconds"])
    per_cpu = (last["size"] - first["size"]) / (last["cpu_seconds"] - first["cpu_seconds"])
    per_example = (last["disk_bytes"] - first["disk_bytes"]) / (last["size"] - first["size"])
    constant = last["disk_bytes"] - per_example * last["size"]
    target = arguments.target
    lines += [
        "",
        f"Marginal rate between {first['size']} and {last['size']} examples: {marginal:.0f} "
        f"examples/s ({marginal * WINDOW:.0f} tokens/s) on this machine as loaded, "
        f"{per_cpu:.0f} examples per CPU-second. Disk: {per_example:.0f} B/example + "
        f"{constant:.0f} B. Extrapolated to {target:,} examples: {target / marginal / 3600:.1f} h "
        f"at the loaded rate, {target / per_cpu / arguments.ranks / 3600:.2f} h on "
        f"{arguments.ranks} idle core(s), {(per_example * target + constant) / 2**30:.2f} GiB on "
        f"disk, peak memory as measured ({last['peak_mib']:.0f} MiB per rank at {last['size']}).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
