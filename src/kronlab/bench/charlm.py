"""``charlm``: a character-level transformer language model on Python standard-library source.

Nothing is downloaded: the text is the source of the modules below, read from the running
interpreter (``importlib`` finds each module's file), as UTF-8 bytes — one byte is one
"character", so losses are nats per byte. Training reads :data:`TRAIN_MODULES`; validation reads
:data:`VALIDATION_MODULES`, which share no file with them. The corpus follows the Python version
(3.11's training text is 1.4 MB, its validation text 84 kB), so compare figures from one version.

The model is :class:`kronlab.tasks.text.TinyGPT` (GPT-2 layout, byte vocabulary) at
d_model 192, 3 layers, 4 heads, context 128; a batch is 32 windows of 128 + 1 bytes drawn
uniformly from the training text by a seeded generator.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from kronlab.tasks.text import GPTConfig, tiny_gpt

TRAIN_MODULES = (
    "argparse", "ast", "calendar", "collections", "configparser", "contextlib", "csv",
    "dataclasses", "datetime", "difflib", "enum", "fractions", "functools", "gettext", "heapq",
    "inspect", "ipaddress", "logging", "numbers", "pprint", "random", "shutil", "statistics",
    "string", "tempfile", "textwrap", "threading", "tokenize", "traceback", "weakref",
)  # fmt: skip
VALIDATION_MODULES = (
    "fnmatch", "glob", "operator", "queue", "sched", "selectors", "shlex", "zipapp",
)  # fmt: skip
CONTEXT = 128
BATCH_SIZE = 32
VALIDATION_WINDOWS = 64
MODEL_CONFIG = GPTConfig(context=CONTEXT, d_model=192, layers=3, heads=4)

Batch = torch.Tensor  # (batch, CONTEXT + 1) byte ids: inputs are [:, :-1], targets [:, 1:]


def module_source(name: str) -> bytes:
    """The source file of the standard-library module ``name``, as bytes."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ValueError(f"standard-library module {name!r} has no Python source here")
    return Path(spec.origin).read_bytes()


@lru_cache(maxsize=2)
def corpus(split: str) -> torch.Tensor:
    """All bytes of the split's modules, one blank line between files, as a long tensor."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    names = TRAIN_MODULES if split == "train" else VALIDATION_MODULES
    text = b"\n\n".join(module_source(name) for name in names)
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def make_model(seed: int) -> nn.Module:
    return tiny_gpt(seed, MODEL_CONFIG)


def batches(steps: int, seed: int) -> Iterator[Batch]:
    """``steps`` batches of random training windows, the same for every optimizer per seed."""
    text = corpus("train")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(CONTEXT + 1)
    for _ in range(steps):
        starts = torch.randint(len(text) - CONTEXT - 1, (BATCH_SIZE, 1), generator=generator)
        yield text[starts + offsets]


def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-byte cross-entropy over every position of every window (nats per byte)."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@lru_cache(maxsize=1)
def validation_windows() -> Batch:
    """Evenly spaced, fixed windows over the validation text (no randomness)."""
    text = corpus("validation")
    starts = torch.linspace(0, len(text) - CONTEXT - 2, VALIDATION_WINDOWS).long()
    return text[starts[:, None] + torch.arange(CONTEXT + 1)]


@torch.no_grad()
def window_losses(model: nn.Module) -> torch.Tensor:
    """Mean next-byte cross-entropy of each validation window (nats per byte), shape
    ``(VALIDATION_WINDOWS,)``."""
    model.eval()
    values = []
    for chunk in validation_windows().split(BATCH_SIZE):
        logits = model(chunk[:, :-1])
        per_byte = F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none")
        values.append(per_byte.mean(dim=1))
    model.train()
    return torch.cat(values)


def validation_loss(model: nn.Module) -> float:
    """Mean over the validation windows (every window has the same length)."""
    return window_losses(model).mean().item()
