"""``fit_examples``: the curvature from the first N training examples, the store and the scores
over all of them, against float64 influence written from the definitions."""

import json

import numpy as np
import pytest

from kronlab.attribution.pipeline import AttributionConfig, AttributionRun
from kronlab.attribution.sources import AttributionTask

from .pipeline_fixtures import inner_scores, oracle_gradients, oracle_inverse, tiny_task
from .test_pipeline import close, make_run


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_curvature_from_the_first_examples_scores_every_example(tmp_path, method):
    scores = make_run(tmp_path, method=method, projection_dim=0, fit_examples=25).run()
    task = tiny_task()
    head = AttributionTask(task.model, task.loss_fn, task.train.subset(25), task.queries)
    # A, S (and EK-FAC's eigenvalues) from examples 0..24 only; the training gradients of all 60.
    inverse = oracle_inverse(head, method, damping=0.1)
    expected = inner_scores(
        inverse(oracle_gradients(task, task.queries)), oracle_gradients(task, task.train)
    )
    assert scores.shape == (6, 60)
    close(scores, expected)


def test_all_examples_is_the_default_and_more_than_there_are_is_all(tmp_path):
    everything = make_run(tmp_path / "all", method="kfac").run()
    more = make_run(tmp_path / "more", method="kfac", fit_examples=1000).run()
    # The same examples in the same batches: the same curvature, bit for bit.
    np.testing.assert_array_equal(np.asarray(more), np.asarray(everything))


def test_changing_fit_examples_makes_the_curvature_stale(tmp_path):
    make_run(tmp_path, method="kfac", fit_examples=25).run()
    config = json.loads((tmp_path / "config.json").read_text())
    config["fit_examples"] = 30
    (tmp_path / "config.json").write_text(json.dumps(config))
    task = tiny_task(num_queries=6)
    run = AttributionRun(tmp_path, AttributionConfig(**config), task=task, show_progress=False)
    with pytest.raises(ValueError, match="train_data_fingerprint"):
        run.score()


@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_bad_fit_examples_is_refused(value):
    with pytest.raises((ValueError, TypeError), match="fit_examples"):
        AttributionConfig(fit_examples=value)
