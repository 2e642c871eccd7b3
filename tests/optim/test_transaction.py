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


def _stacked_state() -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Per-block views of two stacks, as the Shampoo family keeps its state: one row-major,
    one column-major (eigenvectors from LAPACK), plus a counter."""
    rows = torch.randn(3, 4, 4, dtype=torch.float64)
    columns = torch.randn(3, 4, 4, dtype=torch.float64).mT  # a view of a contiguous buffer
    blocks = [{"step": 1, "factor": rows[i], "basis": columns[i]} for i in range(3)]
    return {"p": {"blocks": blocks}}, rows, columns


def test_rollback_of_views_restores_every_value_and_layout_exactly() -> None:
    state, rows, columns = _stacked_state()
    blocks = state["p"]["blocks"]
    strides = [(b["factor"].stride(), b["basis"].stride()) for b in blocks]
    transaction = StepTransaction()
    for _ in range(2):  # the second step reuses the layout found by the first
        transaction.begin(state, [])
        rows.mul_(3.0)
        blocks[1]["basis"].add_(1.0)
        blocks[0]["step"] = 2
        assert transaction.commit_if_finite(state, [], []) == (True, True)
        before = [
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            for b in blocks
        ]
    transaction.begin(state, [])
    rows.mul_(2.0)
    columns[2].fill_(math.nan)
    blocks[0]["step"] = 3
    assert transaction.commit_if_finite(state, [], []) == (True, False)
    transaction.rollback(state)
    restored = state["p"]["blocks"]
    for block, expected, (factor_stride, basis_stride) in zip(restored, before, strides):
        assert block["step"] == expected["step"]
        for key in ("factor", "basis"):
            assert block[key].dtype == expected[key].dtype
            assert torch.equal(block[key], expected[key])  # bit-exact: float64, no NaN
        assert block["factor"].stride() == factor_stride
        assert block["basis"].stride() == basis_stride
    # the restored views share one buffer per stack, as the views they replace did
    for key in ("factor", "basis"):
        bases = {id(block[key]._base) for block in restored}
        assert len(bases) == 1 and None not in {block[key]._base for block in restored}
        assert restored[0][key]._base is not (rows if key == "factor" else columns._base)


def test_a_non_finite_entry_of_a_view_tiled_buffer_refuses_the_step() -> None:
    state, rows, _ = _stacked_state()
    transaction = StepTransaction()
    transaction.begin(state, [])
    assert transaction.commit_if_finite(state, [], []) == (True, True)
    transaction.begin(state, [])  # the same objects: the layout of the last step
    state["p"]["blocks"][2]["factor"][3, 3] = math.inf
    assert transaction.commit_if_finite(state, [], []) == (True, False)
    transaction.rollback(state)
    assert torch.isfinite(state["p"]["blocks"][2]["factor"]).all()


def test_views_that_do_not_tile_their_buffer_are_copied_one_by_one() -> None:
    buffer = torch.randn(4, 3, dtype=torch.float64)
    state = {"p": {"a": buffer[0], "b": buffer[2]}}  # rows 1 and 3 are not state
    expected = (buffer[0].clone(), buffer[2].clone())
    transaction = StepTransaction()
    transaction.begin(state, [])
    buffer[1].fill_(math.nan)  # outside the state: neither tested nor restored
    buffer[0].mul_(2.0)
    assert transaction.commit_if_finite(state, [], []) == (True, True)
    transaction.begin(state, [])
    buffer[2].fill_(math.inf)
    assert transaction.commit_if_finite(state, [], []) == (True, False)
    transaction.rollback(state)
    assert torch.equal(state["p"]["a"], expected[0] * 2.0)
    assert torch.equal(state["p"]["b"], expected[1])
