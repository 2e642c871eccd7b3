"""The optional-dependency extras bring what the features behind them import."""

from __future__ import annotations

import re
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def extra(name: str) -> set[str]:
    """Distribution names of one extra (a one-line list; tomllib is not in Python 3.10)."""
    match = re.search(rf"^{name} = \[(.*)\]$", PYPROJECT.read_text(), flags=re.MULTILINE)
    assert match, f"no one-line extra {name!r} in pyproject.toml"
    requirements = re.findall(r'"([^"]+)"', match.group(1))
    return {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0] for requirement in requirements}


def test_hf_extra_brings_what_trainer_needs() -> None:
    # transformers.TrainingArguments refuses to import without accelerate.
    assert {"transformers", "accelerate", "safetensors"} <= extra("hf")
