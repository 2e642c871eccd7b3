"""Linear datamodeling score (LDS) on a small causal transformer trained on stdlib source.

Two variants of one byte-level language model (one block, width 32): ``linear`` is
:class:`kronlab.tasks.text.TinyGPT` (attention from explicit ``nn.Linear`` projections) and
``torch`` uses ``nn.TransformerEncoderLayer`` (fused ``nn.MultiheadAttention``). Ground truth
(Park et al. 2023): retrain on ``--subsets`` random halves of the training sequences with
``--seeds`` seeds each and record every query's summed next-token loss (cached). A method
predicts ``Σ_{t∈S} score(q, t)``; LDS is the Spearman correlation with the negated losses across
subsets, averaged over queries.

kronlab and kronfluence score the same base model with the same tracked modules, the true
Fisher, the same damping rule (0.1 × mean eigenvalue per module) and the same padding mask;
kronfluence runs in a subprocess of its own venv (``--kronfluence-python``), timed inside it
(imports excluded), kronlab in this process: fit + score wall time, one torch thread. kronlab's
rows also sweep the damping factor (``--sweep``).

    PYTHONPATH=src:. python -m benchmarks.text_lds --variant linear --kronfluence-python PY
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.common import machine_description
from benchmarks.lds import linear_datamodeling_score
from kronlab.attribution import fit_curvature, influence_scores
from kronlab.attribution.sources import language_model_loss
from kronlab.tasks.text import BYTE_VOCAB, GPTConfig, encode_bytes, stdlib_text, tiny_gpt

VOCAB = BYTE_VOCAB + 1
DAMPING_FACTOR = 0.1


@dataclass(frozen=True)
class TextSetup:
    train: int = 192
    queries: int = 24
    length: int = 32
    width: int = 32
    heads: int = 2
    steps: int = 150
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-3

    def key(self, variant: str, subsets: int, seeds: int) -> str:
        text = f"{variant}|{subsets}|{seeds}|{sorted(asdict(self).items())}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class TorchLayerLM(nn.Module):
    """Byte LM around one pre-norm ``nn.TransformerEncoderLayer`` with a causal mask."""

    def __init__(self, setup: TextSetup) -> None:
        super().__init__()
        width = setup.width
        self.wte = nn.Embedding(VOCAB, width)
        self.wpe = nn.Embedding(setup.length, width)
        self.layer = nn.TransformerEncoderLayer(
            width, setup.heads, 4 * width, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device).expand_as(tokens)
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        hidden = self.layer(self.wte(tokens) + self.wpe(positions), causal, is_causal=True)
        return self.lm_head(self.ln_f(hidden))


def make_model(variant: str, seed: int, setup: TextSetup) -> nn.Module:
    if variant == "linear":
        config = GPTConfig(context=setup.length, d_model=setup.width, layers=1, heads=setup.heads)
        return tiny_gpt(seed, config)
    torch.manual_seed(seed)
    return TorchLayerLM(setup)


# Tracked-module sets, each adding to the one before: kronfluence's (nn.Linear modules it can
# hook) and kronlab's others.
def module_sets(variant: str) -> dict[str, list[str] | None]:
    if variant == "linear":
        mlp = ["blocks.0.mlp.0", "blocks.0.mlp.2", "lm_head"]
        linears = ["blocks.0.attn.c_attn", "blocks.0.attn.c_proj", *mlp]
        return {"MLP + head": mlp, "linear layers": linears, "all (+ embeddings)": None}
    # kronfluence never sees attention's fused projections: only the MLP and the head.
    mlp = ["layer.linear1", "layer.linear2", "lm_head"]
    attention = ["layer.self_attn", "layer.self_attn.out_proj"]
    return {"MLP + head": mlp, "+ attention": attention + mlp, "all (+ embeddings)": None}


def corpus(setup: TextSetup) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Training and query sequences: disjoint seeded snippets of stdlib source, as bytes."""
    train = encode_bytes(stdlib_text(setup.train, setup.length, seed=11), setup.length)
    queries = encode_bytes(stdlib_text(setup.queries, setup.length, seed=1011), setup.length)
    return train, queries


