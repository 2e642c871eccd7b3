"""Examples as aligned tensors, and their fingerprint (what every stage checks it was given)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch

from kronlab.summary import tensor_summary

ExampleKind = Literal["image", "vector", "text"]


@dataclass
class ExampleSet:
    """Examples as aligned tensors; a batch is ``tuple(t[start:stop] for t in tensors)``.

    Text sets are ``(tokens, mask)`` and ``mask`` is passed to the hooks so that padding tokens
    contribute nothing; labelled sets are ``(inputs, labels)``.
    """

    tensors: tuple[torch.Tensor, ...]
    kind: ExampleKind
    texts: list[str] | None = None
    origins: list[str] | None = None  # where each example came from ("file.jsonl line 7")

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __repr__(self) -> str:
        tensors = ", ".join(tensor_summary(t) for t in self.tensors)
        texts = "" if self.texts is None else ", with texts"
        return f"ExampleSet({len(self)} {self.kind} examples: {tensors}{texts})"

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[start:stop] for t in self.tensors)

    def token_mask(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """The padding mask of a text batch; ``None`` when nothing is padded (no masking work)."""
        if self.kind != "text" or bool(batch[1].all()):
            return None
        return batch[1]

    def subset(self, count: int | None) -> ExampleSet:
        if count is None or count >= len(self):
            return self
        if count < 1:
            raise ValueError(f"the number of examples must be >= 1, got {count}")
        texts = None if self.texts is None else self.texts[:count]
        origins = None if self.origins is None else self.origins[:count]
        return ExampleSet(tuple(t[:count] for t in self.tensors), self.kind, texts, origins)

    def origin(self, index: int) -> str:
        """Where example ``index`` came from, for error messages."""
        return self.origins[index] if self.origins is not None else f"example {index}"

    def fingerprint(self) -> str:
        return tensors_fingerprint(self.tensors)

    def describe(self, index: int) -> str:
        if self.kind == "text":
            return repr(self.text(index)[:60])
        return f"label {int(self.tensors[1][index])}"

    def text(self, index: int) -> str:
        """The whole text of a text example (``describe`` shows its start)."""
        assert self.texts is not None
        return self.texts[index]


def tensors_fingerprint(tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> str:
    """SHA-256 (first 16 hex digits) of the tensors' dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
