"""Snakemake script (rule integrate): scVI (or Harmony / PCA) latent spaces on shared HVGs.

Reads only what it needs from the merged file (the count layer streamed for the HVGs, then
the HVG columns of the counts and of X) and writes what it adds (HVG columns in var, embeddings,
records) with the merged matrices linked, not copied (sepsis_sc.store).
"""

import logging
from pathlib import Path

import numpy as np

from sepsis_sc import store
from sepsis_sc.config import IntegrationSettings
from sepsis_sc.data import counts_layer
from sepsis_sc.integrate import integrate_methods, select_hvgs
from sepsis_sc.utils import dump_yaml, setup_logging

setup_logging(snakemake.log[0])
log = logging.getLogger("integrate")

settings = IntegrationSettings.from_config(snakemake.params.integration)
methods = snakemake.params.methods  # the downstream method first
src = snakemake.input[0]
layer = counts_layer(store.layer_names(src), snakemake.params.counts_layer)
adata = store.read(src)  # obs, var, uns: no matrix
# seurat_v3 from the raw counts, streamed over row chunks of the file
select_hvgs(adata, settings, counts=store.FileCounts.matching(src, layer, adata), layer=layer)
if adata.uns["hvg"].get("note"):
    log.info("HVGs: %s", adata.uns["hvg"]["note"])
hvg = adata.var["highly_variable"].to_numpy(dtype=bool)
# the methods see the HVGs only: their raw counts (scVI) and log-normalised X (PCA, Harmony),
# each read only when a method needs it
sub = store.read(
    src,
    X=any(m != "scvi" for m in methods),
    layers=[layer] if "scvi" in methods else [],
    genes=hvg,
    obsm=False,
    obsp=False,
)
sub.var = adata.var.loc[sub.var_names]  # the HVG flags (all True here) and their ranks
sub.uns["hvg"] = adata.uns["hvg"]
# comparison methods with nothing to correct (Harmony, one batch level) are skipped
scvi = {"model_dir": snakemake.output.model, "threads": snakemake.threads, "layer": layer}
records = integrate_methods(
    sub, settings, methods=methods, seed=snakemake.params.seed, method_kwargs={"scvi": scvi}
)
for key, value in sub.obsm.items():
    adata.obsm[key] = value
if "PCs" in sub.varm:  # PCA loadings: zero for the genes that are not HVGs
    pcs = np.zeros((adata.n_vars, sub.varm["PCs"].shape[1]), dtype=sub.varm["PCs"].dtype)
    pcs[hvg] = sub.varm["PCs"]
    adata.varm["PCs"] = pcs
    adata.uns["pca"] = sub.uns["pca"]
adata.uns["integration"] = sub.uns["integration"]
adata.uns["integration_runs"] = sub.uns["integration_runs"]
if "scvi" not in records:  # keep the declared output directory even without a scVI model
    marker = Path(snakemake.output.model) / "NOT_TRAINED.txt"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"integration.method is {methods[0]!r} and scvi is not compared; no model.\n")
dump_yaml({"method": methods[0], **records[methods[0]], "runs": records}, snakemake.output.record)
store.write(adata, snakemake.output.h5ad, source=src, link=store.matrix_keys(src))
