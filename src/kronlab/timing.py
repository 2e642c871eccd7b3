"""Step-time ratios of optimizers timed in interleaved step slots, with their spread.

Optimizers timed one after another see different machine load (a busy shared machine swung a
ratio 10–100x between runs). Interleaved, step ``k`` of every optimizer runs at about the same
moment, so the ratio of two optimizers' times over the same block of steps cancels the load;
the spread of those per-block ratios says how much the figure can be trusted.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Steps per timing block: a multiple of the registered precondition periods (10), so that every
# block carries its share of amortized refreshes.
STEP_BLOCK = 20
# A ratio is called noise when the interquartile range of its per-block values exceeds this
# fraction of their median, or when fewer than MIN_BLOCKS blocks were timed.
NOISE_LIMIT = 0.25
MIN_BLOCKS = 3


def interleaved_order(count: int, step: int) -> list[int]:
    """The order in which ``count`` optimizers take step ``step``: one slot each, the starting
    optimizer rotating so that none always runs first (after evaluation) or last."""
    start = step % count if count else 0
    return [(start + offset) % count for offset in range(count)]


def block_size(steps: int) -> int:
    """``STEP_BLOCK``, or a quarter of a short run (at least 1) so its spread can be judged."""
    return STEP_BLOCK if steps >= 4 * STEP_BLOCK else max(1, steps // 4)


@dataclass(frozen=True)
class TimeRatio:
    """Median and quartiles over blocks of ``time(optimizer) / time(reference)``."""

    median: float
    low: float
    high: float
    blocks: int

    @property
    def noisy(self) -> bool:
        if self.blocks < MIN_BLOCKS or not math.isfinite(self.median) or self.median <= 0:
            return True
        return (self.high - self.low) / self.median > NOISE_LIMIT


def time_ratio(seconds: list[float], reference: list[float], block: int) -> TimeRatio:
    """Per-block ratios of the summed step times of two interleaved runs, the first block
    (state allocation, lazy start-up) left out; blocks one run did not finish are not counted."""
    steps = min(len(seconds), len(reference))
    ratios = []
    for start in range(block, steps - block + 1, block):
        denominator = sum(reference[start : start + block])
        if denominator > 0:
            ratios.append(sum(seconds[start : start + block]) / denominator)
    if not ratios:
        return TimeRatio(math.nan, math.nan, math.nan, 0)
    if len(ratios) == 1:
        return TimeRatio(ratios[0], ratios[0], ratios[0], 1)
    low, median, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return TimeRatio(median, low, high, len(ratios))
