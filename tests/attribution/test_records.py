"""File inputs are read batch by batch: JSONL streamed (line offsets only), HF datasets through
their memory-mapped table; each batch equals the same rows of the whole file encoded at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kronlab.attribution.sources import load_examples
from kronlab.tasks.text import encode_bytes


def _snippets(count: int) -> list[dict]:
    return [{"text": f"x_{i} = {i} * {'y' * (i % 5)}  # é", "id": i} for i in range(count)]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(r) + "\n" + ("\n" if i == 2 else "") for i, r in enumerate(records)),
        encoding="utf-8",
    )
    return path


def test_jsonl_is_streamed_and_batches_equal_the_whole_file(tmp_path, monkeypatch) -> None:
    records = _snippets(11)
    path = _write(tmp_path / "train.jsonl", records)
    # Reading the whole file at once is what this replaces.
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("whole file read"))
    examples = load_examples(str(path), "train", length=12)
    assert len(examples) == 11 and examples.kind == "text"
    assert isinstance(examples.source.offsets, np.ndarray)  # what it keeps: one offset a line
    expected_tokens, expected_mask = encode_bytes([r["text"] for r in records], 12)
    tokens, mask = examples.batch(3, 8)
    assert torch.equal(tokens, expected_tokens[3:8]) and torch.equal(mask, expected_mask[3:8])
    assert torch.equal(examples.batch(8, 20)[0], expected_tokens[8:])
    assert examples.describe(4) == repr(records[4]["text"])
    subset = examples.subset(5)
    assert len(subset) == 5 and subset.fingerprint() != examples.fingerprint()
    assert load_examples(str(path), "train", length=12).fingerprint() == examples.fingerprint()
    assert load_examples(str(path), "train", length=10).fingerprint() != examples.fingerprint()


def test_jsonl_errors_name_the_line(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match="bad.jsonl line 2: not valid JSON"):
        load_examples(str(bad), "train")
    listed = tmp_path / "list.jsonl"
    listed.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="list.jsonl line 1: expected a JSON object, got list"):
        load_examples(str(listed), "train")


def test_dataset_directory_is_sliced_not_loaded(tmp_path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    records = _snippets(9)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "dataset"))
    # Iterating over every row is the full load this replaces.
    monkeypatch.setattr(
        datasets.Dataset, "__iter__", lambda self: pytest.fail("dataset iterated in full")
    )
    examples = load_examples(str(tmp_path / "dataset"), "train", length=16)
    reference = load_examples(str(_write(tmp_path / "same.jsonl", records)), "train", length=16)
    assert len(examples) == 9
    for start, stop in ((0, 4), (4, 9)):
        for ours, expected in zip(examples.batch(start, stop), reference.batch(start, stop)):
            assert torch.equal(ours, expected)
    assert examples.describe(7) == reference.describe(7)


def test_build_states_the_store_size_before_writing(tmp_path, capsys) -> None:
    from kronlab.attribution.pipeline import AttributionConfig, AttributionRun

    from .pipeline_fixtures import tiny_task

    config = AttributionConfig(
        num_queries=2, batch_size=16, chunk_rows=16, projection_dim=4, compression="project"
    )
    run = AttributionRun(tmp_path, config, task=tiny_task(num_train=20, num_queries=2))
    store = run.build()
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[kronlab"))
    assert f"build: 20 rows × {store.row_width} float32 values" in line
    assert f"{store.nbytes / 2**20:,.1f} MiB" in line
