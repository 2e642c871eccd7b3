"""An on-disk store of per-example (projected) gradients: one flat row-major array + JSON.

Row ``i`` holds example ``i``'s gradient blocks, module by module in a fixed order, each block
flattened row-major: ``P_S G_i P_Aᵀ`` (``p × p``) when projected, ``G_i`` (``d_out × d_in``)
when ``projection_dim == 0``. This is the layout of bergson's index (Chang et al. 2024, "Scalable
Influence and Fact Tracing for LLM Pretraining"; LoGra, Choe et al. 2024).

Crash safety: rows are written a chunk at a time with positioned writes, and only after a
chunk's bytes are in the file is its commit record in ``committed.bin`` written: a marker and
the CRC-32 of the chunk's bytes (8 bytes, aligned, so never torn). A process killed at any
moment leaves every committed chunk complete; ``resume`` rewrites the others, so in the end
every row is written exactly once into a committed chunk. Ranks own disjoint chunks, and so
disjoint byte ranges of both files: they never need a lock.

Integrity: ``store.json`` carries a digest of its own content and is checked against the sizes
of both files when the store is opened; each chunk's CRC-32 is verified the first time the
chunk is read, so a damaged byte is an :class:`IntegrityError` naming the file and the chunk,
never a wrong score. ``durable=True`` fsyncs each chunk's data before its commit record and the
record after it, so that a committed chunk also survives a power cut. ``resume`` re-verifies
every committed chunk and rewrites those that fail their checksum.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from kronlab.attribution.integrity import (
    IntegrityError,
    crc32,
    fsync_directory,
    naming,
    read_json,
    write_json,
)
from kronlab.linalg.finite import all_finite
from kronlab.linalg.projection import PROJECTION_KINDS

STORE_FORMAT_VERSION = 2
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
DATA_FILE = "gradients.bin"
COMMIT_FILE = "committed.bin"
METADATA_FILE = "store.json"
# A commit record: marker, CRC-32 of the chunk's bytes. An unwritten record reads as zeros.
_COMMIT_RECORD = struct.Struct("<II")
_COMMITTED = 0x31434B4B  # "KKC1"

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
    hint: str = "rebuild it with the current settings (or point to a matching store)",
) -> None:
    """Raise ``StoreMismatchError`` listing every differing field instead of scoring garbage;
    ``hint`` says how to fix it."""
    differences = stored.mismatches(expected, ignore)
    if differences:
        lines = [
            f"  {name}: stored {_describe(have)}, expected {_describe(want)}"
            for name, have, want in differences
        ]
        raise StoreMismatchError(
            f"gradient store {where} was written with different settings:\n"
            + "\n".join(lines)
            + f"\n{hint}"
        )


class GradientStore:
    """A directory with ``gradients.bin`` (``num_rows × row_width``), ``committed.bin`` and
    ``store.json``. Create with :meth:`create`, reopen with :meth:`open`.

    ``durable`` (not recorded: a choice of the writer) fsyncs each chunk commit;
    ``repair_command`` is named when a chunk is missing or fails its checksum.
    """

    def __init__(self, directory: Path, metadata: dict) -> None:
        self.directory = Path(directory)
        self.settings = StoreSettings.from_json(metadata["settings"])
        self.num_rows = int(metadata["num_rows"])
        self.chunk_rows = int(metadata["chunk_rows"])
        self._numpy_dtype = _NUMPY_DTYPES[self.settings.dtype]
        self._array: np.memmap | None = None
        self._verified: set[int] = set()
        self.durable = False
        self.repair_command = "resuming the stage that wrote this store (--resume)"

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
        durable: bool = False,
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
            store.durable = durable
            return store
        directory.mkdir(parents=True, exist_ok=True)
        itemsize = np.dtype(_NUMPY_DTYPES[settings.dtype]).itemsize
        num_chunks = -(-num_rows // chunk_rows)
        # Sparse files: the space is reserved without writing zeros.
        for name, size in (
            (DATA_FILE, num_rows * settings.row_width * itemsize),
            (COMMIT_FILE, num_chunks * _COMMIT_RECORD.size),
        ):
            with naming(directory / name), open(directory / name, "wb") as handle:
                handle.truncate(size)
                if durable:
                    os.fsync(handle.fileno())
        metadata = {
            "format_version": STORE_FORMAT_VERSION,
            "settings": settings.to_json(),
            "num_rows": num_rows,
            "chunk_rows": chunk_rows,
            "row_width": settings.row_width,
            "checksum": "crc32 per chunk",
        }
        # store.json last: its presence means the data and commit files are fully sized.
        write_json(metadata_path, metadata, durable=durable)
        if durable:
            fsync_directory(directory.parent)
        store = cls(directory, metadata)
        store.durable = durable
        return store

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        expected: StoreSettings | None = None,
        ignore: Sequence[str] = (),
    ) -> GradientStore:
        """Open a store; with ``expected``, raise ``StoreMismatchError`` on differing settings.

        ``store.json`` must be intact and agree with the sizes of the data and commit files
        (:class:`IntegrityError` otherwise).
        """
        directory = Path(directory)
        metadata_path = directory / METADATA_FILE
        if not metadata_path.exists():
            raise FileNotFoundError(f"no gradient store at {directory} (missing {METADATA_FILE})")
        rebuild = f"remove {directory} and build it again"
        metadata = read_json(metadata_path, hint=rebuild)
        version = metadata.get("format_version")
        if version != STORE_FORMAT_VERSION:
            raise StoreMismatchError(
                f"gradient store {directory} was written in store format {version!r}; this "
                f"kronlab reads format {STORE_FORMAT_VERSION} (per-chunk checksums): {rebuild}"
            )
        try:
            store = cls(directory, metadata)
        except (KeyError, TypeError, ValueError) as error:
            raise IntegrityError(
                f"{metadata_path} is damaged: invalid metadata ({error}); {rebuild}"
            ) from None
        store._check_sizes(metadata, rebuild)
        if expected is not None:
            check_settings(store.settings, expected, str(directory), ignore)
        return store

    def _check_sizes(self, metadata: dict, rebuild: str) -> None:
        """The metadata must describe the files on disk (a truncated or extended file, or an
        edited ``num_rows`` / ``dtype`` / shape, would map rows onto the wrong bytes)."""
        if self.num_rows < 1 or self.chunk_rows < 1 or metadata["row_width"] != self.row_width:
            raise IntegrityError(
                f"{self.directory / METADATA_FILE} is inconsistent: num_rows={self.num_rows}, "
                f"chunk_rows={self.chunk_rows}, row_width={metadata['row_width']} for blocks of "
                f"{self.row_width} values; {rebuild}"
            )
        for name, size in (
            (DATA_FILE, self.nbytes),
            (COMMIT_FILE, self.num_chunks * _COMMIT_RECORD.size),
        ):
            path = self.directory / name
            actual = path.stat().st_size if path.exists() else None
            if actual != size:
                found = "it is missing" if actual is None else f"it has {actual}"
                raise IntegrityError(
                    f"{path} is damaged: {METADATA_FILE} says it has {size} bytes "
                    f"({self.num_rows} rows × {self.row_width} {self.settings.dtype} values), "
                    f"{found}; {rebuild}"
                )

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

    def _records(self) -> np.ndarray:
        """``(num_chunks, 2)`` uint32: marker and CRC-32 of each chunk."""
        raw = np.fromfile(self.directory / COMMIT_FILE, dtype="<u4")
        return raw[: 2 * self.num_chunks].reshape(-1, 2)

    def committed(self) -> np.ndarray:
        """Boolean per chunk: ``True`` where the chunk's rows are completely written."""
        return self._records()[:, 0] == _COMMITTED

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
        # Data first, then its record: a record never describes bytes not yet written (and,
        # when durable, bytes not yet on the disk).
        self._write_at(DATA_FILE, payload, offset)
        record = _COMMIT_RECORD.pack(_COMMITTED, crc32(payload))
        self._write_at(COMMIT_FILE, record, chunk * _COMMIT_RECORD.size)
        self._verified.add(chunk)

    def _write_at(self, name: str, payload: bytes, offset: int) -> None:
        descriptor = os.open(self.directory / name, os.O_WRONLY)
        try:
            with naming(self.directory / name):
                _pwrite_all(descriptor, payload, offset)
                if self.durable:
                    os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def _encode(self, rows: torch.Tensor) -> np.ndarray:
        converted = rows.detach().to("cpu", _TORCH_DTYPES[self.settings.dtype]).contiguous()
        if self.settings.dtype == "bfloat16":
            return converted.view(torch.int16).numpy().view(np.uint16)
        return converted.numpy()

    # ---- verification ---------------------------------------------------------------------

    def damaged_chunks(self) -> list[int]:
        """Committed chunks whose bytes no longer match their CRC-32 (reads the whole store)."""
        records = self._records()
        return [
            chunk
            for chunk in range(self.num_chunks)
            if records[chunk, 0] == _COMMITTED and not self._chunk_matches(chunk, records)
        ]

    def uncommit(self, chunks: Sequence[int]) -> None:
        """Mark ``chunks`` as not written, so that a resumed stage writes them again."""
        for chunk in chunks:
            self._write_at(COMMIT_FILE, bytes(_COMMIT_RECORD.size), chunk * _COMMIT_RECORD.size)
            self._verified.discard(chunk)

    def _chunk_matches(
        self, chunk: int, records: np.ndarray, copy: np.ndarray | None = None, first: int = 0
    ) -> bool:
        """Whether the chunk's bytes have their recorded CRC-32: taken on ``copy`` (rows from
        ``first`` on, already read) when it holds the whole chunk, else on the file."""
        start, stop = self.chunk_range(chunk)
        if copy is not None and first <= start and stop - first <= len(copy):
            rows = copy[start - first : stop - first]
        else:
            rows = self._read_rows(start, stop)
        return crc32(rows) == int(records[chunk, 1])

    def _verify(self, chunks: range, copy: np.ndarray | None = None, first: int = 0) -> None:
        """Check each chunk's CRC-32 the first time it is read (on the copy that is returned,
        where it covers the chunk: what is checked is what the caller gets)."""
        unchecked = [chunk for chunk in chunks if chunk not in self._verified]
        if not unchecked:
            return
        records = self._records()
        missing = [k for k in unchecked if records[k, 0] != _COMMITTED]
        if missing:
            raise ValueError(
                f"gradient store {self.directory} is incomplete: chunks {missing[:8]} are "
                f"not written; {self.repair_command} writes them"
            )
        for chunk in unchecked:
            if not self._chunk_matches(chunk, records, copy, first):
                start, stop = self.chunk_range(chunk)
                raise IntegrityError(
                    f"{self.directory / DATA_FILE} is damaged: chunk {chunk} (rows {start}.."
                    f"{stop - 1}) does not match the checksum recorded in {COMMIT_FILE} when it "
                    f"was written; {self.repair_command} rewrites it"
                )
            self._verified.add(chunk)

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
        committed and match its checksum."""
        stop = self.num_rows if stop is None else stop
        if not 0 <= start <= stop <= self.num_rows:
            raise ValueError(f"rows must satisfy 0 <= start <= stop <= {self.num_rows}")
        block = self._read_rows(start, stop)
        if stop > start:
            chunks = range(start // self.chunk_rows, (stop - 1) // self.chunk_rows + 1)
            self._verify(chunks, block, start)
        if self.settings.dtype == "bfloat16":
            return torch.from_numpy(block.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(block).float()

    def _read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` in the storage dtype, read into a new (writable) array.

        Positioned reads, not a slice of :attr:`array`: the pages of a memory map that were
        read stay mapped, so streaming a whole store through it would grow resident memory to
        the store's size; read this way it stays one block.
        """
        block = np.empty((stop - start, self.row_width), dtype=self._numpy_dtype)
        buffer = memoryview(block.reshape(-1).view(np.uint8))
        offset = start * self.row_width * block.itemsize
        descriptor = os.open(self.directory / DATA_FILE, os.O_RDONLY)
        try:
            with naming(self.directory / DATA_FILE):
                while buffer:
                    count = os.preadv(descriptor, [buffer], offset)
                    if count == 0:
                        raise IntegrityError(
                            f"{self.directory / DATA_FILE} is damaged: it ends before row "
                            f"{stop}; remove {self.directory} and build it again"
                        )
                    buffer, offset = buffer[count:], offset + count
        finally:
            os.close(descriptor)
        return block

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
