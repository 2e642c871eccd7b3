"""Shared test setup: deterministic, single-threaded torch per test worker.

Property-based tests (hypothesis) run under the ``ci`` profile by default: a fixed, derandomized
budget that keeps the suite fast and reproducible. ``pytest --hypothesis-profile=deep`` runs the
same properties with many more examples (the figure recorded in BENCHMARKS.md).
"""

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

_slow_checks = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=_slow_checks
)
settings.register_profile(
    "deep", max_examples=400, deadline=None, suppress_health_check=_slow_checks
)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
