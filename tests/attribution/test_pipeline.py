"""build → fit → apply → score against float64 influence written from the definitions."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kronlab.attribution.pipeline import AttributionConfig, AttributionRun
from kronlab.attribution.store import GradientStore, StoreMismatchError
from kronlab.linalg import random_projection

from .pipeline_fixtures import (
    inner_scores,
    oracle_factor_inverse_roots,
    oracle_gradients,
    oracle_inverse,
    spearman,
    tiny_task,
)

SRC = str(Path(__file__).resolve().parents[2] / "src")


def make_run(directory: Path, **settings) -> AttributionRun:
    # Full gradients, projected after the inverse when p > 0: the settings these tests assume.
    values = dict(num_queries=6, batch_size=16, chunk_rows=16, fisher="empirical", damping=0.1)
    values.update(projection_dim=0, compression="project")
    values.update(settings)
    task = tiny_task(num_queries=values["num_queries"])
    return AttributionRun(directory, AttributionConfig(**values), task=task, show_progress=False)


def projected(
    blocks: dict[str, torch.Tensor], p: int, kind: str = "orthogonal"
) -> dict[str, torch.Tensor]:
    """``P_S X P_Aᵀ`` with the matrices regenerated from their identifiers, in float64; a side
    with ``d ≤ p`` is kept as is (identity)."""
    result = {}
    for name, block in blocks.items():
        d_out, d_in = block.shape[1:]
        if d_out > p:
            block = random_projection(f"{name}/left", (p, d_out), kind, torch.float64) @ block
        if d_in > p:
            block = block @ random_projection(f"{name}/right", (p, d_in), kind, torch.float64).T
        result[name] = block
    return result


def close(actual: np.ndarray, expected: torch.Tensor, rtol: float = 1e-3) -> None:
    expected = expected.numpy()
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_uncompressed_scores_are_damped_influence(tmp_path, method):
    scores = make_run(tmp_path, method=method, projection_dim=0, damping=0.1).run()
    task = tiny_task()
    inverse = oracle_inverse(task, method, damping=0.1)
    expected = inner_scores(
        inverse(oracle_gradients(task, task.queries)), oracle_gradients(task, task.train)
    )
    assert scores.shape == (6, 60)
    close(scores, expected)


def test_compressed_scores_project_after_the_inverse_and_shrink_storage(tmp_path):
    p = 8
    settings = dict(method="ekfac", damping=1.0, num_queries=20)
    run = make_run(tmp_path / "p8", projection_dim=p, **settings)
    scores = run.run()
    full_run = make_run(tmp_path / "full", projection_dim=0, **settings)
    full_scores = full_run.run()

    task = tiny_task(num_queries=20)
    inverse = oracle_inverse(task, "ekfac", damping=1.0)
    train = oracle_gradients(task, task.train)
    queries = inverse(oracle_gradients(task, task.queries))
    # Exactly the compressed estimator ⟨P_S (H⁻¹ G_q) P_Aᵀ, P_S G_t P_Aᵀ⟩ ...
    close(scores, inner_scores(projected(queries, p), projected(train, p)))
    # ... which approximates the uncompressed scores. On this tiny problem (d ≈ 12, p = 8)
    # the sketch is coarse: the measured Spearman is 0.74 with orthogonal projections (the
    # default; 0.35-0.45 with Rademacher ones); floor 0.5.
    correlation = spearman(torch.tensor(np.asarray(scores)), torch.tensor(np.asarray(full_scores)))
    print(f"Spearman(compressed p={p}, uncompressed) = {correlation:.3f}")
    assert correlation > 0.5

    # Storage shrinks by (p/d_out)(p/d_in) per module: (8·8 + 8·8) / (12·11 + 9·13).
    compressed = GradientStore.open(run.train_store_dir)
    uncompressed = GradientStore.open(full_run.train_store_dir)
    assert [b.shape for b in compressed.settings.modules] == [(p, p), (p, p)]
    assert compressed.nbytes / uncompressed.nbytes == pytest.approx(128 / (12 * 11 + 9 * 13))
    assert (compressed.directory / "gradients.bin").stat().st_size == 60 * 128 * 4


def test_sides_no_larger_than_p_are_stored_unprojected(tmp_path):
    # p = 10: layer 0 (12 × 11) → 10 × 10; layer 2 (9 × 13) keeps its 9 output rows → 9 × 10.
    # Storage shrinks by Σ min(p, d_out)·min(p, d_in) / Σ d_out·d_in, not by (p/d)².
    p = 10
    run = make_run(tmp_path, projection_dim=p, method="kfac")
    scores = run.run()
    store = GradientStore.open(run.train_store_dir)
    assert [b.shape for b in store.settings.modules] == [(10, 10), (9, 10)]
    assert store.row_width == 10 * 10 + 9 * 10
    task = tiny_task()
    queries = oracle_inverse(task, "kfac", damping=0.1)(oracle_gradients(task, task.queries))
    close(
        scores,
        inner_scores(projected(queries, p), projected(oracle_gradients(task, task.train), p)),
    )


def _factor_damped_kfac(task, damping):
    roots = oracle_factor_inverse_roots(task, damping)
    queries = {
        n: roots[n][0] @ roots[n][0] @ g @ roots[n][1] @ roots[n][1]
        for n, g in oracle_gradients(task, task.queries).items()
    }
    return queries, oracle_gradients(task, task.train)


def test_folded_inverse_root_equals_apply_then_project_without_projection(tmp_path):
    scores = make_run(tmp_path, method="kfac", compression="folded", projection_dim=0).run()
    # ⟨(S+δ_S)^{-1/2} G_q (A+δ_A)^{-1/2}, (S+δ_S)^{-1/2} G_t (A+δ_A)^{-1/2}⟩ must equal
    # ⟨(S+δ_S)^{-1} G_q (A+δ_A)^{-1}, G_t⟩, the apply-first score with the same damping.
    queries, train = _factor_damped_kfac(tiny_task(), damping=0.1)
    close(scores, inner_scores(queries, train))


def test_folded_and_apply_then_project_sketch_the_same_scores(tmp_path):
    p = 8
    folded = make_run(tmp_path, method="kfac", compression="folded", projection_dim=p, damping=1.0)
    scores = torch.tensor(np.asarray(folded.run()))
    queries, train = _factor_damped_kfac(tiny_task(), damping=1.0)
    apply_then_project = inner_scores(projected(queries, p), projected(train, p))
    exact = inner_scores(queries, train)
    folded_error = float((scores - exact).norm() / exact.norm())
    project_error = float((apply_then_project - exact).norm() / exact.norm())
    print(
        f"p={p}: relative error folded {folded_error:.3f}, apply-then-project {project_error:.3f}"
    )
    # Two independent sketches of one score matrix (measured 0.51 and 0.62 at p=8 of d≈12).
    assert folded_error < 0.75 and project_error < 0.75


def test_folded_refuses_ekfac_with_a_clear_message():
    with pytest.raises(ValueError, match="EK-FAC.*compression='whitened'.*compression='project'"):
        AttributionConfig(method="ekfac", compression="folded")


def _whitened_and_lifted(task, damping, queries):
    """``(S+δ_S)^{-1/2} G_t (A+δ_A)^{-1/2}`` per training example and
    ``(S+δ_S)^{1/2} X_q (A+δ_A)^{1/2}`` per query block ``X_q``."""
    roots = oracle_factor_inverse_roots(task, damping)
    whitened = {
        n: roots[n][0] @ g @ roots[n][1] for n, g in oracle_gradients(task, task.train).items()
    }
    lifted = {
        n: torch.linalg.inv(roots[n][0]) @ x @ torch.linalg.inv(roots[n][1])
        for n, x in queries.items()
    }
    return whitened, lifted


def test_whitened_store_without_projection_gives_exactly_the_curvature_scores(tmp_path):
    # ⟨(S+δ_S)^{1/2} H⁻¹G_q (A+δ_A)^{1/2}, (S+δ_S)^{-1/2} G_t (A+δ_A)^{-1/2}⟩ = ⟨H⁻¹G_q, G_t⟩,
    # with H the EK-FAC curvature under its usual damping λ = 0.1 · mean(Λ). (K-FAC takes the
    # same path with other eigenvalues; one method keeps the suite fast.)
    method = "ekfac"
    run = make_run(tmp_path, method=method, compression="whitened", projection_dim=0)
    assert run.stage_order() == ("fit", "build", "apply", "score")
    scores = run.run()
    task = tiny_task()
    inverse = oracle_inverse(task, method, damping=0.1)
    expected = inner_scores(
        inverse(oracle_gradients(task, task.queries)), oracle_gradients(task, task.train)
    )
    close(scores, expected)
    # The store really is whitened: (S+δ_S)^{-1/2} G_t (A+δ_A)^{-1/2}, not G_t.
    whitened, _ = _whitened_and_lifted(task, 0.1, {})
    stored = GradientStore.open(run.train_store_dir).read().double()
    rows = torch.cat([whitened[n].flatten(1) for n in ("0", "2")], 1)
    torch.testing.assert_close(stored, rows, rtol=1e-3, atol=1e-4 * rows.abs().max().item())


def test_whitened_ekfac_sketch_is_the_lifted_query_against_the_whitened_store(tmp_path):
    p = 8
    settings = dict(method="ekfac", damping=1.0, num_queries=20)
    scores = make_run(tmp_path / "w", compression="whitened", projection_dim=p, **settings).run()
    project = make_run(tmp_path / "p", compression="project", projection_dim=p, **settings).run()
    task = tiny_task(num_queries=20)
    inverse = oracle_inverse(task, "ekfac", damping=1.0)(oracle_gradients(task, task.queries))
    whitened, lifted = _whitened_and_lifted(task, 1.0, inverse)
    # ⟨P_S (S+δ_S)^{1/2} H⁻¹G_q (A+δ_A)^{1/2} P_Aᵀ, P_S (S+δ_S)^{-1/2} G_t (A+δ_A)^{-1/2} P_Aᵀ⟩
    close(scores, inner_scores(projected(lifted, p), projected(whitened, p)))
    exact = inner_scores(inverse, oracle_gradients(task, task.train))
    errors = {
        name: float((torch.tensor(np.asarray(s)) - exact).norm() / exact.norm())
        for name, s in (("whitened", scores), ("project", project))
    }
    print(f"p={p}: relative error of the sketched EK-FAC scores {errors}")
    # Whitened vectors are better conditioned than (H⁻¹G_q, G_t): measured 0.43 vs 0.53.
    assert errors["whitened"] < errors["project"]


def test_run_skips_complete_stages_and_checks_its_config(tmp_path):
    make_run(tmp_path, projection_dim=4).run()
    again = make_run(tmp_path, projection_dim=4)
    for stage in ("build", "fit", "apply", "score"):
        assert again.is_complete(stage)
        setattr(again, stage, lambda **_: pytest.fail("a complete stage ran again"))
    again.run()
    with pytest.raises(ValueError, match="projection_dim: 4 in .*, 8 now"):
        make_run(tmp_path, projection_dim=8)


def test_stages_need_their_inputs(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(ValueError, match="needs stage 'fit'"):
        run.apply()
    run.build()
    with pytest.raises(FileExistsError, match="--resume"):
        run.build()
    with pytest.raises(ValueError, match="needs stage 'apply'"):
        run.score()


def test_scoring_against_a_store_with_other_settings_is_an_error(tmp_path):
    first = make_run(tmp_path / "a", projection_dim=4)
    first.build()
    other = make_run(tmp_path / "b", projection_dim=6, train_store=str(first.train_store_dir))
    with pytest.raises(StoreMismatchError, match="projection_dim: stored 4, expected 6"):
        other.run()


def test_bfloat16_store_scores_close_to_float32(tmp_path):
    exact = make_run(tmp_path / "f32", projection_dim=4).run()
    rounded = make_run(tmp_path / "bf16", projection_dim=4, dtype="bfloat16").run()
    assert GradientStore.open(tmp_path / "bf16" / "train").nbytes == 60 * 32 * 2
    np.testing.assert_allclose(rounded, exact, rtol=0.05, atol=0.02 * np.abs(exact).max())


def _seed_digits_cache(cache: Path) -> None:
    """An untrained digits MLP in the cache, so the CLI skips training (fast tests)."""
    from kronlab.tasks.digits import digits_mlp

    cache.mkdir(parents=True, exist_ok=True)
    torch.save(digits_mlp(0).state_dict(), cache / "digits-mlp-seed0.pt")


def _cli(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "attribute", *extra,
        "--run-dir", str(run_dir), "--cache-dir", str(cache), "--no-progress",
    ]  # fmt: skip


def test_cli_build_killed_mid_way_resumes_then_runs_to_the_report(tmp_path, capsys):
    from kronlab.cli import main

    cache = tmp_path / "cache"
    _seed_digits_cache(cache)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    settings = ["--num-train", "600", "--projection-dim", "0", "--compression", "project"]
    settings += ["--chunk-rows", "4"]
    settings += ["--batch-size", "4", "--method", "kfac"]
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "kronlab.cli", *_cli(run_dir, cache, "build", *settings)]
    process = subprocess.Popen(command, env=env)
    metadata = run_dir / "train" / "store.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        if metadata.exists() and GradientStore.open(run_dir / "train").committed().sum() >= 3:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = GradientStore.open(run_dir / "train").committed()
    assert 3 <= partial.sum() < len(partial), "the kill must land mid-build"

    # Without --resume the partial store is refused; `run --resume` finishes every stage.
    assert main(_cli(run_dir, cache, "build")) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(_cli(run_dir, cache, "run", "--resume")) == 0
    assert "complete stages: build, fit, apply, score" in capsys.readouterr().out
    resumed = GradientStore.open(run_dir / "train")
    assert resumed.is_complete

    reference = tmp_path / "reference"
    assert main(_cli(reference, cache, "build", *settings)) == 0
    assert torch.equal(resumed.read(), GradientStore.open(reference / "train").read())

    scores = np.load(run_dir / "scores.npy", mmap_mode="r")
    assert scores.shape == (10, 600) and np.isfinite(scores).all()
    report = (run_dir / "report.md").read_text()
    assert report.count("## Query") == 4 and "top_examples.png" in report
    assert (run_dir / "top_examples.png").stat().st_size > 1000
    # Settings are pinned by config.json: a different one is refused.
    assert main(_cli(run_dir, cache, "--dtype", "float16")) == 2
    assert "dtype: 'float32'" in capsys.readouterr().err


def _text_task(texts: list[str], length: int):
    from kronlab.attribution.sources import AttributionTask, ExampleSet, language_model_loss
    from kronlab.tasks.text import GPTConfig, encode_bytes, tiny_gpt

    model = tiny_gpt(0, GPTConfig(context=48, d_model=16, layers=1, heads=2))
    examples = ExampleSet(encode_bytes(texts, length), "text", texts)
    return AttributionTask(model, language_model_loss, examples, examples.subset(2))


def test_sequence_gradients_sum_real_tokens_and_ignore_padding(tmp_path):
    from kronlab.tasks.text import stdlib_text

    texts = stdlib_text(6, length=24, seed=3)
    assert texts == stdlib_text(6, length=24, seed=3)  # the stdlib corpus is deterministic
    assert len({len(t) for t in texts}) > 1  # variable lengths, so padding is exercised
    stores = []
    for length in (32, 48):  # the same sequences, padded to two different lengths
        config = AttributionConfig(
            num_queries=2, projection_dim=6, method="kfac", fisher="empirical", chunk_rows=4
        )
        run = AttributionRun(
            tmp_path / str(length), config, task=_text_task(texts, length), show_progress=False
        )
        scores = run.run()
        assert scores.shape == (2, 6) and np.isfinite(scores).all()
        stores.append(GradientStore.open(run.train_store_dir).read())
        assert "## Query 0: '" in (run.run_dir / "report.md").read_text()
    # Per-sequence gradients are sums over real tokens only: padding changes nothing.
    np.testing.assert_allclose(stores[0], stores[1], rtol=1e-4, atol=1e-6)
    assert stores[0].abs().sum() > 0
