"""Examples read from a file batch by batch: JSONL streamed, HF datasets memory-mapped.

A store of a million examples must not hold them all: :class:`RecordExamples` keeps only what
locates each record (a byte offset per JSONL line, ``8`` bytes per example; a memory-mapped
Arrow table for a ``datasets.save_to_disk`` directory) and encodes a batch's records when the
pipeline asks for that batch. Encoding is per record (bytes or the tokenizer, padded to
``length``), so a batch equals the same rows of the whole set encoded at once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kronlab.attribution.examples import ExampleKind, ExampleSet

Encoder = Callable[[list[dict[str, Any]]], tuple[torch.Tensor, ...]]


RecordCheck = Callable[[dict[str, Any], str], None]


class JsonlRecords:
    """Random access to the records of a ``.jsonl`` file through one pass that keeps each
    line's byte offset and number, checks that every line is a JSON object, and runs ``check``
    (``check(record, "file line N")``) on each record, so a bad line is named before any work."""

    def __init__(self, path: Path, check: RecordCheck | None = None) -> None:
        self.path = Path(path)
        offsets, numbers, digest, position = [], [], hashlib.sha256(), 0
        with self.path.open("rb") as handle:
            for number, line in enumerate(handle, 1):
                digest.update(line)
                if line.strip():
                    origin = f"{self.path} line {number}"
                    try:
                        record = json.loads(line)
                    except UnicodeDecodeError as error:
                        raise ValueError(f"{origin}: not UTF-8 text ({error.reason})") from None
                    except json.JSONDecodeError as error:
                        raise ValueError(
                            f"{origin}: not valid JSON ({error.msg} at column {error.colno})"
                        ) from None
                    if not isinstance(record, dict):
                        raise ValueError(
                            f"{origin}: expected a JSON object, got {type(record).__name__}"
                        )
                    if check is not None:
                        check(record, origin)
                    offsets.append(position)
                    numbers.append(number)
                position += len(line)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.line_numbers = np.asarray(numbers, dtype=np.int64)
        self.digest = digest.hexdigest()

    def origin(self, index: int) -> str:
        return f"{self.path} line {int(self.line_numbers[index])}"

    def __len__(self) -> int:
        return len(self.offsets)

    def records(self, start: int, stop: int) -> list[dict[str, Any]]:
        result = []
        with self.path.open("rb") as handle:
            for offset in self.offsets[start:stop]:
                handle.seek(int(offset))
                result.append(json.loads(handle.readline()))
        return result

    def fingerprint(self) -> str:
        return f"jsonl:{self.digest}"


class DatasetRecords:
    """Random access to a ``datasets.save_to_disk`` directory; ``load_from_disk`` maps its
    Arrow files, so slicing reads only the slice."""

    def __init__(self, path: Path) -> None:
        try:
            from datasets import load_from_disk
        except ImportError as error:
            raise ImportError(
                "a Hugging Face dataset directory needs datasets: pip install 'kronlab[hf]'"
            ) from error
        self.path = Path(path)
        self.dataset = load_from_disk(str(path))

    def __len__(self) -> int:
        return len(self.dataset)

    def records(self, start: int, stop: int) -> list[dict[str, Any]]:
        columns = self.dataset[start:stop]
        names = list(columns)
        return [dict(zip(names, row, strict=True)) for row in zip(*columns.values(), strict=True)]

    def origin(self, index: int) -> str:
        return f"{self.path} record {index + 1}"

    def fingerprint(self) -> str:
        # datasets' own fingerprint of the table and every transform that produced it.
        return f"dataset:{self.dataset._fingerprint}"


class RecordExamples(ExampleSet):
    """An :class:`ExampleSet` whose batches are encoded from ``source`` on demand.

    ``tensors`` (the whole set encoded) exists for small sets and tests; the pipeline uses only
    :meth:`batch`, :meth:`describe` and :meth:`fingerprint`, which never load the whole set.
    """

    def __init__(
        self,
        source: JsonlRecords | DatasetRecords,
        kind: ExampleKind,
        encode: Encoder,
        encoding: str,
        count: int | None = None,
    ) -> None:
        self.source, self.kind, self.encode, self.encoding = source, kind, encode, encoding
        self.count = len(source) if count is None else min(count, len(source))

    def __repr__(self) -> str:
        return f"RecordExamples({self.source.fingerprint()}, kind={self.kind!r}, n={len(self)})"

    def __len__(self) -> int:
        return self.count

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return self.batch(0, len(self))

    @property
    def texts(self) -> list[str] | None:  # type: ignore[override]
        if self.kind != "text":
            return None
        return [str(record["text"]) for record in self.source.records(0, len(self))]

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        stop = min(stop, len(self))
        return self.encode(self.source.records(start, stop))

    def subset(self, count: int | None) -> ExampleSet:
        if count is None or count >= len(self):
            return self
        if count < 1:
            raise ValueError(f"the number of examples must be >= 1, got {count}")
        return RecordExamples(self.source, self.kind, self.encode, self.encoding, count)

    def fingerprint(self) -> str:
        key = f"{self.source.fingerprint()}|{self.encoding}|{len(self)}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def origin(self, index: int) -> str:
        return self.source.origin(index)

    def describe(self, index: int) -> str:
        if self.kind == "text":
            return repr(self.text(index)[:60])
        (record,) = self.source.records(index, index + 1)
        return f"label {int(record['label'])}"

    def text(self, index: int) -> str:
        """The whole text of a text example (``describe`` shows its start)."""
        (record,) = self.source.records(index, index + 1)
        return str(record["text"])
