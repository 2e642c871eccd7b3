"""The optional-dependency extras bring what the features behind them import."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def extra(name: str) -> set[str]:
    requirements = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"][name]
    return {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0] for requirement in requirements}


def test_hf_extra_brings_what_trainer_needs() -> None:
    # transformers.TrainingArguments refuses to import without accelerate.
    assert {"transformers", "accelerate", "safetensors"} <= extra("hf")
