"""Step time of the Shampoo family against AdamW, peer implementations and the FLOP floor.

Run from the worktree root (peers from the ``bench`` extra; a peer that is missing or fails is
reported as such)::

    PYTHONPATH=src python -m benchmarks.shampoo [--frequency 10] [--periods 2] [--threads 1]

Each optimizer is timed (``optimizer.step()`` only, gradients recomputed outside the timer) over
``periods`` whole precondition periods after one period of warm-up, every candidate and FLOP
floor interleaved step by step (medians over periods), on the benchmark MLP
256→512→512→10 (batch 256) and the 4-layer d_model-256 transformer. The FLOP floor of a variant
is the time ``torch.matmul`` takes for the matrix products it cannot avoid, per step plus
1/frequency of the per-refresh products, over the same blocks, in the same process.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
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
    mlp_batch,
    time_callable,
    time_optimizer_steps,
    transformer_batch,
)
from kronlab.factors.eigenbasis import refresh_eigenbasis
from kronlab.factors.inverse import damped_inverse_root, damped_inverse_root_
from kronlab.linalg.qr import qr_eigenbasis_refresh
from kronlab.optim import SOAP, KLShampoo, Shampoo
from kronlab.optim.shampoo import RootInverseConfig

Factory = Callable[[nn.Module, int], torch.optim.Optimizer]


def kronlab_variants() -> dict[str, tuple[Factory, str]]:
    """name → (factory(model, frequency), floor kind)."""
    return {
        "shampoo root_inv": (
            lambda m, f: Shampoo(m.parameters(), lr=1e-3, precondition_frequency=f),
            "root_inv",
        ),
        "shampoo root_inv (qr refresh)": (
            lambda m, f: Shampoo(
                m.parameters(),
                lr=1e-3,
                preconditioner=RootInverseConfig(eigenbasis="qr"),
                precondition_frequency=f,
            ),
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
    one power step F Q (QR refresh), counted once per period. SOAP's refresh also counts moving
    the eigenbasis momentum into the new basis (out of the old one and into the new: 2 + 2
    block products, the cheapest way), the price of the 2 products per step that keeping the
    momentum in the basis saves; before this was counted the floor was too strict.
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
            per_refresh += [(m, m, m), (n, n, n)] + rotate_out + rotate_in
        else:  # eigendecomposed, per-factor: the direction goes in and out of the basis
            per_step += stats + rotate_in + rotate_out
    return per_step, per_refresh


class Candidate:
    """One optimizer on its own copy of the model, stepped and timed one step at a time."""

    def __init__(
        self, name: str, factory: Factory, model: nn.Module, batch, loss_fn, frequency: int
    ):
        self.name = name
        self.model = copy.deepcopy(model)
        self.optimizer = factory(self.model, frequency)
        self.batch, self.loss_fn = batch, loss_fn
        for _ in range(frequency):  # one period of warm-up (and peers' compilation)
            self.step_seconds()

    def step_seconds(self) -> float:
        """Seconds of one ``optimizer.step()`` (the gradient is computed outside the timer)."""
        _select_heavyball_compilation(self.name)
        return time_optimizer_steps(
            self.model, self.optimizer, self.batch, self.loss_fn, steps=1, warmup=0
        )


class Floor:
    """A variant's unavoidable products with fixed operands: per step, and per refresh."""

    def __init__(self, kind: str, blocks: list[tuple[int, int]]) -> None:
        per_step, per_refresh = floor_products(kind, blocks)
        self.per_step = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in per_step]
        self.per_refresh = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in per_refresh]
        self.seconds(self.per_step + self.per_refresh)  # warm-up

    @staticmethod
    def seconds(operands: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        started = time.perf_counter()
        for a, b in operands:
            torch.matmul(a, b)
        return time.perf_counter() - started


def run(
    frequency: int,
    periods: int,
    models: tuple[str, ...] = ("mlp", "transformer"),
    only: tuple[str, ...] = (),
) -> str:
    """Interleaved step by step: in each step slot every candidate takes one timed step and every
    floor times its per-step products (its per-refresh products once per period), so all of
    them see the same load. A period's figure is its mean step time; reported are the median
    over periods of the step time and of the per-period ratios."""
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
        f"precondition_frequency={frequency}; {periods} timed period(s) after 1 period of "
        "warm-up, all candidates and floors interleaved step by step; medians over periods",
        "",
    ]
    floor_kinds = (
        "root_inv",
        "eigendecomposed",
        "soap",
        "per_factor",
        "kl_per_factor",
        "kl_root_inv",
    )
    for title, (model, batch, loss_fn) in setups.items():
        if title.split()[0].lower() not in models:
            continue
        blocks = matrix_blocks(model)
        floors = {kind: Floor(kind, blocks) for kind in floor_kinds}
        entries: list[tuple[str, Factory, str, bool]] = [
            ("AdamW", lambda m, f: torch.optim.AdamW(m.parameters(), lr=1e-3), "", False)
        ]
        entries += [(f"kronlab {n}", f, k, False) for n, (f, k) in kronlab_variants().items()]
        for name, (factory, kind, missing) in peer_factories().items():
            if factory is None:
                lines.append(f"{title}: {name}: {missing}")
            else:
                entries.append((name, factory, kind, True))
        if only:  # AdamW stays: every table's first ratio is to it
            entries = [e for e in entries if e[0] == "AdamW" or any(s in e[0] for s in only)]
            floors = {kind: floors[kind] for kind in {e[2] for e in entries} if kind in floors}
        candidates: list[Candidate] = []
        kinds: dict[str, tuple[str, bool]] = {}
        for name, factory, kind, is_peer in entries:
            try:
                candidates.append(Candidate(name, factory, model, batch, loss_fn, frequency))
                kinds[name] = (kind, is_peer)
            except Exception as error:  # noqa: BLE001 - a crashing peer is a result
                lines.append(
                    f"{title}: {name} failed: {type(error).__name__}: {error}".split("\n")[0]
                )
                traceback.print_exc()
        samples: dict[str, list[float]] = {c.name: [] for c in candidates}
        floor_samples: dict[str, list[float]] = {kind: [] for kind in floors}
        for _ in range(periods):
            totals = dict.fromkeys(samples, 0.0)
            floor_totals = dict.fromkeys(floors, 0.0)
            for slot in range(frequency):
                for candidate in list(candidates):
                    try:
                        totals[candidate.name] += candidate.step_seconds()
                    except Exception as error:  # noqa: BLE001
                        lines.append(f"{title}: {candidate.name} failed: {error!r}"[:200])
                        candidates.remove(candidate)
                        totals[candidate.name] = math.nan
                for kind, floor in floors.items():
                    floor_totals[kind] += floor.seconds(floor.per_step)
                    if slot == 0:
                        floor_totals[kind] += floor.seconds(floor.per_refresh)
            for name, total in totals.items():
                samples[name].append(total / frequency)
            for kind, total in floor_totals.items():
                floor_samples[kind].append(total / frequency)

        def median_ratio(values: list[float], references: list[float]) -> str:
            ratios = [v / r for v, r in zip(values, references)]
            return format_ratio(statistics.median(ratios), 1.0) if ratios else "n/a"

        lines += [
            f"### {title}",
            "",
            f"AdamW step: {1000 * statistics.median(samples['AdamW']):.2f} ms",
            "",
            "| optimizer | ms/step | vs AdamW | vs FLOP floor | vs fastest peer (same algorithm) |",
            "|---|---|---|---|---|",
        ]
        for name, values in samples.items():
            kind, is_peer = kinds[name]
            if name == "AdamW":
                continue
            same = [samples[other] for other, (k, peer) in kinds.items() if peer and k == kind]
            fastest = [min(period) for period in zip(*same)] if same else []
            lines.append(
                f"| {name} | {1000 * statistics.median(values):.2f} | "
                f"{median_ratio(values, samples['AdamW'])} | "
                f"{median_ratio(values, floor_samples[kind])} | "
                f"{'' if is_peer else median_ratio(values, fastest)} |"
            )
        lines += [
            "",
            "FLOP floors (ms): "
            + ", ".join(
                f"{kind} {1000 * statistics.median(values):.2f}"
                for kind, values in floor_samples.items()
            ),
            "",
        ]
        del candidates, floors
    return "\n".join(lines)


