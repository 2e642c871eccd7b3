"""Resolve the pipeline's ``--model``, ``--data`` and ``--queries`` into a model, examples, a loss.

Models: ``digits-mlp`` (embedded default: trained once, then loaded from the cache dir),
``tiny-gpt`` (GPT-2-style, briefly trained on stdlib text, cached too), ``package.module:function``
(a factory returning an ``nn.Module``), or a local Hugging Face model directory.
Data: ``digits``, ``stdlib-text``, a local ``.jsonl`` (``{"text": ...}`` or ``{"input": [...],
"label": k}`` per line; streamed) or a local HF dataset directory (``datasets.save_to_disk``;
memory-mapped); file records are encoded batch by batch (bytes, or the HF model's tokenizer).
Queries: ``test`` (the data's held-out split) or another data spec.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from kronlab.attribution.examples import ExampleSet, tensors_fingerprint

LossFn = Callable[[nn.Module, Any], torch.Tensor]
DEFAULT_CACHE = Path(os.environ.get("KRONLAB_CACHE_DIR", Path.home() / ".cache" / "kronlab"))


@dataclass
class AttributionTask:
    """A model, its summed per-example loss, training examples and queries."""

    model: nn.Module
    loss_fn: LossFn
    train: ExampleSet
    queries: ExampleSet


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the model's parameters and buffers (names included)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensors_fingerprint([tensor]).encode())
    return digest.hexdigest()[:16]


def classification_loss(
    model: nn.Module, batch: tuple[torch.Tensor, ...], sample: bool = False
) -> torch.Tensor:
    """Cross-entropy summed over the batch (the hooks need per-example, unscaled losses).

    ``sample=True`` draws the labels from the model's predictive distribution (true Fisher).
    """
    inputs, labels = batch
    logits = _logits(model(inputs))
    return F.cross_entropy(logits, _targets(logits, labels, sample), reduction="sum")


def language_model_loss(
    model: nn.Module, batch: tuple[torch.Tensor, ...], sample: bool = False
) -> torch.Tensor:
    """Next-token cross-entropy summed over real target tokens (padding masked out).

    Position ``t`` predicts token ``t + 1``; the last position and padded targets get the
    ignore index instead of being sliced or multiplied away, so the logits are never copied
    (neither here nor by the backward of a slice).
    """
    tokens, mask = batch
    logits = _logits(model(tokens, **_no_cache(model)))
    vocab = logits.shape[-1]
    targets = _targets(logits[:, :-1], tokens[:, 1:].reshape(-1), sample)
    targets = targets.reshape(len(tokens), -1).masked_fill(~mask[:, 1:].bool(), _IGNORED)
    targets = F.pad(targets, (0, 1), value=_IGNORED)
    return F.cross_entropy(
        logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=_IGNORED, reduction="sum"
    )


_IGNORED = -100


def _no_cache(model: nn.Module) -> dict[str, bool]:
    """``use_cache=False`` for Hugging Face models (their config has ``use_cache``): by default
    they build a key/value cache, copying every layer's keys and values, which a loss never
    reads."""
    config = getattr(model, "config", None)
    return {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}


def _targets(logits: torch.Tensor, labels: torch.Tensor, sample: bool) -> torch.Tensor:
    """``labels``, or with ``sample`` one draw per row of ``logits`` (``(..., classes)``)."""
    if not sample:
        return labels
    with torch.no_grad():
        flat = logits.detach().reshape(-1, logits.shape[-1])
        probabilities = torch.softmax(flat.float(), dim=-1)
        return torch.multinomial(probabilities, 1).squeeze(-1)


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


# ---- models ---------------------------------------------------------------------------------


def _train_digits_mlp(seed: int) -> nn.Module:
    from kronlab.tasks.digits import digits_mlp, digits_task

    task = digits_task()
    model = digits_mlp(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(400):
        rows = torch.randint(len(task.train_inputs), (128,), generator=generator)
        loss = F.cross_entropy(model(task.train_inputs[rows]), task.train_targets[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _train_tiny_gpt(seed: int) -> nn.Module:
    from kronlab.tasks.text import encode_bytes, stdlib_text, tiny_gpt, train_briefly

    model = tiny_gpt(seed)
    tokens, mask = encode_bytes(stdlib_text(512, 64, seed=seed + 1), 64)
    return train_briefly(model, tokens, mask, steps=60, seed=seed)


def _embedded_models() -> dict[str, tuple[Callable[[int], nn.Module], Callable[[int], nn.Module]]]:
    from kronlab.tasks.digits import digits_mlp
    from kronlab.tasks.text import tiny_gpt

    return {
        "digits-mlp": (digits_mlp, _train_digits_mlp),
        "tiny-gpt": (lambda seed: tiny_gpt(seed), _train_tiny_gpt),
    }


def load_model(spec: str, seed: int = 0, cache_dir: Path | None = None) -> nn.Module:
    """The model named by ``spec`` in eval mode (see the module docstring for the forms)."""
    embedded = _embedded_models()
    if spec in embedded:
        build, train = embedded[spec]
        cache = Path(cache_dir or DEFAULT_CACHE) / f"{spec}-seed{seed}.pt"
        model = build(seed)
        if cache.exists():
            try:
                model.load_state_dict(torch.load(cache, weights_only=True))
            except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
                raise ValueError(
                    f"the cached model {cache} is damaged ({str(error).splitlines()[0]}): "
                    "delete it and the next run trains it again"
                ) from None
        else:
            print(
                f"training the embedded {spec} (seed {seed}) once; it is cached in {cache} "
                "(--cache-dir or KRONLAB_CACHE_DIR to choose where)",
                file=sys.stderr,
            )
            model = train(seed)
            cache.parent.mkdir(parents=True, exist_ok=True)
            temporary = cache.with_suffix(".tmp")
            torch.save(model.state_dict(), temporary)
            os.replace(temporary, cache)
        return model.eval()
    if ":" in spec and not Path(spec).exists():
        module_name, _, function_name = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"--model {spec!r}: cannot import {function_name} ({error})") from None
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"--model {spec!r} returned {type(model).__name__}, not nn.Module")
        return model.eval()
    path = Path(spec)
    if path.is_dir() and (path / "config.json").exists():
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as error:
            raise ImportError(
                "a Hugging Face model directory needs transformers: pip install 'kronlab[hf]'"
            ) from error
        return AutoModelForCausalLM.from_pretrained(path).eval()
    raise ValueError(
        f"--model {spec!r} is not one of {sorted(embedded)}, a 'module:function' factory, or a "
        "local Hugging Face model directory"
    )


# ---- data -----------------------------------------------------------------------------------


def _digits_split(split: Literal["train", "test"]) -> ExampleSet:
    from kronlab.tasks.digits import digits_task

    task = digits_task()
    if split == "train":
        return ExampleSet((task.train_inputs, task.train_targets), "image")
    return ExampleSet((task.test_inputs, task.test_targets), "image")


def _text_encoder(
    length: int, tokenizer_dir: Path | None
) -> Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]:
    """``texts → (tokens, mask)`` padded to ``length``: bytes, or the HF tokenizer (loaded
    once). Each text is encoded on its own, so any slice encodes the same rows."""
    if tokenizer_dir is None:
        from kronlab.tasks.text import encode_bytes

        return lambda texts: encode_bytes(texts, length)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = tokenizer(
            texts, max_length=length, truncation=True, padding="max_length", return_tensors="pt"
        )
        return encoded["input_ids"], encoded["attention_mask"].bool()

    return encode


def _text_set(texts: list[str], length: int, tokenizer_dir: Path | None) -> ExampleSet:
    return ExampleSet(_text_encoder(length, tokenizer_dir)(texts), "text", list(texts))


def _record_examples(source: Any, spec: str, length: int, tokenizer_dir: Path | None) -> ExampleSet:
    """A file's records as examples encoded batch by batch (see
    :mod:`kronlab.attribution.records`); the first record decides text or vectors."""
    from kronlab.attribution.records import RecordExamples

    if len(source) == 0:
        raise ValueError(f"{spec} holds no examples")
    (first,) = source.records(0, 1)
    if "text" in first:
        encode_texts = _text_encoder(length, tokenizer_dir)
        tokenizer = "bytes" if tokenizer_dir is None else _tokenizer_fingerprint(tokenizer_dir)

        def encode_text(records: list[dict]) -> tuple[torch.Tensor, ...]:
            return encode_texts([str(_field(r, "text", spec)) for r in records])

        return RecordExamples(source, "text", encode_text, f"text:{length}:{tokenizer}")
    if "input" in first and "label" in first:

        def encode_vectors(records: list[dict]) -> tuple[torch.Tensor, ...]:
            inputs = torch.tensor([_field(r, "input", spec) for r in records], dtype=torch.float32)
            labels = [int(_field(r, "label", spec)) for r in records]
            return inputs, torch.tensor(labels, dtype=torch.long)

        return RecordExamples(source, "vector", encode_vectors, "vector")
    raise ValueError(
        f"{spec}: records need a 'text' field or 'input' and 'label' fields, got keys "
        f"{sorted(first)}"
    )


def _check_labelled(record: dict, origin: str, first: str, width: int | None) -> int:
    """``ValueError`` naming ``origin`` unless the record is ``{"input": [numbers], "label":
    int >= 0}`` with the same input width as the first record; returns that width."""
    if "input" not in record or "label" not in record:
        raise ValueError(
            f"{origin}: keys {sorted(record)}, but {first} has 'input' and 'label' fields (all "
            "records must have the same fields)"
        )
    values = record["input"]
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"{origin}: 'input' must be a list of numbers, got {values!r:.60}")
    if width is not None and len(values) != width:
        raise ValueError(
            f"{origin}: 'input' has {len(values)} values, but {first} has {width} (all inputs "
            "must have the same width)"
        )
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ValueError(
            f"{origin}: 'label' must be a class index (an integer >= 0), got {label!r}"
        )
    return len(values)


def _consistent_records_check() -> Callable[[dict, str], None]:
    """A check of one record after another: the first decides text (``{"text"}``) or labelled
    vectors (``{"input", "label"}``); every later one must have the same fields, and labelled
    ones numeric inputs of the first one's width and a class index."""
    first: dict[str, Any] = {}

    def check(record: dict, origin: str) -> None:
        if not first:
            if "text" not in record and not ("input" in record and "label" in record):
                raise ValueError(
                    f"{origin}: records need a 'text' field or 'input' and 'label' fields, got "
                    f"keys {sorted(record)}"
                )
            first.update(origin=origin, text="text" in record, width=None)
        if first["text"]:
            if "text" not in record:
                raise ValueError(
                    f"{origin}: keys {sorted(record)}, but {first['origin']} has a 'text' field "
                    "(all records must have the same fields)"
                )
        else:
            first["width"] = _check_labelled(record, origin, first["origin"], first["width"])

    return check


