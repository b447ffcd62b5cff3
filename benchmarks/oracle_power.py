"""Oracle power of the demo design: the planted effects tested on the simulator's truth.

Simulates ``--seeds`` cohorts with the demo sheet (``config/samples.tsv``: 6 sepsis vs 6
control, two batches, age and sex) and the demo's cells per sample, and runs
:func:`sepsis_sc.simulate.oracle_tests` on each truth table (true labels, no QC, annotation
or scoring error). The truth does not depend on the number of genes, so cohorts use the
fewest genes the simulator accepts. Prints, per planted effect, the fraction of seeds where
the oracle detects it (FDR <= 0.05 in the planted direction).

Usage::

    python benchmarks/oracle_power.py --seeds 20 [--cells 1500] [--sheet config/samples.tsv]
        [--min-cells 10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def power(
    sheet: pd.DataFrame,
    seeds: range,
    cells: int,
    n_genes: int | None = None,
    min_cells: int = 1,
    **kw,
) -> pd.DataFrame:
    from sepsis_sc import sim

    n_genes = n_genes or _min_genes()
    sign = np.array([1.0 if s["direction"] == "up" else -1.0 for s in sim.PLANTED_EFFECTS])
    hits = []
    for seed in seeds:
        _, truth = sim.simulate_cohort(
            sheet, cells_per_sample=cells, n_genes=n_genes, seed=seed, **kw
        )
        o = sim.oracle_tests(truth, min_cells=min_cells)
        hits.append((o["oracle_fdr"].to_numpy() <= 0.05) & (np.sign(o["oracle_effect"]) == sign))
    return pd.DataFrame(
        {
            "planted_effect": [s["effect"] for s in sim.PLANTED_EFFECTS],
            "oracle_power": np.mean(hits, 0),
        }
    )


def _min_genes() -> int:
    from sepsis_sc import sim

    try:
        sim.profiles.select_genes(1)
    except ValueError as err:
        return int(str(err).split("n_genes >= ")[1].split()[0])
    return 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--cells", type=int, default=1500)
    ap.add_argument("--sheet", default=str(REPO / "config" / "samples.tsv"))
    ap.add_argument(
        "--min-cells",
        type=int,
        default=10,
        help="the pipeline's stats.min_cells: samples with fewer cells of a "
        "state's parent population give no value (default 10, as config.yaml)",
    )
    args = ap.parse_args()
    sheet = pd.read_csv(args.sheet, sep="\t").drop(columns=["path"], errors="ignore")
    out = power(sheet, range(args.seeds), args.cells, min_cells=args.min_cells)
    print(out.to_string(index=False))


if __name__ == "__main__":
    main()
