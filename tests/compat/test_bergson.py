"""bergson's flag spellings on ``kronlab attribute``, and leaving biases out of the curvature."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kronlab.attribution import cross_entropy_loss, fit_curvature, influence_scores
from kronlab.cli import build_parser, main
from kronlab.compat.bergson import resolve_bergson_flags
from tests.attribution.test_user_inputs import (  # noqa: F401  (factory_module is a fixture)
    _vector_records,
    _write_jsonl,
    factory_module,
)


def _parse(*arguments: str):
    return resolve_bergson_flags(build_parser().parse_args(["attribute", *arguments]))


def test_bergson_spellings_set_kronlab_settings() -> None:
    args = _parse(
        "hessian",
        "--projection_dim", "16",
        "--projection_type", "rademacher",
        "--ev_correction", "false",
        "--lambda_damp_factor", "0.2",
        "--include_bias", "false",
        "--projection_target", "per_module",
    )  # fmt: skip
    assert args.stage == "fit"
    assert (args.projection_dim, args.projection_kind, args.method) == (16, "rademacher", "kfac")
    assert (args.damping, args.bias) == (0.2, False)
    assert _parse("--ev_correction", "true").method == "ekfac"
    assert _parse("--no-bias").bias is False and _parse().bias is None


def test_contradicting_method_is_refused() -> None:
    with pytest.raises(ValueError, match="ev_correction"):
        _parse("--method", "ekfac", "--ev_correction", "false")


def test_bergson_commands_run_end_to_end(tmp_path: Path, factory_module: str, capsys) -> None:  # noqa: F811
    train = _write_jsonl(tmp_path / "train.jsonl", _vector_records(24, seed=1))
    queries = _write_jsonl(tmp_path / "queries.jsonl", _vector_records(3, seed=2))
    run_dir = tmp_path / "run"
    common = ["--run-dir", str(run_dir), "--no-progress", "--model", f"{factory_module}:build"]
    common += ["--data", str(train), "--queries", str(queries), "--batch-size", "8"]
    bergson = ["--projection_dim", "4", "--projection_type", "rademacher"]
    bergson += ["--ev_correction", "false", "--include_bias", "false"]
    assert main(["attribute", "hessian", *common, *bergson]) == 0, capsys.readouterr().err
    assert main(["attribute", "run", *common]) == 0, capsys.readouterr().err
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["method"], config["bias"], config["projection_dim"]) == ("kfac", False, 4)
    scores = np.load(run_dir / "scores.npy")
    assert scores.shape == (3, 24) and np.isfinite(scores).all()


def _models() -> tuple[nn.Module, nn.Module]:
    """The same network with zero biases and without biases: equal forward and weight grads."""
    torch.manual_seed(0)
    with_bias = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    without = nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 3, bias=False))
    without = without.double()
    with torch.no_grad():
        for biased, plain in zip(with_bias[::2], without[::2]):
            biased.bias.zero_()
            plain.weight.copy_(biased.weight)
    return with_bias, without


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_bias_false_is_the_weight_only_curvature(method: str) -> None:
    with_bias, without = _models()
    generator = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(8, 5, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=generator),
        )
        for _ in range(3)
    ]
    options = dict(method=method, fisher="empirical")
    excluded = fit_curvature(with_bias, data, cross_entropy_loss, bias=False, **options)
    reference = fit_curvature(without, data, cross_entropy_loss, **options)
    assert not excluded.includes_bias
    for name, module in reference.modules.items():
        assert excluded.modules[name].spec == module.spec
        for kind, tensor in module.tensors().items():
            torch.testing.assert_close(excluded.modules[name].tensors()[kind], tensor)
    scored = dict(loss_fn=cross_entropy_loss, progress=False)
    torch.testing.assert_close(
        influence_scores(excluded, data[:1], data, model=with_bias, **scored),
        influence_scores(reference, data[:1], data, model=without, **scored),
    )
