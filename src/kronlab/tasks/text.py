"""A small GPT-2-style language model and byte-level text from Python's standard library.

Nothing is downloaded: the corpus is the ``.py`` sources of the running interpreter's stdlib,
tokenized as bytes (256 symbols + one padding id), cut into variable-length sequences and
right-padded, with a mask of the real tokens. The model follows GPT-2's layout (Radford et al.
2019): pre-norm blocks, fused ``c_attn`` (q, k, v) and ``c_proj`` linears, a 4× GELU MLP, learned
positions and an untied output head — every weight matrix is an ``nn.Linear`` that K-FAC tracks.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

BYTE_VOCAB = 256
PAD_ID = 256  # the one id past the bytes


@dataclass(frozen=True)
class GPTConfig:
    """Shape of :class:`TinyGPT`: ``vocab`` ids, ``context`` positions, ``layers`` blocks."""

    vocab: int = BYTE_VOCAB + 1
    context: int = 64
    d_model: int = 64
    layers: int = 2
    heads: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab", "context", "d_model", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ValueError(
                f"d_model must be divisible by heads, got d_model={self.d_model}, "
                f"heads={self.heads}"
            )


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)
        self.c_proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=-1)
        shape = (n, length, self.heads, width // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(attended.transpose(1, 2).reshape(n, length, width))


class GPTBlock(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, 4 * config.d_model),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * config.d_model, config.d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """GPT-2-style decoder: ``tokens (n, T) → logits (n, T, vocab)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab, config.d_model)
        self.wpe = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(GPTBlock(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections.
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * config.layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, length = tokens.shape
        if length > self.config.context:
            raise ValueError(f"sequence length {length} exceeds context {self.config.context}")
        # Positions as an (n, T) batch so hooks see one row of tokens per example.
        positions = torch.arange(length, device=tokens.device).expand(n, length)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def tiny_gpt(seed: int = 0, config: GPTConfig | None = None) -> TinyGPT:
    """A :class:`TinyGPT` with weights drawn from ``seed`` (global RNG left untouched)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return TinyGPT(config or GPTConfig())
    finally:
        torch.random.set_rng_state(state)


def encode_bytes(texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes of each text, cut to ``length`` and right-padded: ``(tokens, mask)``."""
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    tokens = torch.full((len(texts), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(texts), length, dtype=torch.bool)
    for row, text in enumerate(texts):
        data = list(text.encode("utf-8")[:length])
        tokens[row, : len(data)] = torch.tensor(data, dtype=torch.long)
        mask[row, : len(data)] = True
    return tokens, mask


def stdlib_sources(max_files: int = 40) -> list[Path]:
    """The first ``max_files`` top-level ``.py`` files of the stdlib, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in root.glob("*.py") if path.stat().st_size > 2000)
    if not files:
        raise ValueError(f"no Python sources found under {root}")
    return files[:max_files]


def stdlib_text(
    num_sequences: int, length: int = 64, seed: int = 0, min_length: int | None = None
) -> list[str]:
    """``num_sequences`` snippets of stdlib source, ``min_length..length`` bytes each.

    Snippets start at line beginnings chosen by a seeded generator, so the corpus is the same
    on every machine with the same Python version; lengths vary so that padding is exercised.
    """
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
    min_length = max(2, length // 2) if min_length is None else min_length
    if not 2 <= min_length <= length:
        raise ValueError(f"min_length must be in [2, {length}], got {min_length}")
    generator = torch.Generator().manual_seed(seed)
    lines: list[str] = []
    for path in stdlib_sources():
        lines.extend(line for line in path.read_text("utf-8").splitlines() if line.strip())
    texts = []
    for _ in range(num_sequences):
        start = int(torch.randint(len(lines), (1,), generator=generator))
        size = int(torch.randint(min_length, length + 1, (1,), generator=generator))
        snippet = "\n".join(lines[start : start + 16])
        texts.append(snippet.encode("utf-8")[:size].decode("utf-8", errors="ignore"))
    return texts


def sequence_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy **summed** over real target tokens and sequences.

    Position ``t`` predicts token ``t+1``; a target counts only when it is a real token, so
    padding contributes nothing (and the last real token, whose target is padding, neither).
    """
    tokens, mask = batch
    logits = model(tokens)[:, :-1]
    targets = tokens[:, 1:]
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return (losses * mask[:, 1:].reshape(-1).to(losses.dtype)).sum()


def train_briefly(
    model: nn.Module,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    steps: int = 50,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> nn.Module:
    """A few AdamW steps so that gradients look like a trained model's, not a random one's."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        rows = torch.randint(len(tokens), (batch_size,), generator=generator)
        loss = sequence_loss(model, (tokens[rows], mask[rows])) / mask[rows, 1:].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model
