"""scikit-learn's 8×8 handwritten digits (1797 images, shipped with the package)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from kronlab.tasks.base import ClassificationTask

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Images scaled to [0, 1] as float32 ``(1797, 64)`` and labels ``(1797,)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits task needs scikit-learn: pip install 'kronlab[data]'"
        ) from error
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return inputs, torch.tensor(digits.target, dtype=torch.long)


def digits_mlp(seed: int, hidden: int = 128) -> nn.Module:
    """64 → hidden → hidden → 10 with ReLU, initialized from ``seed``."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )
    finally:
        torch.random.set_rng_state(generator_state)


def digits_cnn(seed: int) -> nn.Module:
    """A small conv net on the 8×8 images (input rows of 64 pixels, reshaped inside)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 10),
        )
    finally:
        torch.random.set_rng_state(generator_state)


def digits_task(model: Literal["mlp", "cnn"] = "mlp") -> ClassificationTask:
    """The digits with a fixed 80/20 split (seeded permutation, the same on every machine)."""
    inputs, targets = load_digits_tensors()
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test_size = int(len(inputs) * TEST_FRACTION)
    test, train = order[:test_size], order[test_size:]
    make_model = digits_mlp if model == "mlp" else digits_cnn
    return ClassificationTask(
        name="digits" if model == "mlp" else "digits-cnn",
        train_inputs=inputs[train],
        train_targets=targets[train],
        test_inputs=inputs[test],
        test_targets=targets[test],
        make_model=make_model,
        num_classes=10,
    )
