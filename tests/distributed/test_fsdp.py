"""FSDP2-sharded (``fully_shard``, DTensor) parameters on 2 and 3 gloo processes take the steps
of one process on the global batch.

The owner of each bundle gathers the full values and gradients of its parameters, steps them
and sends every rank its shards of the result, so 20 steps must end where one undistributed
process on the whole batches ends, for every optimizer, also where a rank holds an empty shard.
The same spawn measures where the state lives, skips a step whose gradient shard is non-finite
on one rank, sends the change in bfloat16, and saves a ``torch.distributed.checkpoint`` on 2
ranks that resumes on 1, 2 and 3.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from kronlab.distributed import DistributedConfig
from kronlab.optim.base import KronOptimizer

from .test_sharded_training import BATCH, OPTIMIZERS, WORLD_SIZES, _batches


@dataclass(frozen=True)
class Run:
    """One training run: ``optimizer`` (a name of ``OPTIMIZERS``) on ``model``; ``implied``:
    built without distributed= (DTensor parameters imply it); ``dtype``: the communication
    dtype; ``nan_at``: the step at which the last rank's gradient shard of the first weight
    gets a NaN (that step is skipped on every rank)."""

    optimizer: str
    model: str = "square"
    implied: bool = False
    dtype: torch.dtype | None = None
    nan_at: int | None = None


# "frozen": square weights, one layer frozen (no gradient on any rank, never stepped).
# "uneven": matrices whose rows do not split evenly (on 3 ranks the 2-row weight leaves one rank
# an empty shard, the 5-row ones a short one). The Shampoo family stays on square weights, whose
# full-rank factors keep the eigenbases and roots well conditioned.
RUNS = {
    "shampoo": Run("shampoo", implied=True, nan_at=5),
    "soap": Run("soap"),
    "kl_shampoo_per_factor": Run("kl_shampoo_per_factor"),
    "sirfshampoo": Run("sirfshampoo"),
    "psgd": Run("psgd", model="uneven"),
    "muon": Run("muon", model="uneven"),
    "spectron": Run("spectron"),
    "soap_frozen": Run("soap", model="frozen"),
    "muon_bf16": Run("muon", dtype=torch.bfloat16),
}
CHECKPOINTED = ("shampoo", "psgd")
SAVED_AT, RESUMED_STEPS = 5, 10


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "uneven":
        return nn.Sequential(
            nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 2), nn.Tanh(), nn.Linear(2, 8)
        )
    model = nn.Sequential(
        nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 8)
    )
    if kind == "frozen":  # no gradient on any rank; never stepped
        model[2].requires_grad_(False)
    return model


def _shard(model: nn.Module) -> nn.Module:
    # one FSDP unit for the whole model: one all-gather and one reduce-scatter per step
    return fully_shard(model)


def _build(run: Run, model: nn.Module, distributed: bool) -> KronOptimizer:
    explicit = distributed and not run.implied
    config = DistributedConfig(communication_dtype=run.dtype) if explicit else None
    return OPTIMIZERS[run.optimizer](model, config)


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [
        p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
        for p in model.parameters()
    ]


def _train(run: Run, rank: int = 0, world_size: int = 1) -> dict[str, object]:
    """``STEPS`` steps of ``run``: sharded by ``fully_shard`` when ``world_size > 1`` (each rank
    its share of every batch), else one process on the whole batches."""
    distributed = world_size > 1
    model = _model(run.model)
    trained = _shard(model) if distributed else model
    optimizer = _build(run, trained, distributed)
    share = BATCH // world_size
    rows = slice(rank * share, (rank + 1) * share)
    for step, (inputs, targets) in enumerate(_batches()):
        optimizer.zero_grad()
        nn.functional.mse_loss(trained(inputs[rows]), targets[rows]).backward()
        if step == run.nan_at and rank == world_size - 1:
            gradient = model[0].weight.grad
            (gradient.to_local() if distributed else gradient)[-1, 0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the skipped step's warning
            optimizer.step()
    return {
        "params": _full(model),
        "owners": [bool(optimizer.state.get(param)) for param in model.parameters()],
        "skipped": optimizer.skipped_steps,
        "steps": optimizer.global_step,
    }


def _checkpointed_run(
    name: str, directory: Path, rank: int = 0, world_size: int = 1, save: bool = False
) -> list[torch.Tensor]:
    """Train to ``SAVED_AT`` and save (``save``), or resume from ``directory``; then train to
    ``RESUMED_STEPS``. The full parameters at the end."""
    distributed = world_size > 1
    run = RUNS[name]
    model = _model(run.model)
    trained = _shard(model) if distributed else model
    optimizer = _build(run, trained, distributed)
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
    return _full(model)


def _worker(rank: int, world_size: int, init_file: str, out: str, checkpoints: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        results: dict[tuple[str, str], object] = {
            ("train", name): _train(run, rank, world_size) for name, run in RUNS.items()
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
    return tmp_path_factory.mktemp("fsdp_checkpoints")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, checkpoints: Path) -> dict[int, list[dict]]:
    """Per world size, each rank's results (2 ranks first: they write the checkpoints)."""
    results = {}
    for world_size in WORLD_SIZES:
        directory = tmp_path_factory.mktemp(f"fsdp_ranks{world_size}")
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


@pytest.fixture(scope="module")
def single() -> dict[str, dict]:
    """One process on the global batches, per run."""
    return {name: _train(run) for name, run in RUNS.items()}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("run", RUNS)
def test_fsdp2_ranks_take_the_one_process_steps(
    run: str, world_size: int, ranks: dict, single: dict
) -> None:
    per_rank = [results[("train", run)] for results in ranks[world_size]]
    for other in per_rank[1:]:
        for mine, theirs in zip(per_rank[0]["params"], other["params"], strict=True):
            assert torch.equal(mine, theirs)
        assert (other["skipped"], other["steps"]) == (per_rank[0]["skipped"], per_rank[0]["steps"])
    expected_skips = 0 if RUNS[run].nan_at is None else 1
    assert per_rank[0]["skipped"] == single[run]["skipped"] == expected_skips
    rounded = RUNS[run].dtype is not None
    tolerance = dict(rtol=1e-2, atol=1e-3) if rounded else dict(rtol=1e-4, atol=1e-5)
    for sharded, one in zip(per_rank[0]["params"], single[run]["params"], strict=True):
        torch.testing.assert_close(sharded, one, **tolerance)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("run", [name for name in RUNS if name in OPTIMIZERS])
def test_fsdp2_state_lives_only_on_the_owning_rank(
    run: str, world_size: int, ranks: dict, single: dict
) -> None:
    held = [results[("train", run)]["owners"] for results in ranks[world_size]]
    for index, has_state in enumerate(single[run]["owners"]):
        holders = [rank for rank in range(world_size) if held[rank][index]]
        assert holders == ([holders[0]] if has_state else []), (index, holders)
    assert all(sum(rank_held) < sum(single[run]["owners"]) for rank_held in held)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("resumed_on", (1, *WORLD_SIZES))
@pytest.mark.parametrize("name", CHECKPOINTED)
def test_fsdp2_checkpoint_of_two_ranks_resumes_on_one_two_and_three(
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
        # the gradient reduce-scatter over another number of ranks rounds differently
        torch.testing.assert_close(restored, kept, rtol=1e-4, atol=1e-5)
