"""Pick the faster dtype for Newton–Schulz matmuls of one shape on one device, by measuring.

bfloat16 GEMMs are several times faster than float32 on accelerators and on CPUs with bf16
matrix units (AMX), but on CPUs without them, and for small matrices even with them, they are
slower: measured with one thread on an AMX Xeon, torch 2.13, a 512x512 Newton–Schulz iteration
ran 4x faster in bfloat16, a 64x64 one 12x slower. No rule of thumb covers both, so on CPU each
shape is timed once per process; accelerators use bfloat16.
"""

from __future__ import annotations

import functools
import time

import torch

CANDIDATES = (torch.bfloat16, torch.float32)
_REPEATS = 3


def fastest_newton_schulz_dtype(
    rows: int, columns: int, batch: int, device: torch.device | str
) -> torch.dtype:
    """The dtype in which one Newton–Schulz iteration on ``batch`` matrices ``rows × columns``
    runs fastest on ``device`` (bfloat16 off CPU; on CPU the faster of bfloat16 and float32,
    measured once per shape and thread count and cached)."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.bfloat16
    small, large = sorted((rows, columns))
    return _measure_on_cpu(small, large, batch, torch.get_num_threads())


@functools.cache
def _measure_on_cpu(rows: int, columns: int, batch: int, threads: int) -> torch.dtype:
    # ``threads`` is part of the cache key only: the winner can change with the thread count.
    from kronlab.linalg.newton_schulz import newton_schulz

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, rows, columns, generator=generator)
    seconds = {}
    for dtype in CANDIDATES:
        matrix = sample.to(dtype)
        newton_schulz(matrix, steps=1)  # first call: lazy kernel and allocator set-up
        timings = []
        for _ in range(_REPEATS):
            started = time.perf_counter()
            newton_schulz(matrix, steps=1)
            timings.append(time.perf_counter() - started)
        seconds[dtype] = min(timings)
    # Ties go to bfloat16, the dtype of the reference implementation.
    return min(CANDIDATES, key=lambda dtype: (seconds[dtype], dtype != torch.bfloat16))
