"""The dtype of Newton–Schulz matmuls for one matrix shape on one device, by a fixed rule.

bfloat16 GEMMs are several times faster than float32 on accelerators and on CPUs with bf16
matrix units (AMX), but on CPUs without them (AVX512-BF16 alone included), and for small
matrices even with them, they are slower (the measurements behind the thresholds are in
BENCHMARKS.md, "Muon").
The rule depends only on the device's capabilities and the shape, never on a timing: the same
machine always picks the same dtype, so runs and resumed runs are reproducible.
"""

from __future__ import annotations

import functools

import torch

# On a CPU with bf16 matrix units, bfloat16 wins once the smaller side reaches 128 and the
# matrix has at least 2**15 entries (BENCHMARKS.md, "Newton–Schulz dtype chosen per shape and
# device").
MIN_SIDE_FOR_BF16 = 128
MIN_ENTRIES_FOR_BF16 = 2**15


def newton_schulz_dtype(rows: int, columns: int, device: torch.device | str) -> torch.dtype:
    """bfloat16 off CPU; on CPU bfloat16 for large enough matrices when the CPU has bf16 matrix
    units, float32 otherwise."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.bfloat16
    large_enough = min(rows, columns) >= MIN_SIDE_FOR_BF16 and rows * columns >= (
        MIN_ENTRIES_FOR_BF16
    )
    return torch.bfloat16 if large_enough and cpu_has_bf16_matrix_units() else torch.float32


# a constant of the machine: a compiled step reads the answer instead of tracing the probe
@functools.cache
@torch.compiler.assume_constant_result
def cpu_has_bf16_matrix_units() -> bool:
    """AMX tiles, as torch's CPU feature detection reports them (AVX512-BF16 without AMX ran
    the benchmark's bfloat16 Newton–Schulz slower than float32)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