def per_sequence_losses(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor):
    """Summed next-token cross-entropy of each sequence over its real targets."""
    logits = model(tokens)[:, :-1]
    losses = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    return (losses * mask[:, 1:]).sum(1)


def train_model(
    variant: str, tokens: torch.Tensor, mask: torch.Tensor, seed: int, setup: TextSetup
) -> nn.Module:
    model = make_model(variant, seed, setup)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=setup.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(setup.steps):
        rows = torch.randint(len(tokens), (setup.batch_size,), generator=generator)
        loss = per_sequence_losses(model, tokens[rows], mask[rows]).sum() / mask[rows, 1:].sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def retrain(variant: str, setup: TextSetup, subsets: int, seeds: int) -> dict[str, torch.Tensor]:
    cache = (
        Path(tempfile.gettempdir()) / f"kronlab_text_lds_{setup.key(variant, subsets, seeds)}.pt"
    )
    if cache.exists():
        return torch.load(cache, weights_only=True)
    (tokens, mask), (query_tokens, query_mask) = corpus(setup)
    generator = torch.Generator().manual_seed(1234)
    masks = torch.zeros(subsets, setup.train, dtype=torch.bool)
    losses = torch.zeros(subsets, setup.queries)
    started = time.perf_counter()
    for subset in range(subsets):
        chosen = torch.randperm(setup.train, generator=generator)[: setup.train // 2]
        masks[subset, chosen] = True
        for seed in range(seeds):
            model = train_model(variant, tokens[chosen], mask[chosen], 100 + seed, setup)
            with torch.no_grad():
                losses[subset] += per_sequence_losses(model, query_tokens, query_mask) / seeds
        print(f"  retrained subset {subset + 1}/{subsets} ({time.perf_counter() - started:.0f} s)")
    result = {
        "masks": masks,
        "losses": losses,
        "seconds": torch.tensor(time.perf_counter() - started),
    }
    torch.save(result, cache)
    return result


def batches(tokens: torch.Tensor, mask: torch.Tensor, size: int) -> list:
    return [(tokens[i : i + size], mask[i : i + size]) for i in range(0, len(tokens), size)]


def kronlab_scores(
    model: nn.Module,
    train_data: list,
    query_data: list,
    method: str,
    modules: list[str] | None,
    factors: list[float],
    seed: int,
) -> tuple[dict[float, torch.Tensor], float]:
    """Scores per damping factor; seconds = fit + scoring at the first factor."""
    started = time.perf_counter()
    curvature = fit_curvature(
        model, train_data, language_model_loss, method, modules=modules, seed=seed,
        mask_fn=lambda batch: batch[1], progress=False,
    )  # fmt: skip
    results, seconds = {}, 0.0
    for factor in factors if method != "identity" else factors[:1]:
        results[factor] = influence_scores(
            curvature, query_data, train_data, model=model, loss_fn=language_model_loss,
            damping_factor=factor, mask_fn=lambda batch: batch[1], progress=False,
        )  # fmt: skip
        seconds = seconds or time.perf_counter() - started
    return results, seconds


def kronfluence_scores(
    python: str, variant: str, model: nn.Module, strategy: str, modules: list[str], seed: int
) -> tuple[torch.Tensor, float]:
    with tempfile.TemporaryDirectory() as directory:
        state, output = Path(directory) / "state.pt", Path(directory) / "scores.pt"
        torch.save(model.state_dict(), state)
        command = [
            python, "-m", "benchmarks.text_lds_kronfluence", "--variant", variant,
            "--state", str(state), "--strategy", strategy, "--modules", ",".join(modules),
            "--output", str(output), "--seed", str(seed),
        ]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(completed.stderr[-3000:])
        result = torch.load(output, weights_only=True)
    return result["scores"], result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=["linear", "torch"], default="linear")
    parser.add_argument("--subsets", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--sweep",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[1e-6, 1e-4, 1e-3, 1e-2, 0.03, 0.3, 1.0],
    )
    parser.add_argument("--fisher-seeds", type=int, default=2)
    parser.add_argument(
        "--kronfluence-python",
        default=os.environ.get("KRONFLUENCE_PYTHON", "python"),
        help="the Python of a venv with kronfluence (default: $KRONFLUENCE_PYTHON, else python)",
    )
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    setup = TextSetup()
    truth = retrain(arguments.variant, setup, arguments.subsets, arguments.seeds)
    (tokens, mask), (query_tokens, query_mask) = corpus(setup)
    model = train_model(arguments.variant, tokens, mask, 0, setup)
    train_data = batches(tokens, mask, 64)
    query_data = batches(query_tokens, query_mask, 64)
    factors = [DAMPING_FACTOR] + [f for f in arguments.sweep if f != DAMPING_FACTOR]

    def lds(scores: torch.Tensor) -> float:
        return linear_datamodeling_score(scores, truth["masks"], truth["losses"])

    rows = []
    for tracked, modules in module_sets(arguments.variant).items():
        for method in ("identity", "kfac", "ekfac"):
            seeds = range(arguments.fisher_seeds if method != "identity" else 1)
            runs = [
                kronlab_scores(model, train_data, query_data, method, modules, factors, s)
                for s in seeds
            ]
            per_factor = {f: sum(lds(r[0][f]) for r in runs) / len(runs) for f in runs[0][0]}
            seconds = sum(r[1] for r in runs) / len(runs)
            rows.append(("kronlab", method, tracked, per_factor, seconds, ""))
            print(rows[-1], flush=True)
            if modules is None:
                continue
            try:
                outcomes = [
                    kronfluence_scores(
                        arguments.kronfluence_python, arguments.variant, model, method, modules, s
                    )
                    for s in seeds
                ]
            except (RuntimeError, OSError) as error:
                reason = str(error).strip().splitlines()[-1][:200]
                print(f"kronfluence {method} {tracked}: not run: {reason}", flush=True)
                rows.append(("kronfluence", method, tracked, {}, None, reason))
                continue
            value = sum(lds(scores) for scores, _ in outcomes) / len(outcomes)
            seconds = sum(s for _, s in outcomes) / len(outcomes)
            rows.append(("kronfluence", method, tracked, {DAMPING_FACTOR: value}, seconds, ""))
            print(rows[-1], flush=True)
    print(format_table(arguments, setup, rows, float(truth["seconds"]), factors))


