"""Shared benchmark models and timers (run on demand, never in the test suite).

Protocol (DESIGN.md): every figure is a ratio measured in one process — step time against
``torch.optim.AdamW`` on the same model, against the peer implementation, and against the FLOP
floor (the unavoidable matrix products, timed with ``torch.matmul`` here too).
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn


def benchmark_mlp(seed: int = 0) -> nn.Module:
    """The benchmark MLP 256 → 512 → 512 → 10 (ReLU)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def mlp_batch(batch_size: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, 256, generator=generator)
    return inputs, torch.randint(0, 10, (batch_size,), generator=generator)


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=x.device), 1)
        h = self.norm1(x)
        x = x + self.attention(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """A GPT-style decoder built from a config with random weights (no downloads)."""

    def __init__(
        self,
        vocab: int = 512,
        d_model: int = 256,
        layers: int = 4,
        heads: int = 4,
        context: int = 64,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embedding(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def benchmark_transformer(seed: int = 0) -> TinyTransformer:
    """The benchmark transformer: 4 layers, d_model 256, vocab 512, context 64."""
    torch.manual_seed(seed)
    return TinyTransformer()


def transformer_batch(
    batch_size: int = 16, context: int = 64, vocab: int = 512, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch_size, context + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten())


def time_optimizer_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    steps: int,
    warmup: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Mean seconds of ``optimizer.step()`` alone (gradients recomputed outside the timer).

    Time ``steps`` as a whole number of precondition periods for amortized methods. ``clock``
    is wall time by default; ``time.thread_time`` counts only this thread's CPU time, which a
    machine with more runnable jobs than cores does not inflate by the time spent waiting
    (CPU work only: with one torch thread every kernel runs on the calling thread).
    """
    inputs, targets = batch
    total = 0.0
    for index in range(warmup + steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        _synchronize()
        started = clock()
        optimizer.step()
        _synchronize()
        if index >= warmup:
            total += clock() - started
    return total / steps


def time_callable(
    function: Callable[[], object],
    *,
    repeats: int = 20,
    warmup: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Mean seconds of ``function()`` (``clock`` as in ``time_optimizer_steps``)."""
    for _ in range(warmup):
        function()
    _synchronize()
    started = clock()
    for _ in range(repeats):
        function()
    _synchronize()
    return (clock() - started) / repeats


def matmul_floor_seconds(
    shapes: Iterable[tuple[int, int, int]],
    *,
    repeats: int = 20,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds for the products ``(m×k) @ (k×n)`` listed in ``shapes``, with ``torch.matmul``."""
    operands = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    return time_callable(
        lambda: [torch.matmul(a, b) for a, b in operands], repeats=repeats, clock=clock
    )


def machine_description() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def format_ratio(numerator: float, denominator: float) -> str:
    return (
        "n/a" if not math.isfinite(numerator / denominator) else f"{numerator / denominator:.2f}x"
    )


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
