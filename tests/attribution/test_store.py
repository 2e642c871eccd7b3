"""GradientStore: round trip per dtype, commit markers, resume after SIGKILL, mismatch errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kronlab.attribution.store import (
    GradientStore,
    ModuleBlock,
    StoreMismatchError,
    StoreSettings,
    flatten_blocks,
)

SRC = str(Path(__file__).resolve().parents[2] / "src")


def settings(**overrides) -> StoreSettings:
    values = dict(
        modules=(ModuleBlock("fc1", (4, 4)), ModuleBlock("fc2", (4, 3))),
        projection_dim=4,
        dtype="float32",
        model_fingerprint="model-a",
        data_fingerprint="data-a",
    )
    values.update(overrides)
    return StoreSettings(**values)


def fill(store: GradientStore, rows: torch.Tensor) -> None:
    for chunk in store.pending_chunks():
        start, stop = store.chunk_range(chunk)
        store.write_chunk(chunk, rows[start:stop])


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [("float32", 0.0), ("bfloat16", 2**-8), ("float16", 2**-11)]
)
def test_round_trip_per_dtype(tmp_path, dtype, tolerance):
    layout = settings(dtype=dtype)
    rows = torch.randn(23, layout.row_width)
    store = GradientStore.create(tmp_path / "s", layout, num_rows=23, chunk_rows=5)
    assert store.num_chunks == 5 and not store.is_complete
    fill(store, rows)
    reopened = GradientStore.open(tmp_path / "s", expected=layout)
    assert reopened.is_complete
    read = reopened.read()
    assert read.dtype == torch.float32
    # Storage rounding only: relative error within half an ulp of the storage format.
    np.testing.assert_allclose(read.numpy(), rows.numpy(), rtol=tolerance, atol=1e-30)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    assert (tmp_path / "s" / "gradients.bin").stat().st_size == 23 * layout.row_width * itemsize
    # Row-major flat file: row i starts at i * row_width.
    raw = np.fromfile(tmp_path / "s" / "gradients.bin", dtype=reopened.array.dtype)
    np.testing.assert_array_equal(raw.reshape(23, -1)[7], reopened.array[7])
    metadata = json.loads((tmp_path / "s" / "store.json").read_text())
    assert metadata["format_version"] == 1 and metadata["num_rows"] == 23
    assert metadata["settings"]["modules"][1] == {"name": "fc2", "shape": [4, 3]}


def test_module_blocks_split_rows_in_order(tmp_path):
    layout = settings()
    blocks = {"fc1": torch.randn(6, 4, 4), "fc2": torch.randn(6, 4, 3)}
    rows = flatten_blocks(blocks, layout)
    assert torch.equal(rows[:, :16], blocks["fc1"].reshape(6, 16))
    store = GradientStore.create(tmp_path / "s", layout, num_rows=6, chunk_rows=4)
    fill(store, rows)
    split = store.module_blocks(store.read(2, 5))
    assert torch.equal(split["fc2"], blocks["fc2"][2:5])
    with pytest.raises(ValueError, match="fc2"):
        flatten_blocks({"fc1": blocks["fc1"], "fc2": torch.randn(6, 3, 4)}, layout)


def test_incomplete_store_refuses_reads_and_pending_chunks_split_by_rank(tmp_path):
    layout = settings()
    store = GradientStore.create(tmp_path / "s", layout, num_rows=10, chunk_rows=3)
    store.write_chunk(1, torch.ones(3, layout.row_width))
    assert store.committed().tolist() == [False, True, False, False]
    assert store.pending_chunks(rank=0, world_size=2) == [0, 2]
    assert store.pending_chunks(rank=1, world_size=2) == [3]
    assert torch.equal(store.read(3, 6), torch.ones(3, layout.row_width))
    with pytest.raises(ValueError, match="incomplete.*--resume"):
        store.read(0, 4)
    with pytest.raises(ValueError, match="shape"):
        store.write_chunk(3, torch.ones(3, layout.row_width))  # last chunk has 1 row
    with pytest.raises(ValueError, match="non-finite"):
        store.write_chunk(0, torch.full((3, layout.row_width), float("nan")))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("projection_dim", 8),
        ("dtype", "bfloat16"),
        ("projection_kind", "normal"),
        ("modules", (ModuleBlock("fc1", (4, 4)),)),
        ("model_fingerprint", "model-b"),
        ("transform", "folded:abc"),
    ],
)
def test_settings_mismatch_is_a_clear_error(tmp_path, field, value):
    GradientStore.create(tmp_path / "s", settings(), num_rows=4, chunk_rows=2)
    with pytest.raises(StoreMismatchError, match=f"{field}: stored"):
        GradientStore.open(tmp_path / "s", expected=settings(**{field: value}))
    # The same mismatch also blocks resuming into the store.
    with pytest.raises(StoreMismatchError, match=field):
        GradientStore.create(
            tmp_path / "s", settings(**{field: value}), num_rows=4, chunk_rows=2, resume=True
        )


def test_existing_store_needs_resume_and_matching_size(tmp_path):
    GradientStore.create(tmp_path / "s", settings(), num_rows=4, chunk_rows=2)
    with pytest.raises(FileExistsError, match="resume"):
        GradientStore.create(tmp_path / "s", settings(), num_rows=4, chunk_rows=2)
    with pytest.raises(StoreMismatchError, match="num_rows=4"):
        GradientStore.create(tmp_path / "s", settings(), num_rows=5, chunk_rows=2, resume=True)
    with pytest.raises(StoreMismatchError, match="data_fingerprint"):
        GradientStore.open(tmp_path / "s", expected=settings(data_fingerprint="other"))
    # Query stores are compared without the data fingerprint.
    GradientStore.open(
        tmp_path / "s", expected=settings(data_fingerprint="other"), ignore=("data_fingerprint",)
    )


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="dtype must be one of"):
        settings(dtype="int8")
    with pytest.raises(ValueError, match="projection_dim must be >= 0, got -1"):
        settings(projection_dim=-1)
    with pytest.raises(ValueError, match="unique"):
        settings(modules=(ModuleBlock("a", (1, 1)), ModuleBlock("a", (1, 1))))


WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from kronlab.attribution.store import GradientStore, ModuleBlock, StoreSettings
    layout = StoreSettings(modules=(ModuleBlock("w", (64, 64)),), projection_dim=64)
    store = GradientStore.create(sys.argv[1], layout, num_rows=400, chunk_rows=10,
                                 resume=sys.argv[2] == "resume")
    for chunk in store.pending_chunks():
        start, stop = store.chunk_range(chunk)
        rows = torch.arange(start, stop, dtype=torch.float32)[:, None].expand(-1, 4096)
        store.write_chunk(chunk, rows + torch.linspace(0, 1, 4096))
        with open(sys.argv[1] + "/log", "a") as log:
            log.write(f"{chunk}\\n")
        time.sleep(0.01)
    """
)


def test_resume_after_sigkill_writes_every_row_once(tmp_path):
    path = str(tmp_path / "s")
    env = {**os.environ, "PYTHONPATH": SRC}
    process = subprocess.Popen([sys.executable, "-c", WRITER, path, "new"], env=env)
    log = Path(path) / "log"
    deadline = time.time() + 30
    while time.time() < deadline and (not log.exists() or len(log.read_text().split()) < 5):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    store = GradientStore.open(path)
    killed_at = store.committed()
    assert 5 <= killed_at.sum() < store.num_chunks, "the kill must land mid-build"
    subprocess.run([sys.executable, "-c", WRITER, path, "resume"], env=env, check=True)
    store = GradientStore.open(path)
    assert store.is_complete
    written = [int(k) for k in log.read_text().split()]
    # Committed chunks were never rewritten; each chunk was logged exactly once after its
    # commit (a chunk killed between commit and log would appear zero times, never twice).
    assert len(written) == len(set(written))
    assert set(written) >= set(np.flatnonzero(~killed_at).tolist())
    expected = torch.arange(400, dtype=torch.float32)[:, None] + torch.linspace(0, 1, 4096)
    assert torch.equal(store.read(), expected)
