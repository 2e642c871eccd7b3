"""The ``kronlab`` command line."""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kronlab.distributed.workers import Workers

# What to do about an OSError, by errno; the command to rerun is appended when known.
_OS_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full: free some space (or use a --run-dir on another disk)",
    errno.EDQUOT: "the disk quota is exhausted: free some space (or use another --run-dir)",
    errno.EFBIG: "a file would exceed the file size limit (`ulimit -f`) or the file "
    "system's largest file: raise the limit or use a --run-dir on another file system",
    errno.EACCES: "no permission: use a writable --run-dir (or fix its permissions)",
    errno.EPERM: "not permitted: use a writable --run-dir (or fix its permissions)",
    errno.EROFS: "the file system is read-only: use a writable --run-dir",
}
# Errors after which the interrupted stage can continue where it stopped.
_RESUMABLE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def describe_os_error(error: OSError, retry: str | None = None) -> str:
    """One line for an OSError: what failed, on which file, and what to do about it."""
    if error.strerror is None:  # raised with a message of ours (FileExistsError, ...)
        return str(error)
    where = f" ({error.filename})" if error.filename else ""
    message = f"{error.strerror}{where}"
    hint = _OS_ERROR_HINTS.get(error.errno)
    if hint:
        message += f"; {hint}"
        if retry and error.errno in _RESUMABLE:
            message += f", then `{retry}` continues where it stopped"
    return message


def parse_learning_rates(values: Sequence[str]) -> tuple[float | None, dict[str, float]]:
    """``["3e-3", "soap=1e-3,muon=0.02"]`` → (global lr or None, per-optimizer lrs)."""
    global_lr: float | None = None
    per_optimizer: dict[str, float] = {}
    for value in values:
        for item in value.split(","):
            name, sep, number = item.partition("=")
            try:
                if sep:
                    per_optimizer[name.strip()] = float(number)
                else:
                    global_lr = float(name)
            except ValueError:
                raise ValueError(f"--lr expects NUMBER or NAME=NUMBER, got {item!r}") from None
    return global_lr, per_optimizer


def _add_compare(subparsers: argparse._SubParsersAction) -> None:
    from kronlab.tasks import available_tasks

    parser = subparsers.add_parser(
        "compare",
        help="train a small model with several optimizers and compare them",
        description="Train the task's model from one initialization with each optimizer, then "
        "print final train/test loss, test accuracy and step time relative to AdamW (optimizers "
        "timed in interleaved step slots; the ratio's quartiles over blocks of steps shown, "
        "'?' when they say it is noise), and write "
        "compare.png and compare.json to --out. Under `torchrun --nproc-per-node N` each run "
        "is data-parallel over the N processes (same global batches; rank 0 prints and writes).",
    )
    parser.add_argument(
        "--optimizers",
        default="adamw,sgd,shampoo,soap,pf_shampoo,muon,psgd_quad,sirfshampoo",
        help="comma-separated names (see --list), or 'all'",
    )
    parser.add_argument("--list", action="store_true", help="list the optimizers and exit")
    parser.add_argument("--task", default="digits", choices=available_tasks())
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="[NAME=]LR",
        help="learning rate for all optimizers, or per optimizer (repeatable): --lr soap=3e-3",
    )
    parser.add_argument("--out", type=Path, default=Path("kronlab-out"))
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from kronlab.data_parallel import launched

    with launched() as workers:
        return _compare_on_this_rank(args, workers)


