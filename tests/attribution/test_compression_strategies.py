"""Compression modes as strategies: their maps against float64 definitions, and a new mode
that is one class plus its registration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kronlab.attribution import fit_curvature
from kronlab.attribution.compression import (
    COMPRESSION_STRATEGIES,
    CompressionStrategy,
    compression_strategy,
    module_projections,
    register_compression,
)
from kronlab.attribution.config import AttributionConfig

from .pipeline_fixtures import tiny_task
from .test_pipeline import make_run


def _damped_power(values: torch.Tensor, vectors: torch.Tensor, factor: float, power: float):
    """``(F + δI)^power`` with ``δ = factor · mean(λ)``, in float64 from the eigenpairs."""
    values, vectors = values.double().clamp_min(0), vectors.double()
    damped = values + factor * values.mean()
    return vectors @ torch.diag(damped.pow(power)) @ vectors.T


@pytest.fixture(scope="module")
def kfac_curvature():
    task = tiny_task()
    batches = [tuple(task.train.tensors)]
    return fit_curvature(task.model, batches, task.loss_fn, "kfac", fisher="empirical")


@pytest.mark.parametrize(("name", "power"), [("folded", -0.5), ("whitened", 0.5)])
def test_factor_maps_are_projected_damped_factor_powers(kfac_curvature, name, power):
    shapes = {n: (m.spec.d_out, m.spec.d_in) for n, m in kfac_curvature.modules.items()}
    projections = module_projections(shapes, 5)
    strategy = compression_strategy(name)
    store = strategy.store_maps(projections, kfac_curvature, 0.3)
    query = strategy.query_maps(projections, kfac_curvature, 0.3)
    for module_name, module in kfac_curvature.modules.items():
        sides = (
            (module.output_eigenvalues, module.output_eigenvectors),
            (module.input_eigenvalues, module.input_eigenvectors),
        )
        for side, (values, vectors) in enumerate(sides):
            projection = projections[module_name][side].double()
            expected_store = projection @ _damped_power(values, vectors, 0.3, -0.5)
            expected_query = projection @ _damped_power(values, vectors, 0.3, power)
            torch.testing.assert_close(store[module_name][side].double(), expected_store)
            torch.testing.assert_close(query[module_name][side].double(), expected_query)


def test_modes_declare_what_they_need():
    declared = {
        name: (strategy.store_needs_curvature, strategy.query_inverse)
        for name, strategy in COMPRESSION_STRATEGIES.items()
    }
    assert declared == {
        "project": (False, True),
        "folded": (True, False),
        "whitened": (True, True),
    }
    with pytest.raises(ValueError, match=r"Invalid compression: 'zip' \(allowed: 'project'"):
        compression_strategy("zip")


def test_a_new_mode_is_one_class_and_its_registration(tmp_path):
    # Negating P_S on both sides leaves every score unchanged: the new mode must reproduce
    # the project mode's scores through the pipeline, with no change to the pipeline.
    @register_compression
    class NegatedCompression(CompressionStrategy):
        name = "negated"

        def store_maps(self, projections, curvature, damping):
            return {n: (-left, right) for n, (left, right) in projections.items()}

        def query_maps(self, projections, curvature, damping):
            return self.store_maps(projections, curvature, damping)

    try:
        assert AttributionConfig(compression="negated").compression == "negated"
        negated = make_run(tmp_path / "n", compression="negated", projection_dim=4).run()
        project = make_run(tmp_path / "p", compression="project", projection_dim=4).run()
        np.testing.assert_allclose(negated, project, rtol=1e-6, atol=1e-6 * np.abs(project).max())
    finally:
        del COMPRESSION_STRATEGIES["negated"]
