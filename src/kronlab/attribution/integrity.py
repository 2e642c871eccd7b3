"""Integrity and durability of the pipeline's files: checksums, digests, atomic JSON, fsync.

Every file a stage writes is checked when a later stage reads it: gradient chunks by their
CRC-32 (written at commit), whole files (``curvature.safetensors``, ``scores.npy``) by a
BLAKE2b digest recorded in the stage's JSON, and the JSON files themselves by a digest of their
own content. A damaged or edited file is an :class:`IntegrityError` naming the file, never a
wrong score. ``durable=True`` adds an ``fsync`` of the file and of its directory, so that what
is committed also survives a power cut (without it, only a killed process).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DIGEST_KEY = "content_digest"
_READ_BLOCK = 1 << 22


class IntegrityError(ValueError):
    """A file does not hold what was written to it (damaged, truncated or edited)."""


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """Give an ``OSError`` raised inside (a write on a full disk, past ``ulimit -f``) the file's
    name when the call that failed did not know it."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def crc32(buffer: Any) -> int:
    """CRC-32 of a bytes-like object or a C-contiguous numpy array (no copy)."""
    return zlib.crc32(buffer) & 0xFFFFFFFF


def file_digest(path: Path) -> str:
    """BLAKE2b-128 hex digest of a file's bytes, read in blocks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _content_digest(data: dict) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def fsync_directory(directory: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json(path: Path, data: dict, *, durable: bool = False) -> None:
    """Write ``data`` plus a digest of itself atomically (temporary file, then rename).

    A reader sees the old file or the new one, never half of one; ``durable`` also fsyncs the
    file before the rename and the directory after it.
    """
    sealed = {**data, DIGEST_KEY: _content_digest(data)}
    write_text(path, json.dumps(sealed, indent=2, sort_keys=True), durable=durable)


def write_text(path: Path, text: str, *, durable: bool = False) -> None:
    """Replace ``path``'s content atomically (temporary file, then rename; ``durable``: fsync
    the file before the rename and the directory after it)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with naming(temporary), open(temporary, "w") as handle:
        handle.write(text)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(temporary, path)
    if durable:
        fsync_directory(path.parent)


def read_json(path: Path, *, hint: str = "") -> dict:
    """A JSON object written by :func:`write_json`; :class:`IntegrityError` naming the file when
    it is not valid JSON or its content differs from what was written."""
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise IntegrityError(
            f"{path} is damaged: not valid JSON ({error.msg} at line {error.lineno} column "
            f"{error.colno}){suffix}"
        ) from None
    except UnicodeDecodeError:
        raise IntegrityError(f"{path} is damaged: not UTF-8 text{suffix}") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path} is damaged: not a JSON object{suffix}")
    recorded = data.pop(DIGEST_KEY, None)
    if recorded is None:
        raise IntegrityError(
            f"{path} has no {DIGEST_KEY}: it was written by an older kronlab or by hand{suffix}"
        )
    if recorded != _content_digest(data):
        raise IntegrityError(
            f"{path} was changed after it was written (its {DIGEST_KEY} does not match its "
            f"content){suffix}"
        )
    return data


def check_file_digest(path: Path, recorded: str, *, hint: str = "") -> None:
    """:class:`IntegrityError` unless ``path`` exists and has the recorded digest."""
    suffix = f"; {hint}" if hint else ""
    if not Path(path).exists():
        raise IntegrityError(f"{path} is missing{suffix}")
    actual = file_digest(path)
    if actual != recorded:
        raise IntegrityError(
            f"{path} is damaged: its digest is {actual}, {recorded} was recorded when it was "
            f"written{suffix}"
        )
