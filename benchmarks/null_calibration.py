"""False-positive rate of the sample-level statistics over many null cohorts.

One null demo run (``config/demo_null.yaml``) is a single draw: with ~70 correlated tests, a
perfectly calibrated analysis exceeds 5 % of p < 0.05 in a good share of draws. This script
estimates the rate properly: it simulates ``--seeds`` cohorts with the demo design and no
planted effects, takes the simulator's true cell types as the annotation (so it measures the
statistics, not QC or annotation), then runs the pipeline's own scoring and statistics
(``score_states``, ``sample_table``, ``condition_effects``, ``composition_test`` with the demo
config's settings) and counts p-values below 0.05 and FDR hits per cohort.

Usage::

    python benchmarks/null_calibration.py --seeds 10 [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]


def one_cohort(seed: int, cfg: dict, n_genes: int) -> dict:
    import anndata as ad

    from sepsis_sc.qc import normalize
    from sepsis_sc.score import score_states
    from sepsis_sc.sim import null_calibration, simulate_cohort
    from sepsis_sc.stats import composition_test, condition_effects, sample_table

    sheet = pd.read_csv(REPO / "config/samples.tsv", sep="\t")
    adatas, truth = simulate_cohort(
        sheet,
        cells_per_sample=cfg["demo"]["cells_per_sample"],
        n_genes=n_genes,
        effects=False,
        seed=seed,
    )
    adata = ad.concat(list(adatas.values()), merge="same")
    t = truth.set_index("cell_id").loc[adata.obs_names]
    keep = ~(t["is_doublet"].to_numpy(bool) | t["is_low_quality"].to_numpy(bool))
    adata = adata[keep].copy()
    for col in ("lineage", "cell_type"):
        adata.obs[col] = pd.Categorical(t.loc[adata.obs_names, col].to_numpy())
    adata.layers["counts"] = adata.X.copy()
    normalize(adata)
    sc_cfg, st = cfg["scoring"], cfg["stats"]
    score_states(
        adata,
        organism="human",
        min_genes_fraction=sc_cfg["min_genes_fraction"],
        min_cells_parent=st["min_cells"],
        max_rank=sc_cfg["max_rank"],
        call_rule=sc_cfg["call_rule"],
        call_quantile=sc_cfg["call_quantile"],
        control="control",
    )
    table = sample_table(adata, min_cells=st["min_cells"])
    effects = condition_effects(table, case="sepsis", control="control", test=st["test"])
    comp = pd.concat(
        [
            composition_test(adata, case="sepsis", control="control", level=lv)
            for lv in ("lineage", "cell_type")
        ]
    )
    summary = null_calibration(effects, comp, alpha=0.05)
    return {
        "seed": seed,
        "n_tests": summary["n_tests"],
        "n_p_below_0.05": summary["n_p_below_alpha"],
        "fraction_p_below_0.05": round(summary["fraction_p_below_alpha"], 4),
        "n_fdr_below_0.05": summary["n_fdr_below_alpha"],
    }


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=100, help="seeds not used by the demo")
    ap.add_argument("--n-genes", type=int, default=4000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/out")
    args = ap.parse_args(argv)
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        rows.append(one_cohort(seed, cfg, args.n_genes))
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    total = {
        "seed": "all",
        "n_tests": int(df["n_tests"].sum()),
        "n_p_below_0.05": int(df["n_p_below_0.05"].sum()),
        "fraction_p_below_0.05": round(float(df["n_p_below_0.05"].sum() / df["n_tests"].sum()), 4),
        "n_fdr_below_0.05": int(df["n_fdr_below_0.05"].sum()),
    }
    df = pd.concat([df, pd.DataFrame([total])], ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "null_calibration.tsv", sep="\t", index=False)
    print(df.to_string(index=False))
    print(
        f"cohorts with more than 1 in 20 tests at p < 0.05: "
        f"{int((df['fraction_p_below_0.05'].iloc[:-1] > 0.05).sum())} of {args.seeds}"
    )
    return df


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main(sys.argv[1:])
