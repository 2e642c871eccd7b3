"""``damping="auto"`` in the pipeline: chosen once after the fit, recorded, used everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kronlab.attribution.config import AttributionConfig
from kronlab.attribution.curvature import Curvature
from kronlab.attribution.damping_selection import (
    DEFAULT_FACTORS,
    probe_batches,
    select_damping_factor,
)
from kronlab.attribution.integrity import IntegrityError
from kronlab.attribution.pipeline import AttributionRun
from kronlab.cli import build_parser

from .pipeline_fixtures import tiny_task


def _run(directory, **settings) -> AttributionRun:
    values = dict(num_queries=4, batch_size=16, chunk_rows=16, fisher="empirical", seed=3)
    values.update(settings)
    config = AttributionConfig(**values)
    return AttributionRun(directory, config, task=tiny_task(num_queries=4), show_progress=False)


@pytest.mark.parametrize("compression", ["project", "whitened"])
def test_auto_records_its_choice_and_scores_as_that_fixed_factor(tmp_path, compression):
    run = _run(tmp_path / "auto", damping="auto", compression=compression)
    scores = np.array(run.run())
    record = json.loads((tmp_path / "auto" / "fit.json").read_text())
    chosen = record["damping_selection"]
    assert record["inputs"]["damping"] == "auto"
    assert chosen["factors"] == list(DEFAULT_FACTORS) and chosen["factor"] in DEFAULT_FACTORS
    assert chosen["probe_examples"] == 60 and chosen["subsets"] == 4

    task = tiny_task(num_queries=4)
    curvature = Curvature.load(tmp_path / "auto" / "curvature.safetensors")
    again = select_damping_factor(
        curvature, task.model, probe_batches(task.train, 3), task.loss_fn, seed=3
    )
    assert again.factor == chosen["factor"]
    np.testing.assert_allclose(again.objective, chosen["objective"], rtol=1e-6)

    fixed = _run(tmp_path / "fixed", damping=chosen["factor"], compression=compression)
    np.testing.assert_allclose(scores, np.array(fixed.run()), rtol=1e-5, atol=1e-6)
    used = json.loads((tmp_path / "auto" / "score.json").read_text())["computed_with"]
    assert used["damping"] == chosen["factor"] and used["damping_setting"] == "auto"
    report = (tmp_path / "auto" / "report.md").read_text()
    assert f"damping {chosen['factor']} × mean eigenvalue (chosen by `--damping auto`" in report


def test_an_edited_choice_is_caught(tmp_path):
    run = _run(tmp_path, damping="auto")
    run.run()
    path = tmp_path / "fit.json"
    record = json.loads(path.read_text())
    record["damping_selection"]["factor"] = 1e-8
    path.write_text(json.dumps(record))
    with pytest.raises(IntegrityError, match="fit.json"):
        _run(tmp_path, damping="auto").run()


def test_a_fit_without_the_choice_is_stale_for_auto(tmp_path):
    _run(tmp_path / "run", damping=0.1).fit()
    (tmp_path / "run" / "config.json").unlink()
    with pytest.raises(ValueError, match="damping: None then, 'auto' now"):
        _run(tmp_path / "run", damping="auto").apply()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0.0, r"Invalid damping: 0.0 \(allowed: a finite number, 0.0 < damping\), or 'auto'"),
        ("automatic", r"Invalid damping: 'automatic' .*, or 'auto'"),
        (True, r"Invalid damping: True"),
    ],
)
def test_damping_setting_accepts_a_positive_factor_or_auto(value, message):
    assert AttributionConfig(damping="auto").damping == "auto"
    with pytest.raises(ValueError, match=message):
        AttributionConfig(damping=value)


def test_cli_flag_parses_auto_and_numbers():
    parser = build_parser()
    assert parser.parse_args(["attribute", "--damping", "auto"]).damping == "auto"
    assert parser.parse_args(["attribute", "--damping", "0.01"]).damping == 0.01
    with pytest.raises(SystemExit):
        parser.parse_args(["attribute", "--damping", "often"])
