"""Structured square matrices for Kronecker factors: dense, diagonal, block-diagonal, triangular.

A structure is a stateless description (``dim`` plus options); the matrix itself is one plain
*storage* tensor, so optimizer state stays a dict of tensors that ``state_dict`` round-trips:

============================  =========================  ======================================
structure                     storage                    ``project`` (Π of a symmetric ``S``)
============================  =========================  ======================================
``dense``                     ``(d, d)``                 ``S``
``diagonal``                  ``(d,)``                   ``diag(S)``
``block_diagonal:<b>``        ``(ceil(d/b), b, b)``      the ``b×b`` diagonal blocks of ``S``
``lower_triangular``          ``(d, d)``, zero above     ``diag(S) + 2·strict_lower(S)``
``upper_triangular``          ``(d, d)``, zero below     ``diag(S) + 2·strict_upper(S)``
============================  =========================  ======================================

Each set is closed under products (a matrix Lie group when invertible), so a factor update
``K ← K − β·K·m`` keeps ``K`` in its structure when ``m = Π(·)`` is. Π is the projection onto
the group's Lie algebra used by SINGD and SIRFShampoo (Lin et al., ICML 2023 and ICML 2024): the
triangular ones collect both off-diagonal halves of a symmetric matrix into one triangle.

Storage is *zero-padded* wherever the structure has no entry (the triangle's other half, the
padding of the last block of a block-diagonal matrix whose ``d`` is not a multiple of ``b``), so
elementwise arithmetic and the Frobenius norm of the storage are those of the matrix it stands
for. Every operation here keeps the padding zero.

Every operation also takes a *stack* of same-structure matrices: storage with leading stack dims
``(..., *storage)`` and tensors ``(..., *dims)`` with the same leading dims (``axis`` counts the
tensor's own dims); reductions return one value per matrix. SIRFShampoo steps the factors of
same-shape bundles this way, in one batched call per stack.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

STRUCTURE_NAMES = (
    "dense",
    "diagonal",
    "block_diagonal",
    "lower_triangular",
    "upper_triangular",
)
DEFAULT_BLOCK_SIZE = 16


def apply_along_axis(matrix: Tensor, tensor: Tensor, axis: int) -> Tensor:
    """``tensor ×_axis matrix``: ``matrix @`` every mode-``axis`` fiber of ``tensor`` (for each
    matrix of a stack ``(..., d, d)`` and tensor of a stack with the same leading dims).

    The first and last axes are multiplied in place of the unfolding (``M @ T`` or ``T @ Mᵀ``),
    so no transposed copy is made for the common weight-matrix case.
    """
    lead = matrix.ndim - 2
    batch, dims = tensor.shape[:lead], tensor.shape[lead:]
    if len(dims) == 1:
        return (matrix @ tensor.unsqueeze(-1)).squeeze(-1) if lead else matrix @ tensor
    if axis == len(dims) - 1:
        rows = tensor.reshape(*batch, -1, dims[-1]) @ matrix.transpose(-1, -2)
        return rows.reshape(tensor.shape)
    if axis == 0:
        return (matrix @ tensor.reshape(*batch, dims[0], -1)).reshape(tensor.shape)
    if not lead:
        return torch.tensordot(matrix, tensor, dims=([1], [axis])).movedim(0, axis)
    moved = tensor.movedim(lead + axis, lead)
    product = matrix @ moved.reshape(*batch, dims[axis], -1)
    return product.reshape(moved.shape).movedim(lead, lead + axis)


class MatrixStructure(ABC):
    """A family of ``dim × dim`` matrices and the operations Kronecker-factor updates need.

    All methods take and return storage tensors (see the module docstring); none forms the dense
    ``dim × dim`` matrix unless the structure is dense or triangular.
    """

    label: str = "StructuredMatrix"
    storage_ndim: int = 2  # dims of one matrix's storage (a stack has more, in front)

    def __init__(self, dim: int) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"Invalid dim: {dim!r} (allowed: an integer, 1 <= dim)")
        self.dim = dim

    def describe(self) -> str:
        """E.g. ``'33x33 (DenseMatrix)'``, for ``verbose_init`` reports."""
        return f"{self.dim}x{self.dim} ({self.label})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim})"

    def lead(self, data: Tensor) -> int:
        """The number of leading stack dims of storage ``data``."""
        return data.ndim - self.storage_ndim

    def per_matrix(self, values: Tensor) -> Tensor:
        """One value per matrix of a stack ``(...)``, shaped to broadcast against its storage."""
        return values.reshape(*values.shape, *([1] * self.storage_ndim))

    def _storage_dims(self) -> tuple[int, ...]:
        return tuple(range(-self.storage_ndim, 0))

    # --- construction ---------------------------------------------------------------------
    @abstractmethod
    def identity(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
        """Storage of ``I``."""

    def zeros(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
        """Storage of the zero matrix."""
        return torch.zeros_like(self.identity(dtype, device))

    @abstractmethod
    def to_dense(self, data: Tensor) -> Tensor:
        """The ``dim × dim`` matrix (tests and reports only)."""

    @abstractmethod
    def project(self, symmetric: Tensor) -> Tensor:
        """Storage of ``Π(S)`` for a dense symmetric ``dim × dim`` matrix ``S``."""

    # --- products -------------------------------------------------------------------------
    @abstractmethod
    def apply(self, data: Tensor, tensor: Tensor, axis: int, transpose: bool = False) -> Tensor:
        """``tensor ×_axis K`` (``×_axis Kᵀ`` if ``transpose``) without densifying ``K``."""

    @abstractmethod
    def project_outer(self, columns: Tensor) -> Tensor:
        """Storage of ``Π(X Xᵀ)`` for ``X`` of shape ``(dim, r)``."""

    def accumulate_outer_(self, out: Tensor, columns: Tensor, alpha: float, beta: float) -> Tensor:
        """``out ← beta·out + alpha·Π(X Xᵀ)`` in place (dense fuses it into one GEMM)."""
        return out.mul_(beta).add_(self.project_outer(columns), alpha=alpha)

    @abstractmethod
    def gram(self, data: Tensor) -> Tensor:
        """Storage of ``Π(Kᵀ K)``."""

    @abstractmethod
    def matmul(self, left: Tensor, right: Tensor) -> Tensor:
        """Storage of ``A B`` for ``A``, ``B`` of this structure (the result keeps it)."""

    # --- reductions and in-place edits ------------------------------------------------------
    @abstractmethod
    def trace(self, data: Tensor) -> Tensor:
        """``tr(K)`` as a 0-dim tensor."""

    def frobenius_norm(self, data: Tensor) -> Tensor:
        """``‖K‖_F`` (padding is zero, so it is the storage's 2-norm)."""
        return torch.linalg.vector_norm(data, dim=self._storage_dims())

    def max_abs(self, data: Tensor) -> Tensor:
        """``max |K_ij|``."""
        return torch.linalg.vector_norm(data, ord=math.inf, dim=self._storage_dims())

    @abstractmethod
    def add_to_diagonal_(self, data: Tensor, value: float) -> Tensor:
        """``K ← K + value·I`` in place (padding untouched)."""


class DenseStructure(MatrixStructure):
    """No constraint: ``K`` is any ``d × d`` matrix."""

    label = "DenseMatrix"

    def identity(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
        return torch.eye(self.dim, dtype=dtype, device=device)

    def to_dense(self, data: Tensor) -> Tensor:
        return data.clone()

    def project(self, symmetric: Tensor) -> Tensor:
        return symmetric.clone()

    def apply(self, data: Tensor, tensor: Tensor, axis: int, transpose: bool = False) -> Tensor:
        return apply_along_axis(data.transpose(-1, -2) if transpose else data, tensor, axis)

    def project_outer(self, columns: Tensor) -> Tensor:
        return columns @ columns.transpose(-1, -2)

    def accumulate_outer_(self, out: Tensor, columns: Tensor, alpha: float, beta: float) -> Tensor:
        if out.ndim == 3:
            return out.baddbmm_(columns, columns.transpose(-1, -2), beta=beta, alpha=alpha)
        return out.addmm_(columns, columns.transpose(-1, -2), beta=beta, alpha=alpha)

    def gram(self, data: Tensor) -> Tensor:
        return data.transpose(-1, -2) @ data

    def matmul(self, left: Tensor, right: Tensor) -> Tensor:
        return left @ right

    def trace(self, data: Tensor) -> Tensor:
        return data.diagonal(dim1=-2, dim2=-1).sum(-1)

    def add_to_diagonal_(self, data: Tensor, value: float) -> Tensor:
        data.diagonal(dim1=-2, dim2=-1).add_(value)
        return data


class TriangularStructure(DenseStructure):
    """Lower (``lower=True``) or upper triangular ``K``, stored as a ``d × d`` matrix."""

    def __init__(self, dim: int, lower: bool) -> None:
        super().__init__(dim)
        self.lower = lower
        self.label = "LowerTriangularMatrix" if lower else "UpperTriangularMatrix"

    def _triangle(self, matrix: Tensor, offset: int = 0) -> Tensor:
        return torch.tril(matrix, offset) if self.lower else torch.triu(matrix, -offset)

    def project(self, symmetric: Tensor) -> Tensor:
        # Both off-diagonal halves of a symmetric matrix land in the kept triangle.
        projected = self._triangle(symmetric).mul_(2.0)
        projected.diagonal(dim1=-2, dim2=-1).mul_(0.5)
        return projected

    def project_outer(self, columns: Tensor) -> Tensor:
        return self.project(columns @ columns.transpose(-1, -2))

    def accumulate_outer_(self, out: Tensor, columns: Tensor, alpha: float, beta: float) -> Tensor:
        return out.mul_(beta).add_(self.project_outer(columns), alpha=alpha)

    def gram(self, data: Tensor) -> Tensor:
        # KᵀK of a triangular K is full; only its projection is kept.
        return self.project(data.transpose(-1, -2) @ data)


class DiagonalStructure(MatrixStructure):
    """Diagonal ``K``, stored as its diagonal: every operation is elementwise, O(d)."""

    label = "DiagonalMatrix"
    storage_ndim = 1

    def identity(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
        return torch.ones(self.dim, dtype=dtype, device=device)

    def to_dense(self, data: Tensor) -> Tensor:
        return torch.diag(data)

    def project(self, symmetric: Tensor) -> Tensor:
        return symmetric.diagonal(dim1=-2, dim2=-1).clone()

    def apply(self, data: Tensor, tensor: Tensor, axis: int, transpose: bool = False) -> Tensor:
        lead = self.lead(data)
        shape = [*data.shape[:lead]] + [1] * (tensor.ndim - lead)
        shape[lead + axis] = self.dim
        return tensor * data.reshape(shape)

    def project_outer(self, columns: Tensor) -> Tensor:
        # diag(X Xᵀ) = row sums of squares: the d × d matrix is never formed.
        return torch.linalg.vector_norm(columns, dim=-1).square_()

    def gram(self, data: Tensor) -> Tensor:
        return data.square()

    def matmul(self, left: Tensor, right: Tensor) -> Tensor:
        return left * right

    def trace(self, data: Tensor) -> Tensor:
        return data.sum(-1)

    def add_to_diagonal_(self, data: Tensor, value: float) -> Tensor:
        return data.add_(value)


class BlockDiagonalStructure(MatrixStructure):
    """Block-diagonal ``K`` with ``b × b`` blocks (the last one ``d mod b`` if that is not 0).

    Stored as a stack ``(ceil(d/b), b, b)``; the last block is zero-padded, so every product is
    one batched ``bmm`` over same-shape blocks.
    """

    storage_ndim = 3

    def __init__(self, dim: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(dim)
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(
                f"Invalid block_size: {block_size!r} (allowed: an integer, 1 <= block_size)"
            )
        self.block_size = min(block_size, dim)
        self.num_blocks = math.ceil(dim / self.block_size)
        self.padded_dim = self.num_blocks * self.block_size
        self.label = f"BlockDiagonalMatrix[{self.block_size}]"

    def __repr__(self) -> str:
        return f"BlockDiagonalStructure(dim={self.dim}, block_size={self.block_size})"

    def _pad_rows(self, rows: Tensor) -> Tensor:
        """``(..., d, r) → (..., num_blocks, b, r)``, zero rows appended."""
        padded = torch.nn.functional.pad(rows, (0, 0, 0, self.padded_dim - self.dim))
        return padded.reshape(*rows.shape[:-2], self.num_blocks, self.block_size, -1)

    def identity(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
        data = torch.zeros(
            self.num_blocks, self.block_size, self.block_size, dtype=dtype, device=device
        )
        return self.add_to_diagonal_(data, 1.0)

    def to_dense(self, data: Tensor) -> Tensor:
        return torch.block_diag(*data)[: self.dim, : self.dim]

    def project(self, symmetric: Tensor) -> Tensor:
        padded = torch.nn.functional.pad(symmetric, (0, self.padded_dim - self.dim) * 2)
        blocks = padded.reshape(
            *symmetric.shape[:-2],
            self.num_blocks,
            self.block_size,
            self.num_blocks,
            self.block_size,
        )
        diagonal_blocks = blocks.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)
        return diagonal_blocks.clone(memory_format=torch.contiguous_format)

    def apply(self, data: Tensor, tensor: Tensor, axis: int, transpose: bool = False) -> Tensor:
        blocks = data.transpose(-1, -2) if transpose else data
        lead = self.lead(data)
        moved = tensor.movedim(lead + axis, lead)
        rows = self._pad_rows(moved.reshape(*moved.shape[:lead], self.dim, -1))
        product = (blocks @ rows).reshape(*moved.shape[:lead], self.padded_dim, -1)
        return product[..., : self.dim, :].reshape(moved.shape).movedim(lead, lead + axis)

    def project_outer(self, columns: Tensor) -> Tensor:
        rows = self._pad_rows(columns)
        return rows @ rows.transpose(-1, -2)

    def gram(self, data: Tensor) -> Tensor:
        return data.transpose(-1, -2) @ data

    def matmul(self, left: Tensor, right: Tensor) -> Tensor:
        return left @ right

    def trace(self, data: Tensor) -> Tensor:
        return data.diagonal(dim1=-2, dim2=-1).sum((-2, -1))

    def add_to_diagonal_(self, data: Tensor, value: float) -> Tensor:
        diagonal = data.diagonal(dim1=-2, dim2=-1)
        diagonal[..., :-1, :].add_(value)
        diagonal[..., -1, : self.dim - (self.num_blocks - 1) * self.block_size].add_(value)
        return data


def make_structure(spec: str, dim: int) -> MatrixStructure:
    """The structure named ``spec`` for a ``dim × dim`` factor.

    ``spec`` is one of ``STRUCTURE_NAMES``; ``"block_diagonal:<b>"`` sets the block size
    (default ``DEFAULT_BLOCK_SIZE``, capped at ``dim``).
    """
    name, _, option = spec.partition(":") if isinstance(spec, str) else (spec, "", "")
    if name not in STRUCTURE_NAMES or (option and name != "block_diagonal"):
        raise ValueError(
            f"Invalid structure: {spec!r} (allowed: {', '.join(map(repr, STRUCTURE_NAMES))}, "
            "or 'block_diagonal:<block size>')"
        )
    if name == "dense":
        return DenseStructure(dim)
    if name == "diagonal":
        return DiagonalStructure(dim)
    if name == "block_diagonal":
        if option and not option.isdigit():
            raise ValueError(
                f"Invalid structure: {spec!r} (allowed: 'block_diagonal:<block size>' with a "
                "positive integer block size)"
            )
        return BlockDiagonalStructure(dim, int(option) if option else DEFAULT_BLOCK_SIZE)
    return TriangularStructure(dim, lower=name == "lower_triangular")
