"""``nn.MultiheadAttention``: the visible-projection forward equals torch's, and its packed
in-projection and ``out_proj`` get per-example gradients and K-FAC statistics equal to the
definitions (autograd per example; float64 sums of outer products)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kronlab.curvature import (
    KroneckerStatistics,
    find_modules,
    gradient_matrix,
    layer_batches,
    layer_spec,
    per_example_gradients,
)
from kronlab.curvature.attention import attention_forward

from .curvature_models import sequence_loss

VOCAB, WIDTH, HEADS, LENGTH = 7, 8, 2, 5


def _causal(length: int) -> torch.Tensor:
    return torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)


class AttentionModel(nn.Module):
    """Embedding → self-attention (a bare ``nn.MultiheadAttention`` or a whole
    ``nn.TransformerEncoderLayer``) with a causal mask and a key-padding mask → Linear head."""

    def __init__(self, bias: bool, batch_first: bool, encoder_layer: bool) -> None:
        super().__init__()
        self.batch_first, self.encoder_layer = batch_first, encoder_layer
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        if encoder_layer:
            self.block = nn.TransformerEncoderLayer(
                WIDTH, HEADS, 16, dropout=0.0, batch_first=batch_first, bias=bias
            )
        else:
            self.block = nn.MultiheadAttention(WIDTH, HEADS, bias=bias, batch_first=batch_first)
        self.head = nn.Linear(WIDTH, VOCAB, bias=bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(tokens)
        padding = tokens == 0
        if not self.batch_first:
            hidden = hidden.transpose(0, 1)
        causal = _causal(tokens.shape[1])
        if self.encoder_layer:
            mixed = self.block(hidden, causal, padding, is_causal=True)
        else:
            mixed, _ = self.block(
                hidden,
                hidden,
                hidden,
                key_padding_mask=padding,
                attn_mask=causal,
                need_weights=False,
            )
        if not self.batch_first:
            mixed = mixed.transpose(0, 1)
        return self.head(mixed)


def _batch(examples: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, (examples, LENGTH), generator=generator)
    tokens[1, 3:] = 0  # padding at the end: every query keeps at least one key
    tokens[2, 4:] = 0
    targets = torch.randint(0, VOCAB, (examples, LENGTH), generator=generator)
    return tokens, targets, (tokens != 0).double()


def _parameters(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight, module.in_proj_bias
    return module.weight, getattr(module, "bias", None)


def _autograd_matrices(model, modules, batch):
    """Reference: one backward per example (its own padding), .grad laid out as G."""
    result = {name: [] for name in modules}
    for i in range(batch[0].shape[0]):
        model.zero_grad()
        sequence_loss(model, tuple(t[i : i + 1] for t in batch)).backward()
        for name, module in modules.items():
            weight, bias = _parameters(module)
            grad_bias = None if bias is None else bias.grad
            result[name].append(gradient_matrix(module, weight.grad, grad_bias))
    return {name: torch.stack(matrices) for name, matrices in result.items()}


@pytest.mark.parametrize("encoder_layer", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_per_example_gradients_match_autograd(
    bias: bool, batch_first: bool, encoder_layer: bool
) -> None:
    torch.manual_seed(1)
    model = AttentionModel(bias, batch_first, encoder_layer).double().eval()
    modules = find_modules(model)
    attention = "block.self_attn" if encoder_layer else "block"
    assert {attention, f"{attention}.out_proj"} <= set(modules)
    assert layer_spec(modules[attention]).d_out == 3 * WIDTH
    batch = _batch()
    hooked = per_example_gradients(model, batch, sequence_loss, modules, mask=batch[2])
    reference = _autograd_matrices(model, modules, batch)
    for name in modules:
        torch.testing.assert_close(hooked[name], reference[name])
    # The module is back to torch's own forward afterwards.
    assert all("forward" not in vars(m) for m in model.modules())


def test_a_forward_set_on_the_instance_is_restored() -> None:
    model = AttentionModel(True, True, False).double()
    wrapper = model.block.forward  # e.g. a hook library's wrapper, stored on the instance
    model.block.forward = wrapper
    batch = _batch()
    per_example_gradients(model, batch, sequence_loss, find_modules(model), mask=batch[2])
    assert vars(model.block)["forward"] is wrapper


def _reference_attention(module: nn.MultiheadAttention, packed, padding, causal):
    """Attention from the packed projections, written from the definition (batch-first)."""
    n, length, _ = packed.shape
    q, k, v = (
        t.reshape(n, length, HEADS, WIDTH // HEADS).transpose(1, 2) for t in packed.chunk(3, -1)
    )
    scores = q @ k.transpose(-2, -1) / (WIDTH // HEADS) ** 0.5
    blocked = causal.reshape(1, 1, length, length) | padding.reshape(n, 1, 1, length)
    weights = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(n, length, WIDTH)


@pytest.mark.parametrize("batch_first", [True, False])
def test_kfac_statistics_match_definition(batch_first: bool) -> None:
    torch.manual_seed(2)
    model = AttentionModel(True, batch_first, False).double()
    tokens, targets, mask = batch = _batch()
    attention = model.block
    # Reference: a = [x_t; 1] and g_t = ∂loss/∂(W x_t + b) through the definition's attention,
    # which first must reproduce the module's output.
    x = model.embedding(tokens).detach()
    packed = torch.nn.functional.linear(x, attention.in_proj_weight, attention.in_proj_bias)
    packed = packed.detach().requires_grad_()
    mixed = _reference_attention(attention, packed, tokens == 0, _causal(LENGTH))
    torch.testing.assert_close(
        attention.out_proj(mixed),
        model.block(
            *(_seq(x, batch_first),) * 3, key_padding_mask=tokens == 0, attn_mask=_causal(LENGTH)
        )[0].transpose(*((0, 0) if batch_first else (0, 1))),
    )
    logits = model.head(attention.out_proj(mixed))
    losses = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    (gradient,) = torch.autograd.grad((losses * mask.flatten()).sum(), packed)
    real = mask.bool().flatten()
    activations = torch.cat([x, torch.ones(*x.shape[:2], 1, dtype=x.dtype)], -1).flatten(0, 1)
    activations = activations[real]
    gradients = gradient.flatten(0, 1)[real]
    expected_a = activations.T @ activations / real.sum()
    expected_s = gradients.T @ gradients / tokens.shape[0]

    statistics = KroneckerStatistics()
    modules = find_modules(model, ["block"])
    statistics.update(layer_batches(model, batch, sequence_loss, modules, mask))
    a, s = statistics.factors()["block"]
    torch.testing.assert_close(a, expected_a)
    torch.testing.assert_close(s, expected_s)


def _seq(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return x if batch_first else x.transpose(0, 1)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bias": False, "batch_first": True},
        {"add_bias_kv": True, "add_zero_attn": True},
        {"kdim": 6, "vdim": 5},
    ],
)
@pytest.mark.parametrize("call", ["self", "cross", "weights", "unbatched", "float_masks"])
def test_forward_equals_torch(options: dict, call: str) -> None:
    torch.manual_seed(3)
    module = nn.MultiheadAttention(WIDTH, HEADS, **options).double()
    batch_first = module.batch_first
    n, target, source = 3, 4, 6
    if call == "self" or call == "weights" or "kdim" in options and call != "cross":
        source = target

    def shaped(length: int, width: int = WIDTH) -> torch.Tensor:
        x = torch.randn(n, length, width, dtype=torch.float64)
        return x if batch_first else x.transpose(0, 1)

    query = shaped(target)
    key = shaped(source, options.get("kdim", WIDTH))
    value = shaped(source, options.get("vdim", WIDTH))
    if call in ("self", "weights") and "kdim" not in options:
        key = value = query
    padding = torch.zeros(n, source, dtype=torch.bool)
    padding[1, -2:] = True
    kwargs = {"key_padding_mask": padding, "need_weights": call == "weights"}
    if call == "self" and source == target:
        kwargs.update(attn_mask=_causal(target), is_causal=True)
    if call == "float_masks":
        kwargs.update(
            key_padding_mask=padding.double() * -1e4,
            attn_mask=torch.randn(n * HEADS, target, source, dtype=torch.float64),
            average_attn_weights=False,
            need_weights=True,
        )
    if call == "unbatched":
        query, key, value = (
            query.select(0 if batch_first else 1, 0),
            key.select(0 if batch_first else 1, 0),
            value.select(0 if batch_first else 1, 0),
        )
        kwargs["key_padding_mask"] = padding[0]
    expected = module(query, key, value, **kwargs)
    recorded = []
    ours = attention_forward(
        module, lambda a, b: recorded.append(a) or b, query, key, value, **kwargs
    )
    torch.testing.assert_close(ours[0], expected[0])
    if expected[1] is None:
        assert ours[1] is None
    else:
        torch.testing.assert_close(ours[1], expected[1])
    assert len(recorded) == (0 if "kdim" in options else 1)


class DecoderModel(nn.Module):
    """A ``nn.TransformerDecoderLayer`` (self- and cross-attention over a memory) as a model."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.memory = nn.Embedding(VOCAB, WIDTH)
        self.block = nn.TransformerDecoderLayer(WIDTH, HEADS, 16, dropout=0.0)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        target = self.embedding(tokens).transpose(0, 1)
        memory = self.memory(tokens.flip(1)[:, :3]).transpose(0, 1)  # 3 memory tokens
        return self.head(self.block(target, memory, tgt_mask=_causal(tokens.shape[1]))).transpose(
            0, 1
        )


