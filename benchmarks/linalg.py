"""Batched vs looped matrix functions, and Newton–Schulz vs its matmul FLOP floor.

Run: PYTHONPATH=src python -m benchmarks.linalg
"""

from __future__ import annotations

import torch

from benchmarks.common import machine_description, matmul_floor_seconds, time_callable
from kronlab.factors.inverse import damped_inverse_root
from kronlab.linalg import eigh, newton_schulz


def _inverse_fourth_root(matrix: torch.Tensor) -> torch.Tensor:
    """``(A + εI)^{-1/4}`` as the optimizers form it: eigh, then ``Q diag(s) Qᵀ``."""
    decomposition = eigh(matrix)
    return damped_inverse_root(decomposition.eigenvalues, decomposition.eigenvectors, 1e-6, 0.25)


def main() -> None:
    torch.manual_seed(0)
    print(machine_description())
    print("| work | batched | looped | looped / batched |")
    print("| --- | --- | --- | --- |")
    for count, size in ((64, 32), (16, 128), (4, 512)):
        roots = torch.randn(count, size, size)
        stack = roots @ roots.mT / size + 1e-3 * torch.eye(size)
        for name, function in (
            ("eigh", lambda m: eigh(m)),
            ("inverse 4th root", _inverse_fourth_root),
        ):
            batched = time_callable(lambda f=function, s=stack: f(s), repeats=5, warmup=1)
            looped = time_callable(
                lambda f=function, s=stack: [f(matrix) for matrix in s], repeats=5, warmup=1
            )
            print(
                f"| {name} {count}×{size}² | {1e3 * batched:.2f} ms | {1e3 * looped:.2f} ms "
                f"| {looped / batched:.2f}x |"
            )
    print()
    print("| eigh stack | kronlab.linalg.eigh | torch.linalg.eigh | overhead |")
    print("| --- | --- | --- | --- |")
    for count, size in ((64, 32), (16, 128), (4, 512)):
        roots = torch.randn(count, size, size)
        stack = roots @ roots.mT / size + 1e-3 * torch.eye(size)
        ours = time_callable(lambda s=stack: eigh(s), repeats=5, warmup=1)
        theirs = time_callable(lambda s=stack: torch.linalg.eigh(s), repeats=5, warmup=1)
        print(
            f"| {count}×{size}² | {1e3 * ours:.2f} ms | {1e3 * theirs:.2f} ms "
            f"| {ours / theirs:.2f}x |"
        )
    print()
    print("| Newton–Schulz ('simple' coefficients, 5 steps) | time | matmul floor | ratio |")
    print("| --- | --- | --- | --- |")
    for m, n in ((256, 256), (512, 1024), (1024, 256)):
        matrix = torch.randn(m, n)
        rows, columns = min(m, n), max(m, n)
        shapes = [(rows, columns, rows), (rows, rows, rows), (rows, rows, columns)] * 5
        seconds = time_callable(lambda g=matrix: newton_schulz(g), repeats=10)
        floor = matmul_floor_seconds(shapes, repeats=10)
        print(
            f"| {m}×{n} | {1e3 * seconds:.2f} ms | {1e3 * floor:.2f} ms | {seconds / floor:.2f}x |"
        )


if __name__ == "__main__":
    main()