def _compare_on_this_rank(args: argparse.Namespace, workers: Workers) -> int:
    import kronlab.optim  # noqa: F401  (registers the optimizers)
    from kronlab.compare import compare, format_table, plot_curves, timing_warning, write_json
    from kronlab.optim.registry import available_optimizers, get_optimizer
    from kronlab.tasks import load_task

    if args.list and workers.is_main:
        for name in available_optimizers():
            entry = get_optimizer(name)
            print(f"{name:24s} lr={entry.default_lr:<8g} {entry.summary}")
    if args.list:
        return 0
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    names = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    if names == ["all"]:
        names = available_optimizers()
    if not names:
        raise ValueError("--optimizers is empty")
    for name in names:
        get_optimizer(name)
    global_lr, per_optimizer = parse_learning_rates(args.lr)
    learning_rates = {name: global_lr for name in names} if global_lr is not None else {}
    learning_rates.update(per_optimizer)

    task = load_task(args.task)
    results = compare(
        task,
        names,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        learning_rates=learning_rates,
        show_progress=not args.no_progress,
        workers=workers,
    )
    if not workers.is_main:
        return 0
    print(format_table(results))
    warning = timing_warning(results)
    if warning:
        print(warning)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {
        "task": args.task,
        "optimizers": names,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "learning_rates": learning_rates,
        "processes": workers.world_size,
    }
    write_json(results, args.out / "compare.json", config)
    written = [args.out / "compare.json"]
    title = f"{args.task}: {args.steps} steps, batch {args.batch_size}, seed {args.seed}"
    if plot_curves(results, args.out / "compare.png", title):
        written.append(args.out / "compare.png")
    else:
        print("matplotlib is not installed: skipped compare.png (pip install 'kronlab[plot]')")
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


# What each stage of `kronlab attribute` does: its --help and its line in the command's list.
_STAGE_DESCRIPTIONS = {
    "fit": "Fit the K-FAC / EK-FAC curvature of the model on the training examples "
    "(curvature.safetensors; the true Fisher samples labels from the model).",
    "build": "Write every training example's gradient into the gradient store train/, in "
    "resumable chunks: whitened with the fitted curvature (--compression whitened, the default: "
    "fit runs first), and sketched per module with --projection-dim P (by default only when "
    "full gradients would take more than {budget:g} GB). The store's size is printed first, "
    "and a store above --max-store-gb is refused.",
    "apply": "Compute the queries' gradients, apply the inverse curvature (damped), then the "
    "same projection as the store, into queries/.",
    "score": "Score every query against every stored training row (scores.npy, top_k.npz: "
    "each query's top proponents and opponents), then write report.md and top_examples.png.",
    "run": "Perform every stage that is not complete yet, in order (fit, build, apply, score; "
    "build before fit with --compression project).",
}


def _run_options() -> list[tuple[str, dict, tuple[str, ...] | None]]:
    """The options of `kronlab attribute` that are not pinned in config.json: (flag, argparse
    keywords, the stages whose --help lists it; None: every stage)."""
    from kronlab.attribution.config import GRADIENT_STAGES
    from kronlab.attribution.pipeline import DEFAULT_MAX_STORE_GB

    return [
        ("--run-dir", {"type": Path, "default": Path("kronlab-attribute"),
                       "help": "the run directory (default: kronlab-attribute)"}, None),
        ("--resume", {"action": "store_true", "help": "continue an interrupted stage"},
         ("build", "apply")),
        ("--cache-dir", {"type": Path, "help": "where embedded models are cached (default: "
                         "$KRONLAB_CACHE_DIR, else ~/.cache/kronlab)"}, None),
        ("--backend", {"choices": ("gloo", "nccl"), "help": "torch.distributed backend"}, None),
        ("--device", {"help": "cpu, cuda, cuda:1, ... (default: per backend)"}, None),
        ("--no-progress", {"action": "store_true", "help": "hide the progress bars"}, None),
        ("--durable", {"action": "store_true",
                       "help": "fsync every chunk commit and every file written, and their "
                       "directory: what a stage has committed then survives a power cut, not "
                       "only a killed process"}, None),
        ("--max-store-gb", {"type": float, "default": DEFAULT_MAX_STORE_GB,
                            "help": "refuse a gradient store larger than this many GB before "
                            f"writing it (default: {DEFAULT_MAX_STORE_GB:g}; --projection-dim "
                            "bounds the size)"}, ("build", "apply")),
        ("--fused-activations", {"action": "store_true",
                                 "help": "run Hugging Face's unfused GELUs (gelu_new, ...) as "
                                 "torch's fused kernels of the same function: faster on CPU, "
                                 "equal up to rounding (not pinned in config.json)"},
         GRADIENT_STAGES),
        ("--no-scores-file", {"action": "store_true",
                              "help": "score without the n_query x n_train scores.npy: keep "
                              "only each query's streamed top-k proponents and opponents "
                              "(top_k.npz), in memory independent of the training set"},
         ("score",)),
    ]  # fmt: skip


