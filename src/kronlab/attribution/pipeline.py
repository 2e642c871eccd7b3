"""The attribution pipeline: build → fit → apply → score, each stage's output in a run directory.

- **build**: per-example gradients of the training set, projected per module
  (``P_S G_t P_Aᵀ``), written chunk by chunk to a :class:`GradientStore` (resumable).
- **fit**: K-FAC / EK-FAC curvature of the model on the training set (Grosse et al. 2023,
  "Studying Large Language Model Generalization with Influence Functions").
- **apply**: query gradients ``G_q`` at full size, inverse curvature first, projection last:
  ``P_S (H⁻¹ G_q) P_Aᵀ``; or, with ``compression="folded"`` (K-FAC only), ``M_S G_q M_Aᵀ`` with
  ``M = P (F + δI)^{-1/2}`` on both the store and the queries; or, with
  ``compression="whitened"`` (K-FAC or EK-FAC), the store holds ``M_S G_t M_Aᵀ`` and the queries
  ``L_S (H⁻¹ G_q) L_Aᵀ`` with ``L = P (F + δI)^{+1/2}`` (folded and whitened: fit runs first).
- **score**: ``scores[q, t] = ⟨query_q, train_t⟩`` into a memory-mapped ``scores.npy``
  (``n_query × n_train``; optional), each query's top-k proponents and opponents, streamed, into
  ``top_k.npz``, then ``report.md`` and ``top_examples.png``. ``normalize="train"`` divides
  each score by ``‖train_t‖``, ``"cosine"`` by ``‖query_q‖ ‖train_t‖`` (norms of the stored rows).

``config.json`` pins the settings of a run directory; ``run`` performs the stages not yet
complete. Every stage splits its chunks across ``torch.distributed`` ranks (see
:mod:`kronlab.attribution.distributed`).

Every stage records what it consumed (the model's and the data's fingerprints, the settings
that change its numbers, the digests of the files it read) and every later stage checks that
record against the model, data, settings and files it sees now: a curvature fitted on another
model, queries preconditioned with another damping, or a damaged file is a clear error that
names what differs and the command that fixes it, never a wrong score. ``report.md`` states
the settings read from those records.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from kronlab.attribution.compression import (
    CompressionStrategy,
    compression_strategy,
    module_projections,
    project_blocks,
    projected_side,
)
from kronlab.attribution.config import DAMPING_AUTO, SCORE_ONLY_SETTINGS, AttributionConfig
from kronlab.attribution.curvature import Curvature
from kronlab.attribution.curvature_access import fit as fit_distributed
from kronlab.attribution.damping_selection import probe_batches, select_damping_factor
from kronlab.attribution.distributed import Workers
from kronlab.attribution.fused import fused_activations
from kronlab.attribution.integrity import (
    IntegrityError,
    check_file_digest,
    file_digest,
    naming,
    read_json,
    write_json,
    write_text,
)
from kronlab.attribution.ranking import RankedScores, StreamedTopK, unit_rows
from kronlab.attribution.sources import AttributionTask, ExampleSet, load_task, model_fingerprint
from kronlab.attribution.store import (
    GradientStore,
    ModuleBlock,
    StoreMismatchError,
    StoreSettings,
    check_settings,
    flatten_blocks,
)
from kronlab.curvature import (
    bias_in_curvature,
    find_modules,
    find_modules_outside_attention,
    layer_spec,
    per_example_gradients,
)
from kronlab.linalg.finite import all_finite
from kronlab.optim.validation import check_choice, check_range

STAGES = ("build", "fit", "apply", "score")
T = TypeVar("T")
CONFIG_FILE = "config.json"
# Refuse a gradient store above this many GB unless asked: full per-example gradients of even a
# small model take gigabytes for a few thousand examples.
DEFAULT_MAX_STORE_GB = 2.0
FIT_FILE = "fit.json"
SCORE_FILE = "score.json"


# File systems without fallocate support: fall back to checking the free space.
_FALLOCATE_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class StageMismatchError(ValueError):
    """A stage's input was produced from another model, data or setting than this run's."""


def _with_bias_setting(stage: Callable[..., T]) -> Callable[..., T]:
    """Run a stage with the configured bias setting (``bias_in_curvature``)."""

    @functools.wraps(stage)
    def run_stage(self: AttributionRun, *args: Any, **kwargs: Any) -> T:
        with bias_in_curvature(self.config.bias):
            return stage(self, *args, **kwargs)

    return run_stage


def prepare_run_dir(
    run_dir: Path, config: AttributionConfig, workers: Workers, durable: bool = False
) -> tuple[str, ...]:
    """Write ``config.json``, or check that the one there matches ``config``; returns the
    settings that changed.

    Only settings of the score stage alone (``normalize``, ``top_k``, ``report_queries``) may
    change in an existing run directory: ``config.json`` takes their new values and the scores
    are computed again. Every rank checks after the barrier, so a mismatch raises on all of them
    (none hangs).
    """
    path = Path(run_dir) / CONFIG_FILE
    if workers.is_main and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # No digest: config.json is the user's to edit (the stages' records catch edits).
        write_text(path, json.dumps(config.to_json(), indent=2, sort_keys=True), durable=durable)
    workers.barrier()
    stored = read_config(path)
    changed = [name for name, value in asdict(stored).items() if getattr(config, name) != value]
    pinned = [name for name in changed if name not in SCORE_ONLY_SETTINGS]
    if pinned:
        raise ValueError(
            f"run directory {run_dir} was created with other settings:\n"
            + "\n".join(
                f"  {name}: {getattr(stored, name)!r} in {path}, {getattr(config, name)!r} now"
                for name in pinned
            )
            + "\nuse a new --run-dir for new settings"
        )
    if changed:
        workers.barrier()  # every rank has read the old file before rank 0 replaces it
        if workers.is_main:
            write_text(
                path, json.dumps(config.to_json(), indent=2, sort_keys=True), durable=durable
            )
        workers.barrier()
    return tuple(changed)


def read_config(path: Path) -> AttributionConfig:
    """``config.json`` (the user may edit it: later stages check their inputs against it)."""
    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(
            f"{path} is not UTF-8 text; fix it, or delete it to start the run directory afresh"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno} column "
            f"{error.colno}); fix it, or delete it to start the run directory afresh"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of settings")
    try:
        return AttributionConfig.from_json(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def _differences(recorded: dict, expected: dict) -> list[str]:
    return [
        f"  {name}: {recorded.get(name)!r} then, {value!r} now"
        for name, value in expected.items()
        if recorded.get(name) != value
    ]


class AttributionRun:
    """One run directory: ``AttributionRun(dir, config).run()`` or stage by stage.

    ``fused_activations=True`` (opt-in, not pinned in ``config.json``: an execution choice like
    the device) runs the model's known unfused activations (Hugging Face ``gelu_new`` and the
    other GELUs listed in :mod:`kronlab.attribution.fused`) through torch's fused kernels of the
    same function during build, fit and apply: the same model function, different rounding, a
    faster pass on CPU. The model is restored after each stage.

    ``durable=True`` (not pinned either) fsyncs every chunk commit and every file a stage
    writes, and the directories holding them: what a stage has committed then survives a power
    cut, not only a killed process (see :mod:`kronlab.attribution.integrity`).
    ``max_store_gb`` (not pinned) refuses, before anything is written, a gradient store larger
    than that many GB (10⁹ bytes): full per-example gradients of a model are often far larger
    than expected, and ``--projection-dim`` bounds them; ``None`` sets no limit.
    ``dense_scores=False`` (also
    not pinned: it changes what is written, not any score) skips ``scores.npy``: the score stage
    then keeps only the streamed top-k (``top_k.npz``), in ``O(n_query · top_k)`` memory.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: AttributionConfig | None = None,
        *,
        workers: Workers | None = None,
        show_progress: bool = True,
        cache_dir: Path | None = None,
        task: AttributionTask | None = None,
        fused_activations: bool = False,
        durable: bool = False,
        dense_scores: bool = True,
        max_store_gb: float | None = DEFAULT_MAX_STORE_GB,
    ) -> None:
        if max_store_gb is not None:
            check_range("max_store_gb", max_store_gb, 0.0, low_inclusive=False)
        self.max_store_gb = max_store_gb
        self.run_dir = Path(run_dir)
        self.dense_scores = bool(dense_scores)
        self.fused_activations = bool(fused_activations)
        self.durable = bool(durable)
        self.config = config or AttributionConfig()
        self.workers = workers or Workers()
        self.show_progress = show_progress
        self.cache_dir = cache_dir
        self._task = task
        self._task_placed = False
        self._tracked_modules: dict[str, torch.nn.Module] | None = None
        self._fit_subset: ExampleSet | None = None
        # Score-stage settings changed since the last score: ``run`` scores again.
        self._rescore = bool(prepare_run_dir(self.run_dir, self.config, self.workers, self.durable))

    # ---- paths and lazily loaded inputs ---------------------------------------------------

    @property
    def train_store_dir(self) -> Path:
        return Path(self.config.train_store) if self.config.train_store else self.run_dir / "train"

    @property
    def query_store_dir(self) -> Path:
        return self.run_dir / "queries"

    @property
    def curvature_path(self) -> Path:
        return self.run_dir / "curvature.safetensors"

    @property
    def scores_path(self) -> Path:
        return self.run_dir / "scores.npy"

    @property
    def top_k_path(self) -> Path:
        return self.run_dir / "top_k.npz"

    @property
    def task(self) -> AttributionTask:
        if self._task is None:
            config = self.config
            try:
                self._task = load_task(
                    config.model,
                    config.data,
                    config.queries,
                    num_train=config.num_train,
                    num_queries=config.num_queries,
                    length=config.length,
                    seed=config.seed,
                    cache_dir=self.cache_dir,
                )
            except ValueError as error:
                # The settings may come from an edited config.json rather than the command line.
                raise ValueError(f"{error} (settings of {self.run_dir / CONFIG_FILE})") from None
            self._task.model.to(self.workers.device)
        elif not self._task_placed:
            self._task.model.to(self.workers.device)
        self._task_placed = True
        return self._task

    def _model_execution(self) -> AbstractContextManager:
        """Where the model runs (build, fit, apply): with the opt-in fused activations."""
        return fused_activations(self.task.model) if self.fused_activations else nullcontext()

    def _modules(self) -> dict[str, torch.nn.Module]:
        # Resolved once: a glob walk over the model per batch is a measurable share of a build.
        if self._tracked_modules is None:
            if self.config.modules is None:
                self._tracked_modules = find_modules_outside_attention(self.task.model)
            else:
                self._tracked_modules = find_modules(self.task.model, list(self.config.modules))
        return self._tracked_modules

    def _gradient_shapes(self) -> dict[str, tuple[int, int]]:
        shapes = {}
        for name, module in self._modules().items():
            spec = layer_spec(module)
            assert spec is not None
            shapes[name] = (spec.d_out, spec.d_in)
        return shapes

    def _projections(self) -> dict:
        return module_projections(
            self._gradient_shapes(),
            self.projection_dim,
            self.config.projection_kind,
            device=self.workers.device,
        )

    @property
    def projection_dim(self) -> int:
        """The configured ``projection_dim``; unset, it follows the size of the full store of
        the training set (:meth:`AttributionConfig.resolved_projection_dim`), for the training
        store and the queries alike."""
        full_width = sum(d_out * d_in for d_out, d_in in self._gradient_shapes().values())
        return self.config.resolved_projection_dim(len(self.task.train), full_width)

    def store_settings(
        self, data: ExampleSet, dtype: str, transform: str, extra: dict | None = None
    ) -> StoreSettings:
        p = self.projection_dim
        blocks = tuple(
            ModuleBlock(name, (projected_side(d_out, p), projected_side(d_in, p)))
            for name, (d_out, d_in) in self._gradient_shapes().items()
        )
        return StoreSettings(
            modules=blocks,
            projection_dim=p,
            projection_kind=self.config.projection_kind,
            dtype=dtype,
            transform=transform,
            model_fingerprint=self._model_fingerprint(),
            data_fingerprint=self._data_fingerprint(data),
            extra=extra or {},
        )

    def _model_fingerprint(self) -> str:
        # The model and the data do not change during a run: hash each once (every stage
        # compares them with what the stages before it recorded).
        if getattr(self, "_cached_model_fingerprint", None) is None:
            self._cached_model_fingerprint = model_fingerprint(self.task.model)
        return self._cached_model_fingerprint

    def _data_fingerprint(self, data: ExampleSet) -> str:
        cache = self.__dict__.setdefault("_cached_data_fingerprints", {})
        if id(data) not in cache:
            cache[id(data)] = data.fingerprint()
        return cache[id(data)]

    @property
    def compression(self) -> CompressionStrategy:
        """The configured compression mode (its maps, and whether build needs fit)."""
        return compression_strategy(self.config.compression)

    def train_settings(self) -> StoreSettings:
        compression = self.compression
        extra: dict[str, Any] = {"compression": compression.name}
        fingerprint = None
        damping = self.config.damping
        if compression.store_needs_curvature:
            damping = extra["damping"] = self.damping_factor
            fingerprint = self._curvature_fingerprint()
        transform = compression.store_transform(fingerprint, damping)
        return self.store_settings(self.task.train, self.config.dtype, transform, extra)

    # ---- stage status -----------------------------------------------------------------------

    def stage_order(self) -> tuple[str, ...]:
        """Folded and whitened stores need the curvature before they can be built."""
        if self.compression.store_needs_curvature:
            return ("fit", "build", "apply", "score")
        return STAGES

    def _store_dir(self, stage: str) -> Path:
        return self.train_store_dir if stage == "build" else self.query_store_dir

    def is_complete(self, stage: str) -> bool:
        check_choice("stage", stage, STAGES)
        if stage == "fit":
            return (self.run_dir / FIT_FILE).exists()
        if stage == "score":
            return (self.run_dir / SCORE_FILE).exists()
        if not (self._store_dir(stage) / "store.json").exists():
            return False
        return GradientStore.open(self._store_dir(stage)).is_complete

    def _is_partial(self, stage: str) -> bool:
        """A build or apply that was interrupted: its store exists, some chunks are missing."""
        return stage in ("build", "apply") and (
            (self._store_dir(stage) / "store.json").exists() and not self.is_complete(stage)
        )

    def command(self, stage: str, resume: bool = False) -> str:
        """The command line that performs ``stage`` in this run directory."""
        return f"kronlab attribute {stage}{' --resume' if resume else ''} --run-dir {self.run_dir}"

    def _require(self, stage: str, needed_by: str) -> None:
        if self.is_complete(stage):
            return
        first = self._first_missing(stage)
        resume = any(map(self._is_partial, STAGES))
        raise ValueError(
            f"stage {needed_by!r} needs stage {stage!r} to be complete in {self.run_dir}; "
            f"run `{self.command(first, self._is_partial(first))}` first (or "
            f"`{self.command('run', resume)}` for every missing stage)"
        )

    def _first_missing(self, stage: str) -> str:
        """The stage to run first so that ``stage`` can run (apply needs fit, score needs
        build and apply; folded and whitened builds need fit)."""
        prerequisites = {
            "fit": (),
            "build": ("fit",) if self.compression.store_needs_curvature else (),
            "apply": ("fit",),
            "score": ("build", "apply"),
        }[stage]
        for prerequisite in prerequisites:
            if not self.is_complete(prerequisite):
                return self._first_missing(prerequisite)
        return stage

    def _stale(self, what: str, differences: list[str], paths: list[Path]) -> None:
        if differences:
            raise StageMismatchError(
                f"{what} was computed from other inputs than this run uses:\n"
                + "\n".join(differences)
                + f"\n{self._redo_hint(differences, paths)}"
            )

    def _redo_hint(self, differences: Sequence[str], paths: Sequence[Path]) -> str:
        """How to fix a stale result: after another model or data every stage must run
        again (a new run directory); after a setting, only the stale files."""
        redo = f"delete {', '.join(map(str, paths))} and run `{self.command('run')}`"
        if any("_fingerprint" in line and "curvature" not in line for line in differences):
            return (
                "the model or the data changed since: start a new --run-dir (every stage "
                f"depends on them), or {redo}"
            )
        return f"{redo} (or use a new --run-dir)"

    def check_complete(self, stage: str) -> None:
        """Raise unless what ``stage`` recorded still matches this run's model, data, settings
        and files (``run`` checks each stage it skips)."""
        if stage == "fit":
            self._fit_record()
        elif stage in ("build", "apply"):
            self._open_store(stage)
        else:
            self._score_record()

    @_with_bias_setting
    def run(self, resume: bool = False) -> np.ndarray | RankedScores:
        """All stages in order, skipping those already complete (after checking that they
        still match); returns the scores (the top-k with ``dense_scores=False``)."""
        order = self.stage_order()
        complete = {stage: self.is_complete(stage) for stage in order}
        complete["score"] = complete["score"] and not self._rescore
        # Check every complete stage before any work, so that a stale one is found first; the
        # scores only count when every stage before them is complete.
        for stage in order:
            if complete[stage] and (stage != "score" or all(complete.values())):
                self.check_complete(stage)
        ran = False
        for stage in order:
            # Scores computed before a stage ran again are stale: score once more.
            if complete[stage] and not (stage == "score" and ran):
                self._log(f"{stage}: already complete, skipped")
                continue
            getattr(self, stage)(**({"resume": resume} if stage in ("build", "apply") else {}))
            ran = True
        return self.scores() if self.dense_scores else self.top_k()

    def _log(self, message: str) -> None:
        if self.show_progress and self.workers.is_main:
            print(f"[kronlab attribute] {message}", flush=True)

    def _progress(self, total: int, description: str) -> tqdm:
        return tqdm(
            total=total,
            desc=description,
            unit="ex",
            unit_scale=True,
            disable=not (self.show_progress and self.workers.is_main),
            dynamic_ncols=True,
        )

    # ---- build ------------------------------------------------------------------------------

    @_with_bias_setting
    def build(self, resume: bool = False) -> GradientStore:
        """Write every training example's (projected) gradient row; ``resume`` continues a
        store that an interrupted build left incomplete."""
        compression = self.compression
        curvature = None
        if compression.store_needs_curvature:
            self._require("fit", "build")
            curvature = self._curvature()
        damping = self.damping_factor if curvature is not None else self.config.damping
        maps = compression.store_maps(self._projections(), curvature, damping)
        store = self._open_for_writing("build", self.train_settings(), len(self.task.train), resume)
        # The disk a build takes is fixed by the projection: say it before the first row.
        chosen = ""
        if self.config.projection_dim is None and self.projection_dim:
            chosen = f" (projection_dim {self.projection_dim}: full gradients would take more "
            chosen += "than the default's budget; --projection-dim 0 stores them)"
        self._log(
            f"build: {store.num_rows} rows × {store.row_width} {store.settings.dtype} values = "
            f"{store.nbytes / 2**20:,.1f} MiB in {self.train_store_dir}{chosen}"
        )
        self._write_rows(store, self.task.train, maps, "build", inverse=False)
        return store

    def _open_store(self, stage: str, settings: StoreSettings | None = None) -> GradientStore:
        """The store ``stage`` wrote, checked against the settings this run would write now."""
        directory = self._store_dir(stage)
        if settings is None:
            settings = self.train_settings() if stage == "build" else self.query_settings()
        store = GradientStore.open(directory)
        differences = [name for name, _, _ in store.settings.mismatches(settings)]
        check_settings(
            store.settings, settings, str(directory), hint=self._redo_hint(differences, [directory])
        )
        store.durable = self.durable
        store.repair_command = f"`{self.command(stage, resume=True)}`"
        return store

    def _open_for_writing(
        self, stage: str, settings: StoreSettings, rows: int, resume: bool
    ) -> GradientStore:
        directory = self._store_dir(stage)
        # All ranks look before rank 0 creates anything, so all of them agree (and all raise).
        exists = (directory / "store.json").exists()
        self.workers.barrier()
        if exists:
            existing = GradientStore.open(directory)
            if not resume:
                state = "complete" if existing.is_complete else "partial"
                raise FileExistsError(
                    f"{directory} already holds a {state} gradient store; pass --resume to "
                    f"continue it (`{self.command(stage, resume=True)}`), or use a new --run-dir"
                )
        else:
            self._check_store_size(stage, settings, rows)
        if not exists and self.workers.is_main:
            GradientStore.create(
                directory, settings, rows, self.config.chunk_rows, durable=self.durable
            )
        self.workers.barrier()
        store = self._open_store(stage, settings)
        if store.num_rows != rows or store.chunk_rows != self.config.chunk_rows:
            raise StoreMismatchError(
                f"gradient store {directory} has {store.num_rows} rows in chunks of "
                f"{store.chunk_rows}; this run needs {rows} rows in chunks of "
                f"{self.config.chunk_rows}: delete it and run `{self.command(stage)}`"
            )
        if exists and self.workers.is_main:
            # A resume re-verifies what was committed before (a power cut without --durable
            # can leave a commit record whose data never reached the disk).
            damaged = store.damaged_chunks()
            if damaged:
                self._log(f"{stage}: {len(damaged)} chunks fail their checksum, rewriting them")
                store.uncommit(damaged)
        self.workers.barrier()
        return store

    def _check_store_size(self, stage: str, settings: StoreSettings, rows: int) -> None:
        """Refuse a store above ``max_store_gb`` before anything is written (every rank, so
        that all raise)."""
        size = rows * settings.row_width * torch.finfo(getattr(torch, settings.dtype)).bits // 8
        if self.max_store_gb is None or size <= self.max_store_gb * 1e9:
            return
        raise ValueError(
            f"the {stage} stage would write a gradient store of {size / 1e9:,.1f} GB "
            f"({rows} rows × {settings.row_width} {settings.dtype} values) in "
            f"{self._store_dir(stage)}, above --max-store-gb {self.max_store_gb:g}; store "
            "projected gradients (--projection-dim P, e.g. 64, with --compression whitened) or "
            "raise --max-store-gb"
        )

    def _write_rows(
        self,
        store: GradientStore,
        examples: ExampleSet,
        projections: dict,
        description: str,
        inverse: bool,
    ) -> None:
        pending = store.pending_chunks(self.workers.rank, self.workers.world_size)
        done_rows = store.num_rows - sum(
            stop - start for start, stop in map(store.chunk_range, store.pending_chunks(0, 1))
        )
        progress = self._progress(store.num_rows, description)
        progress.update(done_rows)
        with self._model_execution():
            for chunk in pending:
                start, stop = store.chunk_range(chunk)
                rows = [
                    self._gradient_rows(examples, low, high, projections, store.settings, inverse)
                    for low, high in _batches(start, stop, self.config.batch_size)
                ]
                store.write_chunk(chunk, torch.cat(rows))
                _advance(progress, (stop - start) * self.workers.world_size)
        progress.close()
        self.workers.barrier()

    def _gradient_rows(
        self,
        examples: ExampleSet,
        start: int,
        stop: int,
        projections: dict,
        settings: StoreSettings,
        inverse: bool,
    ) -> torch.Tensor:
        device = self.workers.device
        batch = tuple(t.to(device) for t in examples.batch(start, stop))
        mask = examples.token_mask(batch)
        task = self.task
        if not inverse:
            blocks = per_example_gradients(
                task.model, batch, task.loss_fn, self._modules(), projections, mask=mask
            )
        else:
            full = per_example_gradients(
                task.model, batch, task.loss_fn, self._modules(), mask=mask
            )
            curvature = self._curvature()
            inverse_blocks = curvature.inverse_hvp(full, damping_factor=self.damping_factor)
            blocks = project_blocks(inverse_blocks, projections)
        return flatten_blocks(blocks, settings).float().cpu()

    # ---- fit --------------------------------------------------------------------------------

    @_with_bias_setting
    def fit(self) -> None:
        """Fit the K-FAC / EK-FAC curvature on the training examples and save it."""
        task = self.task
        examples = self._fit_examples()
        passes = 2 if self.config.method == "ekfac" else 1  # EK-FAC's eigenvalue correction
        progress = self._progress(passes * len(examples), f"fit ({self.config.method})")
        batches = TrainingBatches(examples, self.config.batch_size, self.workers.device, progress)
        with self._model_execution():
            curvature = fit_distributed(
                task.model,
                batches,
                task.loss_fn,
                self._modules(),
                method=self.config.method,
                fisher=self.config.fisher,
                mask_fn=examples.token_mask,
                workers=self.workers,
                seed=self.config.seed,
            )
        progress.close()
        if self.workers.is_main:
            record: dict[str, Any] = {"inputs": self._fit_inputs()}
            if self.config.damping == DAMPING_AUTO:
                record["damping_selection"] = self._select_damping(curvature)
            temporary = self.curvature_path.with_name(self.curvature_path.name + ".tmp")
            with naming(temporary):
                curvature.save(temporary)
                if self.durable:
                    with open(temporary, "rb+") as handle:
                        os.fsync(handle.fileno())
            os.replace(temporary, self.curvature_path)
            record["curvature_fingerprint"] = file_digest(self.curvature_path)
            write_json(self.run_dir / FIT_FILE, record, durable=self.durable)
        self.workers.barrier()
        self._cached_curvature = None
        self._verified_fit = None

    def _fit_examples(self) -> ExampleSet:
        """The training examples the curvature is fitted on: the first ``fit_examples`` (kept,
        so that its fingerprint is computed once)."""
        if self._fit_subset is None:
            self._fit_subset = self.task.train.subset(self.config.fit_examples)
        return self._fit_subset

    def _fit_inputs(self) -> dict:
        """Everything the fitted curvature (and, with ``damping="auto"``, the chosen damping
        factor) depends on (the fingerprint is that of the examples it was fitted on, so a
        changed ``fit_examples`` makes the curvature stale)."""
        inputs = {
            "model_fingerprint": self._model_fingerprint(),
            "train_data_fingerprint": self._data_fingerprint(self._fit_examples()),
            "modules": list(self._modules()),
            "method": self.config.method,
            "fisher": self.config.fisher,
            "seed": self.config.seed,
            "batch_size": self.config.batch_size,
        }
        if self.config.damping == DAMPING_AUTO:
            inputs["damping"] = DAMPING_AUTO  # a fixed factor does not need the selection
        return inputs

    def _select_damping(self, curvature: Curvature) -> dict:
        """``damping="auto"``: the factor :func:`select_damping_factor` picks on a seeded
        sample of the training examples, with its evidence (recorded in ``fit.json``)."""
        task, started = self.task, time.perf_counter()
        probe = probe_batches(task.train, self.config.seed, self.workers.device)
        self._log(f"fit: choosing the damping factor on {len(probe)} batches of training data")
        with self._model_execution():
            selection = select_damping_factor(
                curvature, task.model, probe, task.loss_fn, seed=self.config.seed,
                mask_fn=task.train.token_mask,
            )  # fmt: skip
        self._log(f"fit: damping factor {selection.factor:g} (auto)")
        return {
            **selection.to_json(),
            "probe_examples": sum(len(batch[0]) for batch in probe),
            "seconds": round(time.perf_counter() - started, 3),
        }

    @property
    def damping_factor(self) -> float:
        """The damping factor the curvature is applied with: the configured one, or the one
        the fit stage chose and recorded with ``damping="auto"``."""
        if self.config.damping != DAMPING_AUTO:
            # As configured (an int stays one): store transforms record its repr.
            return cast(float, self.config.damping)
        self._require("fit", "apply")
        return float(self._fit_record()["damping_selection"]["factor"])

    def _fit_record(self) -> dict:
        """``fit.json``, checked against this run's model, data and settings, with the
        curvature file checked against its recorded digest (once per run object)."""
        if getattr(self, "_verified_fit", None) is None:
            path = self.run_dir / FIT_FILE
            refit = f"delete {path} and run `{self.command('fit')}`"
            record = read_json(path, hint=refit)
            if not isinstance(record.get("inputs"), dict):
                raise IntegrityError(f"{path} records no inputs (an older kronlab); {refit}")
            self._stale(
                f"the curvature in {self.curvature_path}",
                _differences(record["inputs"], self._fit_inputs()),
                [path],
            )
            check_file_digest(self.curvature_path, record["curvature_fingerprint"], hint=refit)
            self._verified_fit = record
        return self._verified_fit

    def _curvature(self):
        if getattr(self, "_cached_curvature", None) is None:
            self._require("fit", "apply")
            self._fit_record()
            self._cached_curvature = Curvature.load(self.curvature_path, self.workers.device)
        return self._cached_curvature

    def _curvature_fingerprint(self) -> str:
        self._require("fit", "build")
        return self._fit_record()["curvature_fingerprint"]

    # ---- apply ------------------------------------------------------------------------------

    def query_settings(self) -> StoreSettings:
        transform = self.compression.query_transform(
            self._curvature_fingerprint(), self.damping_factor
        )
        extra = {"compression": self.config.compression, "damping": self.damping_factor}
        # Queries are few: keep them in float32 whatever the training store's dtype.
        return self.store_settings(self.task.queries, "float32", transform, extra)

    @_with_bias_setting
    def apply(self, resume: bool = False) -> GradientStore:
        """Transform the queries: ``P_S (H⁻¹ G_q) P_Aᵀ``, ``M_S G_q M_Aᵀ`` when folded,
        ``L_S (H⁻¹ G_q) L_Aᵀ`` when whitened."""
        self._require("fit", "apply")
        store = self._open_for_writing(
            "apply", self.query_settings(), len(self.task.queries), resume
        )
        compression = self.compression
        maps = compression.query_maps(self._projections(), self._curvature(), self.damping_factor)
        self._write_rows(store, self.task.queries, maps, "apply", compression.query_inverse)
        return store

    # ---- score ------------------------------------------------------------------------------

    @_with_bias_setting
    def score(self) -> np.ndarray | RankedScores:
        """``scores[q, t] = ⟨query_q, train_t⟩`` into ``scores.npy`` (unless
        ``dense_scores=False``) and the streamed top-k into ``top_k.npz``, then the report.

        ``normalize``: ``"train"`` scores ``⟨query_q, train_t⟩ / ‖train_t‖``, ``"cosine"``
        ``⟨query_q, train_t⟩ / (‖query_q‖ ‖train_t‖)``, norms of the rows as stored."""
        self._require("build", "score")
        self._require("apply", "score")
        train = self._open_store("build")
        queries = self._open_store("apply")
        # The two stores must agree on everything that shapes a row.
        check_settings(
            train.settings,
            queries.settings,
            f"{self.train_store_dir} (against the queries)",
            ignore=("dtype", "transform", "data_fingerprint"),
        )
        normalize = self.config.normalize
        query_rows = queries.read().to(self.workers.device)
        if normalize == "cosine":
            query_rows = unit_rows(query_rows)
        if self.workers.is_main:
            (self.run_dir / SCORE_FILE).unlink(missing_ok=True)
            if self.dense_scores:
                _allocate_scores(self.scores_path, (len(query_rows), train.num_rows))
        self.workers.barrier()
        scores = np.load(self.scores_path, mmap_mode="r+") if self.dense_scores else None
        ranked = StreamedTopK(min(self.config.top_k, train.num_rows))
        progress = self._progress(train.num_rows, "score")
        for chunk in self.workers.owned(range(train.num_chunks)):
            start, stop = train.chunk_range(chunk)
            rows = train.read(start, stop).to(self.workers.device)
            if normalize in ("train", "cosine"):
                rows = unit_rows(rows)
            block = (query_rows @ rows.T).float()
            if not all_finite([block]):
                raise ValueError(
                    f"scores of training rows {start}..{stop - 1} overflowed float32 (inf or "
                    f"NaN): the gradients in {train.directory} or {queries.directory} are too "
                    "large; rescale the loss or raise --damping"
                )
            if scores is not None:
                scores[:, start:stop] = block.cpu().numpy()
            ranked.update(block, start)
            _advance(progress, (stop - start) * self.workers.world_size)
        progress.close()
        if scores is not None:
            scores.flush()
            if self.durable:
                with open(self.scores_path, "rb+") as handle:
                    os.fsync(handle.fileno())
            del scores
        self._gather_top_k(ranked)
        if self.workers.is_main:
            from kronlab.attribution.report import write_report

            computed_with = self._computed_with(train, queries)
            write_report(
                self.run_dir, computed_with, self.config, self.task, self.top_k(), self.dense_scores
            )
            write_json(
                self.run_dir / SCORE_FILE,
                {
                    "shape": [len(query_rows), train.num_rows],
                    "inputs": self._score_inputs(),
                    "computed_with": computed_with,
                    "scores_digest": file_digest(self.scores_path) if self.dense_scores else None,
                    "top_k_digest": file_digest(self.top_k_path),
                },
                durable=self.durable,
            )
        self.workers.barrier()
        return self.scores() if self.dense_scores else self.top_k()

    def _gather_top_k(self, ranked: StreamedTopK) -> None:
        """Every rank's top-k over its own chunks, merged by rank 0 into ``top_k.npz``."""
        own = self.run_dir / f"top_k.rank{self.workers.rank}.npz"
        if self.workers.distributed and not ranked.empty:  # a rank may own no chunk
            ranked.result().save(own)
        self.workers.barrier()
        if self.workers.is_main:
            if self.workers.distributed:
                for rank in range(1, self.workers.world_size):
                    other = self.run_dir / f"top_k.rank{rank}.npz"
                    if other.exists():
                        ranked.merge(RankedScores.load(other))
                        other.unlink()
                own.unlink(missing_ok=True)
            ranked.result().save(self.top_k_path)
        self.workers.barrier()

    def _score_inputs(self) -> dict:
        """What the scores depend on: the two stores as they are now (their metadata digests
        cover settings, fingerprints and sizes)."""
        return {
            "train_store": file_digest(self.train_store_dir / "store.json"),
            "query_store": file_digest(self.query_store_dir / "store.json"),
            "normalize": self.config.normalize,
        }

    def _computed_with(self, train: GradientStore, queries: GradientStore) -> dict:
        """The settings the scores were computed with, read from the stages' records."""
        fit = self._fit_record()["inputs"]
        return {
            "model_fingerprint": train.settings.model_fingerprint,
            "train_data_fingerprint": train.settings.data_fingerprint,
            "query_data_fingerprint": queries.settings.data_fingerprint,
            "method": fit["method"],
            "fisher": fit["fisher"],
            "curvature_fingerprint": self._fit_record()["curvature_fingerprint"],
            "damping": queries.settings.extra.get("damping"),
            "damping_setting": self.config.damping,
            "compression": queries.settings.extra.get("compression"),
            "projection_dim": train.settings.projection_dim,
            "projection_kind": train.settings.projection_kind,
            "store_dtype": train.settings.dtype,
            "normalize": self.config.normalize,
            "train_rows": train.num_rows,
            "query_rows": queries.num_rows,
        }

    def _score_record(self) -> dict:
        path = self.run_dir / SCORE_FILE
        record = read_json(path, hint=f"run `{self.command('score')}`")
        # Scores recorded before normalization existed were not normalized.
        recorded = {"normalize": "none", **record.get("inputs", {})}
        self._stale(
            f"the scores in {self.scores_path}",
            _differences(recorded, self._score_inputs()),
            [path],
        )
        return record

    def scores(self) -> np.ndarray:
        """The ``(n_query, n_train)`` scores, memory-mapped read-only (checked once against
        the digest recorded when they were written)."""
        if not self.is_complete("score"):
            raise ValueError(f"no scores in {self.run_dir}; run `{self.command('score')}` first")
        if not self.scores_path.exists():
            raise ValueError(
                f"no scores.npy in {self.run_dir}: the score stage ran without dense scores "
                "(--no-scores-file); top_k() reads the streamed top-k"
            )
        if getattr(self, "_verified_scores", None) != self.scores_path.stat().st_mtime_ns:
            record = self._score_record()
            check_file_digest(
                self.scores_path,
                record["scores_digest"],
                hint=f"run `{self.command('score')}` to compute them again",
            )
            self._verified_scores = self.scores_path.stat().st_mtime_ns
        return np.load(self.scores_path, mmap_mode="r")

    def top_k(self) -> RankedScores:
        """Each query's ``top_k`` proponents and opponents from the score stage (checked
        against the digest recorded when they were written, once the stage is complete)."""
        if not self.top_k_path.exists():
            raise ValueError(f"no top_k.npz in {self.run_dir}; run `{self.command('score')}` first")
        if self.is_complete("score"):
            check_file_digest(
                self.top_k_path,
                self._score_record()["top_k_digest"],
                hint=f"run `{self.command('score')}` to compute them again",
            )
        return RankedScores.load(self.top_k_path)


