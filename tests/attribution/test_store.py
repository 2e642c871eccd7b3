"""GradientStore: round trip per dtype, commit markers, resume after SIGKILL, mismatch errors."""

import json

import numpy as np
import pytest
import torch

from kronlab.attribution.integrity import IntegrityError
from kronlab.attribution.store import (
    GradientStore,
    ModuleBlock,
    StoreMismatchError,
    StoreSettings,
    flatten_blocks,
)


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
    assert metadata["format_version"] == 2 and metadata["num_rows"] == 23
    assert metadata["settings"]["modules"][1] == {"name": "fc2", "shape": [4, 3]}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_reads_of_any_row_range_are_the_rows_written(tmp_path, dtype):
    layout = settings(dtype=dtype)
    rows = torch.randn(23, layout.row_width)
    store = GradientStore.create(tmp_path / "s", layout, num_rows=23, chunk_rows=5)
    fill(store, rows)
    stored = rows.to(getattr(torch, dtype)).float()  # the storage rounding, nothing else
    for start, stop in [(0, 23), (3, 17), (5, 10), (22, 23), (9, 9)]:
        reopened = GradientStore.open(tmp_path / "s")  # every chunk checked on first read
        torch.testing.assert_close(reopened.read(start, stop), stored[start:stop], rtol=0, atol=0)


def test_a_data_file_cut_short_after_opening_is_an_error(tmp_path):
    layout = settings()
    store = GradientStore.create(tmp_path / "s", layout, num_rows=23, chunk_rows=5)
    fill(store, torch.randn(23, layout.row_width))
    reopened = GradientStore.open(tmp_path / "s")
    with open(tmp_path / "s" / "gradients.bin", "r+b") as handle:
        handle.truncate(12 * layout.row_width * 4)
    with pytest.raises(IntegrityError, match="gradients.bin is damaged: it ends before row 15"):
        reopened.read(10, 15)


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
    one_inf = torch.zeros(3, layout.row_width)
    one_inf[2, 5] = -float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        store.write_chunk(0, one_inf)
    # Finite entries whose sum overflows float32 are finite rows: written, not refused.
    huge = torch.full((3, layout.row_width), 3e38)
    store.write_chunk(0, huge)
    assert torch.equal(store.read(0, 3), huge)


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


class Crash(Exception):
    """Stands in for a SIGKILL at one instant (the CLI test in test_pipeline.py sends real ones)."""


