"""``nn.Embedding``: ``a_t`` is the one-hot token, so ``G = Σ_t g_t e_tokenᵀ`` is the weight
``(vocab, dim)`` gradient transposed and the activation factor ``A`` is diagonal (the token
frequencies); only that diagonal is kept."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from kronlab.curvature.layers.base import LayerAdapter

if TYPE_CHECKING:
    from kronlab.curvature.hooks import LayerBatch


class EmbeddingAdapter(LayerAdapter, kind="embedding"):
    """Token ids in; the activations are the ids themselves, never a one-hot tensor."""

    description = "nn.Embedding without max_norm/scale_grad_by_freq"
    diagonal_activation = True
    output_axis = 1

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def trackable(self, module: nn.Module) -> bool:
        # Both make the weight gradient something other than Σ_t g_t e_tokenᵀ.
        return not module.scale_grad_by_freq and module.max_norm is None

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        return None

    def weight_dims(self, module: nn.Module) -> tuple[int, int]:
        return module.embedding_dim, module.num_embeddings

    def weight_matrix(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.transpose(0, 1)

    def matrix_weight(self, module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.transpose(-1, -2)

    def token_inputs(self, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Token ids ``(n, T)``."""
        return inputs.reshape(inputs.shape[0], -1)

    def token_mask(
        self, module: nn.Module, inputs: torch.Tensor, token_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        if module.padding_idx is None:
            return token_mask
        # torch never updates the padding row, so its gradient is zero by definition.
        real = inputs != module.padding_idx
        return real if token_mask is None else token_mask & real

    def activations(self, layer: LayerBatch) -> torch.Tensor:
        return layer.inputs

    def activation_outer_sum(self, layer: LayerBatch) -> torch.Tensor:
        """``diag Σ_t a_t a_tᵀ``: the count of each (unmasked) token id."""
        tokens = layer.activations.reshape(-1)
        weights = None
        if layer.token_mask is not None:
            weights = layer.token_mask.reshape(-1).double()
        return torch.bincount(tokens, weights=weights, minlength=layer.spec.d_in).double()

    def example_gradients(
        self, layer: LayerBatch, gradients: torch.Tensor, input_side: torch.Tensor | None
    ) -> torch.Tensor:
        """``Σ_t g_t (P_A e_t)ᵀ``: ``P_A e_t`` is column ``token`` of ``P_A``; without ``P_A``
        the gradients are scattered into their tokens' columns."""
        tokens = layer.activations
        if input_side is not None:
            projected = input_side.to(gradients.dtype).transpose(0, 1)[tokens]
            return gradients.transpose(1, 2) @ projected
        n, _, width = gradients.shape
        by_token = gradients.new_zeros(n, layer.spec.d_in, width)
        by_token.scatter_add_(1, tokens.unsqueeze(-1).expand(-1, -1, width), gradients)
        return by_token.transpose(1, 2)
