"""Clustering: kNN graph on the integrated space, Leiden at several resolutions, UMAP, markers.

The stage reads the integrated AnnData (``obsm["X_scVI"]`` or another latent space) and adds

- ``obsp["connectivities"]``, ``obsp["distances"]``, ``uns["neighbors"]`` (kNN graph, built once);
- ``obs["leiden_r{res}"]`` for each resolution tried and ``obs["leiden"]`` (the chosen one);
- ``obsm["X_umap"]`` (seeded);
- ``uns["leiden_multi"]`` (settings and the chosen resolution);
- ``uns["rank_genes_{groupby}"]`` (:func:`cluster_markers`).

Clusters are kept as cluster IDs; cell-type labels are added by ``sepsis_sc.annotate`` in
separate columns. The resolution is an explicit analyst choice (config
``clustering.resolution``); :func:`resolution_summary` gives the numbers to make it:
number of clusters, modularity, smallest cluster, and two stability measures.
:func:`leiden_multi` and :func:`cluster_markers` take
:class:`sepsis_sc.config.ClusteringSettings` (the config's ``clustering`` section) and
keyword overrides of its fields.

Modules:

* :mod:`~sepsis_sc.cluster.graph`: the kNN graph (:func:`neighbors`, :func:`knn_method`);
* :mod:`~sepsis_sc.cluster.leiden`: :func:`leiden_multi`, :func:`resolution_summary`,
  :func:`leiden_key`;
* :mod:`~sepsis_sc.cluster.markers`: :func:`cluster_markers` (scanpy's Wilcoxon test from a
  :class:`sepsis_sc.store.CountSource` of the log-normalised matrix, in gene blocks).
"""

from __future__ import annotations

from sepsis_sc.cluster.graph import EXACT_KNN_MAX_CELLS, knn_method, neighbors
from sepsis_sc.cluster.leiden import leiden_key, leiden_multi, resolution_summary
from sepsis_sc.cluster.markers import cluster_markers

__all__ = [
    "leiden_key",
    "leiden_multi",
    "resolution_summary",
    "cluster_markers",
    "knn_method",
    "neighbors",
    "EXACT_KNN_MAX_CELLS",
]
