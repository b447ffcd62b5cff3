"""Snakemake script (rule cluster_summary): per-resolution summary with seed stability, and
cluster markers (a side job: nothing downstream of clustering waits for it).

The markers are computed from the log-normalised X in gene blocks read from the file, so
the job never holds the whole matrix (sepsis_sc.cluster.cluster_markers with a
store.FileCounts of X).
"""

from sepsis_sc import store
from sepsis_sc.cluster import cluster_markers, resolution_summary
from sepsis_sc.config import ClusteringSettings
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

settings = ClusteringSettings.from_config(snakemake.params.clustering)
src = snakemake.input[0]
adata = store.read(src, obsm=False)  # obs, var, graphs
summary = resolution_summary(adata, resolutions=settings.resolutions, seed=snakemake.params.seed)
markers = cluster_markers(
    adata, settings, counts=store.FileCounts.matching(src, "X", adata), groupby="leiden"
)
write_table(summary, snakemake.output.resolutions, digits=3)
write_table(markers, snakemake.output.markers)