def _listed(stages: tuple[str, ...] | None, stage: str | None) -> bool:
    """Whether the --help of ``stage`` (None: the whole command, like `run`) lists an option
    used by ``stages`` (None: every stage)."""
    return stage in (None, "run") or stages is None or stage in stages


def _add_settings(group: argparse._ArgumentGroup, stage: str | None = None) -> None:
    """One flag per ``AttributionConfig`` field, generated from the field's ``Setting``: its
    help with the config's default appended, its choices and its parser. The flags' own
    defaults are None so that a run directory's ``config.json`` can fill them in.

    For a stage's parser (``stage`` given) the flags default to SUPPRESS, so that the
    command's own parse stands, and those the stage does not use are accepted but not listed
    (they are pinned in config.json for the stages after it)."""
    from dataclasses import fields

    from kronlab.attribution.config import AttributionConfig, setting_of

    for config_field in fields(AttributionConfig):
        declared = setting_of(config_field)
        default = config_field.default
        shown = default if declared.shown_default is None else declared.shown_default
        text = f"{declared.help} (default: {shown})".lstrip().replace("%", "%%")
        if not _listed(declared.stages, stage):
            text = argparse.SUPPRESS
        common = {"dest": config_field.name, "help": text}
        if stage is not None:
            common["default"] = argparse.SUPPRESS
        flag = declared.flag or "--" + config_field.name.replace("_", "-")
        if declared.const is not None:
            group.add_argument(flag, action="store_const", const=declared.const, **common)
            continue
        parse = declared.parse
        if parse is None and (declared.integer or type(default) in (int, float)):
            parse = int if declared.integer or type(default) is int else float
        group.add_argument(flag, type=parse, choices=declared.choices, **common)


def _add_attribute_options(parser: argparse.ArgumentParser, stage: str | None) -> None:
    """The settings (pinned in config.json), bergson's spellings of them and the run options,
    each listed in the --help of the stages that use it (see :func:`_add_settings`)."""
    from kronlab.compat.bergson import add_bergson_flags

    settings = parser.add_argument_group(
        "settings (pinned in config.json, but for the score stage's own, which may change)"
    )
    _add_settings(settings, stage)
    bergson = parser.add_argument_group("bergson's spellings")
    add_bergson_flags(bergson)
    if stage is not None:
        for action in bergson._group_actions:  # noqa: SLF001 (argparse keeps them only there)
            action.default = action.help = argparse.SUPPRESS
    options = parser.add_argument_group("run options (not pinned)")
    for flag, keywords, stages in _run_options():
        if stage is not None:
            keywords = {**keywords, "default": argparse.SUPPRESS}
            if not _listed(stages, stage):
                keywords["help"] = argparse.SUPPRESS
        options.add_argument(flag, **keywords)


def _add_attribute(subparsers: argparse._SubParsersAction) -> None:
    from kronlab.attribution.config import FULL_STORE_BUDGET_GB
    from kronlab.compat.bergson import STAGE_ALIASES

    parser = subparsers.add_parser(
        "attribute",
        help="influence-function attribution: build, fit, apply, score (or run all)",
        description="Attribute queries to training examples with K-FAC / EK-FAC influence "
        "functions. Each stage writes into --run-dir (config.json pins its settings); `run` "
        "(the default) performs the stages that are not complete yet. With no arguments: a "
        "digits MLP (trained once, then cached) and 10 test queries. Under `torchrun "
        "--nproc-per-node N` the work is split across ranks. `kronlab attribute STAGE --help` "
        "lists what one stage does and the settings it uses.",
    )
    # Settings default to None: taken from the run directory's config.json, else the defaults.
    _add_attribute_options(parser, None)
    stages = parser.add_subparsers(dest="stage", title="stages", metavar="STAGE")
    aliases = {stage: [alias for alias, name in STAGE_ALIASES.items() if name == stage]
               for stage in _STAGE_DESCRIPTIONS}  # fmt: skip
    for stage, description in _STAGE_DESCRIPTIONS.items():
        description = description.format(budget=FULL_STORE_BUDGET_GB)
        stage_parser = stages.add_parser(
            stage,
            aliases=aliases[stage],
            help=description.split(" (")[0].split(", then")[0].rstrip("."),
            description=description,
            epilog=None
            if stage == "run"
            else "Settings of the other stages are accepted too (pinned in config.json at the "
            "first stage, but for the score stage's own): `kronlab attribute run --help` lists "
            "every one.",
        )
        _add_attribute_options(stage_parser, stage)
        stage_parser.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    parser.set_defaults(handler=_run_attribute, stage="run")


