"""Snakemake script (rule cluster_summary): per-resolution summary with seed stability, and
cluster markers (a side job: nothing downstream of clustering waits for it)."""

import anndata as ad

from sepsis_sc.cluster import cluster_markers, resolution_summary
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

c = snakemake.params.clustering
adata = ad.read_h5ad(snakemake.input[0])
summary = resolution_summary(adata, resolutions=c["resolutions"], seed=snakemake.params.seed)
markers = cluster_markers(adata, groupby="leiden", n_genes=c["n_marker_genes"])
write_table(summary, snakemake.output.resolutions, digits=3)
write_table(markers, snakemake.output.markers)
