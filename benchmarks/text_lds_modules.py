"""Text LDS of ``kronlab attribute``'s default tracked modules (every trackable module outside
attention) against tracking all of them and against the MLP and head alone.

Same model, retraining cache and paired statistics as ``benchmarks/text_lds_damping.py``; at the
default damping factor and at 0.1, K-FAC and EK-FAC, one fit per true-Fisher label seed.

    PYTHONPATH=src:. nice -n 10 python -m benchmarks.text_lds_modules --variant linear
"""

from __future__ import annotations

import os

from benchmarks.common import machine_description
from benchmarks.damping_lds import DEFAULT_FACTOR, Sweep, run_sweep
from benchmarks.text_lds import module_sets
from benchmarks.text_lds_damping import METHODS, text_inputs
from kronlab.attribution.curvature import DEFAULT_DAMPING_FACTOR
from kronlab.curvature import find_modules_outside_attention


def main() -> None:
    inputs = text_inputs(__doc__.split("\n")[0])
    arguments, model = inputs.arguments, inputs.model
    factors = sorted({DEFAULT_DAMPING_FACTOR, DEFAULT_FACTOR})
    sets = {
        "default (outside attention)": list(find_modules_outside_attention(model)),
        "all": None,
        "MLP + head": module_sets(arguments.variant)["MLP + head"],
    }
    sweeps: dict[str, Sweep] = {
        f"{label}, {tracked}": run_sweep(
            inputs.fitter(method, modules),
            inputs.score,
            None,
            inputs.truth,
            factors,
            arguments.fisher_seeds,
        )  # fmt: skip
        for tracked, modules in sets.items()
        for method, label in METHODS
    }
    default = next(iter(sets))
    print(
        f"#### text `{arguments.variant}`: default tracked modules "
        f"({', '.join(sets[default])})\n\n"
        f"Machine: {machine_description()}, 1-minute load {os.getloadavg()[0]:.0f}.\n"
    )
    print("| method | against | " + " | ".join(f"Δ LDS @ {f:g}" for f in factors) + " |")
    print("|---|---|" + "---:|" * len(factors))
    for _, label in METHODS:
        sweep = sweeps[f"{label}, {default}"]
        for other in list(sets)[1:]:
            reference = sweeps[f"{label}, {other}"]
            cells = []
            for factor in factors:
                mean, error = sweep.paired(sweep.column(factor), reference.column(factor))
                cells.append(f"{mean:+.4f} ± {error:.4f}")
            print(f"| {label} | {other} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
