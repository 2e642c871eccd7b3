"""The optimizer's own random streams: one seeded ``torch.Generator`` per device.

Drawing from the global RNG would make a resumed run exact only if the caller also restored
the global RNG, and would shift the caller's own stream (dropout, data order) compared with an
optimizer that draws nothing. The generators' states travel in the ``state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch


def derived_seed(seed: int) -> int:
    """A 63-bit seed mixed from ``seed`` (SplitMix64's finalizer), so that an optimizer seeded
    from the caller's seed does not replay the caller's own first draws."""
    mixed = (seed + 0x9E3779B97F4A7C15) % 2**64
    mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) % 2**64
    return (mixed ^ (mixed >> 31)) >> 1


def stream_seed(seed: int, key: int) -> int:
    """The seed of item ``key``'s generator in the streams of ``seed``."""
    return derived_seed((seed + derived_seed(key)) % 2**64)


# One step's standard normal sequence is made of chunks of this many entries, chunk k drawn from
# item (step · 2³² + k)'s generator: its first n entries are the same however many are drawn.
NORMAL_CHUNK = 1 << 16


# A custom operator, so that torch.compile keeps the draw inside the graph as one opaque call
# (Dynamo cannot trace a torch.Generator) and the compiled step draws what the eager one does.
@torch.library.custom_op("kronlab::step_standard_normal", mutates_args=())
def step_standard_normal(
    size: int, seed_high: int, seed_low: int, step: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The first ``size`` entries of step ``step``'s ``N(0, 1)`` sequence in the streams of the
    seed ``seed_high · 2³² + seed_low`` (split: operator integers are 64-bit signed), in
    ``dtype`` on ``device``: whole chunks of ``NORMAL_CHUNK`` draws (in float32 for half types:
    half ``normal_`` is slow)."""
    seed = (seed_high << 32) + seed_low
    draw_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    chunks = -(-size // NORMAL_CHUNK)
    draws = torch.empty(chunks, NORMAL_CHUNK, dtype=draw_dtype, device=device)
    for chunk, row in enumerate(draws):
        generator = torch.Generator(device=device)
        generator.manual_seed(stream_seed(seed, step * 2**32 + chunk))
        row.normal_(generator=generator)
    return draws.view(-1)[:size].to(dtype)


@step_standard_normal.register_fake
def _step_standard_normal_shape(
    size: int, seed_high: int, seed_low: int, step: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return torch.empty(size, dtype=dtype, device=device)


class OptimizerGenerators:
    """Generators seeded with ``seed`` (``None``: ``derived_seed(torch.initial_seed())``, which
    follows the caller's ``torch.manual_seed`` without drawing from the global stream and without
    replaying it), made on first use."""

    def __init__(self, seed: int | None) -> None:
        self.seed = derived_seed(torch.initial_seed()) if seed is None else seed
        self._generators: dict[str, torch.Generator] = {}
        self._pending: dict[str, torch.Tensor] = {}  # loaded states of devices not used yet

    def get(self, device: torch.device | str) -> torch.Generator:
        key = str(torch.device(device))
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=key)
            generator.manual_seed(self.seed)
            if key in self._pending:
                generator.set_state(self._pending.pop(key))
            self._generators[key] = generator
        return generator

    def stream(self, key: int, device: torch.device | str) -> torch.Generator:
        """A new generator for one item ``key`` (a non-negative integer), seeded from the seed
        and ``key`` alone: what it draws depends neither on what was drawn before nor on the
        process that draws it. Not saved: it is made again from the seed."""
        generator = torch.Generator(device=torch.device(device))
        generator.manual_seed(stream_seed(self.seed, key))
        return generator

    def state_dict(self) -> dict[str, Any]:
        """The seed and each device's generator state (uint8 tensors)."""
        states = dict(self._pending)
        states.update({key: gen.get_state() for key, gen in self._generators.items()})
        return {"seed": self.seed, "states": states}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s result (copied: no state shared with ``saved``)."""
        self.seed = saved["seed"]
        self._generators = {}
        self._pending = {key: state.to("cpu").clone() for key, state in saved["states"].items()}

    def step_standard_normal(
        self, size: int, step: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """``step_standard_normal`` in this seed's streams (the generators' states untouched)."""
        seed = self.seed % 2**64
        return step_standard_normal(size, seed >> 32, seed & 0xFFFFFFFF, step, dtype, device)


def check_generator_state(saved: object) -> None:
    """Raise ``ValueError`` unless ``saved`` looks like ``OptimizerGenerators.state_dict()``."""
    valid = (
        isinstance(saved, dict)
        and isinstance(saved.get("seed"), int)
        and isinstance(saved.get("states"), dict)
        and all(
            isinstance(key, str) and isinstance(state, torch.Tensor) and state.dtype == torch.uint8
            for key, state in saved["states"].items()
        )
    )
    if not valid:
        raise ValueError(
            f"Invalid state_dict: generator state {saved!r} (allowed: a seed and one uint8 "
            "state tensor per device, as saved by a kronlab optimizer)"
        )
