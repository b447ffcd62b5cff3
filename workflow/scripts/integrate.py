"""Snakemake script (rule integrate): scVI (or Harmony / PCA) latent spaces on shared HVGs.

Reads only what it needs from the merged file (the count layer streamed for the HVGs, then
the HVG columns of the counts and of X) and writes what it adds (HVG columns in var, embeddings,
records) with the merged matrices linked, not copied (sepsis_sc.store).
"""

import logging
from pathlib import Path

import numpy as np

from sepsis_sc import store
from sepsis_sc.data import counts_layer
from sepsis_sc.integrate import ScviParams, integrate, select_hvgs_streamed
from sepsis_sc.utils import dump_yaml, setup_logging

setup_logging(snakemake.log[0])
log = logging.getLogger("integrate")

cfg = snakemake.params.integration
seed = snakemake.params.seed
src = snakemake.input[0]
layer = counts_layer(store.layer_names(src), snakemake.params.counts_layer)
adata = store.read(src)  # obs, var, uns: no matrix
# seurat_v3 from the raw counts, streamed over row chunks of the file
select_hvgs_streamed(adata, src, n_top_genes=cfg["n_hvg"], batch_key=cfg["batch_key"], layer=layer)
if adata.uns["hvg"].get("note"):
    log.info("HVGs: %s", adata.uns["hvg"]["note"])
hvg = adata.var["highly_variable"].to_numpy(dtype=bool)
# the methods see the HVGs only: their raw counts (scVI) and log-normalised X (PCA, Harmony),
# each read only when a method needs it
needs_x = any(m != "scvi" for m in snakemake.params.methods)
needs_counts = "scvi" in snakemake.params.methods
sub = store.read(
    src, X=needs_x, layers=[layer] if needs_counts else [], genes=hvg, obsm=False, obsp=False
)
sub.var = adata.var.loc[sub.var_names]  # the HVG flags (all True here) and their ranks
sub.uns["hvg"] = adata.uns["hvg"]

method_kwargs = {
    "scvi": {
        "params": ScviParams.from_config(cfg),
        "model_dir": snakemake.output.model,
        "threads": snakemake.threads,
        "layer": layer,
    },
    "harmony": {},
    "pca": {},
}
records = {}
main = snakemake.params.methods[0]
for method in snakemake.params.methods:  # the downstream method first
    # comparison methods with nothing to correct (Harmony, one batch level) are skipped
    key = integrate(
        sub,
        method=method,
        batch_key=cfg["batch_key"],
        n_hvg=cfg["n_hvg"],
        n_pcs=cfg["n_pcs"],
        seed=seed,
        comparison=method != main,
        **method_kwargs[method],
    )
    records[method] = dict(sub.uns["integration"], embedding=key)
    if key is None:
        log.info("%s skipped: %s", method, records[method].get("note"))
        continue
    log.info("%s -> obsm[%r] on %s", method, key, records[method].get("device"))
    if records[method].get("note"):
        log.info("%s: %s", method, records[method]["note"])
for key, value in sub.obsm.items():
    adata.obsm[key] = value
if "PCs" in sub.varm:  # PCA loadings: zero for the genes that are not HVGs
    pcs = np.zeros((adata.n_vars, sub.varm["PCs"].shape[1]), dtype=sub.varm["PCs"].dtype)
    pcs[hvg] = sub.varm["PCs"]
    adata.varm["PCs"] = pcs
    adata.uns["pca"] = sub.uns["pca"]
adata.uns["integration"] = records[main]
adata.uns["integration_runs"] = {
    m: {k: v for k, v in r.items() if v is not None} for m, r in records.items()
}
if "scvi" not in records:  # keep the declared output directory even without a scVI model
    marker = Path(snakemake.output.model) / "NOT_TRAINED.txt"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"integration.method is {main!r} and scvi is not compared; no model.\n")
dump_yaml({"method": main, **records[main], "runs": records}, snakemake.output.record)
store.write(adata, snakemake.output.h5ad, source=src, link=store.matrix_keys(src))
