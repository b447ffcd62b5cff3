"""Reference for the scaling benchmark: the pipeline's core steps as one plain scanpy script.

One process, no intermediate files: read the per-sample 10x HDF5 files, QC metrics and
per-sample MAD filters, Scrublet per sample, gene filter, normalise, HVGs across batches,
scVI with a fixed number of epochs, kNN graph, Leiden at every configured resolution, UMAP,
cluster markers (Wilcoxon), lineage marker scores and therapy-target signature scores
(``sc.tl.score_genes``), a plain cell-type call (best lineage set, then the best of its
subset sets) and the pipeline's pseudobulk DE on it (``sepsis_sc.de.pseudobulk_de``: PyDESeq2
per cell type and lineage, the same gates and settings; DE has no scanpy equivalent, and the
pipeline has run it since 2026-12-01, so a reference without it would not do the same work).
Parameters come from the same config file the pipeline reads, so
both do the same work with the same settings (exact kNN for Scrublet and for the graph up to
the pipeline's cut-offs, scVI batch size from the config); what the pipeline adds on top (rescue of low-RNA immune cells,
subset annotation with an Unassigned outcome, UCell within parent populations, sample-level
statistics, patient profiles, figures, provenance) is the price of its outputs and shows up in the ratio.

Usage::

    python benchmarks/reference_scanpy.py --config config/config.yaml --samples SHEET \
        --epochs 10 --out timings.json [--config-override KEY=VALUE ...]

Prints and writes a JSON record: seconds per step, total seconds, peak resident memory (GB),
cells and genes after QC.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


@contextmanager
def _step(timings: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 2)
    print(f"{name:>12s} {timings[name]:8.1f} s   peak {_peak_gb():5.2f} GB", flush=True)


def _mad_outlier(x: np.ndarray, nmads: float, upper_only: bool = False) -> np.ndarray:
    med = np.median(x)
    mad = np.median(np.abs(x - med)) * 1.4826
    high = x > med + nmads * mad
    return high if upper_only else high | (x < med - nmads * mad)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--samples", required=True, help="sample sheet (sample_id, batch, path, ...)")
    ap.add_argument("--epochs", type=int, required=True, help="scVI epochs (fixed, no early stop)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON file for the timings")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    with _step(timings, "import"):
        import anndata as ad
        import pandas as pd
        import scanpy as sc
        import scvi
        import torch
        import yaml

    from sepsis_sc.config import load_config

    cfg = load_config(args.config)  # with the schema's defaults (the DE and stats keys)
    qc, integ, clus = cfg["qc"], cfg["integration"], cfg["clustering"]
    organism = cfg.get("organism", "human")
    seed = int(cfg.get("seed", 0))
    sheet = pd.read_csv(args.samples, sep="\t", dtype=str)
    torch.set_num_threads(args.threads)

    with _step(timings, "read"):
        parts = []
        for row in sheet.to_dict("records"):
            a = sc.read_10x_h5(row["path"])
            a.var_names_make_unique()
            a.obs_names = [f"{row['sample_id']}_{b}" for b in a.obs_names]
            for col in ("sample_id", "condition", "batch", "donor"):
                a.obs[col] = row[col]
            parts.append(a)
        adata = ad.concat(parts, join="outer", merge="same")
        del parts
        adata.X = adata.X.tocsr()

    with _step(timings, "qc"):
        mt_prefix = "MT-" if organism == "human" else "mt-"
        adata.var["mt"] = adata.var_names.str.startswith(mt_prefix)
        sc.pp.calculate_qc_metrics(
            adata, qc_vars=["mt"], percent_top=None, log1p=True, inplace=True
        )
        keep = np.ones(adata.n_obs, dtype=bool)
        for _, idx in adata.obs.groupby("sample_id", observed=True).indices.items():
            o = adata.obs.iloc[idx]
            bad = _mad_outlier(o["log1p_total_counts"].to_numpy(), qc["nmads_counts"])
            bad |= _mad_outlier(o["log1p_n_genes_by_counts"].to_numpy(), qc["nmads_genes"])
            mt = o["pct_counts_mt"].to_numpy()
            med = np.median(mt)
            mt_cut = max(
                med + qc["nmads_mt"] * np.median(np.abs(mt - med)) * 1.4826,
                qc.get("mt_threshold_floor") or 0,
            )
            if qc.get("max_pct_mt") is not None:
                mt_cut = min(mt_cut, qc["max_pct_mt"])
            bad |= mt > mt_cut
            keep[idx] = ~bad
        adata = adata[keep].copy()

    with _step(timings, "doublets"):
        # a fixed score threshold: scanpy's automatic one needs scikit-image (not a dependency);
        # the pipeline's own per-sample threshold is computed the same cheap way (histogram)
        # exact kNN, as the pipeline uses for samples of <= 30,000 cells (faster than pynndescent
        # at these sizes, so the reference is not slowed by a setting the pipeline avoids)
        sc.pp.scrublet(
            adata,
            batch_key="sample_id",
            threshold=0.25,
            random_state=seed,
            use_approx_neighbors=False,
        )
        adata = adata[~adata.obs["predicted_doublet"].to_numpy(bool)].copy()
        sc.pp.filter_genes(adata, min_cells=qc.get("min_cells_per_gene", 3))

    with _step(timings, "normalise"):
        adata.layers["counts"] = adata.X.copy()
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.highly_variable_genes(
            adata,
            n_top_genes=integ["n_hvg"],
            flavor="seurat_v3",
            layer="counts",
            batch_key=integ["batch_key"],
        )

    with _step(timings, "scvi"):
        scvi.settings.seed = seed
        hvg = adata[:, adata.var["highly_variable"]].copy()
        scvi.model.SCVI.setup_anndata(hvg, layer="counts", batch_key=integ["batch_key"])
        model = scvi.model.SCVI(hvg, n_latent=integ["n_latent"], n_layers=2)
        model.train(
            max_epochs=args.epochs,
            batch_size=args.batch_size or integ["batch_size"],
            early_stopping=False,
            accelerator="cpu",
            enable_progress_bar=False,
        )
        adata.obsm["X_scVI"] = model.get_latent_representation()
        del hvg, model

    with _step(timings, "neighbors"):
        # the pipeline's rule (exact kNN up to sepsis_sc.cluster.EXACT_KNN_MAX_CELLS cells,
        # pynndescent above), so both build the same graph
        from sepsis_sc.cluster import EXACT_KNN_MAX_CELLS

        exact = adata.n_obs <= EXACT_KNN_MAX_CELLS
        sc.pp.neighbors(
            adata,
            n_neighbors=clus["n_neighbors"],
            use_rep="X_scVI",
            random_state=seed,
            transformer="sklearn" if exact else "pynndescent",
        )

    with _step(timings, "leiden"):
        for res in clus["resolutions"]:
            sc.tl.leiden(
                adata,
                resolution=res,
                flavor="igraph",
                n_iterations=2,
                directed=False,
                random_state=seed,
                key_added=f"leiden_r{res}",
            )
        adata.obs["leiden"] = adata.obs[f"leiden_r{clus['resolution']}"]

    with _step(timings, "umap"):
        sc.tl.umap(adata, random_state=seed)

    with _step(timings, "markers"):
        sc.tl.rank_genes_groups(adata, "leiden", method="wilcoxon", n_genes=clus["n_marker_genes"])

    repo = Path(__file__).resolve().parents[1]
    with _step(timings, "scoring"):
        markers = yaml.safe_load((repo / f"resources/markers/{organism}.yaml").read_text())
        genes = set(adata.var_names)
        lineage_scores = {}
        for s in markers["lineage_sets"]:
            up = [g for g in s["up"] if g in genes]
            if len(up) >= 2:
                sc.tl.score_genes(adata, up, score_name="_s", random_state=seed)
                lineage_scores[s["name"]] = adata.obs.pop("_s").to_numpy()
        names = list(lineage_scores)
        adata.obs["lineage_set"] = np.array(names)[
            np.argmax(np.column_stack([lineage_scores[n] for n in names]), axis=1)
        ]
        # a plain cell-type call for the DE levels: the lineage of the best lineage set, then
        # the best of that lineage's subset sets (no Unassigned outcome, no re-embedding)
        from sepsis_sc.annotate import load_vocabulary

        vocab = load_vocabulary()
        set_lineage = {s["name"]: s["lineage"] for s in markers["lineage_sets"]}
        adata.obs["lineage"] = adata.obs["lineage_set"].map(set_lineage).astype(str)
        cell_type = adata.obs["lineage"].to_numpy(dtype=object).copy()
        subset_scores: dict[str, dict[str, np.ndarray]] = {}
        for s in markers["subset_sets"]:
            up = [g for g in s["up"] if g in genes]
            if len(up) >= 2:
                sc.tl.score_genes(adata, up, score_name="_s", random_state=seed)
                lin = vocab.lineage_of(s["cell_type"])
                best = subset_scores.setdefault(lin, {})
                score = adata.obs.pop("_s").to_numpy()
                prev = best.get(s["cell_type"])
                best[s["cell_type"]] = score if prev is None else np.maximum(prev, score)
        for lin, by_type in subset_scores.items():
            rows = np.flatnonzero(adata.obs["lineage"].to_numpy() == lin)
            types = list(by_type)
            pick = np.argmax(np.column_stack([by_type[t][rows] for t in types]), axis=1)
            cell_type[rows] = np.array(types, dtype=object)[pick]
        adata.obs["cell_type"] = pd.Categorical(cell_type)
        sigs = yaml.safe_load((repo / f"resources/signatures/{organism}.yaml").read_text())
        for s in sigs:
            up = [g for g in s["up"] if g in genes]
            if len(up) >= 2:
                sc.tl.score_genes(adata, up, score_name=f"{s['name']}_score", random_state=seed)

    de_cfg = cfg["de"]
    n_fits = 0
    if de_cfg.get("enabled", True):
        with _step(timings, "de"):
            # the pipeline's pseudobulk DE (PyDESeq2 per label, the same gates and settings),
            # run in this process on the in-memory counts: DE has no scanpy equivalent
            from sepsis_sc.config import DESettings
            from sepsis_sc.de import pseudobulk_de
            from sepsis_sc.design import parse_contrasts, resolve_design, sample_meta

            stats_cfg = cfg["stats"]
            contrast = parse_contrasts(cfg)[0]
            design = resolve_design(
                sample_meta(adata),
                contrast,
                contrast.design or stats_cfg.get("design"),
                paired=stats_cfg.get("paired"),
            )
            _, summary = pseudobulk_de(
                adata,
                design,
                DESettings.from_config(de_cfg),
                n_cpus=args.threads,
                alpha=stats_cfg["alpha"],
                layer="counts",
            )
            n_fits = int((summary["status"] == "tested").sum())

    record = {
        "steps": timings,
        "de_fits": n_fits,
        "total_s": round(time.perf_counter() - t_start, 2),
        "peak_rss_gb": round(_peak_gb(), 3),
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "epochs": args.epochs,
    }
    print(json.dumps(record, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