@pytest.mark.parametrize("instant", ["mid-data", "after-data-before-commit"])
def test_resume_after_a_crash_rewrites_only_uncommitted_chunks(tmp_path, monkeypatch, instant):
    layout = settings()
    rows = torch.randn(40, layout.row_width)
    store = GradientStore.create(tmp_path / "s", layout, num_rows=40, chunk_rows=6)
    for chunk in (0, 1, 2):
        store.write_chunk(chunk, rows[6 * chunk : 6 * chunk + 6])

    import kronlab.attribution.store as store_module

    real_pwrite = store_module._pwrite_all

    def crashing_pwrite(fd, payload, offset):
        if instant == "mid-data":
            real_pwrite(fd, payload[: len(payload) // 2], offset)  # half the chunk's bytes
            raise Crash
        if len(payload) == 8:  # the commit record: data is already in the file
            raise Crash
        real_pwrite(fd, payload, offset)

    monkeypatch.setattr(store_module, "_pwrite_all", crashing_pwrite)
    with pytest.raises(Crash):
        store.write_chunk(3, rows[18:24] + 1000)  # these values must not survive
    monkeypatch.setattr(store_module, "_pwrite_all", real_pwrite)

    resumed = GradientStore.create(tmp_path / "s", layout, num_rows=40, chunk_rows=6, resume=True)
    assert resumed.pending_chunks() == [3, 4, 5, 6]
    written = []
    for chunk in resumed.pending_chunks():
        start, stop = resumed.chunk_range(chunk)
        resumed.write_chunk(chunk, rows[start:stop])
        written.append(chunk)
    assert written == [3, 4, 5, 6] and resumed.is_complete
    assert torch.equal(resumed.read(), rows)


def _filled(tmp_path, **overrides) -> tuple[GradientStore, torch.Tensor]:
    layout = settings(**overrides)
    rows = torch.randn(23, layout.row_width)
    store = GradientStore.create(tmp_path / "s", layout, num_rows=23, chunk_rows=5)
    fill(store, rows)
    return store, rows


def test_a_changed_byte_is_an_error_naming_the_file_and_chunk(tmp_path):
    store, rows = _filled(tmp_path)
    path = tmp_path / "s" / "gradients.bin"
    data = bytearray(path.read_bytes())
    offset = 12 * store.row_width * 4 + 3  # a byte of row 12: chunk 2 (rows 10..14)
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    reopened = GradientStore.open(tmp_path / "s")
    assert torch.equal(reopened.read(0, 10), rows[:10])  # untouched chunks still read
    with pytest.raises(IntegrityError, match=r"gradients.bin is damaged: chunk 2 \(rows 10..14\)"):
        reopened.read(8, 12)
    # A zeroed committed chunk is as damaged as a flipped byte.
    data[offset] ^= 0x10
    data[: 5 * store.row_width * 4] = bytes(5 * store.row_width * 4)
    path.write_bytes(bytes(data))
    assert GradientStore.open(tmp_path / "s").damaged_chunks() == [0]


def test_resume_finds_and_rewrites_damaged_chunks(tmp_path):
    store, rows = _filled(tmp_path)
    path = tmp_path / "s" / "gradients.bin"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last chunk
    path.write_bytes(bytes(data))
    reopened = GradientStore.open(tmp_path / "s")
    assert reopened.damaged_chunks() == [4]
    reopened.uncommit([4])
    assert reopened.pending_chunks() == [4] and not reopened.is_complete
    fill(reopened, rows)
    assert torch.equal(GradientStore.open(tmp_path / "s").read(), rows)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(num_rows=22),
        lambda m: m["settings"].update(dtype="float16"),  # same item size as bfloat16
        lambda m: m["settings"]["modules"][0].update(shape=[2, 8]),  # same size, other shape
    ],
    ids=["num_rows", "dtype", "shape"],
)
def test_edited_metadata_is_refused(tmp_path, edit):
    _filled(tmp_path, dtype="bfloat16")
    path = tmp_path / "s" / "store.json"
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))
    with pytest.raises(IntegrityError, match="store.json was changed after it was written"):
        GradientStore.open(tmp_path / "s")


def _reseal(directory, **changes) -> dict:
    """Rewrite ``store.json`` with ``changes`` and a valid digest of its new content (as a
    buggy or older writer might), so that only the other checks can catch it."""
    from kronlab.attribution.integrity import write_json

    path = directory / "store.json"
    metadata = json.loads(path.read_text())
    del metadata["content_digest"]
    metadata.update(changes)
    write_json(path, metadata)
    return metadata


def test_metadata_is_checked_against_the_file_sizes(tmp_path):
    _filled(tmp_path)
    _reseal(tmp_path / "s", num_rows=30)
    with pytest.raises(IntegrityError, match="gradients.bin is damaged: store.json says it has"):
        GradientStore.open(tmp_path / "s")
    _reseal(tmp_path / "s", num_rows=23)
    with open(tmp_path / "s" / "committed.bin", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(IntegrityError, match="committed.bin is damaged"):
        GradientStore.open(tmp_path / "s")


def test_an_older_store_format_asks_for_a_rebuild(tmp_path):
    _filled(tmp_path)
    metadata = _reseal(tmp_path / "s", format_version=1)
    with pytest.raises(StoreMismatchError, match="store format 1.*build it again"):
        GradientStore.open(tmp_path / "s")
    (tmp_path / "s" / "store.json").write_text(json.dumps(metadata))  # format 1: no digest
    with pytest.raises(IntegrityError, match="older kronlab.*build it again"):
        GradientStore.open(tmp_path / "s")


def test_durable_writes_fsync_the_data_before_its_commit_record(tmp_path, monkeypatch):
    layout = settings()
    store = GradientStore.create(tmp_path / "s", layout, 10, 5, durable=True)
    events = []
    import kronlab.attribution.store as store_module

    real_pwrite = store_module._pwrite_all
    monkeypatch.setattr(
        store_module,
        "_pwrite_all",
        lambda fd, payload, offset: (
            events.append(f"write {len(payload)}") or real_pwrite(fd, payload, offset)
        ),
    )
    monkeypatch.setattr(store_module.os, "fsync", lambda fd: events.append("fsync"))
    store.write_chunk(0, torch.ones(5, layout.row_width))
    assert events == [f"write {5 * layout.row_width * 4}", "fsync", "write 8", "fsync"]
