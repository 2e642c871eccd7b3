"""The retraining half of the linear datamodeling score (LDS) benchmark.

Trains the base model on the full digits training split, then retrains on ``subsets`` random
50% subsets with ``seeds`` seeds each and records every query's loss (Park et al. 2023, TRAK;
Grosse et al. 2023 use the same protocol). Results are cached on disk because this half does not
depend on the attribution method.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kronlab.tasks.digits import digits_task

HIDDEN = 32  # small enough that the exact GGN (~3.5k parameters) fits as the accuracy ceiling


@dataclass(frozen=True)
class TrainingRecipe:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-3


def make_model(kind: str, seed: int, hidden: int = HIDDEN) -> nn.Module:
    """``hidden``: the MLP's width (the CNN ignores it)."""
    from kronlab.tasks.digits import digits_cnn, digits_mlp

    return digits_mlp(seed, hidden=hidden) if kind == "mlp" else digits_cnn(seed)


def train(
    kind: str,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    seed: int,
    recipe: TrainingRecipe,
    hidden: int = HIDDEN,
) -> nn.Module:
    """AdamW on shuffled mini-batches; the seed fixes initialization and batch order."""
    model = make_model(kind, seed, hidden)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    for _ in range(recipe.epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), recipe.batch_size):
            indices = order[start : start + recipe.batch_size]
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(inputs[indices]), targets[indices]).backward()
            optimizer.step()
    return model


@torch.no_grad()
def query_losses(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(inputs), targets, reduction="none")


def retrain_subsets(
    kind: str,
    *,
    subsets: int,
    seeds: int,
    queries: int,
    recipe: TrainingRecipe,
    cache: Path,
    hidden: int = HIDDEN,
) -> dict[str, torch.Tensor]:
    """``{"masks": (subsets, n_train) bool, "losses": (subsets, queries) mean over seeds}``."""
    if cache.exists():
        stored = torch.load(cache, weights_only=True)
        if stored["config"].tolist() == [subsets, seeds, queries]:
            return stored
    task = digits_task(kind)
    n_train = len(task.train_inputs)
    generator = torch.Generator().manual_seed(1234)
    masks = torch.zeros(subsets, n_train, dtype=torch.bool)
    losses = torch.zeros(subsets, queries)
    query_inputs, query_targets = task.test_inputs[:queries], task.test_targets[:queries]
    started = time.perf_counter()
    for subset in range(subsets):
        chosen = torch.randperm(n_train, generator=generator)[: n_train // 2]
        masks[subset, chosen] = True
        for seed in range(seeds):
            model = train(
                kind,
                task.train_inputs[chosen],
                task.train_targets[chosen],
                100 + seed,
                recipe,
                hidden,
            )
            losses[subset] += query_losses(model, query_inputs, query_targets) / seeds
        print(f"  retrained subset {subset + 1}/{subsets} ({time.perf_counter() - started:.0f} s)")
    result = {
        "masks": masks,
        "losses": losses,
        "config": torch.tensor([subsets, seeds, queries]),
        "seconds": torch.tensor(time.perf_counter() - started),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, cache)
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--cache", type=Path, default=None)
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    cache = arguments.cache or Path(tempfile.gettempdir()) / f"kronlab_lds_{arguments.model}.pt"
    retrain_subsets(
        arguments.model,
        subsets=arguments.subsets,
        seeds=arguments.seeds,
        queries=arguments.queries,
        recipe=TrainingRecipe(),
        cache=cache,
    )
