"""ModuleCurvature holds one KroneckerEigenbasis; Curvature damps through the Damping rule."""

from __future__ import annotations

import pytest
import torch

from kronlab.attribution import Curvature, ModuleCurvature
from kronlab.curvature import LayerSpec
from kronlab.factors import Damping, KroneckerEigenbasis

SPEC = LayerSpec("linear", 3, 4, False)


def _module() -> ModuleCurvature:
    generator = torch.Generator().manual_seed(0)
    vectors = [
        torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=generator)).Q
        for d in (3, 4)
    ]
    values = [torch.rand(d, dtype=torch.float64, generator=generator) + 0.1 for d in (3, 4)]
    return ModuleCurvature(SPEC, *vectors, *values)


def test_keyword_tensors_and_eigenbasis_are_one_object():
    module = _module()
    assert isinstance(module.eigenbasis, KroneckerEigenbasis)
    assert module.output_eigenvectors is module.eigenbasis.eigenvectors[0]
    torch.testing.assert_close(
        module.eigenvalues(), torch.outer(module.output_eigenvalues, module.input_eigenvalues)
    )
    corrected = torch.rand(3, 4, dtype=torch.float64)
    module.corrected_eigenvalues = corrected  # EK-FAC's correction, measured after the fit
    assert module.eigenbasis.corrected is corrected and module.eigenvalues() is corrected
    same = ModuleCurvature(SPEC, eigenbasis=module.eigenbasis)
    assert same.tensors().keys() == module.tensors().keys()


def test_factor_eigenvalues_for_one_side_only_are_refused():
    with pytest.raises(ValueError, match="factor eigenvalues for one side only"):
        ModuleCurvature(SPEC, output_eigenvalues=torch.ones(3))


def test_inverse_hvp_is_the_eigenbasis_damped_inverse():
    module = _module()
    curvature = Curvature("kfac", {"m": module})
    grads = torch.randn(2, 3, 4, dtype=torch.float64)
    # (H + λI)⁻¹ G from the dense Kronecker product, λ = 0.3 · mean eigenvalue
    rotation = torch.kron(module.output_eigenvectors, module.input_eigenvectors)
    hessian = rotation @ torch.diag(module.eigenvalues().flatten()) @ rotation.T
    damped = hessian + 0.3 * module.eigenvalues().mean() * torch.eye(12, dtype=torch.float64)
    expected = (grads.reshape(2, 12) @ torch.linalg.inv(damped).T).reshape(2, 3, 4)
    result = curvature.inverse_hvp({"m": grads}, damping_factor=0.3)["m"]
    torch.testing.assert_close(result, expected)
    rule = Damping("relative_to_mean", 0.3)
    torch.testing.assert_close(module.eigenbasis.damped_inverse(grads, rule), expected)
    assert curvature.damping("m", damping_factor=0.3) == pytest.approx(
        0.3 * float(module.eigenvalues().mean())
    )
