"""Tiny models shared by the curvature tests."""

from __future__ import annotations

import torch
from torch import nn


class Conv1D(nn.Module):
    """HF-style Conv1D (weight ``(in, out)``, ``y = x W + b``), written here so the tests need no
    transformers install; the hooks detect it by class name."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(
            *x.shape[:-1], self.nf
        )


class TinySequenceModel(nn.Module):
    """Embedding → Conv1D → ReLU → Linear head over tokens (a miniature language model)."""

    def __init__(self, vocab: int = 7, width: int = 5, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width, padding_idx=padding_idx)
        self.mixer = Conv1D(6, width)
        self.head = nn.Linear(6, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mixer(self.embedding(tokens))))


class PositionalSequenceModel(TinySequenceModel):
    """``TinySequenceModel`` plus a learned position embedding called GPT-2's way: once per
    batch on position ids ``(1, T)``, its output broadcast over the examples."""

    def __init__(self, vocab: int = 7, width: int = 5, positions: int = 8) -> None:
        super().__init__(vocab, width)
        self.position = nn.Embedding(positions, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        hidden = self.embedding(tokens) + self.position(ids)
        return self.head(torch.relu(self.mixer(hidden)))


def sequence_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Summed next-token loss; batch = (tokens, targets, mask) with mask 1 on real tokens."""
    tokens, targets, mask = batch
    logits = model(tokens)
    losses = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * mask.flatten()).sum()


def classification_sum_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs), targets, reduction="sum")
