"""The convergence benchmark's harness: runs, cache, resume, outputs (no timing assertions)."""

import json
import math

import pytest
import torch

from kronlab.bench import charlm, optimizers, protocol, run_convergence, runner
from kronlab.bench.optimizers import OptimizerSpec
from kronlab.bench.report import (
    first_crossing,
    format_table,
    last_fifth_drop,
    last_fifth_drop_stderr,
    mean_curve,
)
from kronlab.bench.schedule import FINAL_FRACTION, WEIGHT_DECAY, Schedule, lr_factor
from kronlab.cli import main


def quiet(message: str) -> None:
    pass


@pytest.mark.parametrize("task", ["digits-mlp", "digits-cnn", "charlm"])
def test_five_step_run_of_each_task(tmp_path, task):
    results = run_convergence(
        [task], "adamw", out=tmp_path, quick=True, steps=5, show_progress=False, report=quiet
    )
    (adamw,) = results[task]
    (run,) = adamw.runs
    assert run.eval_steps == [0, 1, 2, 3, 4, 5] and len(run.train_loss) == 5
    assert all(math.isfinite(loss) for loss in run.val_loss)
    assert run.val_loss[-1] < run.val_loss[0] and not run.diverged
    assert run.state_bytes > 0
    assert (tmp_path / task / "runs" / runner.RunKey(task, "adamw", 3e-3, 0, 5).filename()).exists()
    for clock in (run.seconds, run.cpu_seconds):
        assert len(clock) == 6 and clock[0] == 0.0 and clock == sorted(clock) and clock[-1] > 0
    if task == "charlm":  # per-window losses, whose mean is the validation loss
        assert len(run.val_items) == 6 and len(run.val_items[0]) == charlm.VALIDATION_WINDOWS
        for items, loss in zip(run.val_items, run.val_loss):
            assert math.fsum(items) / len(items) == pytest.approx(loss, abs=1e-5)
    else:
        assert run.val_items == []


def test_charlm_window_losses_are_each_windows_mean_cross_entropy():
    model = charlm.make_model(0).double()
    windows = charlm.validation_windows()
    expected = []
    with torch.no_grad():
        for window in windows:
            logits = model(window[None, :-1])[0]
            log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            expected.append(-log_probs.gather(1, window[1:, None]).mean())
    losses = charlm.window_losses(model)
    torch.testing.assert_close(losses, torch.stack(expected))
    assert charlm.validation_loss(model) == pytest.approx(torch.stack(expected).mean().item())


def test_quick_takes_one_seed_unless_told_more(tmp_path):
    def seeds_run(**seeds: int) -> list[int]:
        results = run_convergence(["digits-mlp"], "adamw", out=tmp_path, quick=True, steps=2,
                                  show_progress=False, report=quiet, **seeds)  # fmt: skip
        return [run.settings["seed"] for run in results["digits-mlp"][0].runs]

    assert seeds_run() == [0]
    assert seeds_run(seeds=3) == [0, 1, 2]


def test_protocol_grid_then_seeds_outputs_and_cache(tmp_path, monkeypatch):
    run_convergence(
        ["digits-mlp"], "sgd", out=tmp_path, seeds=2, steps=5, show_progress=False, report=quiet
    )
    directory = tmp_path / "digits-mlp"
    runs = sorted(path.name for path in (directory / "runs").iterdir())
    assert len(runs) == 2 * (len(protocol.GRID_EXPONENTS) + 1)  # adamw and sgd: grid + 1 seed
    summary = json.loads((directory / "summary.json").read_text())
    rows = {row["optimizer"]: row for row in summary["rows"]}
    assert list(rows) == ["adamw", "sgd"]
    assert rows["adamw"]["steps_ratio"] == 1.0 and rows["adamw"]["seeds"] == 2
    assert set(summary["grids"]["sgd"]) == {"0.005556", "0.01667", "0.05", "0.15"}
    table = (directory / "table.md").read_text()
    assert "| adamw |" in table and "| sgd |" in table and "state MiB" in table
    assert (directory / "digits-mlp.png").stat().st_size > 10_000

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(protocol, "train_run", no_training)
    run_convergence(
        ["digits-mlp"], "sgd", out=tmp_path, seeds=2, steps=5, show_progress=False, report=quiet
    )


