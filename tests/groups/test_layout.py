import pytest
import torch

from kronlab.groups import drop_unit_dims, merge_small_dims, most_square_shape, plan_layout


def test_drop_unit_dims():
    assert drop_unit_dims((1, 5, 1, 3)) == (5, 3)
    assert drop_unit_dims((1, 1)) == ()
    assert drop_unit_dims(()) == ()


def test_merge_small_dims():
    assert merge_small_dims((2, 3, 4, 100), 24) == (24, 100)
    assert merge_small_dims((64, 3, 3), 16) == (64, 9)
    assert merge_small_dims((5, 5), 4) == (5, 5)


def test_most_square_shape():
    assert most_square_shape((32, 64, 1024)) == (2048, 1024)
    assert most_square_shape((3, 4)) == (3, 4)
    assert most_square_shape((2, 2, 2, 2)) == (4, 4)


def test_blocks_split_and_merge_round_trip():
    layout = plan_layout((10, 7), max_preconditioner_dim=4)
    assert layout.splits == ((4, 4, 2), (4, 3))
    assert layout.num_blocks == 6
    assert layout.block_shapes == [(4, 4), (4, 3), (4, 4), (4, 3), (2, 4), (2, 3)]
    tensor = torch.randn(10, 7)
    blocks = layout.split(tensor)
    assert [tuple(b.shape) for b in blocks] == layout.block_shapes
    assert torch.equal(blocks[3], tensor[4:8, 4:7])
    assert torch.equal(layout.merge(blocks), tensor)


def test_conv_weight_is_squeezed_merged_and_blocked():
    layout = plan_layout((64, 1, 3, 3), max_preconditioner_dim=32)
    assert layout.shape == (64, 9)
    assert layout.splits == ((32, 32), (9,))
    tensor = torch.randn(64, 1, 3, 3)
    assert torch.equal(layout.merge(layout.split(tensor)), tensor)


def test_no_limit_means_no_merging_or_blocking():
    layout = plan_layout((3, 1, 5, 7))
    assert layout.shape == (3, 5, 7) and layout.num_blocks == 1


def test_most_square_layout_and_scalar():
    assert plan_layout((32, 64, 1024), most_square=True).shape == (2048, 1024)
    scalar = plan_layout(())
    assert scalar.shape == () and scalar.num_blocks == 1
    value = torch.tensor(3.0)
    assert torch.equal(scalar.merge(scalar.split(value)), value)


def test_bad_max_dim():
    with pytest.raises(ValueError, match="max_preconditioner_dim must be >= 1"):
        plan_layout((3, 3), max_preconditioner_dim=0)
