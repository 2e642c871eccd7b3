"""``kronlab compare`` plot: every optimizer's curve is told apart by colour and line style."""

from __future__ import annotations

from kronlab.compare import line_styles
from kronlab.optim import available_optimizers


def test_every_registered_optimizer_gets_its_own_colour_and_line_style() -> None:
    count = len(available_optimizers())
    assert count > 10  # more curves than colours: line styles must tell them apart
    pairs = [(style["color"], style["linestyle"]) for style in line_styles(count)]
    assert len(set(pairs)) == count
    assert len(set(line_styles(40)[i]["color"] for i in range(10))) == 10
