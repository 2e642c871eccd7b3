"""Faults in the attribution pipeline end in one clear ``kronlab: error:`` line or an identical
result: damaged and truncated files, a model or setting changed between stages, an unwritable
directory, a file size limit, a full disk, bad JSONL, kill -9 with resume."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kronlab
from kronlab.attribution.store import GradientStore
from kronlab.cli import main

# The subprocesses run the kronlab under test (whichever this process imported).
SRC = str(Path(kronlab.__file__).resolve().parents[1])
# The smallest digits problem: 64 training examples, 4 queries, 8-row chunks, p = 8.
SETTINGS = (
    "--num-train", "64", "--num-queries", "4", "--chunk-rows", "8", "--batch-size", "8",
    "--method", "kfac", "--fisher", "empirical", "--projection-dim", "8", "--report-queries", "0",
    "--compression", "project",
    "--damping", "0.1",
)  # fmt: skip
# The store of full gradients, built before the curvature is fitted.
FULL = ("--projection-dim", "0", "--compression", "project")


def _seed_cache(cache: Path, seed: int = 0) -> None:
    """An untrained digits MLP (initialized from ``seed``) as the cached embedded model."""
    from kronlab.tasks.digits import digits_mlp

    cache.mkdir(parents=True, exist_ok=True)
    torch.save(digits_mlp(seed).state_dict(), cache / "digits-mlp-seed0.pt")


def cli(run_dir: Path, cache: Path, stage: str, *extra: str) -> tuple[int, str]:
    """``kronlab attribute STAGE`` in this process with one thread; (exit code, stderr)."""
    arguments = ["attribute", stage, "--run-dir", str(run_dir), "--cache-dir", str(cache)]
    stderr = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses below: bit-identical results
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main([*arguments, "--no-progress", *extra])
    finally:
        torch.set_num_threads(threads)
    return code, stderr.getvalue()


def assert_clear_error(code: int, stderr: str, *mentions: str) -> None:
    assert code == 2, stderr
    assert stderr.startswith("kronlab: error: "), stderr
    assert "Traceback" not in stderr
    for mention in mentions:
        assert mention in stderr, (mention, stderr)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(cache, run directory) of one complete, uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    _seed_cache(root / "cache")
    code, stderr = cli(root / "run", root / "cache", "run", *SETTINGS)
    assert code == 0, stderr
    return root / "cache", root / "run"


def _copy(reference: tuple[Path, Path], tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(reference[1], run_dir)
    return run_dir


def _scores(run_dir: Path) -> bytes:
    return (run_dir / "scores.npy").read_bytes()


FILES = [
    "train/gradients.bin",
    "train/committed.bin",
    "train/store.json",
    "queries/gradients.bin",
    "queries/committed.bin",
    "queries/store.json",
    "curvature.safetensors",
    "fit.json",
    "scores.npy",
    "score.json",
    "config.json",
]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("name", FILES)
def test_damaged_file_is_a_clear_error_never_a_wrong_score(reference, tmp_path, name, damage):
    run_dir = _copy(reference, tmp_path)
    path = run_dir / name
    data = bytearray(path.read_bytes())
    if damage == "flip":
        # committed.bin: a byte of chunk 0's checksum; elsewhere a byte in the middle.
        position = 4 if name.endswith("committed.bin") else len(data) // 2
        data[position] ^= 0x5A
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    # A store is read by `score`; `run` checks every other file of a complete run.
    stage = "score" if name.startswith(("train/", "queries/")) else "run"
    code, stderr = cli(run_dir, reference[0], stage)
    if code == 0:  # a damage that changes nothing read (config.json only)
        assert name == "config.json" and _scores(run_dir) == _scores(reference[1])
        return
    assert_clear_error(code, stderr, Path(name).name if name != "train/committed.bin" else "")
    if name.endswith("gradients.bin") and damage == "flip":
        assert "chunk" in stderr and "--resume" in stderr


def test_resume_rewrites_a_damaged_chunk_to_the_identical_result(reference, tmp_path):
    run_dir = _copy(reference, tmp_path)
    path = run_dir / "train" / "gradients.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01  # one bit
    path.write_bytes(bytes(data))
    code, stderr = cli(run_dir, reference[0], "score")
    assert_clear_error(code, stderr, "gradients.bin", "chunk 2 (rows 16..23)", "build --resume")
    assert cli(run_dir, reference[0], "build", "--resume")[0] == 0
    assert cli(run_dir, reference[0], "score")[0] == 0
    assert _scores(run_dir) == _scores(reference[1])


def test_curvature_fitted_on_another_model_is_refused(reference, tmp_path):
    # fit with one checkpoint, then run with another under the same --model name.
    first, second = tmp_path / "first", tmp_path / "second"
    _seed_cache(first, seed=0)
    _seed_cache(second, seed=1)
    run_dir = tmp_path / "run"
    assert cli(run_dir, first, "fit", *SETTINGS)[0] == 0
    code, stderr = cli(run_dir, second, "run")
    assert_clear_error(code, stderr, "model_fingerprint", "curvature.safetensors", "fit.json")
    assert "new --run-dir" in stderr
    # Found before any work: no store was built with the other model.
    assert not (run_dir / "train").exists() and not (run_dir / "scores.npy").exists()


def test_edited_damping_is_refused_then_the_report_states_what_was_used(reference, tmp_path):
    run_dir = _copy(reference, tmp_path)
    assert "damping 0.1 × mean eigenvalue" in (run_dir / "report.md").read_text()
    config = json.loads((run_dir / "config.json").read_text())
    config["damping"] = 0.5
    (run_dir / "config.json").write_text(json.dumps(config))
    code, stderr = cli(run_dir, reference[0], "run")
    # The queries were preconditioned with damping 0.1: scoring them as 0.5 is refused.
    assert_clear_error(
        code, stderr, "damping=0.1", "damping=0.5", "queries", "kronlab attribute run"
    )
    code, stderr = cli(run_dir, reference[0], "score")
    assert_clear_error(code, stderr, "damping=0.1", "damping=0.5")
    # Following the hint: the queries are computed again, then the scores.
    shutil.rmtree(run_dir / "queries")
    assert cli(run_dir, reference[0], "run")[0] == 0
    assert "damping 0.5 × mean eigenvalue" in (run_dir / "report.md").read_text()
    record = json.loads((run_dir / "score.json").read_text())
    assert record["computed_with"]["damping"] == 0.5
    assert _scores(run_dir) != _scores(reference[1])


def test_missing_stage_names_the_command_that_works(reference, tmp_path):
    run_dir = tmp_path / "run"
    code, stderr = cli(run_dir, reference[0], "score", *SETTINGS)
    assert_clear_error(code, stderr, f"kronlab attribute build --run-dir {run_dir}")
    code, stderr = cli(run_dir, reference[0], "apply")
    assert_clear_error(code, stderr, f"kronlab attribute fit --run-dir {run_dir}")


def _writes_refused(directory: Path) -> bool:
    """chmod has no effect for root (and some file systems): look instead of assuming."""
    try:
        (directory / "probe").write_text("")
    except PermissionError:
        return True
    (directory / "probe").unlink()
    return False


def test_unwritable_run_dir(reference, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if not _writes_refused(parent):
            pytest.skip("permissions are not enforced here (running as root?)")
        code, stderr = cli(parent / "run", reference[0], "run", *SETTINGS)
    finally:
        parent.chmod(0o700)
    assert_clear_error(code, stderr, "Permission denied", str(parent / "run"), "writable --run-dir")


def test_permission_error_names_the_file_and_the_fix(reference, tmp_path, monkeypatch):
    # The same path as above, where chmod is not enforced: the file system says EACCES.
    run_dir = _copy(reference, tmp_path)
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_WRONLY and str(path).endswith("gradients.bin"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    shutil.rmtree(run_dir / "queries")
    code, stderr = cli(run_dir, reference[0], "apply")
    assert_clear_error(code, stderr, "Permission denied", "queries/gradients.bin", "writable")


def test_file_size_limit_is_a_clear_error(reference, tmp_path):
    # Full gradients (6.7 MB) past a 1 MB `ulimit -f`: the write fails with EFBIG; without
    # SIGXFSZ ignored the process would die of the signal without a word.
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "kronlab.cli", "attribute", "build", "--run-dir",
               str(run_dir), "--cache-dir", str(reference[0]), "--no-progress", *SETTINGS,
               "--projection-dim", "0"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(command, env=env, preexec_fn=limit, capture_output=True, text=True)
    assert_clear_error(result.returncode, result.stderr, "File too large", "gradients.bin")
    assert "ulimit -f" in result.stderr and "build --resume" in result.stderr


def test_full_disk_while_scoring_is_a_clear_error_not_sigbus(reference, tmp_path, monkeypatch):
    run_dir = _copy(reference, tmp_path)

    def full_disk(descriptor: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # The scores are memory-mapped: their blocks must be allocated before the first write.
    monkeypatch.setattr(os, "posix_fallocate", full_disk, raising=False)
    code, stderr = cli(run_dir, reference[0], "score")
    assert_clear_error(code, stderr, "No space left on device", "scores.npy", "--resume")
    assert not (run_dir / "score.json").exists()  # the old scores no longer count


def test_overflowing_scores_are_an_error_not_inf(reference, tmp_path):
    run_dir = _copy(reference, tmp_path)
    # Finite rows, committed with valid checksums, whose products exceed float32.
    train, queries = (GradientStore.open(run_dir / name) for name in ("train", "queries"))
    train.write_chunk(3, torch.full((8, train.row_width), 1e30))
    queries.write_chunk(0, torch.full((4, queries.row_width), 1e30))
    code, stderr = cli(run_dir, reference[0], "score")
    assert_clear_error(code, stderr, "training rows 24..31 overflowed float32")


def _jsonl(path: Path, records: list, bad_line: str | None = None) -> Path:
    lines = [json.dumps(record) for record in records]
    if bad_line is not None:
        lines[6] = bad_line  # line 7
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"input": [0.5, ', "not valid JSON"),
        ('{"text": "mixed keys"}', "keys ['text'], but"),
        (json.dumps({"input": [0.0] * 63, "label": 1}), "'input' has 63 values"),
        (json.dumps({"input": [0.0] * 64, "label": 12}), "label 12 is out of range"),
        (json.dumps({"input": [0.0] * 64, "label": -1}), "'label' must be a class index"),
    ],
)
def test_bad_jsonl_line_is_named(reference, tmp_path, bad_line, message):
    good = [{"input": [float(i % 7)] * 64, "label": i % 10} for i in range(12)]
    train = _jsonl(tmp_path / "train.jsonl", good, bad_line)
    queries = _jsonl(tmp_path / "queries.jsonl", good[:3])
    code, stderr = cli(
        tmp_path / "run", reference[0], "build", "--data", str(train), "--queries", str(queries),
        *FULL,
    )  # fmt: skip
    assert_clear_error(code, stderr, f"{train} line 7", message)


def test_debug_shows_the_traceback(reference, tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"input": [0.0] * 64, "label": 0}] * 8, "{")
    arguments = ["--data", str(train), "--queries", str(train), *FULL]
    code, stderr = cli(tmp_path / "run", reference[0], "build", *arguments, "--debug")
    assert code == 2 and "Traceback (most recent call last)" in stderr
    assert stderr.rstrip().splitlines()[-1].startswith(f"kronlab: error: {train} line 7")


def test_durable_run_fsyncs_and_gives_the_same_scores(reference, tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    code, stderr = cli(tmp_path / "run", reference[0], "run", *SETTINGS, "--durable")
    assert code == 0, stderr
    # Two per chunk commit (data, then its record) for 8 + 1 chunks, plus the files and dirs.
    assert len(synced) >= 2 * 9 + 4
    assert _scores(tmp_path / "run") == _scores(reference[1])


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not path.exists():
        time.sleep(0.002)


def test_kill_9_at_several_points_then_resume_gives_the_identical_result(reference, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "kronlab.cli", "attribute", "run", "--resume",
               "--run-dir", str(run_dir), "--cache-dir", str(reference[0]), "--no-progress",
               *SETTINGS]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    rng = random.Random(17)
    # One process per kill: mid-build, around the queries' store, around the scores; each
    # waits for its landmark, then a random few milliseconds more.
    for landmark in ("train/store.json", "queries/store.json", "scores.npy"):
        process = subprocess.Popen(command, env=env)
        _wait_for(run_dir / landmark, process)
        time.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        train = GradientStore.open(run_dir / "train")
        if not train.is_complete:
            # An interrupted build: a later stage names the command that continues it.
            code, stderr = cli(run_dir, reference[0], "score")
            assert_clear_error(code, stderr, "kronlab attribute build --resume")
    assert cli(run_dir, reference[0], "run", "--resume")[0] == 0
    assert _scores(run_dir) == _scores(reference[1])
    resumed, uninterrupted = (
        GradientStore.open(d / "train").read() for d in (run_dir, reference[1])
    )
    assert torch.equal(resumed, uninterrupted)
    np.testing.assert_array_equal(
        np.load(run_dir / "scores.npy"), np.load(reference[1] / "scores.npy")
    )


@pytest.mark.parametrize(
    ("raised", "status", "message"),
    [
        (RuntimeError("boom"), 1, "unexpected RuntimeError: boom (rerun with --debug"),
        (KeyboardInterrupt(), 130, "interrupted; `kronlab attribute build --resume --run-dir"),
    ],
)
def test_any_other_failure_is_one_line(tmp_path, monkeypatch, raised, status, message):
    from kronlab.attribution.pipeline import AttributionRun

    def fail(self, resume=False):
        raise raised

    monkeypatch.setattr(AttributionRun, "build", fail)
    code, stderr = cli(tmp_path / "run", tmp_path / "cache", "build")
    assert code == status and stderr.startswith("kronlab: error: ")
    assert message in stderr and "Traceback" not in stderr and stderr.count("\n") == 1


def test_store_above_the_size_limit_is_refused_before_writing(reference, tmp_path):
    run_dir = tmp_path / "run"
    # full digits gradients: 1438 rows x 18,058 float32 values = 0.10 GB
    code, stderr = cli(run_dir, reference[0], "build", "--max-store-gb", "0.05", *FULL)
    assert_clear_error(code, stderr, "above --max-store-gb 0.05", "--projection-dim")
    assert not (run_dir / "train").exists()
    projected = tmp_path / "projected"
    code, stderr = cli(
        projected, reference[0], "build", "--max-store-gb", "0.05", "--projection-dim", "8",
        "--compression", "project",
    )  # fmt: skip
    assert code == 0, stderr
    code, stderr = cli(projected, reference[0], "build", "--max-store-gb", "0", "--resume")
    assert_clear_error(code, stderr, "max_store_gb")
