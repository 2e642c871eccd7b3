"""``kronlab compare`` and ``kronlab bench convergence`` under ``torchrun --nproc-per-node 2``:
the data-parallel run takes the steps of one process on the same global batches (its curves
equal the one-process curves within float tolerance) and only rank 0 prints and writes.

The torchrun runs go through the real entry point (``python -m torch.distributed.run … -m
kronlab``) in a subprocess, two gloo processes, a few steps; an uneven batch (31 rows on 2
ranks) exercises the weighting of each rank's share.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import kronlab
import kronlab.bench.convergence as convergence_module
from kronlab.bench import run_convergence
from kronlab.cli import main
from kronlab.data_parallel import local_share
from kronlab.distributed import DistributedConfig
from kronlab.distributed.workers import Workers
from kronlab.optim import PSGD, Shampoo

F64 = torch.float64
SOURCE = str(Path(kronlab.__file__).resolve().parents[1])


def torchrun(arguments: list[str], cwd: Path) -> str:
    """Run ``kronlab ARGUMENTS`` on two gloo processes; their stdout (asserting success)."""
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([SOURCE, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "kronlab", *arguments]
    done = subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def files_under(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


def test_compare_under_torchrun_takes_the_one_process_steps(tmp_path, capsys):
    arguments = ["compare", "--optimizers", "psgd_quad,muon", "--steps", "4"]
    arguments += ["--batch-size", "31", "--no-progress"]
    assert main([*arguments, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    printed = torchrun([*arguments, "--out", str(tmp_path / "two")], tmp_path)
    assert printed.count("wrote ") == 1 and printed.count("optimizer ") == 1  # rank 0 only
    assert files_under(tmp_path / "two") == files_under(tmp_path / "one")
    one, two = (json.loads((tmp_path / d / "compare.json").read_text()) for d in ("one", "two"))
    assert (one["config"]["processes"], two["config"]["processes"]) == (1, 2)
    assert [r["name"] for r in two["results"]] == [r["name"] for r in one["results"]]
    for alone, split in zip(one["results"], two["results"]):
        assert len(split["train_loss_curve"]) == 4
        torch.testing.assert_close(
            split["train_loss_curve"], alone["train_loss_curve"], rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(
            split["test_loss_curve"], alone["test_loss_curve"], rtol=1e-4, atol=1e-6
        )


def test_convergence_benchmark_under_torchrun_takes_the_one_process_steps(tmp_path, capsys):
    arguments = ["bench", "convergence", "--tasks", "digits-mlp", "--optimizers", "shampoo"]
    arguments += ["--quick", "--steps", "3", "--no-progress"]
    assert main([*arguments, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    printed = torchrun([*arguments, "--out", str(tmp_path / "two")], tmp_path)
    assert printed.count("wrote ") == 1  # rank 0 only
    assert files_under(tmp_path / "two") == files_under(tmp_path / "one")
    runs = sorted((tmp_path / "one" / "digits-mlp" / "runs").glob("*.json"))
    assert len(runs) == 2  # AdamW and Shampoo
    for path in runs:
        alone = json.loads(path.read_text())
        split = json.loads((tmp_path / "two" / path.relative_to(tmp_path / "one")).read_text())
        for curve in ("train_loss", "val_loss"):
            torch.testing.assert_close(split[curve], alone[curve], rtol=1e-4, atol=1e-6)


def test_parallel_jobs_are_refused_under_torchrun(monkeypatch, tmp_path):
    monkeypatch.setattr(convergence_module, "current_workers", lambda: Workers(0, 2))
    with pytest.raises(ValueError, match="Invalid jobs: 2 under torchrun"):
        run_convergence(["digits-mlp"], "adamw", out=tmp_path, quick=True, jobs=2)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("world_size", [2, 3])
def test_weighted_shares_average_to_the_global_mean_gradient(world_size):
    """DDP averages the ranks' gradients: with each share's mean loss weighted by
    ``local_share``, the average is the gradient of the mean loss over the whole batch, also
    when the rows do not divide evenly (7 rows)."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    inputs, targets = torch.randn(7, 3, dtype=F64), torch.randn(7, 2, dtype=F64)

    def gradient(batch: tuple[torch.Tensor, torch.Tensor], weight: float) -> torch.Tensor:
        layer.zero_grad()
        (weight * nn.functional.mse_loss(layer(batch[0]), batch[1])).backward()
        return layer.weight.grad.clone()

    expected = gradient((inputs, targets), 1.0)
    shares = [local_share((inputs, targets), Workers(r, world_size)) for r in range(world_size)]
    assert sum(share[0][0].shape[0] for share in shares) == 7
    averaged = sum(gradient(batch, weight) for batch, weight in shares) / world_size
    torch.testing.assert_close(averaged, expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="Invalid batch size: 1 rows for"):
        local_share(inputs[:1], Workers(0, world_size))


def test_distribute_after_construction_checks_like_the_constructor():
    param = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="Invalid on_nonfinite_grad: 'mask'"):
        PSGD([param], on_nonfinite_grad="mask").distribute(DistributedConfig())
    with pytest.raises(ValueError, match="Invalid distributed: 3"):
        Shampoo([param]).distribute(3)  # type: ignore[arg-type]
    optimizer = Shampoo([param])
    param.grad = torch.randn(4, 3)
    optimizer.step()
    with pytest.raises(ValueError, match="before the first step only"):
        optimizer.distribute(DistributedConfig())
    assert optimizer.distributed is None
