"""The text loss: summed next-token cross-entropy over real targets, from its definition."""

from __future__ import annotations

import torch
from torch import nn

from kronlab.attribution.sources import language_model_loss


class _CachingLM(nn.Module):
    """Embedding → linear head, with a Hugging Face-style ``config.use_cache`` flag."""

    def __init__(self, vocab: int = 6, width: int = 4) -> None:
        super().__init__()
        self.config = type("Config", (), {"use_cache": True})()
        self.embedding = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)
        self.calls: list[object] = []

    def forward(self, tokens: torch.Tensor, use_cache: bool | None = None) -> torch.Tensor:
        self.calls.append(use_cache)
        return self.head(self.embedding(tokens))


def test_language_model_loss_sums_real_next_tokens_only() -> None:
    torch.manual_seed(0)
    model = _CachingLM().double()
    tokens = torch.randint(0, 6, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False  # one real token: nothing to predict
    loss = language_model_loss(model, (tokens, mask))
    log_probs = torch.log_softmax(model(tokens).double(), dim=-1)
    expected = torch.zeros((), dtype=torch.float64)
    for row in range(3):
        for position in range(4):
            if mask[row, position + 1]:
                expected -= log_probs[row, position, tokens[row, position + 1]]
    torch.testing.assert_close(loss, expected)
    # The model is asked not to build a key/value cache.
    assert model.calls[0] is False


def test_language_model_loss_sampled_targets_stay_in_vocabulary() -> None:
    torch.manual_seed(1)
    model = _CachingLM()
    tokens = torch.randint(0, 6, (4, 7))
    loss = language_model_loss(model, (tokens, torch.ones(4, 7, dtype=torch.bool)), sample=True)
    assert torch.isfinite(loss) and loss.requires_grad
