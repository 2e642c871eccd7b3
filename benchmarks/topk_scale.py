"""Streamed top-k scoring at a million training rows: time and peak memory.

The score stage's loop without the disk: ``--rows`` training rows of ``--width`` floats (the
row width of a p = 16 store of ``tiny-gpt``), drawn chunk by chunk from a seeded generator,
scored against ``--queries`` query rows and merged into each query's top-k proponents and
opponents (:class:`kronlab.attribution.StreamedTopK`). Peak memory is this process's
``ru_maxrss``; the dense ``n_query × n_train`` float32 matrix it avoids is printed beside it.

    PYTHONPATH=src:. python -m benchmarks.topk_scale --rows 1000000
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from benchmarks.common import machine_description
from kronlab.attribution import StreamedTopK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=11 * 16 * 16)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--chunk-rows", type=int, default=4096)
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(arguments.queries, arguments.width, generator=generator)
    ranked = StreamedTopK(arguments.k)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    for start in range(0, arguments.rows, arguments.chunk_rows):
        count = min(arguments.chunk_rows, arguments.rows - start)
        rows = torch.randn(count, arguments.width, generator=generator)
        ranked.update(queries @ rows.T, start)
    result = ranked.result()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dense = arguments.queries * arguments.rows * 4 / 2**20
    print(
        f"Command: `PYTHONPATH=src:. python -m benchmarks.topk_scale --rows {arguments.rows}`  \n"
        f"Machine: {machine_description()}, shared with other jobs\n\n"
        f"{arguments.rows:,} rows × {arguments.width} floats against {arguments.queries} "
        f"queries, top-{arguments.k} both ends: {seconds:.1f} s ({arguments.rows / seconds:,.0f} "
        f"rows/s, rows generated included); peak RSS {peak:.0f} MiB ({before:.0f} MiB before "
        f"the loop); the dense score matrix would be {dense:,.0f} MiB; result "
        f"{result.proponents.shape} + {result.opponents.shape} indices."
    )


if __name__ == "__main__":
    main()