def format_table(arguments, setup: TextSetup, rows: list, retrain_seconds: float, factors):
    sweep = sorted(factors)
    lines = [
        f"#### Text LDS, `{arguments.variant}` variant ({arguments.subsets} subsets × "
        f"{arguments.seeds} seeds, {setup.queries} queries, {setup.train} training sequences of "
        f"{setup.length} bytes)",
        "",
        f"Command: `PYTHONPATH=src:. nice -n 10 python -m benchmarks.text_lds --variant "
        f"{arguments.variant}`  ",
        f"Machine: {machine_description()}, shared with other jobs (1-minute load "
        f"{os.getloadavg()[0]:.0f}); "
        f"retraining took {retrain_seconds:.0f} s. LDS: mean over {arguments.fisher_seeds} "
        "true-Fisher label seeds.",
        "",
        "| library | method | tracked | LDS (0.1 × mean eig.) | fit+score s | time / kronfluence | "
        + " | ".join(f"LDS @ {f:g}" for f in sweep)
        + " |",
        "|---|---|---|---:|---:|---:|" + "---:|" * len(sweep),
    ]
    reference = {
        (method, tracked): seconds
        for library, method, tracked, _, seconds, _ in rows
        if library == "kronfluence" and seconds is not None
    }
    for library, method, tracked, per_factor, seconds, note in rows:
        if seconds is None:
            lines.append(f"| {library} | {method} | {tracked} | not run: {note} |")
            continue
        peer = reference.get((method, tracked))
        ratio = f"{seconds / peer:.2f}x" if peer else "–"
        cells = " | ".join(f"{per_factor[f]:.4f}" if f in per_factor else "–" for f in sweep)
        lines.append(
            f"| {library} | {method} | {tracked} | {per_factor[DAMPING_FACTOR]:.4f} | "
            f"{seconds:.2f} | {ratio} | {cells} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
