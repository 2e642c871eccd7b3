"""What the pipeline's integrity checks cost: CRC-32 per chunk, digests of whole files, fsync.

One process, one torch thread, the digits MLP (64 → 128 → 128 → 10, untrained weights: the
cost does not depend on them) on the digits training set, full gradients (``projection_dim=0``:
the largest store, 26 122 float32 values per row) unless ``--projection-dim`` says otherwise.
For each of ``--rounds`` rounds, in a fresh run directory: the four stages with the time spent
inside the checksum calls measured around them (``crc32`` at commit and on first read,
``file_digest`` of the curvature, the stores' metadata and the scores); then a full read of the
store with verification against the same read without it (a raw copy of the memory map), in
alternating order; then the build once more with ``durable=True``, timing its fsyncs. Figures
are medians over rounds; percentages are of the stage's own wall time in the same round.

    PYTHONPATH=src python -m benchmarks.attribution_integrity [--rounds 5] [--projection-dim 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import kronlab.attribution.integrity as integrity
import kronlab.attribution.pipeline as pipeline
import kronlab.attribution.store as store_module
from kronlab.attribution.pipeline import AttributionConfig, AttributionRun
from kronlab.attribution.store import GradientStore


class Timed:
    """Wraps a function; accumulates its wall time and the bytes it was given."""

    def __init__(self, function):
        self.function, self.seconds, self.bytes = function, 0.0, 0

    def __call__(self, argument):
        start = time.perf_counter()
        result = self.function(argument)
        self.seconds += time.perf_counter() - start
        self.bytes += argument.nbytes if hasattr(argument, "nbytes") else _size(argument)
        return result

    def take(self) -> tuple[float, int]:
        seconds, size = self.seconds, self.bytes
        self.seconds, self.bytes = 0.0, 0
        return seconds, size


def _size(argument) -> int:
    return Path(argument).stat().st_size if isinstance(argument, (str, Path)) else len(argument)


def one_round(root: Path, config: AttributionConfig, cache: Path, crc: Timed, digest: Timed):
    results = {}
    run = AttributionRun(root / "run", config, show_progress=False, cache_dir=cache)
    run.task  # noqa: B018 - load the model and data outside the timed stages
    for stage in run.stage_order():
        crc.take(), digest.take()
        start = time.perf_counter()
        getattr(run, stage)()
        wall = time.perf_counter() - start
        crc_seconds, crc_bytes = crc.take()
        digest_seconds, digest_bytes = digest.take()
        results[stage] = (wall, crc_seconds, crc_bytes, digest_seconds, digest_bytes)
    # A full read: verified (a fresh store object checks every chunk) against a raw copy.
    for order in range(2):
        for verified in (order == 0, order == 1):
            store = GradientStore.open(run.train_store_dir)
            start = time.perf_counter()
            if verified:
                store.read()
            else:
                np.array(store.array[:])
            results[f"read-{'verified' if verified else 'raw'}-{order}"] = (
                time.perf_counter() - start
            )
    durable = AttributionRun(
        root / "durable", config, show_progress=False, cache_dir=cache, durable=True
    )
    durable.task  # noqa: B018
    real_fsync, fsyncs = os.fsync, []

    def timed_fsync(descriptor: int) -> None:
        start = time.perf_counter()
        real_fsync(descriptor)
        fsyncs.append(time.perf_counter() - start)

    os.fsync = timed_fsync
    try:
        start = time.perf_counter()
        durable.build()
        results["build-durable"] = time.perf_counter() - start
    finally:
        os.fsync = real_fsync
    results["fsync"] = (len(fsyncs), sum(fsyncs))
    results["store-bytes"] = GradientStore.open(run.train_store_dir).nbytes
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--projection-dim", type=int, default=0)
    parser.add_argument("--chunk-rows", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    crc = Timed(integrity.crc32)
    digest = Timed(integrity.file_digest)
    store_module.crc32 = crc  # the store calls crc32 through its module's name
    pipeline.file_digest = digest
    integrity.file_digest = digest
    config = AttributionConfig(
        method="kfac",
        fisher="empirical",
        projection_dim=args.projection_dim,
        chunk_rows=args.chunk_rows,
        report_queries=0,
    )
    rounds = defaultdict(list)
    with tempfile.TemporaryDirectory() as directory:
        cache = Path(directory) / "cache"
        from kronlab.tasks.digits import digits_mlp

        cache.mkdir()
        torch.save(digits_mlp(0).state_dict(), cache / "digits-mlp-seed0.pt")
        for index in range(args.rounds):
            for key, value in one_round(
                Path(directory) / str(index), config, cache, crc, digest
            ).items():
                rounds[key].append(value)
    median = statistics.median
    size = rounds["store-bytes"][0]
    print(f"store: {size / 1e6:.1f} MB, chunks of {args.chunk_rows} rows; {args.rounds} rounds\n")
    print("| stage | wall s | CRC-32 s (% of stage) | CRC MB/s | digests s (% of stage) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for stage in ("build", "fit", "apply", "score"):
        values = rounds[stage]
        wall = median(v[0] for v in values)
        crc_s = median(v[1] for v in values)
        crc_rate = median(v[2] / v[1] / 1e6 for v in values if v[1] > 0) if crc_s else 0.0
        digest_s = median(v[3] for v in values)
        print(
            f"| {stage} | {wall:.3f} | {crc_s:.4f} ({100 * crc_s / wall:.2f} %) | "
            f"{crc_rate:.0f} | {digest_s:.4f} ({100 * digest_s / wall:.2f} %) |"
        )
    verified = [min(rounds[f"read-verified-{o}"][i] for o in range(2)) for i in range(args.rounds)]
    raw = [min(rounds[f"read-raw-{o}"][i] for o in range(2)) for i in range(args.rounds)]
    ratios = [v / r for v, r in zip(verified, raw)]
    print(
        f"\nfull read of the store: verified {median(verified):.4f} s, raw copy "
        f"{median(raw):.4f} s, ratio {median(ratios):.2f}x "
        f"({size / median(verified) / 1e6:.0f} MB/s verified)"
    )
    durable = [d / b[0] for d, b in zip(rounds["build-durable"], rounds["build"])]
    count = rounds["fsync"][0][0]
    fsync_share = [f[1] / d for f, d in zip(rounds["fsync"], rounds["build-durable"])]
    print(
        f"build with --durable / without: {median(durable):.2f}x; its {count} fsyncs take "
        f"{1e3 * median(f[1] / f[0] for f in rounds['fsync']):.2f} ms each, "
        f"{100 * median(fsync_share):.1f} % of the durable build"
    )


if __name__ == "__main__":
    main()
