"""Sharded optimizers on 2 and 3 gloo processes take the steps of one process.

Each rank owns some preconditioner bundles (``distributed=DistributedConfig()``), steps only
those and all-gathers the results; under DDP every rank sees the global-batch mean gradient, so
20 steps must end where one undistributed process on the whole batches ends. The same spawn
checks that state lives only on the owning rank, that frozen parameters, a rank without
gradients and a non-finite gradient on one rank neither deadlock nor let the ranks drift apart,
and that a narrow communication dtype keeps the ranks identical.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from kronlab.distributed import DistributedConfig
from kronlab.optim import PSGD, SOAP, KLShampoo, Muon, Shampoo, SIRFShampoo, Spectron
from kronlab.optim.base import KronOptimizer

STEPS = 20
BATCH = 12  # divisible by 2 and 3
# Frequencies short enough for refreshes inside the run; float64 factors and square weights
# (full-rank factors) as in tests/optim/test_data_parallel.py, for the same reasons.
SHAMPOO = dict(lr=0.01, precondition_frequency=2, merge_dims=False, factor_dtype=torch.float64)
Factory = Callable[[nn.Module, DistributedConfig | None], KronOptimizer]
OPTIMIZERS: dict[str, Factory] = {
    "shampoo": lambda model, config: Shampoo(model.parameters(), **SHAMPOO, distributed=config),
    "soap": lambda model, config: SOAP(model.parameters(), **SHAMPOO, distributed=config),
    "kl_shampoo_per_factor": lambda model, config: KLShampoo(
        model.parameters(),
        preconditioner="per_factor_eigenvalue_corrected",
        **SHAMPOO,
        distributed=config,
    ),
    "sirfshampoo": lambda model, config: SIRFShampoo(
        model, lr=0.05, beta2=0.1, T=2, distributed=config
    ),
    # The default initial scale (a maximum over the bundles initialised in a step) is agreed on
    # by the ranks and each draws its bundles' fit noise as one process does; noise large enough
    # to show in the parameters.
    "psgd": lambda model, config: PSGD(
        model.parameters(), lr=0.01, method="quad", noise_scale=0.1, distributed=config
    ),
    "muon": lambda model, config: Muon(model.parameters(), lr=0.02, distributed=config),
    "spectron": lambda model, config: Spectron(
        model.parameters(), lr=0.01, rank=4, seed=3, distributed=config
    ),
}
# State is kept per parameter (``optimizer.state[param]``): where it lives is measured parameter
# by parameter.
PER_PARAMETER_STATE = tuple(OPTIMIZERS)
WORLD_SIZES = (2, 3)


def _model(frozen: bool = False, mixed: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if mixed:  # matrices of three sizes: on 2 and 3 ranks, some rank owns no 8 x 8 one
        return nn.Sequential(
            nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2), nn.Tanh(), nn.Linear(2, 8)
        )
    model = nn.Sequential(
        nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 8)
    )
    if frozen:
        model[2].requires_grad_(False)
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 8, generator=generator), torch.randn(BATCH, 8, generator=generator))
        for _ in range(STEPS)
    ]


def _state_owners(optimizer: KronOptimizer, model: nn.Module) -> list[bool]:
    """Whether this rank holds state for each parameter of ``model``."""
    return [bool(optimizer.state.get(param)) for param in model.parameters()]


def _train(name: str, scenario: str, rank: int = 0, world_size: int = 1) -> dict[str, object]:
    """Train ``STEPS`` steps; distributed (sharded) when ``world_size > 1``.

    Scenarios: ``ddp`` (each rank its share of every batch, DDP averages), ``frozen`` (ddp with
    a frozen layer), ``mixed`` (ddp with matrices of several sizes), ``non_finite`` (every rank
    the whole batch; at step 5 the last rank's gradient of the first weight holds a NaN),
    ``no_gradient`` (whole batch; at step 4 the last rank has no gradient at all), ``bf16``
    (ddp, updates all-gathered in bfloat16), ``fsdp2`` (each rank its share of the batch,
    every linear layer its own ``fully_shard`` unit, built without distributed=, which the
    DTensor parameters imply; the other optimizers and settings: ``test_fsdp.py``).
    """
    distributed = world_size > 1
    model = _model(frozen=scenario == "frozen", mixed=scenario == "mixed")
    data_parallel = scenario in ("ddp", "frozen", "mixed", "bf16", "fsdp2")
    trained = DistributedDataParallel(model) if distributed and data_parallel else model
    if distributed and scenario == "fsdp2":
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        trained = fully_shard(model)
    config = None
    if distributed and scenario != "fsdp2":
        dtype = torch.bfloat16 if scenario == "bf16" else None
        config = DistributedConfig(communication_dtype=dtype)
    optimizer = OPTIMIZERS[name](trained, config)
    share = BATCH // world_size if data_parallel else BATCH
    last = rank == world_size - 1
    for step, (inputs, targets) in enumerate(_batches()):
        rows = slice(rank * share, (rank + 1) * share) if data_parallel else slice(None)
        optimizer.zero_grad()
        if not (scenario == "no_gradient" and step == 4 and last and distributed):
            nn.functional.mse_loss(trained(inputs[rows]), targets[rows]).backward()
        if scenario == "non_finite" and step == 5 and last:
            model[0].weight.grad[0, 0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the skipped step's warning
            optimizer.step()
    return {
        "params": [
            p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
            for p in model.parameters()
        ],
        "owners": _state_owners(optimizer, model),
        "skipped": optimizer.skipped_steps,
        "steps": optimizer.global_step,
    }


SCENARIOS = {
    "ddp": list(OPTIMIZERS),
    "frozen": ["soap", "muon"],
    "mixed": ["psgd"],
    "non_finite": ["shampoo", "muon"],
    "no_gradient": ["soap", "muon"],
    "bf16": ["muon"],
    "fsdp2": ["muon"],
}


# Checkpointed with torch.distributed.checkpoint on 2 ranks after SAVED_AT steps, resumed on 1,
# 2 and 3 ranks for the remaining steps of RESUMED_STEPS.
CHECKPOINTED = (
    "shampoo",
    "soap",
    "kl_shampoo_per_factor",
    "psgd",
    "muon",
    "sirfshampoo",
    "spectron",
)
SAVED_AT, RESUMED_STEPS = 5, 10


def _checkpointed_run(
    name: str, directory: Path, rank: int = 0, world_size: int = 1, save: bool = False
) -> list[torch.Tensor]:
    """Train up to ``SAVED_AT`` and save (``save``), or resume from ``directory``; then
    train to ``RESUMED_STEPS``. The parameters at the end."""
    distributed = world_size > 1
    model = _model()
    trained = DistributedDataParallel(model) if distributed else model
    config = DistributedConfig() if distributed else None
    optimizer = OPTIMIZERS[name](trained, config)
    share = BATCH // world_size
    rows = slice(rank * share, (rank + 1) * share)
    batches = _batches()[:RESUMED_STEPS]

    def train(steps: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for inputs, targets in steps:
            optimizer.zero_grad()
            nn.functional.mse_loss(trained(inputs[rows]), targets[rows]).backward()
            optimizer.step()

    if save:
        train(batches[:SAVED_AT])
        model_state, optimizer_state = get_state_dict(trained, optimizer)
        dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=directory)
    else:
        model_state, optimizer_state = get_state_dict(trained, optimizer)
        state = {"model": model_state, "optim": optimizer_state}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(
            trained, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        assert optimizer.global_step == SAVED_AT
    train(batches[SAVED_AT:])
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank: int, world_size: int, init_file: str, out: str, checkpoints: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        results = {
            (scenario, name): _train(name, scenario, rank, world_size)
            for scenario, names in SCENARIOS.items()
            for name in names
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP's notes, SIRFShampoo's zero-lr-step note
            for name in CHECKPOINTED:
                directory = Path(checkpoints) / name
                if world_size == 2:  # the saving run, uninterrupted after the save
                    results[("uninterrupted", name)] = _checkpointed_run(
                        name, directory, rank, world_size, save=True
                    )
                results[("resumed", name)] = _checkpointed_run(name, directory, rank, world_size)
        # every rank done before any tears its gloo connections down (a rank leaving while
        # another still talks to it can abort the other process)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, checkpoints: Path) -> dict[int, list[dict]]:
    """Per world size, each rank's results (2 ranks first: they write the checkpoints)."""
    results = {}
    for world_size in WORLD_SIZES:
        directory = tmp_path_factory.mktemp(f"ranks{world_size}")
        mp.spawn(
            _worker,
            args=(world_size, str(directory / "init"), str(directory), str(checkpoints)),
            nprocs=world_size,
            join=True,
        )
        results[world_size] = [
            torch.load(directory / f"rank{rank}.pt", weights_only=False)
            for rank in range(world_size)
        ]
    return results


def _assert_ranks_agree(per_rank: list[dict]) -> None:
    for other in per_rank[1:]:
        for mine, theirs in zip(per_rank[0]["params"], other["params"], strict=True):
            assert torch.equal(mine, theirs)  # every rank holds the owner's values
        assert (other["skipped"], other["steps"]) == (per_rank[0]["skipped"], per_rank[0]["steps"])


CASES = [(scenario, name) for scenario, names in SCENARIOS.items() for name in names]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("scenario, name", [c for c in CASES if c[0] != "no_gradient"])
def test_sharded_ranks_take_the_one_process_steps(
    scenario: str, name: str, world_size: int, ranks: dict
) -> None:
    per_rank = [results[(scenario, name)] for results in ranks[world_size]]
    _assert_ranks_agree(per_rank)
    single = _train(name, scenario)
    assert per_rank[0]["skipped"] == single["skipped"] == (1 if scenario == "non_finite" else 0)
    tolerance = dict(rtol=1e-2, atol=1e-3) if scenario == "bf16" else dict(rtol=1e-4, atol=1e-5)
    for sharded, one in zip(per_rank[0]["params"], single["params"], strict=True):
        torch.testing.assert_close(sharded, one, **tolerance)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", SCENARIOS["no_gradient"])
def test_a_rank_without_gradients_neither_deadlocks_nor_drifts(
    name: str, world_size: int, ranks: dict
) -> None:
    _assert_ranks_agree([results[("no_gradient", name)] for results in ranks[world_size]])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", PER_PARAMETER_STATE)
def test_state_lives_only_on_the_owning_rank(name: str, world_size: int, ranks: dict) -> None:
    single = _train(name, "ddp")["owners"]
    held = [results[("ddp", name)]["owners"] for results in ranks[world_size]]
    for index, has_state in enumerate(single):
        holders = [rank for rank in range(world_size) if held[rank][index]]
        assert holders == ([holders[0]] if has_state else []), (index, holders)
    # the work is split: no rank holds it all
    assert all(sum(rank_held) < sum(single) for rank_held in held)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("resumed_on", (1, *WORLD_SIZES))
@pytest.mark.parametrize("name", CHECKPOINTED)
def test_checkpoint_of_two_ranks_resumes_on_one_two_and_three(
    name: str, resumed_on: int, ranks: dict, checkpoints: Path
) -> None:
    uninterrupted = ranks[2][0][("uninterrupted", name)]
    if resumed_on == 1:
        resumed = _checkpointed_run(name, checkpoints / name)
    else:
        per_rank = [results[("resumed", name)] for results in ranks[resumed_on]]
        for other in per_rank[1:]:
            assert all(torch.equal(a, b) for a, b in zip(per_rank[0], other))
        resumed = per_rank[0]
    for kept, restored in zip(uninterrupted, resumed, strict=True):
        # DDP's all-reduce over another number of ranks rounds the mean gradient differently
        torch.testing.assert_close(restored, kept, rtol=1e-4, atol=1e-5)
