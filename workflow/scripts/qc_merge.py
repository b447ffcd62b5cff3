"""Snakemake script (rule qc_merge): merge the QC-filtered samples and log-normalise."""

import anndata as ad
import pandas as pd

from sepsis_sc.qc import merge_samples, normalize
from sepsis_sc.utils import setup_logging, write_h5ad, write_table

setup_logging(snakemake.log[0])

summary = pd.concat([pd.read_csv(p, sep="\t") for p in snakemake.input.summaries])
kept = [p for p, n in zip(snakemake.input.h5ad, summary["cells_out"], strict=True) if n > 0]
adata = merge_samples(  # a generator: one sample in memory at a time besides the merged counts
    (ad.read_h5ad(p) for p in kept), min_cells_per_gene=snakemake.params.min_cells_per_gene
)
normalize(adata)
write_table(summary, snakemake.output.summary)
write_h5ad(adata, snakemake.output.h5ad)
