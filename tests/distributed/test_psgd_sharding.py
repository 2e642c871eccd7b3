"""PSGD split over ranks: each rank draws only its own bundles' fit noise, the numbers one
process draws for them, and the ranks stop agreeing on the initial scale once every bundle is
initialised (no all-reduce of PSGD's own after that)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import kronlab.optim.psgd as psgd_module
from kronlab.distributed import DistributedConfig
from kronlab.optim import PSGD
from kronlab.optim.randomness import NORMAL_CHUNK

F64 = torch.float64
STEPS = 6
LATE_STEP = 3  # the step at which the late parameter gets its first non-zero gradient


def test_noise_prefix_does_not_depend_on_the_size_drawn():
    """A bundle's noise is the first ``m·n`` entries of the step's sequence, whatever the
    largest bundle drawing with it: the same numbers on a rank that steps only small bundles."""
    optimizer = PSGD([nn.Parameter(torch.zeros(3, dtype=F64))], seed=5)
    device = torch.device("cpu")
    small = optimizer._step_noise(35, device, F64)
    large = optimizer._step_noise(2 * NORMAL_CHUNK + 7, device, F64)
    torch.testing.assert_close(small, large[:35], rtol=0, atol=0)
    optimizer._count_step()
    assert not torch.equal(optimizer._step_noise(35, device, F64), small)  # fresh every step


def test_a_bundle_steps_alike_alone_and_beside_a_larger_one():
    """One process stepping a small and a large weight, and one stepping the small weight
    alone (as a rank owning only it does), give the small weight the same trajectory."""
    generator = torch.Generator().manual_seed(0)
    small = torch.randn(5, 7, dtype=F64, generator=generator)
    large = torch.randn(40, 30, dtype=F64, generator=generator)
    gradients = [torch.randn(5, 7, dtype=F64, generator=generator) for _ in range(4)]
    results = []
    for with_large in (False, True):
        params = [nn.Parameter(small.clone())] + ([nn.Parameter(large.clone())] * with_large)
        optimizer = PSGD(params, dtype=F64, noise_scale=0.5, preconditioner_init_scale=1.0, seed=3)
        for gradient in gradients:
            params[0].grad = gradient.clone()
            if with_large:
                params[1].grad = torch.ones_like(large)
            optimizer.step()
        results.append(params[0].detach())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def _all_reduces_per_step(rank: int, refused_at: int | None) -> list[int]:
    """PSGD's all-reduces in each of ``STEPS`` calls of ``step`` on 3 weights, the last one
    first getting a non-zero gradient at ``LATE_STEP``; at call ``refused_at`` the last rank's
    first gradient holds a NaN (the step is refused on every rank)."""
    calls = []
    agree = psgd_module.all_reduce_max

    def counted(*args, **kwargs):
        calls.append(1)
        return agree(*args, **kwargs)

    psgd_module.all_reduce_max = counted
    try:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(6, 4, dtype=F64)) for _ in range(3)]
        optimizer = PSGD(params, dtype=F64, distributed=DistributedConfig(), seed=1)
        per_step = []
        for call in range(1, STEPS + 1):
            generator = torch.Generator().manual_seed(call)
            for index, param in enumerate(params):
                param.grad = torch.randn(param.shape, dtype=F64, generator=generator)
                if index == 2 and call < LATE_STEP:
                    param.grad.zero_()  # not initialised before LATE_STEP
            if call == refused_at and rank == 1:
                params[0].grad[0, 0] = float("nan")
            before = len(calls)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the skipped step's warning
                optimizer.step()
            per_step.append(len(calls) - before)
    finally:
        psgd_module.all_reduce_max = agree
    return per_step


def _worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        counts = {refused: _all_reduces_per_step(rank, refused) for refused in (None, LATE_STEP)}
        # every rank done before any tears its gloo connections down (a rank leaving while
        # another still talks to it can abort the other process)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(counts, Path(out) / f"rank{rank}.pt")


def test_ranks_agree_on_the_scale_only_until_every_bundle_is_initialised(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        counts = torch.load(tmp_path / f"rank{rank}.pt")
        # calls 1 .. LATE_STEP - 1 leave one bundle waiting; LATE_STEP initialises it
        expected = [1] * LATE_STEP + [0] * (STEPS - LATE_STEP)
        assert counts[None] == expected, (rank, counts)
        # refused at LATE_STEP: its initialisation is rolled back, the next call agrees again
        expected = [1] * (LATE_STEP + 1) + [0] * (STEPS - LATE_STEP - 1)
        assert counts[LATE_STEP] == expected, (rank, counts)