def test_interrupted_benchmark_resumes_with_the_unfinished_runs(tmp_path, monkeypatch):
    trained = []
    original = protocol.train_run

    def interrupted_third(task, spec, key, **kwargs):
        if len(trained) == 2:
            raise KeyboardInterrupt
        trained.append(key)
        return original(task, spec, key, **kwargs)

    monkeypatch.setattr(protocol, "train_run", interrupted_third)
    arguments = dict(out=tmp_path, steps=3, show_progress=False, report=quiet)
    with pytest.raises(KeyboardInterrupt):
        run_convergence(["digits-mlp"], "adamw", **arguments)
    files = list((tmp_path / "digits-mlp" / "runs").iterdir())
    assert sorted(f.name for f in files) == sorted(key.filename() for key in trained)

    resumed = []

    def counting(task, spec, key, **kwargs):
        resumed.append(key)
        return original(task, spec, key, **kwargs)

    monkeypatch.setattr(protocol, "train_run", counting)
    run_convergence(["digits-mlp"], "adamw", **arguments)
    assert not set(resumed) & set(trained)
    assert len(resumed) == len(protocol.GRID_EXPONENTS) + 2 - len(trained)  # grid + 2 seeds


def test_cache_with_other_settings_is_not_reused(tmp_path):
    key = runner.RunKey("digits-mlp", "adamw", 3e-3, 0, 3)
    record = runner.RunRecord(settings=key.settings(), val_loss=[1.0])
    runner.store(tmp_path, record, key)
    assert runner.load_cached(tmp_path, key) == record
    data = json.loads(runner.cache_path(tmp_path, key).read_text())
    data["settings"]["weight_decay"] = 0.5
    runner.cache_path(tmp_path, key).write_text(json.dumps(data))
    assert runner.load_cached(tmp_path, key) is None


def test_missing_peer_is_skipped_with_a_message(tmp_path, monkeypatch):
    missing = OptimizerSpec("absent_peer", lambda model, lr: None, 1e-3, "soap", "no_such_pkg_x")
    monkeypatch.setattr(optimizers, "PEERS", (*optimizers.PEERS, missing))
    messages = []
    results = run_convergence(
        ["digits-mlp"], "absent_peer", out=tmp_path, quick=True, steps=2,
        show_progress=False, report=messages.append,
    )  # fmt: skip
    assert [r.name for r in results["digits-mlp"]] == ["adamw"]
    assert any("skipping absent_peer" in m and "no_such_pkg_x" in m for m in messages)


def test_schedule_warmup_cosine_and_decoupled_weight_decay():
    steps = 100  # warm-up: 5 steps
    assert lr_factor(1, steps) == pytest.approx(0.2) and lr_factor(5, steps) == 1.0
    assert lr_factor(steps, steps) == pytest.approx(FINAL_FRACTION)
    middle = 5 + (steps - 5) / 2
    assert lr_factor(int(middle), steps) == pytest.approx(
        FINAL_FRACTION + (1 - FINAL_FRACTION) * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=0.02
    )
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    sgd = torch.optim.SGD([param], lr=0.5, weight_decay=0.3)
    shared = Schedule(sgd, steps)
    assert sgd.param_groups[0]["weight_decay"] == 0.0  # the optimizer's own decay is replaced
    param.grad = torch.tensor([0.25, 1.0], dtype=torch.float64)
    shared.before_step(1)
    sgd.step()
    lr = 0.5 * 0.2
    expected = torch.tensor([1.0, -2.0], dtype=torch.float64) * (1 - lr * WEIGHT_DECAY)
    expected -= lr * torch.tensor([0.25, 1.0], dtype=torch.float64)
    torch.testing.assert_close(param.detach(), expected)


