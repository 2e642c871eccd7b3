import torch

from kronlab.linalg.finite import all_finite, finite_matrices


def test_finite_matrices_flags_exactly_the_non_finite_matrices():
    matrices = torch.randn(5, 3, 4)
    matrices[1, 0, 2] = float("nan")
    matrices[3, 2, 1] = float("inf")
    matrices[4] = 3e38  # finite entries whose sum overflows: still finite
    assert finite_matrices(matrices).tolist() == [True, False, True, False, True]
    assert finite_matrices(torch.ones(2, 2)).item()


def test_all_finite_any_dtype_and_overflowing_sums():
    assert all_finite([torch.randn(3, 3), torch.empty(0), torch.full((4,), 6e4).half()])
    for bad in (float("nan"), float("inf"), -float("inf")):
        tensors = [torch.randn(3), torch.randn(2, 2).bfloat16()]
        tensors[1][1, 0] = bad
        assert not all_finite(tensors)
    assert all_finite([])
