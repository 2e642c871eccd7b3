"""The priority-order driver of the convergence protocol (benchmarks/convergence_priority.py)."""

from benchmarks import convergence_priority as driver
from kronlab.bench.optimizers import resolve
from kronlab.bench.protocol import lr_grid


def test_grid_nearest_the_default_first_lowest_only_where_the_next_leads_then_seeds(tmp_path):
    specs = [resolve("adamw"), resolve("sgd")]
    driver.run("digits-mlp", specs, steps=3, seeds=2, jobs=2, out=tmp_path)
    for spec in specs:
        low, second, default, high = lr_grid(spec.default_lr)
        losses = driver.grid_losses("digits-mlp", spec, 3, tmp_path)
        first_three = {lr: losses[lr] for lr in (second, default, high)}
        ran_lowest = min(first_three, key=first_three.__getitem__) == second
        assert set(losses) == {second, default, high} | ({low} if ran_lowest else set())
        result = driver.result_from_cache("digits-mlp", spec, 3, 2, tmp_path)
        assert result.best_lr == min(losses, key=losses.__getitem__)
        assert [run.settings["seed"] for run in result.runs] == [0, 1]
    driver.report("digits-mlp", specs, 3, 2, tmp_path)
    table = (tmp_path / "digits-mlp" / "table.md").read_text()
    assert "| adamw" in table and "| sgd" in table
    assert driver.result_from_cache("digits-cnn", specs[0], 3, 2, tmp_path) is None
