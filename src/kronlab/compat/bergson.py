"""bergson's command-line spellings for ``kronlab attribute``.

``--projection_dim``, ``--projection_type``, ``--ev_correction``, ``--lambda_damp_factor``,
``--include_bias`` and ``--projection_target`` are accepted next to kronlab's own flags, and
``hessian`` names the ``fit`` stage. ``--ev_correction true|false`` is ``--method ekfac|kfac``;
``--lambda_damp_factor`` is ``--damping`` (both a factor of the mean eigenvalue).
"""

from __future__ import annotations

import argparse

STAGE_ALIASES = {"hessian": "fit"}
PROJECTION_TYPES = ("normal", "rademacher")


def parse_bool(value: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``), as bergson's flags take them."""
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {value!r} (allowed: true, false)")


def add_bergson_flags(settings: argparse._ArgumentGroup) -> None:
    """Register bergson's spellings on the ``kronlab attribute`` settings group."""
    spelled = "bergson's spelling of "
    settings.add_argument(
        "--projection_dim", dest="projection_dim", type=int, help=spelled + "--projection-dim"
    )
    settings.add_argument(
        "--projection_type",
        dest="projection_kind",
        choices=PROJECTION_TYPES,
        help=spelled + "--projection-kind",
    )
    settings.add_argument(
        "--lambda_damp_factor", dest="damping", type=float, help=spelled + "--damping"
    )
    settings.add_argument(
        "--ev_correction",
        type=parse_bool,
        metavar="{true,false}",
        help="bergson: true is --method ekfac, false --method kfac",
    )
    settings.add_argument(
        "--include_bias",
        dest="bias",
        type=parse_bool,
        metavar="{true,false}",
        help=spelled + "--no-bias (false)",
    )
    settings.add_argument(
        "--projection_target",
        choices=("per_module",),
        help="bergson: kronlab projects per module (the only value accepted)",
    )


def resolve_bergson_flags(args: argparse.Namespace) -> argparse.Namespace:
    """Turn bergson's spellings into kronlab's settings; ``ValueError`` on a contradiction."""
    args.stage = STAGE_ALIASES.get(args.stage, args.stage)
    correction = getattr(args, "ev_correction", None)
    if correction is not None:
        method = "ekfac" if correction else "kfac"
        if args.method is not None and args.method != method:
            raise ValueError(
                f"Invalid --ev_correction: {correction} with --method {args.method} "
                f"(allowed: --ev_correction {str(args.method == 'ekfac').lower()} or no --method)"
            )
        args.method = method
    return args
