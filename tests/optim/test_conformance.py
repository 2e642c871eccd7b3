"""Every registered optimizer honours torch.optim's contract, through the public API only.

Parametrized over :func:`kronlab.optim.available_optimizers`, so a newly registered optimizer
(or registered variant) is covered without edits here. Each test builds the optimizer the way
the registry does (``create_optimizer(name, model)``) and uses only the constructor, ``step``,
``zero_grad``, ``add_param_group``, ``param_groups``, ``state_dict`` and ``load_state_dict``:

* a ``state_dict`` round trip (live, or through ``torch.save`` / ``torch.load(weights_only=True)``)
  is bit-exact, and the resumed run equals the uninterrupted one;
* a non-finite gradient is skipped: parameters and state stay bit-identical, and the run goes on
  as if that step had never been asked for;
* bfloat16 parameters stay bfloat16 and finite; kronlab keeps its state in float32 unless the
  optimizer has a documented state dtype (PSGD's ``dtype``);
* ``StepLR`` and ``LambdaLR`` change the step as they do torch.optim's (the step is the group's
  current lr times the direction);
* several param groups each take their own lr, also when their parameters share shapes;
* ``add_param_group`` mid-run: the new parameters are stepped, the old ones go on unchanged, and
  a checkpoint with the later group resumes exactly;
* ``step(closure)`` calls the closure once and returns its loss;
* every numeric or choice hyperparameter in the constructor's signature refuses a bad value with
  a ``ValueError`` naming the argument, the value and what is allowed (the bad values are derived
  from the signature: its defaults and annotations).

torch's own optimizers (registered as references) run the tests whose contract is torch.optim's;
the non-finite skip, the float32 state, live-state isolation and the error messages are
kronlab's guarantees and run on kronlab's optimizers only.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

from kronlab.optim import KronOptimizer, available_optimizers, create_optimizer

from .state_checks import assert_identical, cloned, same_parameters, through_torch_save

ALL = available_optimizers()
KRONLAB = [
    name for name in ALL if isinstance(create_optimizer(name, nn.Linear(2, 2)), KronOptimizer)
]

pytestmark = pytest.mark.filterwarnings(
    # SIRFShampoo built for part of a model warns that this part saw no forward pass.
    "ignore:SIRFShampoo saw no training-mode forward"
)


class TwoBranches(nn.Module):
    """Two branches of the same shapes with separate losses: a branch's gradients do not depend
    on the other branch, so adding the second to a running optimizer must not change the first's
    trajectory, and same-shape parameters of two param groups may share the optimizer's stacks."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        self.second = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        self.to(dtype)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.first(inputs).square().mean() + self.second(inputs).square().mean()


