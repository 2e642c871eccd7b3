"""The settings of an attribution run, each declared once: default, help, choices and range.

``AttributionConfig`` is saved as a run directory's ``config.json``; its validation and the
``kronlab attribute`` settings flags are both generated from each field's :class:`Setting`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kronlab.attribution.compression import COMPRESSION_STRATEGIES, compression_strategy
from kronlab.attribution.curvature import DEFAULT_DAMPING_FACTOR
from kronlab.attribution.store import STORAGE_DTYPES
from kronlab.linalg.projection import PROJECTION_KINDS
from kronlab.optim.validation import check_choice, check_range

METHODS = ("kfac", "ekfac")
DAMPING_AUTO = "auto"


@dataclass(frozen=True)
class Setting:
    """What a setting accepts and how the command line spells it.

    ``low`` (with ``integer`` / ``low_inclusive``) and ``choices`` (any container, e.g. a
    registry) validate the value;
    ``parse`` turns the flag's text into it (default: ``int`` for integers, the default's type
    for numbers, else text); ``flag`` + ``const`` make a switch that stores ``const``;
    ``shown_default`` replaces the default in the help; ``also`` lists values accepted besides
    the range (``damping="auto"``).
    """

    help: str = ""
    choices: Collection[Any] | None = None
    low: float | None = None
    integer: bool = False
    low_inclusive: bool = True
    parse: Callable[[str], Any] | None = None
    flag: str | None = None
    const: Any = None
    shown_default: str | None = None
    also: tuple[Any, ...] = ()

    def check(self, name: str, value: Any) -> None:
        """``ValueError`` naming ``name``, ``value`` and the allowed range or choices."""
        if isinstance(value, str) and value in self.also:
            return
        if self.choices is not None:
            check_choice(name, value, self.choices)
        if self.low is not None or self.integer:
            try:
                check_range(
                    name, value, self.low, integer=self.integer, low_inclusive=self.low_inclusive
                )
            except ValueError as error:
                if not self.also:
                    raise
                extra = ", ".join(map(repr, self.also))
                raise ValueError(f"{error}, or {extra}") from None


def setting(default: Any, help: str = "", **options: Any) -> Any:  # noqa: A002 (argparse's name)
    """A config field with its :class:`Setting` as metadata."""
    return field(default=default, metadata={"setting": Setting(help=help, **options)})


def setting_of(config_field: Any) -> Setting:
    """The :class:`Setting` declared for a field of :class:`AttributionConfig`."""
    return config_field.metadata["setting"]


def _comma_separated(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(","))


def factor_or_auto(value: str) -> float | str:
    """``--damping``: a number, or ``auto``."""
    return DAMPING_AUTO if value.strip().lower() == DAMPING_AUTO else float(value)


@dataclass(frozen=True)
class AttributionConfig:
    """Everything that determines a run's results (saved as ``config.json``).

    ``damping`` is a factor of the mean curvature eigenvalue, or ``"auto"`` (chosen by
    :func:`kronlab.attribution.damping_selection.select_damping_factor` after the fit).
    ``projection_dim=0`` stores full gradients; ``projection_kind`` is one of
    :data:`kronlab.linalg.projection.PROJECTION_KINDS`.
    ``compression``: ``"project"`` (store ``P_S G_t P_Aᵀ``, queries ``P_S (H⁻¹G_q) P_Aᵀ``),
    ``"folded"`` (K-FAC only: ``M = P (F + δI)^{-1/2}`` on both sides, per-factor damping) or
    ``"whitened"`` (store ``M_S G_t M_Aᵀ``, queries ``L_S (H⁻¹G_q) L_Aᵀ`` with
    ``L = P (F + δI)^{1/2}``: exactly the K-FAC / EK-FAC score without projection, and a sketch
    of well-conditioned vectors with it; see :mod:`kronlab.attribution.compression`).
    ``chunk_rows`` is the unit of commit (and of resume); ``batch_size`` the number of examples
    per forward/backward pass. ``bias=False`` leaves the tracked layers' biases out of the
    curvature, the stored gradients and the scores.
    """

    model: str = setting(
        "digits-mlp", "digits-mlp | tiny-gpt | package.module:function | HF model directory"
    )
    data: str = setting(
        "digits",
        "digits | stdlib-text | file.jsonl | HF dataset directory; a JSONL file (or dataset) "
        'holds one record per line, all of one form: {"text": "..."} (tokenized with the model '
        'directory\'s tokenizer, else as bytes) or {"input": [numbers], "label": class index}',
    )
    queries: str = setting("test", "test (the data's held-out split) or a data spec")
    num_queries: int = setting(10, low=1, integer=True)
    num_train: int | None = setting(None, "use the first N training examples", low=1, integer=True)
    modules: tuple[str, ...] | None = setting(
        None,
        "comma-separated module names or glob patterns",
        parse=_comma_separated,
        shown_default="all trackable modules",
    )
    method: str = setting("ekfac", choices=METHODS)
    fisher: str = setting("true", choices=("empirical", "true"))
    damping: float | str = setting(
        DEFAULT_DAMPING_FACTOR,
        "factor of the mean eigenvalue; auto: after the fit, the factor of 1e-4, 1e-3, 0.01, "
        "0.1, 1 whose damped Newton direction best lowers the loss of random halves of a "
        "sample of the training data (recorded in fit.json; see BENCHMARKS.md)",
        low=0.0,
        low_inclusive=False,
        parse=factor_or_auto,
        also=(DAMPING_AUTO,),
    )
    projection_dim: int = setting(0, "0 stores full gradients", low=0, integer=True)
    projection_kind: str = setting("orthogonal", choices=PROJECTION_KINDS)
    compression: str = setting(
        "project",
        "project: P (H⁻¹G_q) vs P G_t; folded (K-FAC only): P (F+δ)^(-1/2) on both; "
        "whitened: P (F+δ)^(1/2) H⁻¹G_q vs P (F+δ)^(-1/2) G_t, best with --projection-dim",
        choices=COMPRESSION_STRATEGIES,  # the live registry: a mode registered later counts
    )
    dtype: str = setting("float32", "storage dtype of the store", choices=STORAGE_DTYPES)
    batch_size: int = setting(64, low=1, integer=True)
    chunk_rows: int = setting(256, "rows per committed chunk", low=1, integer=True)
    length: int = setting(64, "tokens per text sequence", low=2, integer=True)
    seed: int = setting(0)
    train_store: str | None = setting(None, "use the gradient store in this directory")
    top_k: int = setting(5, low=1, integer=True)
    report_queries: int = setting(4, low=0, integer=True)
    bias: bool = setting(
        True,
        "leave the tracked layers' biases out of the curvature, the store and the scores",
        choices=(True, False),
        flag="--no-bias",
        const=False,
        shown_default="biases included",
    )

    def __post_init__(self) -> None:
        for config_field in fields(self):
            value = getattr(self, config_field.name)
            if value is None and config_field.default is None:
                continue  # an optional setting left unset
            setting_of(config_field).check(config_field.name, value)
        compression_strategy(self.compression).check_method(self.method)
        if self.modules is not None and not isinstance(self.modules, tuple):
            object.__setattr__(self, "modules", tuple(self.modules))

    def to_json(self) -> dict:
        data = asdict(self)
        data["modules"] = None if self.modules is None else list(self.modules)
        return data

    @classmethod
    def from_json(cls, data: dict) -> AttributionConfig:
        known = {config_field.name for config_field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config.json has unknown settings {unknown}")
        if data.get("modules") is not None:
            data = {**data, "modules": tuple(data["modules"])}
        return cls(**data)
