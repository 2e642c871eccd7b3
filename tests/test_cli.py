import json
import math

import pytest
import torch

from kronlab.cli import build_parser, main, parse_learning_rates


def test_compare_writes_table_json_and_png(tmp_path, capsys):
    code = main(
        [
            "compare",
            "--optimizers",
            "adamw,sgd",
            "--steps",
            "200",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "optimizer" in out and "time / AdamW" in out and "sgd" in out
    payload = json.loads((tmp_path / "compare.json").read_text())
    results = {r["name"]: r for r in payload["results"]}
    assert results["adamw"]["test_accuracy"] > 0.9  # the acceptance floor
    assert results["adamw"]["ratio_to_adamw"] == 1.0
    assert len(results["sgd"]["train_loss_curve"]) == 200
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_compare_always_times_adamw(tmp_path):
    assert (
        main(
            [
                "compare",
                "--optimizers",
                "sgd",
                "--steps",
                "5",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    names = [r["name"] for r in json.loads((tmp_path / "compare.json").read_text())["results"]]
    assert names == ["sgd", "adamw"]


def test_unknown_optimizer_lists_available(capsys):
    assert main(["compare", "--optimizers", "adamw,nope", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown optimizer 'nope'" in err and "adamw" in err and "sgd" in err
    assert err.count("\n") == 1


def test_lr_for_optimizer_not_compared_is_an_error(tmp_path, capsys):
    assert (
        main(
            [
                "compare",
                "--optimizers",
                "sgd",
                "--lr",
                "adamw=1",
                "--steps",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "--lr names optimizers" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--steps", "--batch-size"])
def test_bad_counts(flag, capsys):
    assert main(["compare", flag, "0"]) == 2
    assert flag in capsys.readouterr().err


def test_list_and_help(capsys):
    assert main(["compare", "--list"]) == 0
    assert "adamw" in capsys.readouterr().out
    assert main([]) == 0
    assert "compare" in capsys.readouterr().out


def test_parse_learning_rates():
    assert parse_learning_rates(["1e-3"]) == (1e-3, {})
    assert parse_learning_rates(["soap=3e-3,muon=0.02", "sgd=0.1"]) == (
        None,
        {"soap": 3e-3, "muon": 0.02, "sgd": 0.1},
    )
    with pytest.raises(ValueError, match="--lr expects"):
        parse_learning_rates(["soap=fast"])


def test_all_optimizers(tmp_path):
    import kronlab.optim

    assert (
        main(
            [
                "compare",
                "--optimizers",
                "all",
                "--steps",
                "3",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    names = [r["name"] for r in json.loads((tmp_path / "compare.json").read_text())["results"]]
    assert names == kronlab.optim.available_optimizers()


def test_each_run_is_independent_of_the_others(tmp_path):
    """An optimizer that draws random numbers gives the same curve alone or after others."""
    common = ["--steps", "5", "--no-progress"]
    main(["compare", "--optimizers", "psgd_quad", "--out", str(tmp_path / "a"), *common])
    main(
        [
            "compare",
            "--optimizers",
            "muon,spectron,psgd_quad",
            "--out",
            str(tmp_path / "b"),
            *common,
        ]
    )

    def curve(folder):
        results = json.loads((tmp_path / folder / "compare.json").read_text())["results"]
        return next(r for r in results if r["name"] == "psgd_quad")["train_loss_curve"]

    assert curve("a") == curve("b")


def test_step_time_leaves_out_the_warm_up_steps():
    from kronlab.compare import step_ms

    # 20 steps: the first two (one tenth) carry the one-time start-up cost and are left out.
    assert step_ms([2.0, 1.0] + [0.001] * 18) == pytest.approx(1.0)
    assert step_ms([0.004]) == pytest.approx(4.0)  # a single step is all there is
    assert math.isnan(step_ms([]))


def test_step_time_keeps_amortized_refreshes_and_drops_slow_blocks():
    from kronlab.compare import step_ms

    # 200 steps of 1 ms with a 10 ms refresh every 10th step (mean 1.9 ms), the first 60 steps
    # slowed 20x by start-up and a burst of other load: the burst blocks are outvoted.
    steps = [0.010 if step % 10 == 9 else 0.001 for step in range(200)]
    steps[:60] = [20 * seconds for seconds in steps[:60]]
    assert step_ms(steps) == pytest.approx(1.9)


def test_attribute_help_shows_defaults_and_the_jsonl_forms(capsys):
    with pytest.raises(SystemExit):
        main(["attribute", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: ekfac)" in text and "(default: 0.01)" in text
    assert '{"text": "..."}' in text and '{"input": [numbers], "label": class index}' in text


def test_attribute_rerun_says_nothing_was_written(tmp_path, capsys):
    from kronlab.tasks.digits import digits_mlp

    cache = tmp_path / "cache"
    cache.mkdir()
    torch.save(digits_mlp(0).state_dict(), cache / "digits-mlp-seed0.pt")
    arguments = ["attribute", "--run-dir", str(tmp_path / "run"), "--cache-dir", str(cache)]
    arguments += ["--num-train", "64", "--projection-dim", "4", "--no-progress"]
    assert main(arguments) == 0
    first = capsys.readouterr().out
    assert "report.md" in first.splitlines()[-1] and "top_k.npz" in first
    assert main(arguments) == 0
    assert "nothing to do" in capsys.readouterr().out.splitlines()[-1]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "the first 4 of 10 queries" in report


def _stage_help(stage: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main(["attribute", stage, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("stage", ["fit", "build", "apply", "score", "run"])
def test_each_stage_help_lists_its_own_settings_with_defaults(stage, capsys):
    from dataclasses import fields

    from kronlab.attribution.config import AttributionConfig, setting_of

    text = _stage_help(stage, capsys)
    for config_field in fields(AttributionConfig):
        declared = setting_of(config_field)
        flag = declared.flag or "--" + config_field.name.replace("_", "-")
        used = stage == "run" or declared.stages is None or stage in declared.stages
        assert (f" {flag} " in text) == used, (stage, flag)
    assert "(default: " in text


def test_stage_helps_describe_their_stage(capsys):
    texts = {stage: _stage_help(stage, capsys) for stage in ("fit", "build", "apply", "score")}
    assert len(set(texts.values())) == 4
    assert "Fit the K-FAC / EK-FAC curvature" in texts["fit"]
    assert "--method {kfac,ekfac} (default: ekfac)" in texts["fit"]
    assert "--projection-dim" not in texts["fit"] and "--top-k" not in texts["fit"]
    assert "--max-store-gb" in texts["build"] and "(default: 2;" in texts["build"]
    assert "--resume" in texts["build"] and "--resume" not in texts["score"]
    assert "--normalize {none,train,cosine}" in texts["score"] and "--method" not in texts["score"]
    assert "--no-scores-file" in texts["score"] and "--no-scores-file" not in texts["fit"]
    assert "kronlab attribute run --help" in texts["fit"]


def test_stage_parsers_accept_every_setting_before_or_after_the_stage():
    parser = build_parser()
    # A setting another stage uses is accepted (pinned in config.json for later stages).
    parsed = parser.parse_args(["attribute", "fit", "--projection-dim", "8", "--debug"])
    assert (parsed.stage, parsed.projection_dim, parsed.top_k) == ("fit", 8, None)
    parsed = parser.parse_args(["attribute", "--num-train", "5", "--resume", "build"])
    assert (parsed.stage, parsed.num_train, parsed.resume) == ("build", 5, True)
    parsed = parser.parse_args(["attribute", "--run-dir", "somewhere"])
    assert (parsed.stage, str(parsed.run_dir), parsed.max_store_gb) == ("run", "somewhere", 2.0)
    assert (
        parser.parse_args(["attribute", "hessian", "--ev_correction", "false"]).ev_correction
        is False
    )


def test_default_store_is_full_while_small_then_a_whitened_projection(tmp_path, monkeypatch):
    from kronlab.attribution import config as settings
    from kronlab.attribution.compression import projected_side
    from kronlab.attribution.store import GradientStore
    from kronlab.tasks.digits import digits_mlp

    config = settings.AttributionConfig()
    assert (config.projection_dim, config.compression) == (None, "whitened")
    # 1,000 rows of 250,000 float32 values are exactly 1 GB; one more row is over the budget
    assert config.resolved_projection_dim(1000, 250_000) == 0
    assert config.resolved_projection_dim(1001, 250_000) == settings.DEFAULT_PROJECTION_DIM == 64
    assert settings.AttributionConfig(dtype="bfloat16").resolved_projection_dim(2000, 250_000) == 0
    assert settings.AttributionConfig(projection_dim=0).resolved_projection_dim(10**6, 10**6) == 0
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.save(digits_mlp(0).state_dict(), cache / "digits-mlp-seed0.pt")
    # the embedded digits MLP (64 → 128 → 128 → 10, biases as an extra input column)
    shapes = [(128, 65), (128, 129), (10, 129)]
    full_width = sum(d_out * d_in for d_out, d_in in shapes)

    def default_run(name: str) -> GradientStore:
        arguments = ["attribute", "--run-dir", str(tmp_path / name), "--cache-dir", str(cache)]
        arguments += ["--num-train", "32", "--num-queries", "2", "--report-queries", "0"]
        assert main([*arguments, "--no-progress"]) == 0
        return GradientStore.open(tmp_path / name / "train")

    # digits: the full store is small, so it is kept (exact scores)
    store = default_run("small")
    assert store.settings.projection_dim == 0 and store.row_width == full_width
    assert store.settings.extra["compression"] == "whitened"
    # past the budget (here lowered to 1 MB) each side wider than 64 is sketched to 64
    monkeypatch.setattr(settings, "FULL_STORE_BUDGET_GB", 1e-3)
    store = default_run("large")
    assert store.settings.projection_dim == 64
    assert store.row_width == sum(projected_side(o, 64) * projected_side(i, 64) for o, i in shapes)
    report = (tmp_path / "large" / "report.md").read_text()
    assert "compression: whitened, projection_dim: 64" in report
