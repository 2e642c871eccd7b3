"""Data-parallel training: two gloo processes under DistributedDataParallel, each with half of
every batch, end with the parameters one process reaches on the whole batches.

DDP averages the gradients, so each rank's optimizer sees the full-batch mean gradient and
must take the same step as a single process; an optimizer that reads anything else from its
rank's data (SIRFShampoo counts the batch size in a forward pre-hook) must still agree."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kronlab.optim import PSGD, SOAP, KLShampoo, Muon, Shampoo, SIRFShampoo, Spectron

STEPS = 6
BATCH = 16

# Each factory gets the model the training loop calls (the DDP wrapper under DDP) and returns
# the optimizer. Frequencies are short so refreshes happen inside the 6 steps. The Shampoo
# family keeps the 8x8 weights two-factor blocks (merged, each would be one 64x64 factor of
# rank 1) and float64 factors: this gradient's G Gᵀ has condition ~1e6, so in float32 its
# smallest eigenvalue sits at the eigh noise floor, where the summation order decides how it is
# rounded, and inverse roots and Adam in the eigenbasis magnify that.
SHAMPOO = dict(lr=0.01, precondition_frequency=2, merge_dims=False, factor_dtype=torch.float64)
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd": lambda model: torch.optim.SGD(model.parameters(), lr=0.1),
    "shampoo": lambda model: Shampoo(model.parameters(), **SHAMPOO),
    "soap": lambda model: SOAP(model.parameters(), **SHAMPOO),
    "kl_shampoo": lambda model: KLShampoo(model.parameters(), **SHAMPOO),
    "pf_shampoo": lambda model: Shampoo(
        model.parameters(), preconditioner="per_factor_eigenvalue_corrected", **SHAMPOO
    ),
    "psgd_quad": lambda model: PSGD(model.parameters(), lr=0.01, method="quad"),
    "muon": lambda model: Muon(model.parameters(), lr=0.02),
    "spectron": lambda model: Spectron(model.parameters(), lr=0.01, rank=4),
    "sirfshampoo": lambda model: SIRFShampoo(model, lr=0.05, beta2=0.1, T=2),
}


def _model() -> nn.Module:
    # Square weights and more examples than rows: every gradient, hence every Kronecker factor,
    # has full rank. With a singular factor the all-reduce's rounding (~1e-8) would pick a
    # different null-space eigenbasis in one process than in two, and Adam in that basis (SOAP)
    # or a tiny-epsilon inverse root would turn it into O(lr) differences: true of any
    # implementation, and not what this test is about.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 8, generator=generator), torch.randn(BATCH, 8, generator=generator))
        for _ in range(STEPS)
    ]


def _train(name: str, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    model = _model()
    trained = DistributedDataParallel(model) if world_size > 1 else model
    optimizer = OPTIMIZERS[name](trained)
    torch.manual_seed(2)  # the same optimizer randomness (PSGD's fit noise) on every rank
    share = BATCH // world_size
    for inputs, targets in _batches():
        rows = slice(rank * share, (rank + 1) * share)
        optimizer.zero_grad()
        nn.functional.mse_loss(trained(inputs[rows]), targets[rows]).backward()
        optimizer.step()
    return [parameter.detach().clone() for parameter in model.parameters()]


def _worker(rank: int, world_size: int, init_file: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        results[rank] = {name: _train(name, rank, world_size) for name in OPTIMIZERS}
        # every rank done before any tears its gloo connections down (a rank leaving while
        # another still talks to it can abort the other process)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_parameters(tmp_path_factory) -> dict:
    init_file = tmp_path_factory.mktemp("ddp") / "init"
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, str(init_file), results), nprocs=2, join=True)
        return dict(results)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_two_ranks_take_the_one_process_steps(name: str, two_process_parameters: dict) -> None:
    single = _train(name)
    rank0, rank1 = two_process_parameters[0][name], two_process_parameters[1][name]
    for one, zero, other in zip(single, rank0, rank1, strict=True):
        assert torch.equal(zero, other)  # ranks never drift apart
        torch.testing.assert_close(zero, one, rtol=1e-4, atol=1e-5)
