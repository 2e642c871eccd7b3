"""The ``distributed=`` option: refused values, and one process runs undistributed."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kronlab.distributed import DistributedConfig
from kronlab.optim import PSGD, SOAP, KLShampoo, Muon, Shampoo, SIRFShampoo, Spectron

CLASSES = [Shampoo, SOAP, KLShampoo, PSGD, Muon, Spectron]


def _build(cls: type, model: nn.Module, **options):
    if cls is Spectron:
        options["rank"] = 2
    return cls(model.parameters(), **options)


@pytest.mark.parametrize("cls", CLASSES + [SIRFShampoo], ids=lambda cls: cls.__name__)
def test_every_matrix_optimizer_takes_the_option(cls: type) -> None:
    model = nn.Linear(4, 3)
    config = DistributedConfig()
    optimizer = (
        cls(model, distributed=config)
        if cls is SIRFShampoo
        else _build(cls, model, distributed=config)
    )
    assert optimizer.distributed is config
    assert optimizer.sharding() is None  # no process group: one process, undistributed


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_bad_values_are_refused_naming_the_argument(cls: type) -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="Invalid distributed: 'yes'"):
        _build(cls, model, distributed="yes")
    with pytest.raises(ValueError, match="Invalid on_nonfinite_grad: 'mask' with distributed="):
        _build(cls, model, distributed=DistributedConfig(), on_nonfinite_grad="mask")


def test_without_a_process_group_the_steps_are_the_plain_ones() -> None:
    def run(config: DistributedConfig | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        optimizer = Muon(model.parameters(), lr=0.02, distributed=config)
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).square().mean().backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    for plain, configured in zip(run(None), run(DistributedConfig()), strict=True):
        assert torch.equal(plain, configured)


def test_dtensor_parameters_are_refused_naming_them(tmp_path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = nn.Parameter(distribute_tensor(torch.randn(3, 4), mesh, [Replicate()]))
        with pytest.raises(TypeError, match="Invalid parameter group0.param0: a DTensor"):
            Muon([weight], distributed=DistributedConfig())
    finally:
        dist.destroy_process_group()
