"""False-positive rate of the sample-level tests on real cohort designs (null cohorts).

For each design (balanced, repeated patients, unbalanced, within-patient paired), simulate
``--cohorts`` null cohorts with :mod:`sepsis_sc.sim` (donor effects, time-point
noise, no condition effect), run the pipeline's composition test and state-metric tests, and
report the share of p-values below 0.05 (nominal 5 %). Writes a table, a QQ figure and prints
both::

    python benchmarks/design_calibration.py                 # 200 cohorts per design (~1 min)
    python benchmarks/design_calibration.py --cohorts 20 --out /tmp/cal   # quick
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sepsis_sc import stats
from sepsis_sc.design import Contrast
from sepsis_sc.sim import repeated_sheet, simulate_cells, simulate_state_table

REPO = Path(__file__).resolve().parents[1]
SEPSIS = Contrast("sepsis_vs_control", "condition", "sepsis", "control")
LATE = Contrast("T6_vs_T0", "timepoint", "T6", "T0")
DESIGNS = {
    "balanced 6 vs 6": (lambda: repeated_sheet(6, 6, ("T0",)), SEPSIS),
    "5 patients x 2 time points vs 3": (lambda: repeated_sheet(5, 3), SEPSIS),
    "unbalanced 10 vs 3": (lambda: repeated_sheet(10, 3, ("T0",)), SEPSIS),
    "T6 vs T0 within 5 patients (paired)": (lambda: repeated_sheet(5, 3), LATE),
}


def run(n_cohorts: int, seed: int = 0) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    rows, pvals = [], {}
    for d_i, (name, (make, contrast)) in enumerate(DESIGNS.items()):
        sheet = make()
        comp_p, state_p, prim_p = [], [], []
        t0 = time.perf_counter()
        for k in range(n_cohorts):
            rng = np.random.default_rng(seed + 10_000 * d_i + k)
            adata, _ = simulate_cells(rng, sheet, cells=(300, 900))
            comp = stats.composition_test(adata, contrast=contrast, meta=sheet, level="lineage")
            comp_p += comp["pvalue"].tolist()
            tab, _ = simulate_state_table(rng, sheet, n_states=4)
            primary = {f"s{j}": "fraction" for j in range(4)}
            eff = stats.condition_effects(tab, contrast=contrast, meta=sheet, primary=primary)
            state_p += eff["pvalue"].tolist()
            prim_p += eff.loc[eff["role"] == "primary", "pvalue"].tolist()
        pvals[name] = {"composition": np.asarray(comp_p), "state metrics": np.asarray(state_p)}
        for test, p in (
            ("composition", comp_p),
            ("state metrics", state_p),
            ("primary states", prim_p),
        ):
            p = np.asarray(p, float)
            p = p[np.isfinite(p)]
            rows.append(
                {
                    "design": name,
                    "test": test,
                    "n_tests": p.size,
                    "fpr_0.05": float(np.mean(p < 0.05)),
                    "fpr_0.01": float(np.mean(p < 0.01)),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
    return pd.DataFrame(rows), pvals


def plot(pvals: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sepsis_sc.pl.style import set_style

    set_style()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"]
    for ax, test in zip(axes, ("composition", "state metrics")):
        for c, (name, d) in zip(colours, pvals.items()):
            p = np.sort(d[test][np.isfinite(d[test])])
            exp = (np.arange(1, p.size + 1) - 0.5) / p.size
            ax.plot(-np.log10(exp), -np.log10(p), color=c, lw=1.6, label=name)
        lim = max(ax.get_xlim()[1], 3)
        ax.plot([0, lim], [0, lim], color="black", lw=0.8, ls="--")
        ax.set_xlabel("expected -log10 p (uniform)")
        ax.set_title(f"{test.capitalize()}: null cohorts", loc="left")
    axes[0].set_ylabel("observed -log10 p")
    axes[1].legend(frameon=False, fontsize=8, loc="upper left")
    fig.suptitle(
        "Sample-level tests on null cohorts: points on the diagonal = calibrated", x=0.01, ha="left"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohorts", type=int, default=200)
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    args = ap.parse_args()
    table, pvals = run(args.cohorts)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "design_calibration.tsv", sep="\t", index=False)
    plot(pvals, args.out / "img" / "design_calibration.png")
    with pd.option_context("display.width", 160):
        print(table.to_string(index=False))


if __name__ == "__main__":
    main()