def test_first_crossing_interpolates_between_evaluations():
    steps, losses, seconds = [0, 10, 20], [3.0, 2.0, 1.0], [0.0, 4.0, 10.0]
    assert first_crossing(steps, losses, seconds, 1.5) == pytest.approx((15.0, 7.0))
    assert first_crossing(steps, losses, seconds, 3.5) == (0.0, 0.0)
    assert first_crossing(steps, losses, seconds, 0.5) is None


def test_lr_grid_is_four_points_a_factor_three_apart():
    grid = protocol.lr_grid(3e-3)
    assert grid == pytest.approx([3e-3 / 9, 1e-3, 3e-3, 9e-3], rel=1e-3)  # 4 digits kept


def test_cli_rejects_bad_arguments_before_training(tmp_path, capsys):
    assert main(["bench", "convergence", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds must be >= 1, got 0" in capsys.readouterr().err
    assert main(["bench", "convergence", "--tasks", "mnist", "--out", str(tmp_path)]) == 2
    assert "unknown task 'mnist'" in capsys.readouterr().err
    assert main(["bench", "convergence", "--optimizers", "adamz", "--out", str(tmp_path)]) == 2
    assert "unknown optimizer 'adamz'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_last_fifth_drop_reads_the_mean_curve_from_four_fifths_on():
    runs = [
        runner.RunRecord(settings={}, eval_steps=[0, 40, 80, 100], val_loss=[4.0, 3.0, 2.0, 1.5]),
        runner.RunRecord(settings={}, eval_steps=[0, 40, 80, 100], val_loss=[4.0, 3.0, 2.2, 1.7]),
    ]
    for run in runs:
        run.seconds = [0.0, 1.0, 2.0, 3.0]
    assert last_fifth_drop(runs) == pytest.approx((2.1 - 1.6) / 2.1)


def test_last_fifth_drop_stderr_is_the_standard_error_over_windows_of_the_seed_mean_fall():
    items = torch.tensor(
        [
            [[4.0, 4.2, 3.9], [2.0, 2.4, 2.1], [1.8, 2.1, 1.7]],
            [[4.1, 4.0, 4.0], [2.2, 2.3, 2.0], [1.9, 2.2, 1.9]],
        ],
        dtype=torch.float64,
    )  # fmt: skip  (seed, evaluation, window)
    runs = [
        runner.RunRecord(
            settings={},
            eval_steps=[0, 80, 100],
            val_items=seed.tolist(),
            val_loss=seed.mean(dim=1).tolist(),
        )  # fmt: skip
        for seed in items
    ]
    falls = [
        [(items[s, 1, w] - items[s, 2, w]).item() / items[s, 1].mean().item() for w in range(3)]
        for s in range(2)
    ]
    mean_falls = [(falls[0][w] + falls[1][w]) / 2 for w in range(3)]
    centre = sum(mean_falls) / 3
    variance = sum((f - centre) ** 2 for f in mean_falls) / 2
    assert last_fifth_drop_stderr(runs) == pytest.approx(math.sqrt(variance / 3))
    assert math.isnan(last_fifth_drop_stderr([runner.RunRecord(settings={})]))


def test_seconds_follow_the_chosen_clock():
    run = runner.RunRecord(settings={}, eval_steps=[0, 10], val_loss=[2.0, 1.0],
                           seconds=[0.0, 5.0], cpu_seconds=[0.0, 3.0])  # fmt: skip
    assert mean_curve([run])[2] == [0.0, 3.0]
    assert mean_curve([run], "wall")[2] == [0.0, 5.0]
    with pytest.raises(ValueError, match="clock must be one of .* got 'gpu'"):
        mean_curve([run], "gpu")
    assert "CPU seconds to AdamW's" in format_table([])
    assert "| seconds to AdamW's" in format_table([], "wall")
