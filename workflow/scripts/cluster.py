"""Snakemake script (rule cluster): kNN graph, multi-resolution Leiden, UMAP, cluster markers."""

import anndata as ad

from sepsis_sc.cluster import cluster_markers, leiden_multi
from sepsis_sc.utils import setup_logging, write_h5ad, write_table

setup_logging(snakemake.log[0])

c = snakemake.params.clustering
adata = ad.read_h5ad(snakemake.input[0])
summary = leiden_multi(
    adata,
    use_rep=snakemake.params.use_rep,
    n_neighbors=c["n_neighbors"],
    resolutions=c["resolutions"],
    default_resolution=c["resolution"],
    seed=snakemake.params.seed,
)
markers = cluster_markers(adata, groupby="leiden", n_genes=c["n_marker_genes"])
write_table(summary, snakemake.output.resolutions)
write_table(markers, snakemake.output.markers)
write_h5ad(adata, snakemake.output.h5ad)
