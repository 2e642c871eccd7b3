"""Running K-FAC factor statistics, accumulated in float64.

``A = Σ_tokens a aᵀ / #tokens`` and ``S = Σ_tokens g gᵀ / #examples``, so that for one token per
example ``A ⊗ S = E[a aᵀ] ⊗ E[g gᵀ]`` (Martens & Grosse 2015) and for sequences ``A ⊗ S`` is
K-FAC-expand's approximation of the per-example Fisher ``E_i[vec(G_i) vec(G_i)ᵀ]``
(Eschenhagen et al. 2023). Embeddings keep only the diagonal of ``A`` (token frequencies).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from kronlab.curvature.hooks import LayerBatch
from kronlab.curvature.layers.base import LayerSpec

SumOverRanks = Callable[[torch.Tensor], torch.Tensor]


class KroneckerStatistics:
    """Sums of ``a aᵀ`` over real tokens and ``g gᵀ`` per tracked module, with their counts."""

    def __init__(self) -> None:
        self.specs: dict[str, LayerSpec] = {}
        self.activation_sums: dict[str, torch.Tensor] = {}
        self.gradient_sums: dict[str, torch.Tensor] = {}
        self.token_counts: dict[str, int] = {}
        self.example_counts: dict[str, int] = {}
        self.batch_count = 0

    def update(self, layers: Iterable[LayerBatch]) -> None:
        """Add one batch's module calls (a module called twice counts its examples once)."""
        self.batch_count += 1
        seen: set[str] = set()
        for layer in layers:
            name = layer.name
            if name not in self.specs:
                self.specs[name] = layer.spec
                self.token_counts[name] = 0
                self.example_counts[name] = 0
            if name not in seen:
                self.example_counts[name] += layer.num_examples
                seen.add(name)
            self.token_counts[name] += layer.num_tokens
            self._add(self.activation_sums, name, layer.spec.adapter.activation_outer_sum(layer))
            gradients = layer.gradients.reshape(-1, layer.spec.d_out).double()
            self._add(self.gradient_sums, name, gradients.transpose(0, 1) @ gradients)

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (A, S)}`` in float64; ``A`` is a vector (the diagonal) for embeddings.

        Raises ``ValueError`` for a module that saw no real token or has non-finite statistics.
        """
        result = {}
        for name in self.specs:
            if self.token_counts[name] == 0:
                raise ValueError(f"module {name!r} saw no unmasked token; cannot fit its factors")
            activation = self.activation_sums[name] / self.token_counts[name]
            gradient = self.gradient_sums[name] / self.example_counts[name]
            if not (torch.isfinite(activation).all() and torch.isfinite(gradient).all()):
                raise ValueError(
                    f"non-finite K-FAC statistics for module {name!r} (activations or output "
                    "gradients contain inf/NaN)"
                )
            result[name] = (activation, gradient)
        return result

    def sum_over_ranks(self, specs: Mapping[str, LayerSpec], sum_over: SumOverRanks) -> None:
        """Replace every sum and count by its total over all ranks, in place, before any
        division (so the factors are those of all ranks' tokens together).

        ``sum_over(tensor)`` sums a tensor over ranks in place (an all-reduce); every rank
        calls this with the same ``specs``, and a module this rank did not see starts at zero.
        """
        for name, spec in specs.items():
            if name not in self.specs:
                shape = (spec.d_in,) if spec.diagonal_activation else (spec.d_in, spec.d_in)
                self.specs[name] = spec
                self.activation_sums[name] = torch.zeros(shape, dtype=torch.float64)
                self.gradient_sums[name] = torch.zeros(spec.d_out, spec.d_out, dtype=torch.float64)
                self.token_counts[name] = self.example_counts[name] = 0
            sum_over(self.activation_sums[name])
            sum_over(self.gradient_sums[name])
        counts = [self.batch_count]
        for name in specs:
            counts += [self.token_counts[name], self.example_counts[name]]
        totals = sum_over(torch.tensor(counts, dtype=torch.float64)).long().tolist()
        self.batch_count = totals[0]
        for index, name in enumerate(specs):
            self.token_counts[name], self.example_counts[name] = totals[
                1 + 2 * index : 3 + 2 * index
            ]

    @staticmethod
    def _add(store: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        store[name] = value if name not in store else store[name] + value
