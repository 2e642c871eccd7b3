"""An on-disk store of per-example (projected) gradients: one flat row-major array + JSON.

Row ``i`` holds example ``i``'s gradient blocks, module by module in a fixed order, each block
flattened row-major: ``P_S G_i P_Aᵀ`` (``p × p``) when projected, ``G_i`` (``d_out × d_in``)
when ``projection_dim == 0``. This is the layout of bergson's index (Chang et al. 2024, "Scalable
Influence and Fact Tracing for LLM Pretraining"; LoGra, Choe et al. 2024).

Crash safety: rows are written a chunk at a time with positioned writes, and only after a
chunk's bytes are in the file is its byte in ``committed.bin`` set. A process killed at any
moment leaves every committed chunk complete; ``resume`` rewrites the others, so in the end
every row is written exactly once into a committed chunk. Ranks own disjoint chunks, and so
disjoint byte ranges of both files: they never need a lock.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from kronlab.linalg.finite import all_finite
from kronlab.linalg.projection import PROJECTION_KINDS

STORE_FORMAT_VERSION = 1
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
DATA_FILE = "gradients.bin"
COMMIT_FILE = "committed.bin"
METADATA_FILE = "store.json"

# bfloat16 has no numpy dtype: its bits are stored as uint16 and reinterpreted on read.
_NUMPY_DTYPES = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModuleBlock:
    """One module's stored block: ``name`` and its ``(rows, columns)`` after projection."""

    name: str
    shape: tuple[int, int]

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class StoreSettings:
    """Everything that must agree between a store and whatever is scored against it.

    ``transform`` says what was applied to each ``G_i`` before storing: ``"projection"``
    (``P_S G P_Aᵀ``, or ``G`` itself at ``projection_dim=0``), or ``"folded:<fingerprint>:…"``
    / ``"whitened:<fingerprint>:…"`` (``M_S G M_Aᵀ`` with ``M = P (F + δI)^{-1/2}`` of the named
    curvature's K-FAC factors and the damping that follows).
    """

    modules: tuple[ModuleBlock, ...]
    projection_dim: int
    projection_kind: str = "rademacher"
    dtype: str = "float32"
    transform: str = "projection"
    model_fingerprint: str = ""
    data_fingerprint: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        if self.projection_kind not in PROJECTION_KINDS:
            raise ValueError(
                f"projection_kind must be one of {PROJECTION_KINDS}, got {self.projection_kind!r}"
            )
        if self.projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0, got {self.projection_dim}")
        if not self.modules:
            raise ValueError("modules must name at least one module block, got none")
        names = [block.name for block in self.modules]
        if len(set(names)) != len(names):
            raise ValueError(f"module names must be unique, got {names}")

    @property
    def row_width(self) -> int:
        return sum(block.size for block in self.modules)

    def column_ranges(self) -> dict[str, tuple[int, int]]:
        """``name -> (start, stop)`` of each module's columns within a row."""
        ranges, start = {}, 0
        for block in self.modules:
            ranges[block.name] = (start, start + block.size)
            start += block.size
        return ranges

    def to_json(self) -> dict:
        data = asdict(self)
        data["modules"] = [{"name": b.name, "shape": list(b.shape)} for b in self.modules]
        return data

    @classmethod
    def from_json(cls, data: dict) -> StoreSettings:
        data = dict(data)
        data["modules"] = tuple(
            ModuleBlock(entry["name"], tuple(entry["shape"])) for entry in data["modules"]
        )
        return cls(**data)

    def mismatches(
        self, other: StoreSettings, ignore: Sequence[str] = ()
    ) -> list[tuple[str, object, object]]:
        """``(field, self's value, other's value)`` for every compared field that differs."""
        fields = (
            "modules",
            "projection_dim",
            "projection_kind",
            "dtype",
            "transform",
            "model_fingerprint",
            "data_fingerprint",
        )
        return [
            (name, getattr(self, name), getattr(other, name))
            for name in fields
            if name not in ignore and getattr(self, name) != getattr(other, name)
        ]


class StoreMismatchError(ValueError):
    """A store was written with settings other than the ones it is being used with."""


def _describe(value: object) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], ModuleBlock):
        return "[" + ", ".join(f"{b.name}{list(b.shape)}" for b in value) + "]"
    return repr(value)


def check_settings(
    stored: StoreSettings,
    expected: StoreSettings,
    where: str,
    ignore: Sequence[str] = (),
) -> None:
    """Raise ``StoreMismatchError`` listing every differing field instead of scoring garbage."""
    differences = stored.mismatches(expected, ignore)
    if differences:
        lines = [
            f"  {name}: stored {_describe(have)}, expected {_describe(want)}"
            for name, have, want in differences
        ]
        raise StoreMismatchError(
            f"gradient store {where} was written with different settings:\n"
            + "\n".join(lines)
            + "\nrebuild it with the current settings (or point to a matching store)"
        )


