"""Gradient-store build at growing sizes: throughput, peak memory and disk per example.

Writes ``--sizes`` 64-byte windows of standard-library source as JSONL (streamed to disk), then
runs ``kronlab attribute build`` on ``tiny-gpt`` in a fresh process per size and reads that
process's wall time, peak resident memory (``ru_maxrss``) and the store's bytes on disk. Flat
peak memory across sizes is what lets one extrapolate to a million examples.

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
        "--cache-dir", str(run_dir.parent / "models"), "--no-progress",
    ]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(process.stderr.read().decode()[-2000:])
    store = run_dir / "train"
    disk = sum(path.stat().st_size for path in store.rglob("*") if path.is_file())
    return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024, "disk_bytes": disk}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="5000,20000")
    parser.add_argument("--projection-dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--target", type=int, default=1_000_000, help="extrapolate to this")
    arguments = parser.parse_args()
    sizes = [int(size) for size in arguments.sizes.split(",")]
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
        f"Command: `PYTHONPATH=src python -m benchmarks.store_scale --sizes "
        f"{arguments.sizes} --projection-dim {arguments.projection_dim}`  ",
        f"Machine: {machine_description()} (shared with other jobs, `nice -n 10`)",
        "",
        "| examples | wall s (process) | examples/s | tokens/s | peak RSS MiB | disk B/example |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        rate = row["size"] / row["seconds"]
        lines.append(
            f"| {row['size']} | {row['seconds']:.1f} | {rate:.0f} | {rate * WINDOW:.0f} | "
            f"{row['peak_mib']:.0f} | {row['disk_bytes'] / row['size']:.0f} |"
        )
    first, last = rows[0], rows[-1]
    # Marginal rate between the two sizes removes start-up (imports, model load) from the rate.
    marginal = (last["size"] - first["size"]) / max(last["seconds"] - first["seconds"], 1e-9)
    per_example = last["disk_bytes"] / last["size"]
    target = arguments.target
    lines += [
        "",
        f"Marginal rate between {first['size']} and {last['size']} examples: {marginal:.0f} "
        f"examples/s ({marginal * WINDOW:.0f} tokens/s). Extrapolated to {target:,} examples: "
        f"{target / marginal / 3600:.1f} h, {per_example * target / 2**30:.2f} GiB on disk, "
        f"peak memory as measured ({last['peak_mib']:.0f} MiB at {last['size']}).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
