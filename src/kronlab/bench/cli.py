"""The ``kronlab bench`` command (registered by ``kronlab.cli``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks run on demand (convergence)")
    benches = parser.add_subparsers(title="benchmarks", metavar="BENCHMARK")
    convergence = benches.add_parser(
        "convergence",
        help="steps and seconds each optimizer needs to reach AdamW's validation loss",
        description="Learning-rate grid at one seed, then --seeds seeds at the best lr, for each "
        "optimizer and task; writes a table, a plot and JSON per task under --out. Finished runs "
        "are cached there and skipped on a rerun. Under `torchrun --nproc-per-node N` each run "
        "is data-parallel over the N processes (same global batches; rank 0 prints and writes).",
    )
    convergence.add_argument(
        "--tasks", default="digits-mlp,digits-cnn,charlm", help="comma-separated task names"
    )
    convergence.add_argument(
        "--optimizers",
        default="kronlab",
        help="comma-separated names; 'kronlab' (the default set), 'kronlab-all' and 'peers' "
        "expand to groups; AdamW is always included",
    )
    convergence.add_argument(
        "--seeds", type=int, help="seeds at the best lr (default 3; 1 with --quick)"
    )
    convergence.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs in parallel processes (1 under torchrun, where each run is data-parallel)",
    )
    convergence.add_argument("--out", type=Path, default=Path("kronlab-bench"))
    convergence.add_argument(
        "--quick",
        action="store_true",
        help="default lrs (no grid), short budgets, one seed unless --seeds",
    )
    convergence.add_argument("--steps", type=int, help="override every task's step budget")
    convergence.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="the seconds in the table and plot: the process's CPU time (default; least "
        "disturbed by other jobs on the machine) or the wall clock; runs record both",
    )
    convergence.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    convergence.set_defaults(handler=_run_convergence)
    parser.set_defaults(handler=lambda args: parser.print_help() or 0)


def _run_convergence(args: argparse.Namespace) -> int:
    from kronlab.bench import run_convergence
    from kronlab.data_parallel import launched

    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    with launched():
        run_convergence(
            tasks,
            args.optimizers,
            out=args.out,
            seeds=args.seeds,
            quick=args.quick,
            steps=args.steps,
            jobs=args.jobs,
            show_progress=not args.no_progress,
            clock=args.clock,
        )
    return 0