def _run_attribute(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from kronlab.attribution.distributed import init_workers
    from kronlab.attribution.pipeline import (
        CONFIG_FILE,
        AttributionConfig,
        AttributionRun,
        read_config,
        with_overrides,
    )
    from kronlab.compat.bergson import resolve_bergson_flags

    args = resolve_bergson_flags(args)
    stored = args.run_dir / CONFIG_FILE
    resumable = args.stage if args.stage in ("build", "apply") else "run"
    args.retry_command = f"kronlab attribute {resumable} --resume --run-dir {args.run_dir}"
    base = read_config(stored) if stored.exists() else AttributionConfig()
    settings = {
        config_field.name: getattr(args, config_field.name) for config_field in fields(base)
    }
    config = with_overrides(base, **settings)
    workers = init_workers(args.backend, args.device)
    run = AttributionRun(
        args.run_dir,
        config,
        workers=workers,
        show_progress=not args.no_progress,
        cache_dir=args.cache_dir,
        fused_activations=args.fused_activations,
        durable=args.durable,
        max_store_gb=args.max_store_gb,
        dense_scores=not args.no_scores_file,
    )
    results = [
        run.scores_path,
        run.top_k_path,
        args.run_dir / "report.md",
        args.run_dir / "top_examples.png",
    ]
    before = {path: _modified(path) for path in results}
    if args.stage == "run":
        run.run(resume=args.resume)
    elif args.stage in ("build", "apply"):
        getattr(run, args.stage)(resume=args.resume)
    else:
        getattr(run, args.stage)()
    if workers.is_main:
        done = [stage for stage in run.stage_order() if run.is_complete(stage)]
        print(f"{args.run_dir}: complete stages: {', '.join(done) or 'none'}")
        written = [str(path) for path in results if _modified(path) not in (None, before[path])]
        if written:
            print(f"wrote {', '.join(written)}")
        elif run.is_complete("score"):
            print(f"nothing to do: the results are already in {args.run_dir / 'report.md'}")
    return 0


def _modified(path: Path) -> int | None:
    """The file's modification time in ns, or None when there is no such file."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def build_parser() -> argparse.ArgumentParser:
    from kronlab import __version__
    from kronlab.bench.cli import add_bench_parser

    parser = argparse.ArgumentParser(
        prog="kronlab", description="Kronecker-factored optimizers and influence functions."
    )
    parser.add_argument("--version", action="version", version=f"kronlab {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (for a bug report)"
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_compare(subparsers)
    _add_attribute(subparsers)
    add_bench_parser(subparsers)
    for command in subparsers.choices.values():
        # Also accepted after the command; SUPPRESS keeps a flag given before it.
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 0
    if hasattr(signal, "SIGXFSZ"):
        # Past the file size limit a write then fails with EFBIG (reported below) instead of
        # the signal killing the process without a word.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        retry = getattr(args, "retry_command", None)
        _report(args, "interrupted" + (f"; `{retry}` continues where it stopped" if retry else ""))
        return 130
    except OSError as error:
        _report(args, describe_os_error(error, getattr(args, "retry_command", None)))
        return 2
    except (ValueError, TypeError, ImportError) as error:
        _report(args, str(error))
        return 2
    except Exception as error:  # noqa: BLE001 - the CLI's promise: one line, never a traceback
        _report(
            args,
            f"unexpected {type(error).__name__}: {error} (rerun with --debug for the traceback)",
        )
        return 1


def _report(args: argparse.Namespace, message: str) -> None:
    if getattr(args, "debug", False):
        traceback.print_exc()
    print(f"kronlab: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
