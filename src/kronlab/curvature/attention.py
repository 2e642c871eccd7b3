"""``nn.MultiheadAttention`` as K-FAC sees it: a packed in-projection plus ``out_proj``.

torch's attention never calls ``out_proj`` as a module and applies ``in_proj_weight`` inside one
fused function, so no forward hook sees the projections' inputs and outputs. While the hooks
record, a tracked attention module (or one whose ``out_proj`` is tracked) runs
:func:`attention_forward` instead: the same computation from the module's own parameters, with
the in-projection as one visible ``F.linear`` and ``out_proj`` called as a module.

The packed in-projection is **one** K-FAC block ``(3E, E [+1])`` (the layout of
``in_proj_weight``/``in_proj_bias``), not three ``E × E`` blocks. In self-attention the three
projections read the same token ``x_t``, so ``G = Σ_t [g_q; g_k; g_v]_t [x_t; 1]ᵀ`` is exactly one
sum of outer products: one activation factor (three blocks would hold three copies of it) and a
``3E × 3E`` gradient factor that keeps the q/k/v cross-covariances three blocks would drop.
The price is one ``3E`` eigendecomposition instead of three ``E`` ones (9x the flops of that
side, about ``0.1 s`` at ``E = 512`` on a CPU core, paid once per fit). For cross-attention
(``query`` not ``key``/``value``) the key and value tokens are extra tokens of the same block
whose gradient is zero outside their own third, so ``G`` stays exact and K-FAC treats the
block as weight-shared across the three token streams.

Separate projection weights (``kdim``/``vdim`` other than ``embed_dim``) are not packed: only
``out_proj`` can be tracked in such a module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

Record = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def packed_in_projection(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.MultiheadAttention`` with a packed ``in_proj_weight``."""
    return isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None


def attention_forward(
    module: nn.MultiheadAttention,
    record: Record | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module(query, key, value, ...)`` computed with visible projections.

    ``record(inputs, outputs)`` (batch-first ``(n, tokens, E)`` and ``(n, tokens, 3E)``)
    receives the packed in-projection and returns the tensor to continue with; ``None`` skips
    recording. Same arguments, results and dropout draws as ``nn.MultiheadAttention.forward``.
    """
    self_attention = key is query and value is query
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not module.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    n, target_length, width = query.shape
    source_length = key.shape[1]
    heads, head_dim = module.num_heads, module.head_dim

    q, k, v = _projections(module, record, query, key, value, self_attention)
    if module.bias_k is not None and module.bias_v is not None:
        k = torch.cat([k, module.bias_k.expand(n, 1, width)], dim=1)
        v = torch.cat([v, module.bias_v.expand(n, 1, width)], dim=1)
    q, k, v = (t.reshape(n, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    if module.add_zero_attn:
        zeros = k.new_zeros(n, heads, 1, head_dim)
        k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
    added = k.shape[2] - source_length  # bias_kv and zero-attention columns

    padding = _float_mask(key_padding_mask, query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    # torch trusts the hint (and drops the mask) only when nothing else needs the mask.
    causal_hint = is_causal and padding is None and not need_weights
    mask = None if causal_hint else _float_mask(attn_mask, query.dtype)
    if mask is not None:
        if mask.dim() == 2:
            mask = mask.reshape(1, 1, target_length, source_length)
        else:
            mask = mask.reshape(n, heads, target_length, source_length)
        mask = F.pad(mask, (0, added))
    if padding is not None:
        padding = F.pad(padding, (0, added)).reshape(n, 1, 1, -1)
        mask = padding if mask is None else mask + padding

    dropout = module.dropout if module.training else 0.0
    if need_weights:
        scores = (q * (1.0 / math.sqrt(head_dim))) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if dropout > 0.0:
            weights = F.dropout(weights, p=dropout)
        attended = weights @ v
    else:
        weights = None
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal_hint
        )
    output = module.out_proj(attended.transpose(1, 2).reshape(n, target_length, width))
    if weights is not None and average_attn_weights:
        weights = weights.mean(dim=1)
    if not batched:
        output = output.squeeze(0)
        weights = None if weights is None else weights.squeeze(0)
    elif not module.batch_first:
        output = output.transpose(0, 1)
    return output, weights


def _projections(
    module: nn.MultiheadAttention,
    record: Record | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    self_attention: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = module.embed_dim
    weight, bias = module.in_proj_weight, module.in_proj_bias
    if weight is None:  # separate q/k/v weights: not a tracked block
        b_q, b_k, b_v = (None,) * 3 if bias is None else bias.chunk(3)
        return (
            F.linear(query, module.q_proj_weight, b_q),
            F.linear(key, module.k_proj_weight, b_k),
            F.linear(value, module.v_proj_weight, b_v),
        )
    if self_attention:
        packed = F.linear(query, weight, bias)
        if record is not None:
            packed = record(query, packed)
        q, k, v = packed.chunk(3, dim=-1)
        return q, k, v
    if record is None:
        b_q, b_k, b_v = (None,) * 3 if bias is None else bias.chunk(3)
        w_q, w_k, w_v = weight.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    # Query, key and value tokens as one stream through the whole packed weight; each keeps only
    # its own third, so the other thirds' output gradients are zero and G is exact.
    target_length, source_length = query.shape[1], key.shape[1]
    packed = record(
        torch.cat([query, key, value], dim=1),
        F.linear(torch.cat([query, key, value], dim=1), weight, bias),
    )
    keys_end = target_length + source_length
    return (
        packed[:, :target_length, :width],
        packed[:, target_length:keys_end, width : 2 * width],
        packed[:, keys_end:, 2 * width :],
    )


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Boolean masks (True = not allowed) as additive ``-inf``; float masks as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def attention_hooks(
    model: nn.Module, tracked: dict[str, nn.Module], record_for: Callable[[str], Record]
) -> list[Callable[[], None]]:
    """Route every attention module of ``model`` whose in-projection or ``out_proj`` is tracked
    through :func:`attention_forward`; returns the callables that undo it."""
    names = {id(module): name for name, module in tracked.items()}
    undo: list[Callable[[], None]] = []
    for module in model.modules():
        if not isinstance(module, nn.MultiheadAttention):
            continue
        own = names.get(id(module))
        if own is None and id(module.out_proj) not in names:
            continue
        record = record_for(own) if own is not None else None
        # An instance attribute shadows the class's forward; one already there (a wrapper
        # installed by another library) is put back afterwards.
        previous = module.__dict__.get("forward")
        module.forward = _bound(module, record)
        undo.append(lambda module=module, previous=previous: _restore(module, previous))
    return undo


def _restore(module: nn.Module, previous: Callable[..., Any] | None) -> None:
    if previous is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = previous


def sequence_first_modules(model: nn.Module) -> set[int]:
    """Ids of the modules that see ``(tokens, examples, ·)`` inputs: those inside a torch
    transformer layer built with ``batch_first=False``, except attention and its ``out_proj``,
    which :func:`attention_forward` records example-first."""
    layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    found: set[int] = set()
    for layer in model.modules():
        if isinstance(layer, layers) and not layer.self_attn.batch_first:
            example_first = set()
            for module in layer.modules():
                if isinstance(module, nn.MultiheadAttention):
                    example_first.update((id(module), id(module.out_proj)))
            found.update(id(m) for m in layer.modules() if id(m) not in example_first)
    return found


def _bound(module: nn.MultiheadAttention, record: Record | None) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return attention_forward(module, record, *args, **kwargs)

    return forward
