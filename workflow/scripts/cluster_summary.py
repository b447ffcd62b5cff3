"""Snakemake script (rule cluster_summary): per-resolution summary with seed stability, and
cluster markers (a side job: nothing downstream of clustering waits for it).

The markers are computed from the log-normalised X in gene blocks read from the file, so
the job never holds the whole matrix (sepsis_sc.cluster.cluster_markers_streamed).
"""

from sepsis_sc import store
from sepsis_sc.cluster import cluster_markers_streamed, resolution_summary
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

c = snakemake.params.clustering
src = snakemake.input[0]
adata = store.read(src, obsm=False)  # obs, var, graphs
summary = resolution_summary(adata, resolutions=c["resolutions"], seed=snakemake.params.seed)
markers = cluster_markers_streamed(adata, src, groupby="leiden", n_genes=c["n_marker_genes"])
write_table(summary, snakemake.output.resolutions, digits=3)
write_table(markers, snakemake.output.markers)
