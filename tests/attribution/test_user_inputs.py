"""The pipeline's user-supplied inputs: a ``module:function`` model factory, JSONL records, a
local Hugging Face model directory and dataset directory, each loaded and run end to end."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kronlab.attribution.sources import language_model_loss, load_examples, load_model
from kronlab.cli import main
from kronlab.curvature import find_modules, gradient_matrix, per_example_gradients

FACTORY = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def not_a_model():
    return 3
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "user_factory.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_factory"


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _vector_records(count: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, 5, generator=generator)
    labels = torch.randint(0, 3, (count,), generator=generator)
    return [{"input": x.tolist(), "label": int(y)} for x, y in zip(inputs, labels, strict=True)]


def test_factory_model_is_built_in_eval_mode(factory_module: str) -> None:
    model = load_model(f"{factory_module}:build")
    assert isinstance(model, nn.Sequential) and not model.training
    with pytest.raises(ValueError, match="cannot import missing"):
        load_model(f"{factory_module}:missing")
    with pytest.raises(ValueError, match="returned int, not nn.Module"):
        load_model(f"{factory_module}:not_a_model")


def test_jsonl_records_become_vectors_or_masked_text(tmp_path: Path) -> None:
    records = _vector_records(4, seed=0)
    vectors = load_examples(str(_write_jsonl(tmp_path / "v.jsonl", records)), "train")
    assert vectors.kind == "vector" and len(vectors) == 4
    torch.testing.assert_close(vectors.tensors[0][2], torch.tensor(records[2]["input"]))
    assert vectors.tensors[1].tolist() == [r["label"] for r in records]

    texts = [{"text": "def f(x):\n    return x"}, {"text": "ab"}]
    text = load_examples(str(_write_jsonl(tmp_path / "t.jsonl", texts)), "train", length=8)
    tokens, mask = text.tensors
    assert text.kind == "text" and tokens.shape == mask.shape == (2, 8)
    assert mask[0].all() and mask[1].sum() == 2  # the short snippet is padded and masked

    with pytest.raises(ValueError, match="no held-out split for --queries test"):
        load_examples(str(tmp_path / "v.jsonl"), "test")
    with pytest.raises(ValueError, match="holds no examples"):
        load_examples(str(_write_jsonl(tmp_path / "empty.jsonl", [])), "train")
    with pytest.raises(ValueError, match="'text' field or 'input' and 'label'"):
        load_examples(str(_write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}])), "train")


def test_factory_model_on_jsonl_runs_end_to_end(
    tmp_path: Path, factory_module: str, capsys: pytest.CaptureFixture
) -> None:
    train = _write_jsonl(tmp_path / "train.jsonl", _vector_records(24, seed=1))
    queries = _write_jsonl(tmp_path / "queries.jsonl", _vector_records(3, seed=2))
    run_dir = tmp_path / "run"
    arguments = ["attribute", "run", "--run-dir", str(run_dir), "--no-progress"]
    arguments += ["--model", f"{factory_module}:build", "--data", str(train)]
    arguments += ["--queries", str(queries), "--projection-dim", "0", "--batch-size", "8"]
    assert main(arguments) == 0, capsys.readouterr().err
    scores = np.load(run_dir / "scores.npy")
    assert scores.shape == (3, 24) and np.isfinite(scores).all()
    assert (run_dir / "report.md").exists()


def _tiny_gpt2_directory(directory: Path, tied: bool = True) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=260, n_positions=32, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=tied
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def test_hugging_face_model_directory_on_text_runs_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model_dir = _tiny_gpt2_directory(tmp_path / "gpt2")
    model = load_model(str(model_dir))
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    snippets = [{"text": f"value_{i} = {i} * {i + 1}  # line {i}"} for i in range(12)]
    train = _write_jsonl(tmp_path / "train.jsonl", snippets)
    queries = _write_jsonl(tmp_path / "queries.jsonl", snippets[:2])
    run_dir = tmp_path / "run"
    arguments = ["attribute", "run", "--run-dir", str(run_dir), "--no-progress"]
    arguments += ["--model", str(model_dir), "--data", str(train), "--queries", str(queries)]
    arguments += ["--length", "16", "--projection-dim", "4", "--batch-size", "4"]
    with pytest.warns(RuntimeWarning, match="no tokenizer files"):  # a bytes-level GPT-2
        assert main(arguments) == 0, capsys.readouterr().err
    scores = np.load(run_dir / "scores.npy")
    assert scores.shape == (2, 12) and np.isfinite(scores).all()


def test_hugging_face_gpt2_per_example_gradients_match_autograd(tmp_path: Path) -> None:
    # GPT-2 calls its position embedding once per batch on ids (1, T) and broadcasts it:
    # every tracked module, that one included, must get each example's own gradient. Untied
    # embeddings: tied, each module's gradient is its own use's share of the parameter's .grad.
    model = load_model(str(_tiny_gpt2_directory(tmp_path / "gpt2", tied=False))).double()
    tokens = torch.randint(0, 260, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 4:] = False
    modules = find_modules(model)
    assert {"transformer.wpe", "transformer.h.0.attn.c_attn", "lm_head"} <= set(modules)
    hooked = per_example_gradients(model, (tokens, mask), language_model_loss, modules, mask=mask)
    for i in range(3):
        model.zero_grad()
        language_model_loss(model, (tokens[i : i + 1], mask[i : i + 1])).backward()
        for name, module in modules.items():
            bias = getattr(module, "bias", None)
            expected = gradient_matrix(
                module, module.weight.grad, None if bias is None else bias.grad
            )
            torch.testing.assert_close(hooked[name][i], expected, msg=name)


def test_hugging_face_dataset_directory_is_read_like_jsonl(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    records = _vector_records(5, seed=3)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "dataset"))
    from_directory = load_examples(str(tmp_path / "dataset"), "train")
    from_jsonl = load_examples(str(_write_jsonl(tmp_path / "same.jsonl", records)), "train")
    assert from_directory.kind == from_jsonl.kind == "vector"
    for loaded, expected in zip(from_directory.tensors, from_jsonl.tensors, strict=True):
        assert torch.equal(loaded, expected)
