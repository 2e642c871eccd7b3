"""``torch.distributed.checkpoint`` saves and restores every kronlab optimizer in one process.

The standard flow: ``get_state_dict`` (which, for a fresh optimizer, builds its state with one
zero-learning-rate step on zero gradients), ``dcp.save`` / ``dcp.load`` into that template,
``set_state_dict``; training then continues exactly as without the interruption.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from kronlab.optim import KronOptimizer, create_optimizer

from ..optim.state_checks import KRON_OPTIMIZERS


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 4, generator=generator)).square().mean().backward()
        optimizer.step()


def _resumed(name: str, directory) -> tuple[nn.Module, KronOptimizer]:
    model = _model(seed=7)  # other weights: the checkpoint must bring them
    optimizer = create_optimizer(name, model)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optimizer_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    return model, optimizer


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore:SIRFShampoo saw no training-mode forward")
@pytest.mark.parametrize("name", KRON_OPTIMIZERS)
def test_resume_from_dcp_continues_the_trajectory(name: str, tmp_path) -> None:
    model = _model()
    optimizer = create_optimizer(name, model)
    _train(model, optimizer, 3, seed=1)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    assert all(isinstance(key, str) for key in optimizer_state["state"])  # keyed by name
    dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=tmp_path)
    resumed_model, resumed = _resumed(name, tmp_path)
    assert resumed.global_step == optimizer.global_step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _train(model, optimizer, 3, seed=2)
        _train(resumed_model, resumed, 3, seed=2)
    for kept, restored in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(kept, restored)


def _layout(optimizer: KronOptimizer) -> dict[tuple, object]:
    """Every state entry's path with its shape and dtype (tensors) or type (other values)."""
    found: dict[tuple, object] = {}

    def walk(value: object, path: tuple) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*path, key))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, (*path, index))
        elif isinstance(value, torch.Tensor):
            found[path] = (tuple(value.shape), value.dtype)
        else:
            found[path] = type(value)

    walk(optimizer.state_dict(), ())  # the param groups too: the generators' states
    return found


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore:SIRFShampoo saw no training-mode forward")
@pytest.mark.parametrize("name", KRON_OPTIMIZERS)
def test_one_step_on_zero_gradients_creates_the_state_of_a_trained_optimizer(name: str) -> None:
    """The template DCP restores into: all the entries of training's state, shaped alike."""
    model = _model()
    trained = create_optimizer(name, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _train(model, trained, 3, seed=1)
    fresh = create_optimizer(name, model)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    fresh.step()
    assert _layout(fresh) == _layout(trained)


def test_old_state_dicts_with_the_global_entry_in_state_still_load() -> None:
    model = _model()
    optimizer = create_optimizer("muon", model)
    _train(model, optimizer, 2, seed=1)
    saved = optimizer.state_dict()
    old_form = {
        "state": {
            **{
                key: {k: v for k, v in value.items() if k != "kronlab_step"}
                for key, value in saved["state"].items()
            },
            "kronlab": saved["param_groups"][0]["kronlab"],
        },
        "param_groups": [
            {k: v for k, v in group.items() if k != "kronlab"} for group in saved["param_groups"]
        ],
    }
    loaded = create_optimizer("muon", model)
    loaded.load_state_dict(old_form)
    assert loaded.global_step == 2
    for key, value in saved["state"].items():
        for entry, tensor in value.items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(loaded.state_dict()["state"][key][entry], tensor)
