"""Snakemake script (rule qc_merge): leave out samples too small for the sample-level tests,
merge the QC-filtered samples and log-normalise."""

import sys

import anndata as ad
import pandas as pd

from sepsis_sc.qc import merge_samples, normalize, select_samples
from sepsis_sc.utils import setup_logging, write_h5ad, write_table

setup_logging(snakemake.log[0])

summary = pd.concat([pd.read_csv(p, sep="\t") for p in snakemake.input.summaries])
summary = select_samples(
    summary, min_cells=snakemake.params.min_cells_per_sample, on_small=snakemake.params.on_small
)
for sid, why in zip(summary["sample_id"], summary["excluded_reason"], strict=True):
    if why:
        print(f"sepsis-sc: sample {sid} left out of the cohort: {why}", file=sys.__stderr__)
kept = [p for p, keep in zip(snakemake.input.h5ad, summary["included"], strict=True) if keep]
adata = merge_samples(  # a generator: one sample in memory at a time besides the merged counts
    (ad.read_h5ad(p) for p in kept), min_cells_per_gene=snakemake.params.min_cells_per_gene
)
adata.uns["excluded_samples"] = {
    str(s): str(w) for s, w in zip(summary["sample_id"], summary["excluded_reason"]) if w
}
normalize(adata, layer=snakemake.params.downstream_layer)
write_table(summary, snakemake.output.summary, digits=3)
write_h5ad(adata, snakemake.output.h5ad)
