"""The ``kronlab`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


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
        "print final train/test loss, test accuracy and step time relative to AdamW, and write "
        "compare.png and compare.json to --out.",
    )
    parser.add_argument(
        "--optimizers", default="adamw,sgd", help="comma-separated names (see --list)"
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
    import kronlab.optim  # noqa: F401  (registers the optimizers)
    from kronlab.compare import compare, format_table, plot_curves, write_json
    from kronlab.optim.registry import available_optimizers, get_optimizer
    from kronlab.tasks import load_task

    if args.list:
        for name in available_optimizers():
            entry = get_optimizer(name)
            print(f"{name:24s} lr={entry.default_lr:<8g} {entry.summary}")
        return 0
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    names = [name.strip() for name in args.optimizers.split(",") if name.strip()]
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
    )
    print(format_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    config = {
        "task": args.task,
        "optimizers": names,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "learning_rates": learning_rates,
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


def build_parser() -> argparse.ArgumentParser:
    from kronlab import __version__

    parser = argparse.ArgumentParser(
        prog="kronlab", description="Kronecker-factored optimizers and influence functions."
    )
    parser.add_argument("--version", action="version", version=f"kronlab {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_compare(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except (ValueError, ImportError) as error:
        print(f"kronlab: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
