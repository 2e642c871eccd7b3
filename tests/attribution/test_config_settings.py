"""Each attribution setting is declared once: validation and command-line flags follow it."""

from __future__ import annotations

from dataclasses import fields

import pytest

from kronlab.attribution.config import AttributionConfig, setting_of
from kronlab.cli import build_parser


def _attribute_parser():
    subparsers = build_parser()._subparsers._group_actions[0]  # noqa: SLF001 (argparse's own)
    return subparsers.choices["attribute"]


def test_every_setting_has_a_flag_with_its_choices():
    actions = {
        flag: action
        for action in _attribute_parser()._actions  # noqa: SLF001
        for flag in action.option_strings
    }
    for config_field in fields(AttributionConfig):
        declared = setting_of(config_field)
        flag = declared.flag or "--" + config_field.name.replace("_", "-")
        action = actions[flag]
        assert action.dest == config_field.name
        assert action.default is None  # config.json or the dataclass fills unset settings
        if declared.const is None:
            assert action.choices == declared.choices, config_field.name


def test_flags_parse_into_the_declared_types():
    arguments = ["attribute", "--num-queries", "3", "--damping", "0.2", "--modules", "0, 2"]
    arguments += ["--compression", "whitened", "--no-bias", "--num-train", "50"]
    parsed = build_parser().parse_args(arguments)
    settings = {f.name: getattr(parsed, f.name) for f in fields(AttributionConfig)}
    config = AttributionConfig(**{k: v for k, v in settings.items() if v is not None})
    assert (config.num_queries, config.damping, config.num_train) == (3, 0.2, 50)
    assert config.modules == ("0", "2") and config.bias is False
    assert config.compression == "whitened" and config.method == "ekfac"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_queries": 0}, r"Invalid num_queries: 0 \(allowed: an integer, 1 <= num_queries\)"),
        ({"num_train": 0}, r"Invalid num_train: 0"),
        ({"damping": 0.0}, r"Invalid damping: 0.0 \(allowed: a finite number, 0.0 < damping\)"),
        ({"compression": "zip"}, r"Invalid compression: 'zip' \(allowed: 'project', 'folded'"),
        ({"length": 1}, r"Invalid length: 1"),
    ],
)
def test_declared_ranges_and_choices_validate(settings, message):
    with pytest.raises(ValueError, match=message):
        AttributionConfig(**settings)