def _select_heavyball_compilation(name: str) -> None:
    # heavyball reads its global compile switch at every call: set it for the one stepping.
    if name.startswith("heavyball"):
        import heavyball.utils

        heavyball.utils.compile_mode = "default" if "compile on" in name else None


def costs_in_matmuls(candidates: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each candidate over ``rounds`` interleaved rounds, in units of the
    ``"matmul"`` candidate's median (one d×d product on the same stack)."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, function in candidates.items():
            samples[name].append(time_callable(function, repeats=1, warmup=0))
    unit = statistics.median(samples["matmul"])
    return {name: statistics.median(values) / unit for name, values in samples.items()}


def refresh_costs(sizes: tuple[int, ...] = (256, 512, 768, 1024), rounds: int = 5) -> str:
    """Per-factor cost of each way to refresh, in units of one ``d×d @ d×d`` matmul (interleaved,
    medians): what the root-inverse refresh costs by eigh and by the warm-started QR step, and
    Householder QR against Cholesky QR for SOAP's orthonormalization. The factor is a float32
    EMA-like ``F = X Xᵀ / d`` with a fast-decaying spectrum (condition ~1e7, like the benchmark
    models' factors), warm-started from the eigenbasis of a perturbed ``F``."""
    lines = [
        "| d | eigh + Q diag Qᵀ | warm QR step + Q diag Qᵀ | Householder QR (geqrf + orgqr) "
        "| Cholesky QR | Cholesky QR: max abs(QᵀQ − I) |",
        "|---|---|---|---|---|---|",
    ]
    for size in sizes:
        generator = torch.Generator().manual_seed(size)
        scales = torch.logspace(0, -3.5, size)  # singular values of X: condition of F ~ 1e7
        basis = torch.linalg.qr(torch.randn(size, size, generator=generator))[0]
        factor = (basis * scales**2) @ basis.T
        noise = torch.randn(size, size, generator=generator) * 1e-4
        warm = torch.linalg.eigh(factor + noise @ noise.T)[1]
        image = factor @ warm

        def cholesky_qr(image: torch.Tensor = image) -> torch.Tensor:
            upper = torch.linalg.cholesky_ex(image.T @ image, upper=True)[0]
            return torch.linalg.solve_triangular(upper, image, upper=True, left=False)

        def householder(image: torch.Tensor = image) -> torch.Tensor:
            return torch.linalg.householder_product(*torch.geqrf(image))

        def via_eigh(factor: torch.Tensor = factor) -> torch.Tensor:
            values, vectors = torch.linalg.eigh(factor)
            return damped_inverse_root(values, vectors, 1e-12, 0.25)

        def via_qr(factor: torch.Tensor = factor, warm: torch.Tensor = warm) -> torch.Tensor:
            refreshed = qr_eigenbasis_refresh(factor, warm, exact_eigenvalues=False)
            return damped_inverse_root(refreshed.eigenvalues, refreshed.eigenvectors, 1e-12, 0.25)

        candidates = {
            "matmul": lambda factor=factor, warm=warm: factor @ warm,
            "eigh": via_eigh,
            "qr": via_qr,
            "householder": householder,
            "cholesky": cholesky_qr,
        }
        cost = costs_in_matmuls(candidates, rounds)
        q = cholesky_qr()
        error = (q.T @ q - torch.eye(size)).abs().max().item()
        lines.append(
            f"| {size} | {cost['eigh']:.1f} | {cost['qr']:.1f} | {cost['householder']:.1f} | "
            f"{cost['cholesky']:.1f} | {error:.1e} |"
        )
    return "\n".join(lines)


def root_refresh_costs(
    batches: tuple[tuple[int, int], ...] = ((256, 23), (512, 4), (768, 4), (1024, 8)),
    rounds: int = 9,
) -> str:
    """Per-factor cost of a root-inverse refresh, in units of one ``d×d @ d×d`` matmul
    (interleaved rounds, medians), on ``(d, B)`` batches of B EMA-like factors (the transformer's
    batch per size; the MLP's is 4 × 512) held as two stacks, as after the stacking plan, with
    the exponent of a matrix block (1/4):

    * before: ``torch.cat`` of the stacks, ``torch.linalg.eigh``, ``Q diag(s) Qᵀ`` (this
      issue's starting code);
    * kronlab: ``refresh_eigenbasis`` (eigh in its one working copy) and
      ``damped_inverse_root_`` (``X Xᵀ`` in the eigenvectors' memory), the code the optimizer runs;
    * eigvalsh: eigenvalues alone (tridiagonalization + QR on the tridiagonal), a lower bound
      for any LAPACK ``eigh`` route to an exact root;
    * warm-rotated eigh: ``Qᵀ F Q`` (2 products), its eigh, ``Q V`` and the root (exact, but
      no cheaper: the tridiagonalization does not exploit a nearly diagonal input);
    * warm QR step: ``eigenbasis="qr"`` (approximate), as the optimizer runs it.
    """
    lines = [
        "| d × B | before: cat + eigh + Q diag Qᵀ | kronlab: eigh in place + X Xᵀ "
        "| eigvalsh alone | warm-rotated eigh (exact) | warm QR step (approximate) |",
        "|---|---|---|---|---|---|",
    ]
    exponent, epsilon = 0.25, 1e-12
    for size, batch in batches:
        generator = torch.Generator().manual_seed(size)
        scales = torch.logspace(0, -3.5, size)  # condition of F ~ 1e7, like the models' factors
        factors = []
        for _ in range(batch):
            basis = torch.linalg.qr(torch.randn(size, size, generator=generator))[0]
            factors.append((basis * scales**2) @ basis.T)
        stack = torch.stack(factors)
        stacks = list(stack.split([batch // 2, batch - batch // 2]))
        noise = torch.randn(batch, size, size, generator=generator) * 1e-4
        warm = torch.linalg.eigh(stack + noise @ noise.mT)[1]
        warm_stacks = list(warm.split([batch // 2, batch - batch // 2]))
        failures = torch.zeros(batch, dtype=torch.long)

        def before(stacks: list[torch.Tensor] = stacks) -> torch.Tensor:
            values, vectors = torch.linalg.eigh(torch.cat(stacks))
            return damped_inverse_root(values, vectors, epsilon, exponent)

        def kronlab_refresh(
            stacks: list[torch.Tensor] = stacks, failures: torch.Tensor = failures
        ) -> torch.Tensor:
            refreshed = refresh_eigenbasis(
                stacks, None, None, failures, track_columns=False, exact_eigenvalues=False
            )
            return damped_inverse_root_(
                refreshed.eigenvalues, refreshed.eigenvectors, epsilon, exponent
            )

        def rotated(stack: torch.Tensor = stack, warm: torch.Tensor = warm) -> torch.Tensor:
            values, vectors = torch.linalg.eigh(warm.mT @ stack @ warm)
            return damped_inverse_root(values, warm @ vectors, epsilon, exponent)

        def warm_qr(
            stacks: list[torch.Tensor] = stacks,
            warm_stacks: list[torch.Tensor] = warm_stacks,
            failures: torch.Tensor = failures,
        ) -> torch.Tensor:
            refreshed = refresh_eigenbasis(
                stacks,
                warm_stacks,
                None,
                failures,
                method="qr",
                track_columns=False,
                exact_eigenvalues=False,
            )
            return damped_inverse_root(
                refreshed.eigenvalues, refreshed.eigenvectors, epsilon, exponent
            )

        candidates: dict[str, Callable[[], object]] = {
            "matmul": lambda stack=stack: stack @ stack,
            "before": before,
            "kronlab": kronlab_refresh,
            "eigvalsh": lambda stack=stack: torch.linalg.eigvalsh(stack),
            "rotated": rotated,
            "qr": warm_qr,
        }
        cost = costs_in_matmuls(candidates, rounds)
        lines.append(
            f"| {size} × {batch} | {cost['before']:.1f} | {cost['kronlab']:.1f} | "
            f"{cost['eigvalsh']:.1f} | "
            f"{cost['rotated']:.1f} | {cost['qr']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frequency", type=int, default=10)
    parser.add_argument("--periods", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="mlp,transformer", help="comma-separated subset")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated substrings: time only candidates whose name contains one "
        "(AdamW always), and only their floors",
    )
    parser.add_argument(
        "--keep-denormals",
        action="store_true",
        help="leave subnormal floats on (by default they are flushed to zero, for every candidate)",
    )
    parser.add_argument(
        "--refresh-costs", action="store_true", help="only the per-factor refresh cost table"
    )
    parser.add_argument(
        "--root-refresh-costs",
        action="store_true",
        help="only the root-inverse refresh cost table (before/after, exact alternatives)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Every candidate trains on one fixed batch; after a few hundred steps (frequency 100) its
    # gradients and second moments underflow into subnormal floats, which this CPU handles
    # 20-60x slower: SOAP-style steps, ours and pytorch_optimizer's, read 600-1350 ms instead
    # of ~16 ms. Flushing them (the same for all candidates) times the algorithms, not that.
    torch.set_flush_denormal(not args.keep_denormals)
    if args.refresh_costs:
        print(f"machine: {machine_description()}\n")
        print(refresh_costs())
        return
    if args.root_refresh_costs:
        print(f"machine: {machine_description()}\n")
        print(root_refresh_costs())
        return
    only = tuple(part for part in args.only.split(",") if part)
    print(run(args.frequency, args.periods, tuple(args.models.split(",")), only))


if __name__ == "__main__":
    main()
