"""``kronlab compare`` timing: interleaved step slots, per-block time ratios with their spread,
and the warning when the spread says a ratio is noise (fake clocks: no timing assertions)."""

from __future__ import annotations

import math
import random

import torch
from torch import nn

from kronlab.compare import RunResult, compare, run_interleaved, timing_warning
from kronlab.tasks.base import ClassificationTask
from kronlab.timing import TimeRatio, interleaved_order, time_ratio


def tiny_task() -> ClassificationTask:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 5, generator=generator)
    targets = torch.randint(0, 3, (40,), generator=generator)

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(5, 3)

    return ClassificationTask("tiny", inputs[:32], targets[:32], inputs[32:], targets[32:],
                              make_model, 3)  # fmt: skip


class GrowingLoadClock:
    """Each reading advances time by more than the last: the machine gets ever busier, so
    optimizers timed one after another would get very different times for equal work."""

    def __init__(self) -> None:
        self.now, self.tick = 0.0, 1.0

    def __call__(self) -> float:
        self.now += self.tick
        self.tick *= 1.01
        return self.now


class NoisyClock:
    """Each reading advances time by 1 or, at random, by 20 (other jobs' bursts)."""

    def __init__(self) -> None:
        self.now, self.random = 0.0, random.Random(0)

    def __call__(self) -> float:
        self.now += 20.0 if self.random.random() < 0.3 else 1.0
        return self.now


def test_every_step_slot_rotates_through_all_optimizers() -> None:
    assert [interleaved_order(3, step) for step in (1, 2, 3, 4)] == [
        [1, 2, 0],
        [2, 0, 1],
        [0, 1, 2],
        [1, 2, 0],
    ]


def test_runs_take_step_k_before_any_takes_step_k_plus_one() -> None:
    slots: list[tuple[str, int]] = []

    class Recorder:
        def __init__(self, name: str, diverge_at: int | None = None) -> None:
            self.name, self.diverge_at, self.finished = name, diverge_at, False

        def step(self, step: int, clock: object) -> None:
            slots.append((self.name, step))
            self.finished = step == self.diverge_at

    run_interleaved([Recorder("a"), Recorder("b", diverge_at=2), Recorder("c")], 3)
    assert [step for _, step in slots] == [1, 1, 1, 2, 2, 2, 3, 3]
    assert ("b", 3) not in slots  # a diverged run takes no more slots
    assert {name for name, step in slots if step == 1} == {"a", "b", "c"}


def test_interleaving_cancels_a_load_that_changes_during_the_run() -> None:
    results = compare(tiny_task(), ["sgd", "adamw"], steps=80, batch_size=8,
                      show_progress=False, clock=GrowingLoadClock())  # fmt: skip
    # Identical fake work per step: in interleaved slots each pair of runs sees the same load
    # (timed one after the other, sgd's ratio would be 1.01^(2·80) ≈ 4.9).
    for result in results:
        assert math.isclose(result.ratio_to_adamw, 1.0, rel_tol=0.02)
        assert not result.timing_noisy
    assert timing_warning(results) is None


def test_a_spread_out_ratio_is_flagged_as_noise() -> None:
    results = compare(tiny_task(), ["sgd"], steps=80, batch_size=8, show_progress=False,
                      clock=NoisyClock())  # fmt: skip
    sgd = next(r for r in results if r.name == "sgd")
    assert sgd.ratio_low < sgd.ratio_to_adamw < sgd.ratio_high
    assert sgd.timing_noisy
    warning = timing_warning(results)
    assert warning is not None and "(sgd)" in warning and "spread" in warning


def test_time_ratio_quartiles_and_noise_rule() -> None:
    # blocks of 2 steps, the first left out: per-block ratios 2, 2, 3, 2
    seconds = [9.0, 9.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 2.0, 2.0]
    reference = [1.0] * 10
    ratio = time_ratio(seconds, reference, block=2)
    assert ratio == TimeRatio(median=2.0, low=2.0, high=2.25, blocks=4)
    assert not ratio.noisy  # spread 0.25 / 2.0 = 12.5% of the median
    assert TimeRatio(2.0, 1.5, 2.6, 4).noisy
    assert TimeRatio(2.0, 2.0, 2.0, 2).noisy  # too few blocks to judge


def test_too_short_runs_are_flagged_with_the_reason() -> None:
    result = RunResult("soap", 1e-3, ratio_to_adamw=3.0, timed_blocks=2, timing_noisy=True)
    warning = timing_warning([result])
    assert warning is not None and "too few to measure the spread" in warning