def _allocate_scores(path: Path, shape: tuple[int, int]) -> None:
    """Create ``scores.npy`` with all its blocks allocated: writing a memory map into a sparse
    file on a full disk kills the process with SIGBUS; allocating first raises ENOSPC here."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    del array
    size = path.stat().st_size
    with open(path, "rb+") as handle:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(handle.fileno(), 0, size)
                return
            except OSError as error:
                if error.errno not in _FALLOCATE_UNSUPPORTED:
                    raise OSError(error.errno, error.strerror, str(path)) from None
        free = shutil.disk_usage(path.parent).free
        if free < size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _advance(progress: tqdm, rows: int) -> None:
    """Only rank 0 draws the bar: it stands for every rank's share (its rows × world size),
    capped at the total since the last round of chunks may be uneven."""
    progress.update(min(rows, max(progress.total - progress.n, 0)))


class TrainingBatches(Sequence):
    """Batches of an :class:`ExampleSet`, sliced on demand; each full iteration (one pass of
    the curvature fit) advances ``progress`` by the examples it yields."""

    def __init__(
        self, examples: ExampleSet, size: int, device: torch.device, progress: tqdm | None = None
    ) -> None:
        self.examples, self.device, self.progress = examples, device, progress
        self.ranges = list(_batches(0, len(examples), size))

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        low, high = self.ranges[index]
        return tuple(t.to(self.device) for t in self.examples.batch(low, high))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for index in range(len(self)):
            batch = self[index]
            yield batch
            if self.progress is not None:
                self.progress.update(len(batch[0]))


def _batches(start: int, stop: int, size: int) -> Iterator[tuple[int, int]]:
    for low in range(start, stop, size):
        yield low, min(low + size, stop)


def with_overrides(config: AttributionConfig, **overrides: object) -> AttributionConfig:
    """``config`` with the given (non-``None``) fields replaced, validated again."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
