"""FSDP2 (DTensor) parameters in one gloo process: the layouts the full-tensor step accepts,
the refusals, and the shard arithmetic it relies on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from kronlab.distributed.fsdp import ShardLayout
from kronlab.optim import SOAP, Muon, Shampoo


@pytest.fixture
def one_rank(tmp_path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _train(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        optimizer.zero_grad()
        model(torch.randn(6, 5, generator=generator)).square().mean().backward()
        optimizer.step()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


@pytest.mark.parametrize("cls", (Shampoo, SOAP))
def test_one_rank_fully_sharded_steps_equal_the_plain_ones(cls: type, one_rank: None) -> None:
    plain = _model()
    _train(plain, cls(plain.parameters(), lr=0.01, precondition_frequency=2))
    sharded = fully_shard(_model())
    optimizer = cls(sharded.parameters(), lr=0.01, precondition_frequency=2)
    assert optimizer.distributed is not None  # implied by the DTensor parameters
    _train(sharded, optimizer)
    for one, other in zip(plain.parameters(), sharded.parameters(), strict=True):
        assert torch.equal(one.detach(), other.full_tensor())


def test_dtensor_parameters_refuse_the_masked_check(one_rank: None) -> None:
    model = fully_shard(_model())
    with pytest.raises(ValueError, match="Invalid on_nonfinite_grad: 'mask' with DTensor"):
        Shampoo(model.parameters(), on_nonfinite_grad="mask")


def test_a_two_dimensional_mesh_is_refused_naming_the_parameter(one_rank: None) -> None:
    mesh = init_device_mesh("cpu", (1, 1))
    weight = nn.Parameter(distribute_tensor(torch.randn(3, 4), mesh, [Shard(0), Shard(1)]))
    with pytest.raises(TypeError, match="Invalid parameter group0.param0: a DTensor .* 2-D mesh"):
        Muon([weight])


def test_shard_layout_follows_torch_chunk() -> None:
    """Rank ``r`` holds chunk ``r`` of ``torch.chunk`` (empty when the chunks run out)."""
    full = torch.arange(2 * 5.0).reshape(2, 5)
    for size, world_size in ((5, 3), (2, 3), (5, 2), (1, 4)):
        tensor = full[:, :size]
        pieces = [Shard.local_shard_size_and_offset(size, world_size, r) for r in range(world_size)]
        layout = ShardLayout(
            tensor.shape, 1, tuple(s for s, _ in pieces), tuple(o for _, o in pieces)
        )
        chunks = list(torch.chunk(tensor, world_size, dim=1))
        chunks += [tensor[:, :0]] * (world_size - len(chunks))
        for rank, chunk in enumerate(chunks):
            assert torch.equal(layout.piece(tensor, rank), chunk)
            assert layout.numel(rank) == chunk.numel()
