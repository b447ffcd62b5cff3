"""Snakemake script (rule integrate): scVI (or Harmony / PCA) latent spaces on shared HVGs."""

import logging
from pathlib import Path

import anndata as ad

from sepsis_sc.data import counts_layer
from sepsis_sc.integrate import ScviParams, integrate, select_hvgs
from sepsis_sc.utils import dump_yaml, setup_logging, write_h5ad

setup_logging(snakemake.log[0])
log = logging.getLogger("integrate")

cfg = snakemake.params.integration
seed = snakemake.params.seed
adata = ad.read_h5ad(snakemake.input[0])
layer = counts_layer(adata, snakemake.params.counts_layer)
select_hvgs(adata, n_top_genes=cfg["n_hvg"], batch_key=cfg["batch_key"], layer=layer)
if adata.uns["hvg"].get("note"):
    log.info("HVGs: %s", adata.uns["hvg"]["note"])

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
        adata,
        method=method,
        batch_key=cfg["batch_key"],
        n_hvg=cfg["n_hvg"],
        n_pcs=cfg["n_pcs"],
        seed=seed,
        comparison=method != main,
        **method_kwargs[method],
    )
    records[method] = dict(adata.uns["integration"], embedding=key)
    if key is None:
        log.info("%s skipped: %s", method, records[method].get("note"))
        continue
    log.info("%s -> obsm[%r] on %s", method, key, records[method].get("device"))
    if records[method].get("note"):
        log.info("%s: %s", method, records[method]["note"])

adata.uns["integration"] = records[main]
adata.uns["integration_runs"] = {m: {k: v for k, v in r.items() if v is not None} for m, r in records.items()}
if "scvi" not in records:  # keep the declared output directory even without a scVI model
    marker = Path(snakemake.output.model) / "NOT_TRAINED.txt"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"integration.method is {main!r} and scvi is not compared; no model.\n")
dump_yaml({"method": main, **records[main], "runs": records}, snakemake.output.record)
write_h5ad(adata, snakemake.output.h5ad)
