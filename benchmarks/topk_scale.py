"""Streamed top-k scoring at a million training rows: time and peak memory.

The score stage's loop without the disk: ``--rows`` training rows of ``--width`` floats (the
row width of a p = 16 store of ``tiny-gpt``), drawn chunk by chunk from a seeded generator,
scored against ``--queries`` query rows and merged into each query's top-k proponents and
opponents (:class:`kronlab.attribution.StreamedTopK`). Peak memory is this process's
``ru_maxrss``; the dense ``n_query × n_train`` float32 matrix it avoids is printed beside it.

    PYTHONPATH=src:. python -m benchmarks.topk_scale --rows 1000000

With ``--run-dir`` (a run whose build and apply stages are complete) the rows are the run's
gradient store, read and CRC-checked chunk by chunk as the score stage reads them, against its
query rows; the result is compared with the run's ``top_k.npz`` when there is one.

    PYTHONPATH=src:. python -m benchmarks.topk_scale --run-dir RUN --k 100 --chunk-rows 1024
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_description
from kronlab.attribution import StreamedTopK
from kronlab.attribution.ranking import RankedScores
from kronlab.attribution.store import GradientStore


def stored_rows(run_dir: Path, chunk_rows: int) -> tuple[torch.Tensor, Iterator, int]:
    """The run's query rows, an iterator of ``(start, rows)`` over its training store (read
    in ``chunk_rows`` blocks, each chunk's CRC-32 checked) and the store's row count."""
    train = GradientStore.open(run_dir / "train")
    queries = GradientStore.open(run_dir / "queries").read()
    starts = range(0, train.num_rows, chunk_rows)
    blocks = (
        (start, train.read(start, min(start + chunk_rows, train.num_rows))) for start in starts
    )
    return queries, blocks, train.num_rows


def generated_rows(arguments: argparse.Namespace) -> tuple[torch.Tensor, Iterator, int]:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(arguments.queries, arguments.width, generator=generator)
    starts = range(0, arguments.rows, arguments.chunk_rows)
    blocks = (
        (start, torch.randn(min(arguments.chunk_rows, arguments.rows - start), arguments.width,
                            generator=generator))
        for start in starts
    )  # fmt: skip
    return queries, blocks, arguments.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=11 * 16 * 16)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--run-dir", type=Path, help="score this run's stores instead")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if arguments.run_dir is None:
        queries, blocks, rows = generated_rows(arguments)
        source = "generated rows included"
    else:
        queries, blocks, rows = stored_rows(arguments.run_dir, arguments.chunk_rows)
        source = "read from disk and CRC-checked"
    ranked = StreamedTopK(arguments.k)
    started = time.perf_counter()
    cpu_started = time.process_time()
    for start, block in blocks:
        ranked.update(queries @ block.T, start)
    result = ranked.result()
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dense = len(queries) * rows * 4 / 2**20
    same = ""
    if arguments.run_dir is not None and (arguments.run_dir / "top_k.npz").exists():
        recorded = RankedScores.load(arguments.run_dir / "top_k.npz")
        equal = all(
            np.array_equal(getattr(result, name), getattr(recorded, name))
            for name in ("proponents", "opponents", "proponent_scores", "opponent_scores")
        )
        same = f" Equal to the run's top_k.npz: {equal}."
    print(
        f"Command: `PYTHONPATH=src:. python -m benchmarks.topk_scale {_arguments_text(arguments)}`"
        f"  \nMachine: {machine_description()}, shared with other jobs\n\n"
        f"{rows:,} rows × {queries.shape[1]} floats ({source}) against {len(queries)} queries, "
        f"top-{arguments.k} both ends: {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU "
        f"({rows / seconds:,.0f} rows/s); peak RSS {peak:.0f} MiB ({before:.0f} MiB before the "
        f"loop); the dense score matrix would be {dense:,.0f} MiB; result "
        f"{result.proponents.shape} + {result.opponents.shape} indices.{same}"
    )


def _arguments_text(arguments: argparse.Namespace) -> str:
    if arguments.run_dir is not None:
        return f"--run-dir RUN --k {arguments.k} --chunk-rows {arguments.chunk_rows}"
    return f"--rows {arguments.rows}"


if __name__ == "__main__":
    main()