def check_model_inputs(model: nn.Module, examples: ExampleSet, spec: str, model_spec: str) -> None:
    """Labelled examples must fit the model: one forward pass on the first example (width),
    and every label below the model's number of outputs (naming the first one that is not;
    labels are read batch by batch, never the whole set at once)."""
    if examples.kind == "text":
        return
    inputs, _ = examples.batch(0, 1)
    try:
        with torch.no_grad():
            outputs = _logits(model(inputs))
    except RuntimeError as error:
        raise ValueError(
            f"--model {model_spec!r} cannot take the inputs of {spec} (shape "
            f"{tuple(inputs.shape[1:])}, {examples.origin(0)}): {str(error).splitlines()[0]}"
        ) from None
    classes = outputs.shape[-1]
    for start in range(0, len(examples), _LABEL_CHECK_ROWS):
        _, labels = examples.batch(start, start + _LABEL_CHECK_ROWS)
        bad = (labels < 0) | (labels >= classes)
        if bool(bad.any()):
            index = start + int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{examples.origin(index)}: label {int(labels[index - start])} is out of range "
                f"for --model {model_spec!r}, which has {classes} outputs (allowed: "
                f"0..{classes - 1})"
            )


_LABEL_CHECK_ROWS = 4096


def _field(record: dict, name: str, spec: str) -> Any:
    if name not in record:
        raise ValueError(f"{spec}: a record has no {name!r} field (keys {sorted(record)})")
    return record[name]