def _atomic_write_json(path: Path, data: dict) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(temporary, path)


class GradientStore:
    """A directory with ``gradients.bin`` (``num_rows × row_width``), ``committed.bin`` and
    ``store.json``. Create with :meth:`create`, reopen with :meth:`open`."""

    def __init__(self, directory: Path, metadata: dict) -> None:
        self.directory = Path(directory)
        self.settings = StoreSettings.from_json(metadata["settings"])
        self.num_rows = int(metadata["num_rows"])
        self.chunk_rows = int(metadata["chunk_rows"])
        self._numpy_dtype = _NUMPY_DTYPES[self.settings.dtype]
        self._array: np.memmap | None = None

    # ---- creation -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike,
        settings: StoreSettings,
        num_rows: int,
        chunk_rows: int = 256,
        *,
        resume: bool = False,
    ) -> GradientStore:
        """A new empty store, or with ``resume=True`` the existing one if its settings match.

        Without ``resume`` an existing store is an error (never silently overwritten).
        """
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        directory = Path(directory)
        metadata_path = directory / METADATA_FILE
        if metadata_path.exists():
            if not resume:
                raise FileExistsError(
                    f"a gradient store already exists at {directory}; pass resume=True "
                    "(--resume) to continue it, or choose another directory"
                )
            store = cls.open(directory, expected=settings)
            if store.num_rows != num_rows or store.chunk_rows != chunk_rows:
                raise StoreMismatchError(
                    f"gradient store {directory} has num_rows={store.num_rows}, "
                    f"chunk_rows={store.chunk_rows}; resuming needs num_rows={num_rows}, "
                    f"chunk_rows={chunk_rows}"
                )
            return store
        directory.mkdir(parents=True, exist_ok=True)
        itemsize = np.dtype(_NUMPY_DTYPES[settings.dtype]).itemsize
        num_chunks = -(-num_rows // chunk_rows)
        # Sparse files: the space is reserved without writing zeros.
        with open(directory / DATA_FILE, "wb") as handle:
            handle.truncate(num_rows * settings.row_width * itemsize)
        with open(directory / COMMIT_FILE, "wb") as handle:
            handle.truncate(num_chunks)
        metadata = {
            "format_version": STORE_FORMAT_VERSION,
            "settings": settings.to_json(),
            "num_rows": num_rows,
            "chunk_rows": chunk_rows,
            "row_width": settings.row_width,
        }
        # store.json last: its presence means the data and commit files are fully sized.
        _atomic_write_json(metadata_path, metadata)
        return cls(directory, metadata)

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        expected: StoreSettings | None = None,
        ignore: Sequence[str] = (),
    ) -> GradientStore:
        """Open a store; with ``expected``, raise ``StoreMismatchError`` on differing settings."""
        directory = Path(directory)
        metadata_path = directory / METADATA_FILE
        if not metadata_path.exists():
            raise FileNotFoundError(f"no gradient store at {directory} (missing {METADATA_FILE})")
        metadata = json.loads(metadata_path.read_text())
        version = metadata.get("format_version")
        if version != STORE_FORMAT_VERSION:
            raise StoreMismatchError(
                f"gradient store {directory} has format_version={version}; this kronlab "
                f"reads format_version={STORE_FORMAT_VERSION}"
            )
        store = cls(directory, metadata)
        if expected is not None:
            check_settings(store.settings, expected, str(directory), ignore)
        return store

    def __repr__(self) -> str:
        settings = self.settings
        return (
            f"GradientStore({str(self.directory)!r}, {self.num_rows} rows x {self.row_width} "
            f"{settings.dtype}, {len(settings.modules)} modules, projection_dim "
            f"{settings.projection_dim}, transform {settings.transform.split(':')[0]})"
        )

    # ---- chunks and commits ---------------------------------------------------------------

    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.chunk_rows)

    @property
    def row_width(self) -> int:
        return self.settings.row_width

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        if not 0 <= chunk < self.num_chunks:
            raise ValueError(f"chunk must be in [0, {self.num_chunks}), got {chunk}")
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_rows)

    def committed(self) -> np.ndarray:
        """Boolean per chunk: ``True`` where the chunk's rows are completely written."""
        flags = np.fromfile(self.directory / COMMIT_FILE, dtype=np.uint8)
        return flags[: self.num_chunks] == 1

    def pending_chunks(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Uncommitted chunks owned by ``rank`` (chunk ``k`` belongs to rank ``k mod world``)."""
        done = self.committed()
        return [k for k in range(rank, self.num_chunks, world_size) if not done[k]]

    @property
    def is_complete(self) -> bool:
        return bool(self.committed().all())

    def write_chunk(self, chunk: int, rows: torch.Tensor) -> None:
        """Write chunk ``chunk``'s rows (``(rows, row_width)``, any float dtype), then commit it."""
        start, stop = self.chunk_range(chunk)
        if tuple(rows.shape) != (stop - start, self.row_width):
            raise ValueError(
                f"chunk {chunk} needs rows of shape {(stop - start, self.row_width)}, "
                f"got {tuple(rows.shape)}"
            )
        # The shared sum-first test: a finite sum means every entry is finite (an exact
        # per-entry test only when it is not), 30x cheaper than isfinite().all() per chunk.
        if not all_finite([rows]):
            raise ValueError(f"chunk {chunk} (rows {start}..{stop - 1}) has non-finite gradients")
        payload = self._encode(rows).tobytes()
        offset = start * self.row_width * np.dtype(self._numpy_dtype).itemsize
        data_fd = os.open(self.directory / DATA_FILE, os.O_WRONLY)
        try:
            _pwrite_all(data_fd, payload, offset)
        finally:
            os.close(data_fd)
        commit_fd = os.open(self.directory / COMMIT_FILE, os.O_WRONLY)
        try:
            _pwrite_all(commit_fd, b"\x01", chunk)
        finally:
            os.close(commit_fd)

    def _encode(self, rows: torch.Tensor) -> np.ndarray:
        converted = rows.detach().to("cpu", _TORCH_DTYPES[self.settings.dtype]).contiguous()
        if self.settings.dtype == "bfloat16":
            return converted.view(torch.int16).numpy().view(np.uint16)
        return converted.numpy()

    # ---- reading --------------------------------------------------------------------------

    @property
    def array(self) -> np.memmap:
        """The raw memory map ``(num_rows, row_width)`` in the storage dtype (bf16 as uint16)."""
        if self._array is None:
            self._array = np.memmap(
                self.directory / DATA_FILE,
                dtype=self._numpy_dtype,
                mode="r",
                shape=(self.num_rows, self.row_width),
            )
        return self._array

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` as float32 ``(n, row_width)``; every chunk touched must be
        committed."""
        stop = self.num_rows if stop is None else stop
        if not 0 <= start <= stop <= self.num_rows:
            raise ValueError(f"rows must satisfy 0 <= start <= stop <= {self.num_rows}")
        if stop > start:
            first, last = start // self.chunk_rows, (stop - 1) // self.chunk_rows
            done = self.committed()
            missing = [k for k in range(first, last + 1) if not done[k]]
            if missing:
                raise ValueError(
                    f"gradient store {self.directory} is incomplete: chunks {missing[:8]} are "
                    "not written; run the build again with --resume"
                )
        block = np.array(self.array[start:stop])  # a private copy: torch wants it writable
        if self.settings.dtype == "bfloat16":
            return torch.from_numpy(block.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(block).float()

    def iter_rows(self, batch_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, rows)`` over the whole store in batches of ``batch_rows``."""
        for start in range(0, self.num_rows, batch_rows):
            yield start, self.read(start, min(start + batch_rows, self.num_rows))

    def module_blocks(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split rows ``(n, row_width)`` into ``{name: (n, r, c)}`` blocks (views)."""
        blocks = {}
        for block, (start, stop) in zip(self.settings.modules, self.column_ranges()):
            blocks[block.name] = rows[:, start:stop].reshape(-1, *block.shape)
        return blocks

    def column_ranges(self) -> list[tuple[int, int]]:
        return list(self.settings.column_ranges().values())

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.row_width * np.dtype(self._numpy_dtype).itemsize


def _pwrite_all(fd: int, payload: bytes, offset: int) -> None:
    view = memoryview(payload)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def flatten_blocks(blocks: dict[str, torch.Tensor], settings: StoreSettings) -> torch.Tensor:
    """``{name: (n, r, c)}`` → rows ``(n, row_width)`` in the store's module order."""
    missing = [b.name for b in settings.modules if b.name not in blocks]
    if missing:
        raise ValueError(f"gradient blocks are missing modules {missing}")
    parts = []
    for block in settings.modules:
        tensor = blocks[block.name]
        if tuple(tensor.shape[1:]) != block.shape:
            raise ValueError(
                f"module {block.name!r} block has shape {tuple(tensor.shape[1:])}, the store "
                f"expects {block.shape}"
            )
        parts.append(tensor.reshape(tensor.shape[0], -1))
    return torch.cat(parts, dim=1)