def batches(seed: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """A fixed batch sequence from its own generator (the global RNG stays free)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(8, 5, generator=generator).to(dtype)


def dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def backward(model: nn.Module, inputs: torch.Tensor) -> None:
    model.zero_grad()
    model(inputs).float().backward()


def train(model: nn.Module, optimizer: Any, steps: int, seed: int) -> None:
    data = batches(seed, dtype_of(model))
    for _ in range(steps):
        backward(model, next(data))
        optimizer.step()


def copy_of(model: TwoBranches) -> TwoBranches:
    twin = TwoBranches(dtype_of(model))
    twin.load_state_dict(model.state_dict())
    return twin


def values(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def without(state: Any, key: str) -> Any:
    """``state`` with every entry named ``key`` dropped, at any depth."""
    if isinstance(state, dict):
        return {k: without(v, key) for k, v in state.items() if k != key}
    if isinstance(state, (list, tuple)):
        return type(state)(without(item, key) for item in state)
    return state


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


# --- state_dict round trip ---------------------------------------------------------------------
# Steps before and after a checkpoint: the resumed run crosses a preconditioner refresh (the
# registered Shampoo family refreshes every 10 steps, from step 1).
BEFORE, AFTER = 4, 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ALL)
def test_round_trip_through_torch_save_is_bit_exact_and_resumes_exactly(
    name: str, dtype: torch.dtype
) -> None:
    """Also for bfloat16 parameters: loading must not cast the state to the parameters' dtype."""
    model = TwoBranches(dtype)
    optimizer = create_optimizer(name, model)
    train(model, optimizer, BEFORE, seed=1)
    resumed_model = copy_of(model)
    resumed = create_optimizer(name, resumed_model)
    resumed.load_state_dict(through_torch_save(optimizer.state_dict()))
    assert_identical(cloned(optimizer.state_dict()), resumed.state_dict())
    torch.manual_seed(12345)  # resuming needs no global random state
    train(model, optimizer, AFTER, seed=2)
    train(resumed_model, resumed, AFTER, seed=2)
    assert same_parameters(model, resumed_model)
    assert_identical(cloned(optimizer.state_dict()), resumed.state_dict())


@pytest.mark.parametrize("name", KRONLAB)
def test_a_live_state_dict_loads_a_copy_and_both_runs_go_on_alike(name: str) -> None:
    """torch's ``state_dict`` is live (not copied): the loaded optimizer must share no tensor
    with the saving one, or the steps of one would move the other."""
    model = TwoBranches()
    optimizer = create_optimizer(name, model)
    train(model, optimizer, BEFORE, seed=1)
    resumed_model = copy_of(model)
    resumed = create_optimizer(name, resumed_model)
    resumed.load_state_dict(optimizer.state_dict())
    train(model, optimizer, AFTER, seed=2)  # the saver first: a shared tensor would move here
    train(resumed_model, resumed, AFTER, seed=2)
    assert same_parameters(model, resumed_model)
    assert_identical(cloned(optimizer.state_dict()), resumed.state_dict())


# --- non-finite gradients ----------------------------------------------------------------------
# Skipped steps that leave a trace on today's optimizers (defects, left to their owners).


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize(
    "name",
    KRONLAB,
)
def test_non_finite_gradient_is_skipped_untouched_and_leaves_no_trace(
    name: str, bad: float
) -> None:
    model, reference_model = TwoBranches(), TwoBranches()
    optimizer = create_optimizer(name, model)
    reference = create_optimizer(name, reference_model)
    data = batches(1, torch.float32)
    for _ in range(2):
        inputs = next(data)
        for net, opt in ((model, optimizer), (reference_model, reference)):
            backward(net, inputs)
            opt.step()
    before, state = values(model), cloned(optimizer.state_dict())
    skipped = optimizer.skipped_steps
    backward(model, next(data))
    model.second[2].weight.grad[1, 2] = bad
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        optimizer.step()
    assert optimizer.skipped_steps == skipped + 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the skipped-step counter is the one thing a skipped step writes
    assert_identical(
        without(state, "skipped_steps"), without(optimizer.state_dict(), "skipped_steps")
    )
    for _ in range(2):  # the run goes on as if the bad step had never been asked for
        inputs = next(data)
        for net, opt in ((model, optimizer), (reference_model, reference)):
            backward(net, inputs)
            opt.step()
    assert same_parameters(model, reference_model)
    assert_identical(
        without(cloned(reference.state_dict()), "skipped_steps"),
        without(optimizer.state_dict(), "skipped_steps"),
    )


# --- bfloat16 parameters -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_bfloat16_parameters_stay_bfloat16_and_finite(name: str) -> None:
    model = TwoBranches(torch.bfloat16)
    before = values(model)
    optimizer = create_optimizer(name, model)
    train(model, optimizer, 3, seed=1)
    for old, param in zip(before, model.parameters()):
        assert param.dtype == torch.bfloat16 and torch.isfinite(param).all()
        assert not torch.equal(old, param)
    state = list(tensors_in(optimizer.state_dict()["state"]))
    assert all(torch.isfinite(t).all() for t in state if t.is_floating_point())
    if isinstance(optimizer, KronOptimizer):
        # float32 unless a param group names its state dtype (PSGD's documented ``dtype``)
        allowed = {torch.float32} | {
            group["dtype"]
            for group in optimizer.param_groups
            if isinstance(group.get("dtype"), torch.dtype)
        }
        assert {t.dtype for t in state if t.is_floating_point()} <= allowed


# --- learning rates: schedulers and param groups -----------------------------------------------
def change(before: list[torch.Tensor], model: nn.Module) -> list[torch.Tensor]:
    return [param.detach() - old for old, param in zip(before, model.parameters())]


def assert_scaled(expected: list[torch.Tensor], actual: list[torch.Tensor], factor: float) -> None:
    """``actual == factor · expected`` up to rounding: float64 parameters, but an optimizer may
    round its update at float32 precision (Muon's and Spectron's AdamW part does)."""
    for a, b in zip(expected, actual):
        torch.testing.assert_close(b, a * factor, rtol=1e-6, atol=1e-7)


# Methods whose parameter step is not proportional to lr (the lr still acts through the group).
NOT_PROPORTIONAL_TO_LR = {"spectron"}  # W = A Bᵀ with both factors stepped by ρ ∝ lr: a ρ² term

SCHEDULERS: dict[str, tuple[Callable[[Any], Any], float]] = {
    # (scheduler, the lr factor of the third step: the first two run at the base lr)
    "StepLR": (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5), 0.5),
    "LambdaLR": (
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch < 2 else 0.2),
        0.2,
    ),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("name", ALL)