def test_cross_attention_gradients_match_autograd() -> None:
    torch.manual_seed(4)
    model = DecoderModel().double().eval()
    modules = find_modules(model, ["block.*"])
    assert "block.multihead_attn" in modules
    tokens, targets, _ = _batch()
    batch = (tokens, targets, torch.ones(tokens.shape, dtype=torch.float64))
    hooked = per_example_gradients(model, batch, sequence_loss, modules)
    reference = _autograd_matrices(model, modules, batch)
    for name in modules:
        torch.testing.assert_close(hooked[name], reference[name])


def test_fit_and_score_a_transformer_encoder_layer(tmp_path) -> None:
    """The path that used to fail ("tracked modules were not called by loss_fn"): fit EK-FAC on
    a model with a torch encoder layer and score; scores equal a float64 solve with the fitted
    curvature applied to autograd's per-example gradients."""
    from kronlab.attribution import cross_entropy_loss, fit_curvature, influence_scores

    torch.manual_seed(5)
    model = AttentionModel(True, True, True).double().eval()
    tokens, targets, _ = _batch(6)
    data = [(tokens[:3], targets[:3]), (tokens[3:], targets[3:])]
    curvature = fit_curvature(model, data, cross_entropy_loss, method="ekfac", progress=False)
    assert "block.self_attn" in curvature.modules
    scores = influence_scores(
        curvature, data[:1], data, model=model, loss_fn=cross_entropy_loss, progress=False
    )
    # Saved and loaded, the attention block is still recognised on the model.
    curvature.save(tmp_path / "curvature.safetensors")
    curvature = type(curvature).load(tmp_path / "curvature.safetensors")
    modules = curvature.tracked_modules(model)
    gradients = per_example_gradients(model, (tokens, targets), _summed_loss, modules)
    queries = {name: g[:3] for name, g in gradients.items()}
    preconditioned = curvature.inverse_hvp(queries)
    expected = sum(
        preconditioned[name].flatten(1) @ gradients[name].flatten(1).T for name in modules
    )
    torch.testing.assert_close(scores.double(), expected.double(), rtol=1e-4, atol=1e-6)


def _summed_loss(model: nn.Module, batch) -> torch.Tensor:
    from kronlab.attribution import cross_entropy_loss

    return cross_entropy_loss(model, batch)
