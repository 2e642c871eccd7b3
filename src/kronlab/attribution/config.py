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
# An unset projection_dim stores full gradients while their store takes at most
# FULL_STORE_BUDGET_GB, else sketches each side to DEFAULT_PROJECTION_DIM (whitened, the default
# compression): on digits the full store is exact and small, on language models it is not
# (BENCHMARKS.md, "Choosing the default projection").
FULL_STORE_BUDGET_GB = 1.0
DEFAULT_PROJECTION_DIM = 64
# How the score stage scales ⟨query row, training row⟩ (see ``AttributionConfig``).
SCORE_NORMALIZATIONS = ("none", "train", "cosine")
DAMPING_AUTO = "auto"


@dataclass(frozen=True)
class Setting:
    """What a setting accepts and how the command line spells it.

    ``low`` (with ``integer`` / ``low_inclusive``) and ``choices`` (any container, e.g. a
    registry) validate the value;
    ``parse`` turns the flag's text into it (default: ``int`` for integers, the default's type
    for numbers, else text); ``flag`` + ``const`` make a switch that stores ``const``;
    ``shown_default`` replaces the default in the help; ``stages`` names the stages whose
    work the setting changes (``None``: every stage), the ones whose ``--help`` lists it;
    ``also`` lists values accepted besides the range (``damping="auto"``).
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
    stages: tuple[str, ...] | None = None
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


# The stages whose work a setting changes: what each stage's ``--help`` lists.
GRADIENT_STAGES = ("fit", "build", "apply")  # the stages that take per-example gradients
STORE_STAGES = ("build", "apply")  # the stages that write gradient rows


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
    ``projection_dim=0`` stores full gradients, ``None`` (the default) full gradients up to
    ``FULL_STORE_BUDGET_GB`` of store and ``DEFAULT_PROJECTION_DIM`` beyond
    (:meth:`resolved_projection_dim`); ``projection_kind`` is one of
    :data:`kronlab.linalg.projection.PROJECTION_KINDS`.
    ``compression``: ``"project"`` (store ``P_S G_t P_Aᵀ``, queries ``P_S (H⁻¹G_q) P_Aᵀ``),
    ``"folded"`` (K-FAC only: ``M = P (F + δI)^{-1/2}`` on both sides, per-factor damping) or
    ``"whitened"`` (store ``M_S G_t M_Aᵀ``, queries ``L_S (H⁻¹G_q) L_Aᵀ`` with
    ``L = P (F + δI)^{1/2}``: exactly the K-FAC / EK-FAC score without projection, and a sketch
    of well-conditioned vectors with it; see :mod:`kronlab.attribution.compression`).
    ``chunk_rows`` is the unit of commit (and of resume); ``batch_size`` the number of examples
    per forward/backward pass. ``bias=False`` leaves the tracked layers' biases out of the
    curvature, the stored gradients and the scores. ``normalize`` scales the scores (score
    stage only): ``"train"`` divides each by the training row's norm, ``"cosine"`` by both
    rows' norms (rows as stored: projected, or whitened with ``compression="whitened"``).
    ``fit_examples`` fits the curvature on the first N training examples only (all by
    default).
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
    queries: str = setting(
        "test", "test (the data's held-out split) or a data spec", stages=("apply", "score")
    )
    num_queries: int = setting(10, low=1, integer=True, stages=("apply", "score"))
    num_train: int | None = setting(
        None,
        "use the first N training examples",
        low=1,
        integer=True,
        shown_default="all",
        stages=("fit", "build", "score"),
    )
    modules: tuple[str, ...] | None = setting(
        None,
        "comma-separated module names or glob patterns",
        parse=_comma_separated,
        shown_default="all trackable modules outside attention (names with attn/attention, "
        "nn.MultiheadAttention), or all if that leaves none",
        stages=GRADIENT_STAGES,
    )
    method: str = setting("ekfac", choices=METHODS, stages=("fit",))
    fisher: str = setting("true", choices=("empirical", "true"), stages=("fit",))
    damping: float | str = setting(
        DEFAULT_DAMPING_FACTOR,
        "factor of the mean eigenvalue; auto: after the fit, the factor of 1e-4, 1e-3, 0.01, "
        "0.1, 1 whose damped Newton direction best lowers the loss of random halves of a "
        "sample of the training data (recorded in fit.json; see BENCHMARKS.md)",
        low=0.0,
        low_inclusive=False,
        parse=factor_or_auto,
        also=(DAMPING_AUTO,),
        stages=GRADIENT_STAGES,
    )
    projection_dim: int | None = setting(
        None,
        "per-module sketch size of each gradient side; 0 stores full gradients",
        low=0,
        integer=True,
        shown_default=f"full gradients while their store takes at most {FULL_STORE_BUDGET_GB:g} "
        f"GB, else {DEFAULT_PROJECTION_DIM}",
        stages=STORE_STAGES,
    )
    projection_kind: str = setting("orthogonal", choices=PROJECTION_KINDS, stages=STORE_STAGES)
    compression: str = setting(
        "whitened",
        "project: P (H⁻¹G_q) vs P G_t; folded (K-FAC only): P (F+δ)^(-1/2) on both; "
        "whitened: P (F+δ)^(1/2) H⁻¹G_q vs P (F+δ)^(-1/2) G_t, best with --projection-dim",
        choices=COMPRESSION_STRATEGIES,  # the live registry: a mode registered later counts
        stages=STORE_STAGES,
    )
    dtype: str = setting(
        "float32", "storage dtype of the store", choices=STORAGE_DTYPES, stages=("build",)
    )
    batch_size: int = setting(64, low=1, integer=True, stages=GRADIENT_STAGES)
    chunk_rows: int = setting(
        256, "rows per committed chunk", low=1, integer=True, stages=STORE_STAGES
    )
    length: int = setting(
        64, "tokens per text sequence", low=2, integer=True, stages=GRADIENT_STAGES
    )
    seed: int = setting(0, stages=GRADIENT_STAGES)
    train_store: str | None = setting(
        None,
        "use the gradient store in this directory",
        shown_default="the run directory's train/",
        stages=("build", "score"),
    )
    normalize: str = setting(
        "none",
        "scale of the scores: none: ⟨q, t⟩, the stored query row · training row; train: "
        "⟨q, t⟩ / ‖t‖, without the pull of training examples with large gradients (e.g. long "
        "texts); cosine: ⟨q, t⟩ / (‖q‖ ‖t‖), in [-1, 1] and comparable across queries",
        choices=SCORE_NORMALIZATIONS,
        stages=("score",),
    )
    top_k: int = setting(5, low=1, integer=True, stages=("score",))
    report_queries: int = setting(4, low=0, integer=True, stages=("score",))
    bias: bool = setting(
        True,
        "leave the tracked layers' biases out of the curvature, the store and the scores",
        choices=(True, False),
        flag="--no-bias",
        const=False,
        shown_default="biases included",
        stages=GRADIENT_STAGES,
    )
    # Last, so that config.json files written before it read as "all examples".
    fit_examples: int | None = setting(
        None,
        "fit the curvature on the first N training examples (build and score still use all): "
        "a subsample's factors at a fraction of a large set's fitting time",
        low=1,
        integer=True,
        shown_default="all",
        stages=("fit",),
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

    def resolved_projection_dim(self, rows: int, full_row_width: int) -> int:
        """``projection_dim``, or when unset: 0 (full gradients) while ``rows`` full rows of
        ``full_row_width`` values take at most ``FULL_STORE_BUDGET_GB``, else
        ``DEFAULT_PROJECTION_DIM``."""
        if self.projection_dim is not None:
            return self.projection_dim
        nbytes = rows * full_row_width * (4 if self.dtype == "float32" else 2)
        return 0 if nbytes <= FULL_STORE_BUDGET_GB * 1e9 else DEFAULT_PROJECTION_DIM

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


# Settings only the score stage reads: an existing run directory may be scored again with others.
SCORE_ONLY_SETTINGS = frozenset(
    config_field.name
    for config_field in fields(AttributionConfig)
    if setting_of(config_field).stages == ("score",)
)
