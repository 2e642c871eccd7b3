"""kronfluence on the text LDS benchmark's base model (run in kronfluence's own venv).

Invoked by ``benchmarks/text_lds.py`` as a subprocess: rebuilds the same model, data and
tracked modules, fits kronfluence's factors with ``--strategy`` (identity, kfac or ekfac; true
Fisher), scores with its heuristic damping (0.1 × mean eigenvalue, ``damping_factor=None``, the
rule kronlab's default uses) and writes the scores and the fit + score wall time (imports and
model loading excluded) to ``--output``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from benchmarks.text_lds import TextSetup, corpus, make_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--strategy", choices=["identity", "kfac", "ekfac"], required=True)
    parser.add_argument("--modules", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(arguments.seed)

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    tracked = arguments.modules.split(",")

    def summed_loss(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, sample: bool):
        logits = model(tokens)[:, :-1]
        targets = tokens[:, 1:]
        if sample:
            with torch.no_grad():
                probabilities = torch.softmax(logits.detach().reshape(-1, logits.shape[-1]), -1)
                targets = torch.multinomial(probabilities, 1).reshape(targets.shape)
        losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return (losses * mask[:, 1:]).sum()

    class TextTask(Task):
        def compute_train_loss(self, batch, model: nn.Module, sample: bool = False):
            return summed_loss(model, batch[0], batch[1], sample)

        def compute_measurement(self, batch, model: nn.Module):
            return summed_loss(model, batch[0], batch[1], False)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch[1]

    setup = TextSetup()
    (tokens, mask), (query_tokens, query_mask) = corpus(setup)
    model = make_model(arguments.variant, 0, setup)
    model.load_state_dict(torch.load(arguments.state, weights_only=True))
    model.eval()
    train = TensorDataset(tokens, mask.long())  # kronfluence counts tokens in int64
    queries = TensorDataset(query_tokens, query_mask.long())
    with tempfile.TemporaryDirectory() as output_dir:
        started = time.perf_counter()
        model = prepare_model(model, TextTask())
        analyzer = Analyzer(
            "text", model, TextTask(), cpu=True, disable_tqdm=True, output_dir=output_dir
        )
        analyzer.fit_all_factors(
            arguments.strategy,
            train,
            per_device_batch_size=64,
            factor_args=FactorArguments(strategy=arguments.strategy),
        )
        analyzer.compute_pairwise_scores(
            "scores",
            arguments.strategy,
            queries,
            train,
            per_device_query_batch_size=64,
            per_device_train_batch_size=64,
            score_args=ScoreArguments(damping_factor=None),
        )
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
        seconds = time.perf_counter() - started
    torch.save({"scores": scores.float(), "seconds": seconds}, arguments.output)


if __name__ == "__main__":
    main()