def test_lr_schedulers_scale_the_step_as_for_torch_optim(name: str, scheduler: str) -> None:
    """Three runs from the same start: with the scheduler, at the base lr, and with each group's
    lr set by hand to the scheduled value before the third step (what torch.optim reads)."""
    make_scheduler, factor = SCHEDULERS[scheduler]
    runs = [TwoBranches(torch.float64) for _ in range(3)]
    optimizers = [create_optimizer(name, model) for model in runs]
    base = [group["lr"] for group in optimizers[0].param_groups]
    schedule = make_scheduler(optimizers[0])
    data = batches(1, torch.float64)
    for step in range(3):
        if step == 2:
            for group, lr in zip(optimizers[2].param_groups, base):
                group["lr"] = lr * factor
        inputs = next(data)
        moved = []
        for model, optimizer in zip(runs, optimizers):
            before = values(model)
            backward(model, inputs)
            optimizer.step()
            moved.append(change(before, model))
        schedule.step()
        if step < 2:  # the same lr so far: the same steps, bit for bit
            assert same_parameters(runs[0], runs[1]) and same_parameters(runs[0], runs[2])
    assert [group["lr"] for group in optimizers[0].param_groups] == pytest.approx(
        [lr * factor for lr in base]
    )
    assert same_parameters(runs[0], runs[2])
    if name in NOT_PROPORTIONAL_TO_LR:
        assert not same_parameters(runs[0], runs[1])
    else:
        assert_scaled(moved[1], moved[0], factor)


@pytest.mark.parametrize("name", ALL)
def test_param_groups_take_their_own_lr(name: str) -> None:
    """The second branch (the same shapes as the first) in its own group at half, or the same,
    lr: the first step differs by that factor there and not at all in the first branch."""
    moved = {}
    for factor in (1.0, 0.5):
        model = TwoBranches(torch.float64)
        optimizer = create_optimizer(name, model.first)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.add_param_group({"params": list(model.second.parameters()), "lr": lr * factor})
        before = values(model)
        train(model, optimizer, 1, seed=1)
        moved[factor] = change(before, model)
        assert optimizer.param_groups[-1]["lr"] == lr * factor
    split = len(list(TwoBranches().first.parameters()))
    for a, b in zip(moved[1.0][:split], moved[0.5][:split]):
        assert torch.equal(a, b)
    if name in NOT_PROPORTIONAL_TO_LR:
        assert not all(torch.equal(a, b) for a, b in zip(moved[1.0][split:], moved[0.5][split:]))
    else:
        assert_scaled(moved[1.0][split:], moved[0.5][split:], 0.5)


@pytest.mark.parametrize("name", ALL)
def test_param_group_added_mid_run_is_stepped_and_resumes(name: str) -> None:
    model, alone_model = TwoBranches(), TwoBranches()
    optimizer = create_optimizer(name, model.first)
    alone = create_optimizer(name, alone_model.first)  # never gets the second branch
    train(model, optimizer, 2, seed=1)
    train(alone_model, alone, 2, seed=1)
    optimizer.add_param_group({"params": list(model.second.parameters())})
    added = values(model.second)
    train(model, optimizer, 2, seed=2)
    train(alone_model, alone, 2, seed=2)
    assert all(not torch.equal(a, p) for a, p in zip(added, model.second.parameters()))
    assert same_parameters(model.first, alone_model.first)

    resumed_model = copy_of(model)
    resumed = create_optimizer(name, resumed_model.first)
    resumed.add_param_group({"params": list(resumed_model.second.parameters())})
    resumed.load_state_dict(through_torch_save(optimizer.state_dict()))
    train(model, optimizer, 2, seed=3)
    train(resumed_model, resumed, 2, seed=3)
    assert same_parameters(model, resumed_model)


