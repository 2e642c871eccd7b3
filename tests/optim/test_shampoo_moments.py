"""The first-order pieces of the Shampoo step against float64 formulas written here."""

from __future__ import annotations

import torch

from kronlab.optim.shampoo.moments import adam_quotient_


def test_adam_quotient_with_the_bias_correction_as_a_scale():
    # √bc₂ · out must be Adam's m / (√(v/bc₂) + ε), the quotient written into ``out``.
    generator = torch.Generator().manual_seed(4)
    numerator = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    second_moment = torch.rand(2, 3, 4, generator=generator, dtype=torch.float64) * 1e-3
    correction, epsilon = 1 - 0.95**3, 1e-4
    out = torch.empty_like(numerator)
    scale = adam_quotient_(out, numerator, second_moment, correction, epsilon)
    expected = numerator / ((second_moment / correction).sqrt() + epsilon)
    torch.testing.assert_close(scale * out, expected, rtol=1e-12, atol=0)
