"""Neighbourhood differential abundance (sepsis_sc.da): null calibration, planted changes, and
time and memory at cohort scale.

Three parts, each optional::

    python benchmarks/da_calibration.py --null-seeds 10          # demo-shaped null cohorts
    python benchmarks/da_calibration.py --demo results/demo      # planted truth of a demo run
    python benchmarks/da_calibration.py --scale 100000           # time / memory, 100k cells

* ``--null-seeds N``: N null cohorts shaped like the demo (6 sepsis vs 6 control samples of
  1,500 cells, 12,000 genes, no planted effect; ``sepsis_sc.sim.simulate_cohort``), embedded
  with PCA on 2,000 HVGs (not scVI: the demo's integration takes minutes per cohort), run
  through the pipeline's DA. Reports per seed the neighbourhoods tested and those at spatial
  FDR <= ``da.alpha``; the target is none in >= 90 % of seeds.
* ``--demo DIR``: the results folder of a demo run (with its ``data/demo/truth.tsv.gz``):
  recomputes the neighbourhoods exactly as the workflow did (same settings and seed) and
  reads, per neighbourhood, the share of truly planted cells (immature neutrophils, MS1-like
  monocytes, the unnamed zinc-stress programme) against the DA result in ``da/<contrast>``.
* ``--scale N``: N synthetic cells in 20 samples (a 30-dimensional Gaussian mixture of 15
  populations whose shares differ between samples), the time of each step and the peak
  memory of the process.
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

warnings.filterwarnings("ignore")

CONTRAST = ("sepsis_vs_control", "condition", "sepsis", "control")


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _pca_cohort(seed: int, effects: bool, cells: int = 1500, genes: int = 12000):
    from sepsis_sc.sim import cohort_adata, two_arm_sheet

    return cohort_adata(
        two_arm_sheet(6, digits=2),
        cells_per_sample=cells,
        n_genes=genes,
        seed=seed,
        effects=effects,
        target_sum=None,
        n_pcs=30,
        pca_seed=seed,
    )


def null_seeds(n_seeds: int) -> pd.DataFrame:
    from sepsis_sc import da
    from sepsis_sc.design import Contrast, resolve_design, sample_meta

    rows = []
    for seed in range(100, 100 + n_seeds):
        t0 = time.perf_counter()
        adata = _pca_cohort(seed, effects=False)
        da.make_nhoods(adata, use_rep="X_pca", seed=0)
        design = resolve_design(sample_meta(adata), Contrast(*CONTRAST), None)
        res = da.test_nhoods(adata, design)
        rows.append(
            {
                "seed": seed,
                "cells": adata.n_obs,
                "nhoods": len(res),
                "tested": int(res["pvalue"].notna().sum()),
                "significant": int(res["significant"].sum()),
                "min_spatial_fdr": float(res["spatial_fdr"].min()),
                "share_p_below_0.05": float((res["pvalue"] < 0.05).mean()),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def demo_truth(results: Path, truth: Path) -> pd.DataFrame:
    import scipy.sparse as sp

    from sepsis_sc import da, store
    from sepsis_sc.config import DASettings

    settings = DASettings()  # the demo config's (schema defaults), seed 0
    adata = store.read(results / "targets" / "scored.h5ad", obsp=False, obsm=["X_scVI"])
    da.make_nhoods(adata, settings, use_rep="X_scVI", seed=0)
    nh = pd.read_csv(results / "da" / CONTRAST[0] / "nhoods.tsv", sep="\t", index_col=0)
    if len(nh) != adata.obsm["nhoods"].shape[1]:
        raise RuntimeError("the recomputed neighbourhoods differ from the run's (settings?)")
    t = pd.read_csv(truth, sep="\t").set_index("cell_id").reindex(adata.obs_names)
    member = sp.csc_matrix(adata.obsm["nhoods"])
    size = nh["size"].to_numpy(float)
    planted = {
        "immature neutrophils": (t["cell_type"] == "Immature neutrophil").to_numpy(float),
        "MS1-like monocytes": t["ms1_like"].fillna(False).astype(bool).to_numpy(float),
        "zinc-stress CD4 memory T (unnamed)": t["zinc_stress"]
        .fillna(False)
        .astype(bool)
        .to_numpy(float),
    }
    rows = []
    for what, flag in planted.items():
        share = (member.T @ flag) / size
        mostly = nh[share >= 0.5]
        rows.append(
            {
                "planted": what,
                "neighbourhoods >= 50 % planted cells": len(mostly),
                "expanded at spatial FDR <= alpha": int((mostly["direction"] == "expanded").sum()),
                "of them unexplained": int(
                    (mostly["unexplained"].astype(str).str.lower() == "true").sum()
                ),
                "min spatial FDR": float(mostly["spatial_fdr"].min()) if len(mostly) else np.nan,
            }
        )
    return pd.DataFrame(rows)


def scale(n_cells: int, seed: int = 0) -> pd.DataFrame:
    import anndata as ad

    from sepsis_sc import da
    from sepsis_sc.design import Contrast, resolve_design, sample_meta

    rng = np.random.default_rng(seed)
    n_samples, n_pop, dims = 20, 15, 30
    centres = rng.normal(0, 4, (n_pop, dims))
    per = n_cells // n_samples
    emb, obs = [], []
    for s in range(n_samples):
        share = rng.dirichlet(np.full(n_pop, 5.0))
        pop = rng.choice(n_pop, size=per, p=share)
        emb.append(centres[pop] + rng.normal(0, 1, (per, dims)))
        cond = "sepsis" if s % 2 == 0 else "control"
        obs.append(
            pd.DataFrame(
                {"sample_id": f"S{s:02d}", "condition": cond, "donor": f"D{s:02d}", "pop": pop}
            )
        )
    obs = pd.concat(obs, ignore_index=True)
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(obs=obs, obsm={"X_scVI": np.vstack(emb).astype(np.float32)})
    adata.obsm["X_umap"] = adata.obsm["X_scVI"][:, :2]
    adata.obs["cell_type"] = adata.obs["pop"].astype(str)
    times = {}
    t0 = time.perf_counter()
    da.make_nhoods(adata, use_rep="X_scVI", seed=seed)
    times["make_nhoods"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    design = resolve_design(sample_meta(adata), Contrast(*CONTRAST), None)
    res = da.test_nhoods(adata, design)
    times["test_nhoods"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    nh = da.describe_nhoods(adata).join(res.set_index("nhood"))
    nh = da.explain_nhoods(nh)
    da.unexplained_per_sample(adata, nh)
    times["describe_explain"] = time.perf_counter() - t0
    return pd.DataFrame(
        [
            {
                "cells": adata.n_obs,
                "samples": n_samples,
                "nhoods": len(nh),
                **{f"{k}_s": round(v, 1) for k, v in times.items()},
                "total_s": round(sum(times.values()), 1),
                "peak_rss_gb": round(_peak_gb(), 2),
            }
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--null-seeds", type=int, default=0)
    ap.add_argument("--demo", type=Path, help="results/<run> of a demo run")
    ap.add_argument("--truth", type=Path, default=Path("data/demo/truth.tsv.gz"))
    ap.add_argument("--scale", type=int, default=0, help="cells of the scaling run")
    ap.add_argument("--out", type=Path, default=None, help="folder for the tables (TSV)")
    args = ap.parse_args()
    tables = {}
    if args.null_seeds:
        tables["da_null"] = null_seeds(args.null_seeds)
    if args.demo:
        tables["da_demo"] = demo_truth(args.demo, args.truth)
    if args.scale:
        tables["da_scale"] = scale(args.scale)
    for name, tab in tables.items():
        print(f"\n{name}\n{tab.to_string(index=False)}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            tab.to_csv(args.out / f"{name}.tsv", sep="\t", index=False)
    if "da_null" in tables:
        t = tables["da_null"]
        print(
            f"\nnull seeds without a significant neighbourhood: {(t['significant'] == 0).sum()} of {len(t)}"
        )


if __name__ == "__main__":
    main()
