"""Snakemake script (rule cluster): kNN graph, multi-resolution Leiden, UMAP.

Reads obs and the embeddings only; writes the clusters, graphs and UMAP with the count
matrices linked to the merged file (sepsis_sc.store).
"""

from sepsis_sc import store
from sepsis_sc.cluster import leiden_multi
from sepsis_sc.config import ClusteringSettings
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])

src = snakemake.input[0]
adata = store.read(src, obsp=False)
leiden_multi(
    adata,
    ClusteringSettings.from_config(snakemake.params.clustering),
    use_rep=snakemake.params.use_rep,
    seed=snakemake.params.seed,
    n_stability_runs=0,  # the seed-stability runs are in rule cluster_summary, off the critical path
)
store.write(adata, snakemake.output.h5ad, source=src, link=store.matrix_keys(src))