# --- closure -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_closure_is_called_once_and_its_loss_returned(name: str) -> None:
    model, reference_model = TwoBranches(), TwoBranches()
    optimizer = create_optimizer(name, model)
    reference = create_optimizer(name, reference_model)
    inputs = next(batches(1, torch.float32))
    returned = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(inputs)
        loss.backward()
        returned.append(loss)
        return loss

    with torch.no_grad():  # as a training loop may: step(closure) enables grad for the closure
        loss = optimizer.step(closure)
    assert len(returned) == 1 and loss is returned[0]
    backward(reference_model, inputs)
    reference.step()
    assert same_parameters(model, reference_model)


# --- bad hyperparameters -----------------------------------------------------------------------
def build_with(name: str, model: nn.Module, **overrides: Any) -> Any:
    """The registry's construction of ``name`` for ``model``, with ``overrides`` replacing (or
    adding) constructor arguments: what the registry entry passes stays as it is otherwise."""
    cls = type(create_optimizer(name, nn.Linear(2, 2)))
    original = cls.__init__

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if type(self) is not cls:  # a subclass's super().__init__ call: as it is
            return original(self, *args, **kwargs)
        bound = inspect.signature(original).bind(self, *args, **kwargs)
        bound.arguments.update(overrides)
        return original(*bound.args, **bound.kwargs)

    with mock.patch.object(cls, "__init__", init):
        return create_optimizer(name, model)


def bad_values(parameter: inspect.Parameter) -> list[tuple[Any, str]]:
    """Values no hyperparameter of this kind allows, each with the text the error must show.

    Numbers: NaN and -inf (floats), 2.5, 2.0 and True (integers; inf too where annotated
    ``int``); pairs of floats (betas): NaN in
    either place; strings (a choice): a name that is no choice. Booleans, dtypes, callables and
    objects are left to the optimizers' own tests."""
    default, annotation = parameter.default, str(parameter.annotation)
    if isinstance(default, bool) or annotation == "bool":
        return []
    if (
        isinstance(default, tuple)
        and len(default) == 2
        and all(isinstance(x, float) for x in default)
    ):
        return [((math.nan, default[1]), "nan"), ((default[0], math.nan), "nan")]
    if isinstance(default, int) or (default is None and re.search(r"\bint\b", annotation)
                                    and "float" not in annotation):  # fmt: skip
        whole = [(2.5, "2.5"), (2.0, "2.0"), (True, "True")]
        # an integer-only annotation refuses infinity too (a float one may allow it as "never")
        return whole + ([] if "float" in annotation else [(math.inf, "inf")])
    if isinstance(default, float) or (default is None and "float" in annotation):
        return [(math.nan, "nan"), (-math.inf, "-inf")]
    if isinstance(default, str):
        return [("no-such-choice", "'no-such-choice'")]
    return []


# Former names kept for old code: their value is checked under the current name.
FORMER_NAMES = {"epsilon"}


def hyperparameter_cases() -> Iterator[Any]:
    for name in KRONLAB:
        cls = type(create_optimizer(name, nn.Linear(2, 2)))
        for argument, parameter in inspect.signature(cls.__init__).parameters.items():
            if argument in FORMER_NAMES:
                continue
            for value, shown in bad_values(parameter):
                yield pytest.param(name, argument, value, shown,
                                   id=f"{name}-{argument}={value!r}")  # fmt: skip


@pytest.mark.parametrize("name, argument, value, shown", list(hyperparameter_cases()))
def test_bad_hyperparameter_is_refused_naming_the_argument(
    name: str, argument: str, value: Any, shown: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the former name epsilon is deprecated
        with pytest.raises(ValueError) as error:
            build_with(name, TwoBranches(), **{argument: value})
    message = str(error.value)
    assert re.search(rf"\b{re.escape(argument)}\b", message), message
    assert shown in message, message
    assert "allowed" in message, message  # and the range or choices it allows
