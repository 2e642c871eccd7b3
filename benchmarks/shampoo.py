"""Step time of the Shampoo family against AdamW, peer implementations and the FLOP floor.

Run from the worktree root (peers from the ``bench`` extra; a peer that is missing or fails is
reported as such)::

    PYTHONPATH=src python -m benchmarks.shampoo [--frequency 10] [--periods 2] [--threads 1]

Each optimizer is timed (``optimizer.step()`` only, gradients recomputed outside the timer) over
``periods`` whole precondition periods after one period of warm-up, on the benchmark MLP
256→512→512→10 (batch 256) and the 4-layer d_model-256 transformer. The FLOP floor of a variant
is the time ``torch.matmul`` takes for the matrix products it cannot avoid, per step plus
1/frequency of the per-refresh products, over the same blocks, in the same process.
"""

from __future__ import annotations

import argparse
import copy
import math
import traceback
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import (
    benchmark_mlp,
    benchmark_transformer,
    format_ratio,
    language_model_loss,
    machine_description,
    matmul_floor_seconds,
    mlp_batch,
    time_optimizer_steps,
    transformer_batch,
)
from kronlab.optim import SOAP, KLShampoo, Shampoo

Factory = Callable[[nn.Module, int], torch.optim.Optimizer]


def kronlab_variants() -> dict[str, tuple[Factory, str]]:
    """name → (factory(model, frequency), floor kind)."""
    return {
        "shampoo root_inv": (
            lambda m, f: Shampoo(m.parameters(), lr=1e-3, precondition_frequency=f),
            "root_inv",
        ),
        "shampoo eigendecomposed": (
            lambda m, f: Shampoo(
                m.parameters(), lr=1e-3, preconditioner="eigendecomposed", precondition_frequency=f
            ),
            "eigendecomposed",
        ),
        "SOAP (qr)": (lambda m, f: SOAP(m.parameters(), precondition_frequency=f), "soap"),
        "eigenvalue-corrected (eigh)": (
            lambda m, f: Shampoo(
                m.parameters(),
                lr=1e-3,
                preconditioner="eigenvalue_corrected",
                grafting="none",
                max_preconditioner_dim=10000,
                merge_dims=False,
                precondition_frequency=f,
            ),
            "soap",
        ),
        "per-factor eigenvalue-corrected": (
            lambda m, f: Shampoo(
                m.parameters(),
                lr=1e-3,
                preconditioner="per_factor_eigenvalue_corrected",
                precondition_frequency=f,
            ),
            "per_factor",
        ),
        "KL-Shampoo (per-factor)": (
            lambda m, f: KLShampoo(m.parameters(), precondition_frequency=f),
            "kl_per_factor",
        ),
        "KL-Shampoo (root_inv)": (
            lambda m, f: KLShampoo(
                m.parameters(), preconditioner="root_inv", precondition_frequency=f
            ),
            "kl_root_inv",
        ),
    }


def peer_factories() -> dict[str, tuple[Factory | None, str, str]]:
    """name → (factory or None, algorithm it implements, why it is missing)."""
    peers: dict[str, tuple[Factory | None, str, str]] = {}
    try:
        import heavyball
        import heavyball.utils

        def heavyball_soap(compiled: bool) -> Factory:
            def make(model: nn.Module, frequency: int) -> torch.optim.Optimizer:
                heavyball.utils.compile_mode = "default" if compiled else None
                return heavyball.SOAP(
                    model.parameters(),
                    lr=3e-3,
                    precondition_frequency=frequency,
                    use_precond_schedule=False,
                )

            return make

        peers["heavyball.SOAP (compile off)"] = (heavyball_soap(False), "soap", "")
        peers["heavyball.SOAP (compile on)"] = (heavyball_soap(True), "soap", "")
    except Exception as error:  # noqa: BLE001 - report any import failure
        peers["heavyball.SOAP"] = (None, "soap", f"import failed: {error!r}")
    try:
        import pytorch_optimizer

        peers["pytorch_optimizer.SOAP"] = (
            lambda m, f: pytorch_optimizer.SOAP(m.parameters(), precondition_frequency=f),
            "soap",
            "",
        )
        peers["pytorch_optimizer.Shampoo"] = (
            lambda m, f: pytorch_optimizer.Shampoo(
                m.parameters(), lr=1e-3, preconditioning_compute_steps=f
            ),
            "root_inv",
            "",
        )
        peers["pytorch_optimizer.ScalableShampoo"] = (
            lambda m, f: pytorch_optimizer.ScalableShampoo(
                m.parameters(),
                lr=1e-3,
                preconditioning_compute_steps=f,
                start_preconditioning_step=1,
            ),
            "root_inv",
            "",
        )
    except Exception as error:  # noqa: BLE001
        peers["pytorch_optimizer"] = (None, "soap", f"import failed: {error!r}")
    return peers


def matrix_blocks(model: nn.Module, max_dim: int = 1024) -> list[tuple[int, int]]:
    """(m, n) of every ≥2-D parameter, cut into blocks of at most ``max_dim`` per side."""
    blocks = []
    for param in model.parameters():
        shape = [s for s in param.shape if s != 1]
        if len(shape) < 2:
            continue
        m, n = shape[0], math.prod(shape[1:])
        rows = [min(max_dim, m - start) for start in range(0, m, max_dim)]
        cols = [min(max_dim, n - start) for start in range(0, n, max_dim)]
        blocks += [(r, c) for r in rows for c in cols]
    return blocks