def _tokenizer_fingerprint(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (directory / name).exists():
            digest.update(name.encode() + (directory / name).read_bytes())
    return digest.hexdigest()[:16]


def load_examples(
    spec: str,
    split: Literal["train", "test"],
    *,
    length: int = 64,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
) -> ExampleSet:
    """Examples named by ``spec``; embedded sets have a train and a held-out test split."""
    if spec == "digits":
        return _digits_split(split)
    if spec == "stdlib-text":
        from kronlab.tasks.text import stdlib_text

        # Disjoint seeds keep the query snippets apart from the training ones.
        count, offset = (512, 1) if split == "train" else (64, 1000)
        return _text_set(stdlib_text(count, length, seed=seed + offset), length, tokenizer_dir)
    if split == "test":
        # A user's file has no held-out split: its "test" would silently be the training set.
        raise ValueError(
            f"data {spec!r} has no held-out split for --queries test: pass the queries as their "
            "own file or directory (--queries queries.jsonl)"
        )
    path = Path(spec)
    if path.suffix == ".jsonl" and path.is_file():
        from kronlab.attribution.records import JsonlRecords

        records = JsonlRecords(path, check=_consistent_records_check())
        return _record_examples(records, spec, length, tokenizer_dir)
    if path.is_dir():
        from kronlab.attribution.records import DatasetRecords

        return _record_examples(DatasetRecords(path), spec, length, tokenizer_dir)
    raise ValueError(
        f"data {spec!r} is not 'digits', 'stdlib-text', a local .jsonl file or a local Hugging "
        "Face dataset directory"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _has_tokenizer(directory: Path) -> bool:
    """A local HF model directory that ships a tokenizer (else text is encoded as bytes)."""
    return directory.is_dir() and any((directory / name).exists() for name in TOKENIZER_FILES)


def load_task(
    model: str,
    data: str,
    queries: str = "test",
    *,
    num_train: int | None = None,
    num_queries: int = 10,
    length: int = 64,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> AttributionTask:
    """Model, loss and examples for the pipeline; the loss follows the kind of data."""
    network = load_model(model, seed=seed, cache_dir=cache_dir)
    tokenizer_dir = Path(model) if _has_tokenizer(Path(model)) else None
    if tokenizer_dir is None and Path(model).is_dir():
        warnings.warn(
            f"--model {model!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): text is "
            "encoded as bytes, which only fits a model trained on bytes",
            RuntimeWarning,
            stacklevel=2,
        )
    train = load_examples(data, "train", length=length, tokenizer_dir=tokenizer_dir, seed=seed)
    if queries == "test":
        query_set = load_examples(
            data, "test", length=length, tokenizer_dir=tokenizer_dir, seed=seed
        )
    else:
        query_set = load_examples(queries, "train", length=length, tokenizer_dir=tokenizer_dir)
    if query_set.kind != train.kind and {query_set.kind, train.kind} != {"image", "vector"}:
        raise ValueError(f"queries are {query_set.kind} examples but the data is {train.kind}")
    check_model_inputs(network, train, data, model)
    check_model_inputs(network, query_set, data if queries == "test" else queries, model)
    loss_fn = language_model_loss if train.kind == "text" else classification_loss
    for parameter in network.parameters():
        parameter.requires_grad_(True)
    return AttributionTask(network, loss_fn, train.subset(num_train), query_set.subset(num_queries))
