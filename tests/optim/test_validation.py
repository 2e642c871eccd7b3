import math

import pytest

from kronlab.optim.validation import check_betas, check_choice, check_range


def test_check_range_accepts_and_rejects():
    check_range("lr", 0.0, 0.0)
    check_range("frequency", 3, 1, integer=True)
    check_range("steps", math.inf, 1, integer=True)
    with pytest.raises(ValueError, match=r"Invalid lr: -1 \(allowed: a number, 0 <= lr\)"):
        check_range("lr", -1, 0)
    with pytest.raises(ValueError, match=r"0 < epsilon"):
        check_range("epsilon", 0.0, 0.0, low_inclusive=False)
    with pytest.raises(ValueError, match="an integer"):
        check_range("frequency", 2.5, 1, integer=True)
    for bad in (float("nan"), "0.1", None, True):
        with pytest.raises(ValueError, match="Invalid x"):
            check_range("x", bad, 0)


def test_check_betas_and_choice():
    check_betas("betas", (0.9, 1.0))
    with pytest.raises(ValueError, match=r"Invalid betas\[1\]: 1.5"):
        check_betas("betas", (0.9, 1.5))
    with pytest.raises(ValueError, match="a tuple of 2 numbers"):
        check_betas("betas", 0.9)
    with pytest.raises(ValueError, match=r"Invalid betas\[0\]: 1.0"):
        check_betas("betas", (1.0, 0.5), high_inclusive=False)
    check_choice("grafting", "adam", ("adam", "sgd"))
    with pytest.raises(ValueError, match=r"Invalid grafting: 'lion' \(allowed: 'adam', 'sgd'\)"):
        check_choice("grafting", "lion", ("adam", "sgd"))
