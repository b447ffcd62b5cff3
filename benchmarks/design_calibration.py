"""Calibration and power of the sample-level tests on null cohorts shaped like real data.

Null cohorts (no condition effect) and cohorts with one planted change are simulated with
:mod:`sepsis_sc.sim.designs` and run through the pipeline's composition test and state tests
for each variance-moderation setting (``stats.moderation``, ``stats.unit_weights``):

* **composition, per label**: Dirichlet-multinomial cell counts whose donor-level shares
  vary label by label (rare labels 3-5x more volatile, :func:`~sepsis_sc.sim.label_volatility`),
  patients' repeated samples alike but not equal; two label sets: 12 sepsis PBMC populations
  (6 of them at 0.5-3 %) and 3 labels with one dominant;
* **state tests, per state**: 10 states of one metric whose donor SDs span 0.05-2 (states of
  unlike scale, as log2 CPM of different signatures);
* designs: 5 patients x 2 time points vs 3 controls, 6 vs 6, 3 vs 3 and 2 vs 2 donors;
* **power**: a 2-fold change of a rare label (DC, 1 %) and of an abundant one (CD14
  monocytes, 27 %), share of cohorts where it is found at FDR <= 0.05.

Prints and writes ``design_calibration.tsv`` (per label / state: share of p < 0.05),
``design_power.tsv`` and a figure::

    python benchmarks/design_calibration.py                       # 200 cohorts (~40 min)
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
from sepsis_sc.sim import (
    DOMINANT_THREE_PROPORTIONS,
    SEPSIS_PBMC_PROPORTIONS,
    dirichlet_multinomial_cells,
    repeated_sheet,
    state_values_of_unlike_scale,
)

REPO = Path(__file__).resolve().parents[1]
SEPSIS = Contrast("sepsis_vs_control", "condition", "sepsis", "control")
DESIGNS = {
    "5 patients x 2 vs 3": lambda: repeated_sheet(5, 3),
    "6 vs 6": lambda: repeated_sheet(6, 6, ("T0",)),
    "3 vs 3": lambda: repeated_sheet(3, 3, ("T0",)),
    "2 vs 2": lambda: repeated_sheet(2, 2, ("T0",)),
}
LABEL_SETS = {
    "12 sepsis PBMC labels": SEPSIS_PBMC_PROPORTIONS,
    "3 labels, one dominant": DOMINANT_THREE_PROPORTIONS,
}
#: (name, moderation, unit weights); "plain unweighted (before)" is the rule before issue #34
VARIANTS = [
    ("plain unweighted (before)", "plain", False),
    ("plain", "plain", True),
    ("robust", "robust", True),
    ("trend", "trend", True),
    ("robust + trend", "robust_trend", True),
    ("none (default)", "none", True),
]
STATE_SCALES = np.exp(np.linspace(np.log(0.05), np.log(2.0), 10))
RARE, ABUNDANT = "DC", "CD14 monocyte"


def composition_calibration(n: int, variants, seed: int = 0) -> pd.DataFrame:
    rows = []
    for s_i, (set_name, props) in enumerate(LABEL_SETS.items()):
        for d_i, (design, make) in enumerate(DESIGNS.items()):
            sheet = make()
            p = {v[0]: [] for v in variants}
            t0 = time.perf_counter()
            for k in range(n):
                rng = np.random.default_rng(seed + 100_000 * s_i + 10_000 * d_i + k)
                adata, _ = dirichlet_multinomial_cells(rng, sheet, props)
                for name, mod, w in variants:
                    c = stats.composition_test(
                        adata,
                        contrast=SEPSIS,
                        meta=sheet,
                        level="lineage",
                        moderation=mod,
                        unit_weights=w,
                    )
                    p[name].append(c.set_index("label")["pvalue"])
            for name in p:
                rate = (pd.DataFrame(p[name]) < 0.05).mean()
                for label, r in rate.items():
                    rows.append({"test": "composition", "features": set_name, "design": design,
                                 "variant": name, "feature": label, "p_below_0.05": r})  # fmt: skip
            print(f"composition {set_name}, {design}: {time.perf_counter() - t0:.0f} s", flush=True)
    return pd.DataFrame(rows)


def state_calibration(n: int, variants, seed: int = 1) -> pd.DataFrame:
    rows = []
    primary = {f"s{j}": "pseudobulk_expression" for j in range(len(STATE_SCALES))}
    for d_i, (design, make) in enumerate(DESIGNS.items()):
        sheet = make()
        p = {v[0]: [] for v in variants}
        for k in range(n):
            rng = np.random.default_rng(seed + 10_000 * d_i + k)
            tab = state_values_of_unlike_scale(rng, sheet, STATE_SCALES)
            for name, mod, w in variants:
                e = stats.condition_effects(
                    tab,
                    contrast=SEPSIS,
                    meta=sheet,
                    primary=primary,
                    moderation=mod,
                    unit_weights=w,
                )
                p[name].append(e.set_index("state")["pvalue"])
        for name in p:
            rate = (pd.DataFrame(p[name]) < 0.05).mean()
            for state, r in rate.items():
                scale = STATE_SCALES[int(state[1:])]
                rows.append({"test": "state", "features": "10 states, SD 0.05-2", "design": design,
                             "variant": name, "feature": f"{state} (SD {scale:.2g})", "p_below_0.05": r})  # fmt: skip
        print(f"states {design}: done", flush=True)
    return pd.DataFrame(rows)


def power(n: int, variants, seed: int = 2) -> pd.DataFrame:
    rows = []
    for d_i, (design, make) in enumerate(DESIGNS.items()):
        sheet = make()
        for label in (RARE, ABUNDANT):
            found = {v[0]: 0 for v in variants}
            for k in range(n):
                rng = np.random.default_rng(
                    seed + 10_000 * d_i + k + (0 if label == RARE else 5000)
                )
                adata, _ = dirichlet_multinomial_cells(
                    rng, sheet, SEPSIS_PBMC_PROPORTIONS, fold={label: 2.0}
                )
                for name, mod, w in variants:
                    c = stats.composition_test(
                        adata,
                        contrast=SEPSIS,
                        meta=sheet,
                        level="lineage",
                        moderation=mod,
                        unit_weights=w,
                    ).set_index("label")
                    found[name] += bool(c.loc[label, "fdr"] <= 0.05 and c.loc[label, "effect"] > 0)
            for name, f in found.items():
                share = SEPSIS_PBMC_PROPORTIONS[label]
                rows.append({"design": design, "label": f"{label} ({share:.0%})", "fold": 2.0,
                             "variant": name, "found_at_fdr_0.05": f / n})  # fmt: skip
        print(f"power {design}: done", flush=True)
    return pd.DataFrame(rows)


def summary(cal: pd.DataFrame) -> pd.DataFrame:
    """Per test, feature set, design and variant: the worst feature and the mean."""
    g = cal.groupby(["test", "features", "design", "variant"], sort=False)["p_below_0.05"]
    return g.agg(worst="max", mean="mean").reset_index()


def plot(cal: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sepsis_sc.pl.style import set_style

    set_style()
    s = summary(cal)
    groups = list(dict.fromkeys(zip(s["test"], s["features"], strict=True)))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 4.6), sharey=True)
    variants = list(dict.fromkeys(s["variant"]))
    colours = plt.get_cmap("tab10").colors
    for ax, (test, feats) in zip(np.atleast_1d(axes), groups, strict=True):
        sub = s[(s["test"] == test) & (s["features"] == feats)]
        designs = list(dict.fromkeys(sub["design"]))
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            vv = sub[sub["variant"] == v].set_index("design").reindex(designs)
            x = np.arange(len(designs)) + i * width
            ax.bar(x, vv["worst"], width, color=colours[i % 10], label=v)
            ax.scatter(x, vv["mean"], color="black", s=8, zorder=3)
        ax.axhline(0.05, color="black", lw=0.8, ls="--")
        ax.axhline(0.08, color="grey", lw=0.8, ls=":")
        ax.set_xticks(np.arange(len(designs)) + 0.4 - width / 2)
        ax.set_xticklabels(designs, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{test}: {feats}", loc="left", fontsize=9)
    np.atleast_1d(axes)[0].set_ylabel("share of null p < 0.05:\nworst feature (bar), mean (dot)")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, frameon=False, fontsize=8, loc="lower center", ncol=len(labels))
    fig.suptitle(
        "Null cohorts: worst label / state per design and moderation (dashed: nominal 5 %; dotted: 8 %)",
        x=0.01,
        ha="left",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohorts", type=int, default=200)
    ap.add_argument("--power-cohorts", type=int, default=None)
    ap.add_argument("--variants", default=None, help="comma-separated names (default all)")
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    ap.add_argument(
        "--plot-only", action="store_true", help="redraw the figure from OUT/design_calibration.tsv"
    )
    args = ap.parse_args()
    if args.plot_only:
        plot(
            pd.read_csv(args.out / "design_calibration.tsv", sep="\t"),
            args.out / "img" / "design_calibration.png",
        )
        return
    variants = VARIANTS
    if args.variants:
        want = args.variants.split(",")
        unknown = sorted(set(want) - {v[0] for v in VARIANTS})
        if unknown:
            ap.error(f"unknown variant(s) {unknown}; choose from {[v[0] for v in VARIANTS]}")
        variants = [v for v in VARIANTS if v[0] in want]
    cal = pd.concat(
        [
            composition_calibration(args.cohorts, variants),
            state_calibration(args.cohorts, variants),
        ],
        ignore_index=True,
    )
    pw = power(args.power_cohorts or args.cohorts, variants)
    args.out.mkdir(parents=True, exist_ok=True)
    cal.to_csv(args.out / "design_calibration.tsv", sep="\t", index=False)
    pw.to_csv(args.out / "design_power.tsv", sep="\t", index=False)
    plot(cal, args.out / "img" / "design_calibration.png")
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(summary(cal).round(3).to_string(index=False))
        print(
            pw.pivot_table(
                index=["design", "label"], columns="variant", values="found_at_fdr_0.05"
            ).round(2)
        )


if __name__ == "__main__":
    main()
