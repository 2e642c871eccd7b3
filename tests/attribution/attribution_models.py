"""Tiny models and float64 reference computations shared by the attribution tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ..curvature.curvature_models import Conv1D  # noqa: F401  (re-exported for these tests)


def tiny_mlp(bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias)).double()


def tiny_conv(bias: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=bias),
        nn.Tanh(),
        nn.Conv2d(3, 2, 3, stride=2, bias=bias),
        nn.Flatten(),
        nn.Linear(8, 3, bias=bias),
    ).double()


def classification_batches(inputs: torch.Tensor, targets: torch.Tensor, size: int):
    return [(inputs[i : i + size], targets[i : i + size]) for i in range(0, len(inputs), size)]


def flat_example_gradients(model: nn.Module, inputs, targets) -> torch.Tensor:
    """``(n, P)`` per-example gradients of the cross-entropy w.r.t. all parameters (autograd)."""
    rows = []
    for x, y in zip(inputs, targets):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[None]), y[None], reduction="sum").backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


def exact_ggn(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``(1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i`` over all parameters, by brute force."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def logits(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        split, offset = {}, 0
        for name, p in params.items():
            split[name] = flat[offset : offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        return functional_call(model, split, (x[None],))[0]

    flat = torch.cat([p.flatten() for p in params.values()])
    jacobians = vmap(jacrev(logits), in_dims=(None, 0))(flat, inputs)  # (N, C, P)
    probabilities = torch.softmax(model(inputs), -1).detach()
    output_hessian = (
        torch.diag_embed(probabilities) - probabilities[:, :, None] * probabilities[:, None, :]
    )
    return torch.einsum("ncp,ncd,ndq->pq", jacobians, output_hessian, jacobians) / len(inputs)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks_a = a.flatten().argsort().argsort().double()
    ranks_b = b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ranks_a, ranks_b]))[0, 1])
