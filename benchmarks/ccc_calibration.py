"""Therapy axes (sepsis_sc.ccc): null calibration, power on the planted axis, and per-sample
time and memory on a real run's file and at cohort scale.

Parts, each optional::

    python benchmarks/ccc_calibration.py --null-seeds 10 --power-seeds 10
    python benchmarks/ccc_calibration.py --h5ad results/demo/targets/scored.h5ad
    python benchmarks/ccc_calibration.py --scale 100000 --liana-samples 5 \\
        --like results/demo/targets/scored.h5ad

* ``--null-seeds N`` / ``--power-seeds N``: demo-shaped cohorts (6 sepsis vs 6 control
  samples of ``--cells`` cells, 12,000 genes; ``sepsis_sc.sim.simulate_cohort`` without / with
  its planted effects; truth labels as the annotation), axis scores and the sample-level test
  of every axis (``stats`` defaults). Null: axes at FDR <= 0.05 per seed (target: none in
  >= 90 % of seeds). Power: the share of seeds in which each axis reaches FDR <= 0.05 (the
  PD-L1 -> PD-1 axis is planted through the hla_low monocytes' CD274 and the exhausted
  T cells' PDCD1).
* ``--h5ad FILE``: a scored file of a run (``targets/scored.h5ad``): read as rule
  ccc_scores reads it (obs and the genes of LIANA's resource only), axis scores and LIANA per
  sample (on the first ``--liana-samples`` samples when given); the time of each sample and
  the peak memory.
* ``--scale N``: N log-normalised cells written to a temporary ``.h5ad`` and measured as
  ``--h5ad`` in a fresh process (its peak memory is the stage's, not the builder's): with
  ``--like FILE`` a run's scored cells tiled (each copy of a sample a new sample: real
  expression), else synthetic (the resource's genes, 1,000 cells per sample, 15 cell types
  in 6 lineages, each gene detected in a type-specific share of the cells).
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import numpy as np
import pandas as pd

warnings.filterwarnings("ignore")


def _peak_gb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss it does not carry the
    parent's pages over a fork + exec, so the --scale child measures itself)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def sim_cohort(seed: int, effects: bool, cells: int = 1500, genes: int = 12000, n_per: int = 6):
    """A demo-shaped simulated cohort, log-normalised, truth cell types and lineages in obs."""
    from sepsis_sc.sim import cohort_adata, two_arm_sheet

    return cohort_adata(
        two_arm_sheet(n_per, digits=2),
        cells_per_sample=cells,
        n_genes=genes,
        seed=seed,
        effects=effects,
        doublets=False,
        low_quality_rate=0.0,
    )


def axes_result(adata) -> pd.DataFrame:
    """Axis scores and the sample-level test of every axis (sepsis vs control)."""
    from sepsis_sc import ccc
    from sepsis_sc.design import Contrast

    scores = ccc.axis_scores(adata)
    meta = adata.obs[["sample_id", "condition", "donor"]].drop_duplicates()
    return ccc.test_axes(
        scores,
        meta=meta.set_index("sample_id"),
        contrast=Contrast("sepsis_vs_control", "condition", "sepsis", "control"),
    )


def calibration(null_seeds: int, power_seeds: int, cells: int, genes: int = 12000) -> None:
    for effects, n in ((False, null_seeds), (True, power_seeds)):
        hits = []
        for seed in range(n):
            t0 = time.perf_counter()
            res = axes_result(sim_cohort(seed, effects, cells=cells, genes=genes))
            sig = res.loc[res["fdr"] <= 0.05, "axis"].tolist()
            hits.append(sig)
            print(
                f"{'planted' if effects else 'null'} seed {seed}: {int(res['fdr'].notna().sum())}"
                f" axes tested, at FDR <= 0.05: {sig or 'none'} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        if not n:
            continue
        if effects:
            axes = sorted({a for h in hits for a in h})
            for a in axes:
                print(f"power of {a}: {sum(a in h for h in hits)}/{n} seeds at FDR <= 0.05")
        else:
            print(f"null seeds without any axis at FDR <= 0.05: {sum(not h for h in hits)}/{n}")


def on_file(path: str, n_perms: int, liana_samples: int = 0) -> None:
    import liana as li

    from sepsis_sc import ccc, store

    t0 = time.perf_counter()
    light = store.read(path, obsm=False, obsp=False, uns=False)
    res = li.resource.select_resource("consensus")
    genes = {g for c in ("ligand", "receptor") for x in res[c] for g in x.split("_")}
    genes |= set(ccc.axis_genes(ccc.load_axes()))
    keep = [g for g in light.var_names if g in genes]
    adata = store.read(path, X=True, obsm=False, obsp=False, uns=False, genes=keep)
    n_samples = adata.obs["sample_id"].nunique()
    print(
        f"read {adata.n_obs} cells x {adata.n_vars} genes ({n_samples} samples) as rule "
        f"ccc_scores does: {time.perf_counter() - t0:.1f} s, peak {_peak_gb():.2f} GB"
    )
    t0 = time.perf_counter()
    ccc.axis_scores(adata)
    dt = time.perf_counter() - t0
    print(f"axis scores: {dt:.2f} s ({1000 * dt / n_samples:.0f} ms per sample)")
    if liana_samples:
        first = sorted(adata.obs["sample_id"].unique())[:liana_samples]
        adata = adata[adata.obs["sample_id"].isin(first)].copy()
    t0 = time.perf_counter()
    lr = ccc.liana_by_sample(adata, n_perms=n_perms)
    cpu = time.process_time()
    per = pd.Series(lr.attrs["seconds"])
    n_cells = adata.obs["sample_id"].value_counts()
    print(
        f"LIANA on {len(per)} samples ({int(n_cells.median())} cells median): median "
        f"{per.median():.1f} s, max {per.max():.1f} s wall per sample, total "
        f"{time.perf_counter() - t0:.0f} s; process CPU so far {cpu:.0f} s; "
        f"peak memory {_peak_gb():.2f} GB"
    )


def _tiled(like: str, n_cells: int):
    """A run's scored cells (the LIANA resource's genes) copied until there are ``n_cells``:
    every copy of a sample is a new sample (real expression, cohort-scale sample count)."""
    import anndata as ad
    import liana as li

    from sepsis_sc import ccc, store

    res = li.resource.select_resource("consensus")
    genes = {g for c in ("ligand", "receptor") for x in res[c] for g in x.split("_")}
    genes |= set(ccc.axis_genes(ccc.load_axes()))
    light = store.read(like, obsm=False, obsp=False, uns=False)
    keep = [g for g in light.var_names if g in genes]
    src = store.read(like, X=True, obsm=False, obsp=False, uns=False, genes=keep)
    src.obs = src.obs[["sample_id", "cell_type", "lineage"]].astype(str)
    copies = []
    for i in range(-(-n_cells // src.n_obs)):
        c = src.copy()
        c.obs["sample_id"] = c.obs["sample_id"] + f"_x{i}"
        c.obs_names = c.obs_names + f"_x{i}"
        copies.append(c)
    return ad.concat(copies)[:n_cells].copy()


def scale(n_cells: int, liana_samples: int, n_perms: int, like: str | None = None) -> None:
    """Write N log-normalised cells (``like``: a run's scored file tiled; else synthetic) to
    a temporary .h5ad, then measure rule ccc_scores' work on it in a fresh process (its peak
    memory is the stage's, not the builder's)."""
    if like:
        import subprocess
        import sys
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/scaled.h5ad"
            a = _tiled(like, n_cells)
            a.write_h5ad(path)
            print(f"{a.n_obs} cells ({like} tiled) x {a.n_vars} genes written")
            del a
            cmd = [sys.executable, __file__, "--h5ad", path, "--liana-samples", str(liana_samples)]
            subprocess.run([*cmd, "--n-perms", str(n_perms)], check=True)
        return
    seed = 0
    import subprocess
    import sys
    import tempfile

    import anndata as ad
    import liana as li
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    res = li.resource.select_resource("consensus")
    genes = sorted({g for c in ("ligand", "receptor") for x in res[c] for g in x.split("_")})
    lineages = {
        "Monocyte": ["Classical monocyte", "Non-classical monocyte"],
        "T": ["CD4 naive T", "CD4 memory T", "CD8 naive T", "CD8 effector/memory T", "Treg"],
        "NK": ["NK CD56dim", "NK CD56bright"],
        "B": ["naive B", "memory B"],
        "DC": ["cDC2", "pDC"],
        "Neutrophil": ["Mature neutrophil", "Immature neutrophil"],
    }
    types = [(lin, t) for lin, ts in lineages.items() for t in ts]
    k = rng.integers(0, len(types), n_cells)
    n_samples = max(2, n_cells // 1000)
    # log-normalised expression: each gene detected in a type-specific share of its cells
    # (Beta(0.3, 3): ~9 % on average, a few genes in most cells of a type, as ligands and
    # receptors in PBMC), at a log level of 0.7-2.5
    order = np.argsort(k, kind="stable")
    blocks = []
    for t in range(len(types)):
        n_t = int((k == t).sum())
        detect = rng.beta(0.3, 3.0, len(genes)).astype(np.float32)
        mask = rng.random((n_t, len(genes)), dtype=np.float32) < detect
        block = sp.csr_matrix(mask, dtype=np.float32)
        block.data = np.log1p(rng.poisson(3.0, block.nnz) + 1.0).astype(np.float32)
        blocks.append(block)
    x = sp.vstack(blocks, format="csr")[np.argsort(order)]
    obs = pd.DataFrame(
        {
            "sample_id": [f"S{i:03d}" for i in rng.integers(0, n_samples, n_cells)],
            "cell_type": [types[i][1] for i in k],
            "lineage": [types[i][0] for i in k],
        },
        index=[f"c{i}" for i in range(n_cells)],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/scaled.h5ad"
        ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
        print(f"{n_cells} synthetic cells x {len(genes)} genes, {n_samples} samples written")
        cmd = [sys.executable, __file__, "--h5ad", path, "--liana-samples", str(liana_samples)]
        subprocess.run([*cmd, "--n-perms", str(n_perms)], check=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--null-seeds", type=int, default=0)
    ap.add_argument("--power-seeds", type=int, default=0)
    ap.add_argument("--cells", type=int, default=1500, help="cells per simulated sample")
    ap.add_argument("--genes", type=int, default=12000, help="genes of the simulated cohorts")
    ap.add_argument("--h5ad", default=None, help="a run's targets/scored.h5ad")
    ap.add_argument("--scale", type=int, default=0, help="cells at scale")
    ap.add_argument("--like", default=None, help="--scale: tile this scored file's cells")
    ap.add_argument(
        "--liana-samples", type=int, default=0, help="LIANA on the first N samples (0: all)"
    )
    ap.add_argument("--n-perms", type=int, default=100)
    a = ap.parse_args(argv)
    if a.null_seeds or a.power_seeds:
        calibration(a.null_seeds, a.power_seeds, a.cells, a.genes)
    if a.h5ad:
        on_file(a.h5ad, a.n_perms, a.liana_samples if a.scale == 0 and a.liana_samples else 0)
    if a.scale:
        scale(a.scale, a.liana_samples, a.n_perms, a.like)


if __name__ == "__main__":
    main()