def floor_products(
    kind: str, blocks: list[tuple[int, int]]
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(per-step products, per-refresh products) each variant cannot avoid, per m×n block.

    Statistics G Gᵀ and Gᵀ G (KL: G R^{-1/2} and L^{-1/2} G first); root-inverse: L^{-p} G R^{-p};
    eigenbasis variants: into the basis and back (2 + 2); SOAP: the gradient into the basis and
    the direction back (momentum can live in the basis); refresh: Q diag Qᵀ (root-inverse) or
    one power step F Q (QR refresh), counted once per period.
    """
    per_step: list[tuple[int, int, int]] = []
    per_refresh: list[tuple[int, int, int]] = []
    for m, n in blocks:
        stats = [(m, n, m), (n, m, n)]
        if kind.startswith("kl"):
            stats += [(m, n, n), (m, m, n)]
        rotate_in, rotate_out = [(m, m, n), (m, n, n)], [(m, m, n), (m, n, n)]
        if kind in ("root_inv", "kl_root_inv"):
            per_step += stats + [(m, m, n), (m, n, n)]
            per_refresh += [(m, m, m), (n, n, n)]
        elif kind == "soap":
            per_step += stats + rotate_in + rotate_out
            per_refresh += [(m, m, m), (n, n, n)]
        else:  # eigendecomposed, per-factor: the direction goes in and out of the basis
            per_step += stats + rotate_in + rotate_out
    return per_step, per_refresh


def time_one(
    factory: Factory, model: nn.Module, batch, loss_fn, frequency: int, periods: int
) -> float:
    model = copy.deepcopy(model)
    optimizer = factory(model, frequency)
    return time_optimizer_steps(
        model, optimizer, batch, loss_fn, steps=periods * frequency, warmup=frequency
    )


def run(frequency: int, periods: int) -> str:
    setups = {
        "MLP 256-512-512-10, batch 256": (
            benchmark_mlp(),
            mlp_batch(),
            nn.functional.cross_entropy,
        ),
        "transformer 4x256, batch 16x64": (
            benchmark_transformer(),
            transformer_batch(),
            language_model_loss,
        ),
    }
    lines = [
        f"machine: {machine_description()}",
        f"precondition_frequency={frequency}, timed {periods} periods after 1 period of warm-up",
        "",
    ]
    for title, (model, batch, loss_fn) in setups.items():
        adamw = time_one(
            lambda m, f: torch.optim.AdamW(m.parameters(), lr=1e-3),
            model,
            batch,
            loss_fn,
            frequency,
            periods,
        )
        blocks = matrix_blocks(model)
        floors = {}
        for kind in (
            "root_inv",
            "eigendecomposed",
            "soap",
            "per_factor",
            "kl_per_factor",
            "kl_root_inv",
        ):
            per_step, per_refresh = floor_products(kind, blocks)
            floors[kind] = (
                matmul_floor_seconds(per_step)
                + matmul_floor_seconds(per_refresh, repeats=3) / frequency
            )
        peer_times: dict[str, tuple[float, str]] = {}
        for name, (factory, kind, missing) in peer_factories().items():
            if factory is None:
                peer_times[name] = (math.nan, kind)
                lines.append(f"{title}: {name}: {missing}")
                continue
            try:
                peer_times[name] = (
                    time_one(factory, model, batch, loss_fn, frequency, periods),
                    kind,
                )
            except Exception as error:  # noqa: BLE001 - a crashing peer is a result
                peer_times[name] = (math.nan, kind)
                lines.append(
                    f"{title}: {name} failed: {type(error).__name__}: {error}".split("\n")[0]
                )
                traceback.print_exc()
        lines += [
            f"### {title}",
            "",
            f"AdamW step: {1000 * adamw:.2f} ms",
            "",
            "| optimizer | ms/step | vs AdamW | vs FLOP floor | vs fastest peer (same algorithm) |",
            "|---|---|---|---|---|",
        ]
        for name, (factory, kind) in kronlab_variants().items():
            seconds = time_one(factory, model, batch, loss_fn, frequency, periods)
            same = [t for t, k in peer_times.values() if k == kind and math.isfinite(t)]
            fastest = min(same) if same else math.nan
            lines.append(
                f"| kronlab {name} | {1000 * seconds:.2f} | {format_ratio(seconds, adamw)} | "
                f"{format_ratio(seconds, floors[kind])} | {format_ratio(seconds, fastest)} |"
            )
        for name, (seconds, kind) in peer_times.items():
            lines.append(
                f"| {name} | {1000 * seconds:.2f} | {format_ratio(seconds, adamw)} | "
                f"{format_ratio(seconds, floors[kind])} | |"
            )
        lines += [
            "",
            "FLOP floors (ms): "
            + ", ".join(f"{kind} {1000 * value:.2f}" for kind, value in floors.items()),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frequency", type=int, default=10)
    parser.add_argument("--periods", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(run(args.frequency, args.periods))


if __name__ == "__main__":
    main()
