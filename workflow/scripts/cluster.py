"""Snakemake script (rule cluster): kNN graph, multi-resolution Leiden, UMAP."""

import anndata as ad

from sepsis_sc.cluster import leiden_multi
from sepsis_sc.utils import setup_logging, write_h5ad

setup_logging(snakemake.log[0])

c = snakemake.params.clustering
adata = ad.read_h5ad(snakemake.input[0])
leiden_multi(
    adata,
    use_rep=snakemake.params.use_rep,
    n_neighbors=c["n_neighbors"],
    resolutions=c["resolutions"],
    default_resolution=c["resolution"],
    seed=snakemake.params.seed,
    n_stability_runs=0,  # the seed-stability runs are in rule cluster_summary, off the critical path
)
write_h5ad(adata, snakemake.output.h5ad)
