"""``kronlab attribute``'s default tracked modules: every trackable module outside attention."""

from __future__ import annotations

from torch import nn

from kronlab.attribution import AttributionConfig, AttributionRun
from kronlab.curvature import find_modules, find_modules_outside_attention
from kronlab.tasks.text import GPTConfig, tiny_gpt


def test_gpt_attention_projections_are_left_out() -> None:
    model = tiny_gpt(config=GPTConfig(vocab=16, context=8, d_model=8, layers=2, heads=2))
    everything = find_modules(model)
    default = find_modules_outside_attention(model)
    left_out = sorted(set(everything) - set(default))
    assert left_out == [f"blocks.{i}.attn.{n}" for i in range(2) for n in ("c_attn", "c_proj")]
    assert {"wte", "wpe", "blocks.0.mlp.0", "lm_head"} <= set(default)


def test_torch_multihead_attention_and_its_out_proj_are_left_out() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    default = find_modules_outside_attention(nn.Sequential(layer, nn.Linear(8, 3)))
    assert sorted(default) == ["0.linear1", "0.linear2", "1"]


def test_a_model_of_attention_only_keeps_every_module() -> None:
    model = nn.Sequential()
    model.add_module("attention", nn.MultiheadAttention(8, 2))
    assert list(find_modules_outside_attention(model)) == list(find_modules(model))


def test_the_pipeline_tracks_the_default_set_unless_modules_are_given(tmp_path) -> None:
    class Task:  # only the model is read to resolve the modules
        model = nn.Sequential()

    Task.model.add_module("self_attn", nn.Linear(4, 4))
    Task.model.add_module("head", nn.Linear(4, 2))
    run = AttributionRun(tmp_path / "a", AttributionConfig(), task=Task(), show_progress=False)
    assert list(run._modules()) == ["head"]
    chosen = AttributionConfig(modules=("self_attn", "head"))
    run = AttributionRun(tmp_path / "b", chosen, task=Task(), show_progress=False)
    assert list(run._modules()) == ["self_attn", "head"]
