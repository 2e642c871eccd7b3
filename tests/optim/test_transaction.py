"""StepTransaction: copies taken before a step, checked after it, put back on failure."""

from __future__ import annotations

import math

import torch

from kronlab.optim.transaction import StepTransaction


def test_rollback_restores_written_replaced_and_added_state_exactly() -> None:
    kept, written = torch.randn(3, 3), torch.randn(4)
    param = torch.randn(2, 2)
    state = {"kronlab": {"step": 1, "stacks": [{"kept": kept, "written": written}]}}
    before = (kept.clone(), written.clone(), param.clone())
    transaction = StepTransaction()
    transaction.begin(state, [param])
    state["kronlab"]["step"] = 2
    state["kronlab"]["stacks"][0]["written"].mul_(2)
    state["kronlab"]["stacks"][0]["kept"] = torch.zeros(3, 3)  # replaced
    state["new"] = {"momentum": torch.ones(2)}  # created by the step
    param.add_(math.inf)
    assert transaction.commit_if_finite(state, [param], [torch.ones(2)]) == (True, False)
    transaction.rollback(state)
    assert set(state) == {"kronlab"} and state["kronlab"]["step"] == 1
    stack = state["kronlab"]["stacks"][0]
    assert torch.equal(stack["kept"], before[0]) and torch.equal(stack["written"], before[1])
    assert torch.equal(param, before[2])


def test_a_copy_reused_from_an_earlier_step_is_still_exact() -> None:
    factor = torch.randn(5, 5)
    state = {"p": {"factor": factor}}
    transaction = StepTransaction()
    transaction.begin(state, [])
    factor.add_(1.0)  # step 1 writes the factor in place
    assert transaction.commit_if_finite(state, [], []) == (True, True)
    transaction.begin(state, [])  # copied again: step 1 wrote it
    assert transaction.commit_if_finite(state, [], []) == (True, True)  # step 2 leaves it
    expected = factor.clone()
    transaction.begin(state, [])  # reuses step 2's copy: unchanged since
    factor.mul_(math.inf)
    assert transaction.commit_if_finite(state, [], []) == (True, False)
    transaction.rollback(state)
    assert torch.equal(state["p"]["factor"], expected)


def test_non_finite_gradient_is_reported_as_such() -> None:
    state = {"p": {"momentum": torch.zeros(3)}}
    transaction = StepTransaction()
    transaction.begin(state, [])
    state["p"]["momentum"].add_(math.nan)
    assert transaction.commit_if_finite(state, [], [torch.tensor([math.nan])]) == (False, False)
