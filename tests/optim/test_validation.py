import math

import numpy as np
import pytest
from torch import nn

from kronlab.optim import PSGD, Muon, Shampoo, SIRFShampoo, Spectron
from kronlab.optim.validation import check_betas, check_choice, check_range


def test_check_range_accepts_and_rejects():
    check_range("lr", 0.0, 0.0)
    check_range("frequency", 3, 1, integer=True)
    check_range("steps", math.inf, 1, integer=True, or_infinity=True)
    with pytest.raises(ValueError, match=r"Invalid lr: -1 \(allowed: a finite number, 0 <= lr\)"):
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


def test_integer_arguments_must_be_real_integers():
    check_range("frequency", 3, 1, integer=True)
    check_range("frequency", np.int64(3), 1, integer=True)
    check_range("start", math.inf, 1, integer=True, or_infinity=True)
    for bad in (4.0, math.inf, True, 2.5):
        with pytest.raises(ValueError, match=r"Invalid frequency: .* \(allowed: an integer, 1 <="):
            check_range("frequency", bad, 1, integer=True)
    with pytest.raises(ValueError, match=r"allowed: an integer or inf, 1 <= start"):
        check_range("start", 5.0, 1, integer=True, or_infinity=True)


def _linear() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


def test_infinite_numbers_are_refused_unless_allowed():
    check_range("max_skew_dense", math.inf, 0.0, or_infinity=True)
    for bad in (math.inf, -math.inf):
        with pytest.raises(ValueError, match=r"allowed: a finite number, 0.0 <= lr"):
            check_range("lr", bad, 0.0)


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda m, **kw: Shampoo(m.parameters(), **kw), "lr"),
        (lambda m, **kw: Shampoo(m.parameters(), **kw), "eps"),
        (lambda m, **kw: Shampoo(m.parameters(), **kw), "weight_decay"),
        (lambda m, **kw: PSGD(m.parameters(), **kw), "lr"),
        (lambda m, **kw: PSGD(m.parameters(), **kw), "noise_scale"),
        (lambda m, **kw: Muon(model=m, **kw), "adamw_eps"),
        (lambda m, **kw: SIRFShampoo(m, **kw), "lam"),
        (lambda m, **kw: SIRFShampoo(m, **kw), "weight_decay"),
        (lambda m, **kw: Spectron(model=m, rank_fraction=0.5, **kw), "weight_decay"),
    ],
)
def test_infinite_hyperparameters_are_refused_at_construction(build, name):
    with pytest.raises(ValueError, match=rf"Invalid {name}: inf \(allowed: a finite number"):
        build(_linear(), **{name: math.inf})
