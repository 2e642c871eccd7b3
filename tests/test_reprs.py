"""Public objects print a short summary (methods, modules, shapes, damping), never tensor values."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kronlab.attribution import fit_curvature
from kronlab.attribution.curvature import DEFAULT_DAMPING_FACTOR
from kronlab.attribution.sources import ExampleSet
from kronlab.attribution.store import GradientStore, ModuleBlock, StoreSettings
from kronlab.optim import SOAP


def summed_cross_entropy(model: nn.Module, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")


def test_curvature_repr_lists_modules_shapes_and_default_damping() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 3, bias=False))
    batch = (torch.randn(16, 30), torch.randint(0, 3, (16,)))
    curvature = fit_curvature(model, [batch], summed_cross_entropy, "ekfac", fisher="empirical")
    text = repr(curvature)
    assert "tensor(" not in text
    assert len(text.splitlines()) == 2 + len(curvature.modules)
    assert text.startswith("Curvature(method='ekfac', 2 modules, fisher='empirical'")
    first = curvature.modules["0"]
    damping = DEFAULT_DAMPING_FACTOR * first.eigenvalues().double().mean().item()
    assert (
        "'0': linear G 40x31 with bias; eigenbasis float32[40, 40] ⊗ float32[31, 31]; "
        f"eigenvalues corrected float32[40, 31]; default damping {damping:.3g}"
    ) in text
    assert "'2': linear G 3x40;" in text
    assert repr(first).startswith("ModuleCurvature(linear G 40x31 with bias;")


def test_data_optimizer_and_store_reprs_are_one_line_summaries(tmp_path) -> None:
    examples = ExampleSet((torch.randn(100, 8), torch.zeros(100, dtype=torch.long)), "vector")
    assert repr(examples) == "ExampleSet(100 vector examples: float32[100, 8], int64[100])"
    model = nn.Linear(8, 2)
    bundle = SOAP(None, model=model).bundles[0]
    assert repr(bundle) == (
        "ParameterBundle(['weight'], shapes [2x8] grouped as 2x8 by PerParameter(), param group 0)"
    )
    settings = StoreSettings(modules=(ModuleBlock("fc", (4, 4)),), projection_dim=4)
    store = GradientStore.create(tmp_path / "store", settings, num_rows=10)
    assert repr(store) == (
        f"GradientStore({str(tmp_path / 'store')!r}, 10 rows x 16 float32, 1 modules, "
        "projection_dim 4, transform projection)"
    )
