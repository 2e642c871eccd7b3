"""A tiny attribution problem and a float64 influence oracle written from the definitions."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kronlab.attribution.sources import AttributionTask, ExampleSet, classification_loss

IN, HIDDEN, CLASSES = 10, 12, 9


def tiny_task(num_train: int = 60, num_queries: int = 6, seed: int = 0) -> AttributionTask:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))
    # Clustered inputs (one center per class) so that gradients of examples correlate, as
    # they do on real data; isotropic noise would make all gradients nearly orthogonal.
    labels = torch.randint(0, CLASSES, (num_train + num_queries,), generator=generator)
    centers = torch.randn(CLASSES, IN, generator=generator)
    noise = torch.randn(num_train + num_queries, IN, generator=generator)
    inputs = centers[labels] + 0.5 * noise
    train = ExampleSet((inputs[:num_train], labels[:num_train]), "vector")
    queries = ExampleSet((inputs[num_train:], labels[num_train:]), "vector")
    return AttributionTask(model, classification_loss, train, queries)


def layer_terms(model: nn.Sequential, inputs: torch.Tensor, labels: torch.Tensor):
    """Per example and linear layer: activations ``a`` (bias 1 appended) and ``g = ∂ℓ_i/∂s``."""
    model = model.double()
    first, second = model[0], model[2]
    a1 = torch.cat([inputs.double(), torch.ones(len(inputs), 1, dtype=torch.float64)], 1)
    s1 = (a1[:, :-1] @ first.weight.T + first.bias).requires_grad_(True)
    h1 = torch.tanh(s1)
    a2 = torch.cat([h1, torch.ones(len(inputs), 1, dtype=torch.float64)], 1)
    s2 = (h1 @ second.weight.T + second.bias).requires_grad_(True)
    loss = F.cross_entropy(s2, labels, reduction="sum")
    g1, g2 = torch.autograd.grad(loss, [s1, s2])
    model.float()
    return {"0": (a1.detach(), g1), "2": (a2.detach(), g2)}


def oracle_gradients(task: AttributionTask, examples: ExampleSet) -> dict[str, torch.Tensor]:
    """``G_i = g_i a_iᵀ`` (one token per example) in float64."""
    terms = layer_terms(task.model, *examples.tensors)
    return {name: g[:, :, None] * a[:, None, :] for name, (a, g) in terms.items()}


def oracle_inverse(task: AttributionTask, method: str, damping: float):
    """``G ↦ Q_S[(Q_SᵀGQ_A)/(Λ+λ)]Q_Aᵀ`` per layer, from A = mean aaᵀ, S = mean ggᵀ."""
    terms = layer_terms(task.model, *task.train.tensors)
    train_gradients = oracle_gradients(task, task.train)
    inverses = {}
    for name, (a, g) in terms.items():
        values_a, vectors_a = torch.linalg.eigh(a.T @ a / len(a))
        values_s, vectors_s = torch.linalg.eigh(g.T @ g / len(g))
        if method == "kfac":
            eigenvalues = values_s[:, None] * values_a[None, :]
        else:
            rotated = vectors_s.T @ train_gradients[name] @ vectors_a
            eigenvalues = (rotated**2).mean(0)
        denominator = eigenvalues + damping * eigenvalues.mean()
        inverses[name] = (vectors_s, vectors_a, denominator)

    def apply(gradients: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        result = {}
        for name, block in gradients.items():
            vectors_s, vectors_a, denominator = inverses[name]
            result[name] = (
                vectors_s @ ((vectors_s.T @ block @ vectors_a) / denominator) @ vectors_a.T
            )
        return result

    return apply


def oracle_factor_inverse_roots(task: AttributionTask, damping: float):
    """``(S + δ_S)^{-1/2}``, ``(A + δ_A)^{-1/2}`` per layer with ``δ = damping · mean(λ)``."""
    roots = {}
    for name, (a, g) in layer_terms(task.model, *task.train.tensors).items():
        sides = []
        for factor in (g.T @ g / len(g), a.T @ a / len(a)):
            values, vectors = torch.linalg.eigh(factor)
            values = values.clamp_min(0)
            sides.append(
                vectors @ torch.diag((values + damping * values.mean()) ** -0.5) @ vectors.T
            )
        roots[name] = tuple(sides)
    return roots


def inner_scores(queries: dict[str, torch.Tensor], train: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(torch.einsum("qij,tij->qt", queries[n].double(), train[n].double()) for n in queries)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over rows of the Spearman rank correlation (no ties in continuous scores)."""
    ranks_x = x.argsort(1).argsort(1).double()
    ranks_y = y.argsort(1).argsort(1).double()
    ranks_x -= ranks_x.mean(1, keepdim=True)
    ranks_y -= ranks_y.mean(1, keepdim=True)
    correlation = (ranks_x * ranks_y).sum(1) / (ranks_x.norm(dim=1) * ranks_y.norm(dim=1))
    return float(correlation.mean())
