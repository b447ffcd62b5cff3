"""Leiden at several resolutions on one kNN graph, and the numbers to choose one.

* :func:`leiden_multi`: the kNN graph (:func:`~sepsis_sc.cluster.graph.neighbors`), Leiden at
  each resolution of :class:`~sepsis_sc.config.ClusteringSettings`, UMAP;
* :func:`resolution_summary`: clusters, modularity and seed stability per resolution;
* :func:`leiden_key`: the ``obs`` column of a resolution's clusters.

Every Leiden run and modularity on a graph share one igraph graph, and a run gives the
partition ``sc.tl.leiden(flavor="igraph")`` gives for the same graph and seed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from sepsis_sc.cluster.graph import neighbors
from sepsis_sc.config import ClusteringSettings

logger = logging.getLogger(__name__)

__all__ = ["leiden_key", "leiden_multi", "resolution_summary"]


def leiden_key(resolution: float) -> str:
    """``obs`` column of the Leiden clusters at ``resolution`` (``leiden_r1.0``, ``leiden_r0.2``)."""
    return f"leiden_r{float(resolution)}"


def _check_resolutions(resolutions: Sequence[float]) -> list[float]:
    res = sorted({float(r) for r in resolutions})
    if not res:
        raise ValueError("resolutions is empty (config key clustering.resolutions)")
    if any(r <= 0 for r in res):
        raise ValueError(f"resolutions must be positive, got {res}")
    return res


class _IgraphRNG:
    """Random numbers for igraph drawn from a seeded ``numpy.random.RandomState``.

    The same generator scanpy's ``sc.tl.leiden(flavor="igraph", random_state=seed)`` installs,
    so :func:`_run_leiden` gives the partition scanpy gives for the same graph and seed.
    """

    def __init__(self, seed: int) -> None:
        self._rng = np.random.RandomState(seed)

    def getrandbits(self, k: int) -> int:
        return self._rng.tomaxint() & ((1 << k) - 1)

    def randint(self, a: int, b: int) -> int:
        return self._rng.randint(a, b + 1)

    def __getattr__(self, attr: str):
        return getattr(self._rng, "normal" if attr == "gauss" else attr)


def _igraph(adjacency: sp.spmatrix):
    """Undirected, weighted igraph graph of ``adjacency``, with scanpy's edge order.

    Built once and shared by every Leiden run and modularity on the same kNN graph (scanpy
    builds it again, through a Python list of edges, on each ``sc.tl.leiden`` call).
    """
    import igraph as ig

    coo = sp.csr_matrix(adjacency).tocoo()
    keep = coo.data != 0
    edges = list(zip(coo.row[keep].tolist(), coo.col[keep].tolist(), strict=True))  # fastest
    g = ig.Graph(n=adjacency.shape[0], edges=edges, directed=False)
    g.es["weight"] = coo.data[keep].astype(np.float64)
    return g


def _run_leiden(
    adjacency: sp.spmatrix,
    resolution: float,
    seed: int,
    n_iterations: int,
    flavor: str,
    graph=None,
) -> np.ndarray:
    """Leiden partition of ``adjacency`` as an integer array (does not touch any AnnData).

    With ``flavor="igraph"`` this is ``sc.tl.leiden(flavor="igraph", directed=False)`` on a
    graph built once (pass ``graph=_igraph(adjacency)`` to reuse it); the result is the same.
    """
    if flavor == "igraph":
        import igraph as ig

        g = _igraph(adjacency) if graph is None else graph
        try:
            ig.set_random_number_generator(_IgraphRNG(seed))
            part = g.community_leiden(
                objective_function="modularity",
                weights="weight",
                resolution=resolution,
                n_iterations=n_iterations,
            )
        finally:
            import random

            ig.set_random_number_generator(random)
        return np.asarray(part.membership, dtype=np.int64)
    tmp = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(adjacency.shape[0])]))
    sc.tl.leiden(
        tmp,
        resolution=resolution,
        adjacency=adjacency,
        random_state=seed,
        n_iterations=n_iterations,
        flavor=flavor,
        key_added="leiden",
    )
    return tmp.obs["leiden"].astype(int).to_numpy()


def _modularity(adjacency: sp.spmatrix, membership: np.ndarray, graph=None) -> float:
    """Newman-Girvan modularity (resolution 1) of a partition of the weighted, undirected graph.

    ``graph`` (from :func:`_igraph`) holds each edge of the symmetric kNN graph in both
    directions; doubling every weight leaves modularity unchanged.
    """
    g = _igraph(adjacency) if graph is None else graph
    return float(g.modularity(np.asarray(membership).tolist(), weights="weight", directed=False))


def resolution_summary(
    adata: ad.AnnData,
    *,
    resolutions: Sequence[float] | None = None,
    seed: int = 0,
    n_stability_runs: int = 3,
    n_iterations: int = 2,
    flavor: Literal["igraph", "leidenalg"] = "igraph",
    chosen: float | None = None,
) -> pd.DataFrame:
    """Per-resolution numbers for choosing the Leiden resolution.

    Needs the kNN graph (``obsp["connectivities"]``) and the ``obs["leiden_r{res}"]``
    columns written by :func:`leiden_multi`.

    - ``n_clusters``, ``smallest_cluster`` (cells), ``largest_cluster_fraction``;
    - ``modularity``: Newman-Girvan modularity (at resolution 1, so comparable across
      resolutions) of the partition on the weighted kNN graph;
    - ``stability_ari``: mean adjusted Rand index between the clusters and
      ``n_stability_runs`` Leiden runs with other seeds (``seed + 1``, ...) at the same
      resolution; near 1 = the partition does not depend on the seed;
    - ``ari_previous``: ARI with the next lower resolution tried (NaN for the lowest); a
      plateau of high values marks a robust range of resolutions.

    Parameters
    ----------
    adata
        Clustered AnnData.
    resolutions
        Resolutions to summarise (default: every ``leiden_r*`` column).
    seed
        Seed of the stored clusters; the stability runs use ``seed + 1 ...``.
    n_stability_runs
        Extra Leiden runs per resolution (0 skips the stability column).
    n_iterations, flavor
        Leiden settings of the stability runs (use those of the stored clusters).
    chosen
        Resolution used downstream (``chosen`` column); default ``uns["leiden_multi"]``.

    Returns
    -------
    One row per resolution: ``resolution``, ``key``, ``n_clusters``, ``smallest_cluster``,
    ``largest_cluster_fraction``, ``modularity``, ``stability_ari``, ``ari_previous``,
    ``chosen``.
    """
    if "connectivities" not in adata.obsp:
        raise KeyError("obsp['connectivities'] is missing; run leiden_multi (or sc.pp.neighbors).")
    if resolutions is None:
        resolutions = [
            float(c[len("leiden_r") :]) for c in adata.obs.columns if c.startswith("leiden_r")
        ]
    resolutions = _check_resolutions(resolutions)
    if chosen is None and "leiden_multi" in adata.uns:
        chosen = adata.uns["leiden_multi"].get("resolution")
    return _resolution_rows(
        adata,
        resolutions,
        seed=seed,
        n_stability_runs=n_stability_runs,
        n_iterations=n_iterations,
        flavor=flavor,
        chosen=chosen,
    )


def _resolution_rows(
    adata: ad.AnnData,
    resolutions: list[float],
    *,
    seed: int,
    n_stability_runs: int,
    n_iterations: int,
    flavor: str,
    chosen: float | None,
    graph=None,
) -> pd.DataFrame:
    """The rows of :func:`resolution_summary` for checked ``resolutions``; ``graph`` is the
    igraph graph of ``obsp["connectivities"]`` when the caller already built it."""
    from sklearn.metrics import adjusted_rand_score

    conn = adata.obsp["connectivities"]
    if graph is None:
        graph = _igraph(conn)
    rows = []
    previous = None
    for res in resolutions:
        key = leiden_key(res)
        if key not in adata.obs:
            raise KeyError(f"obs[{key!r}] not found; run leiden_multi with this resolution")
        labels = adata.obs[key].astype(str).to_numpy()
        codes = pd.factorize(labels)[0]
        sizes = np.bincount(codes)
        stability = np.nan
        if n_stability_runs > 0:
            aris = [
                adjusted_rand_score(
                    codes,
                    _run_leiden(
                        conn, res, seed + i, n_iterations=n_iterations, flavor=flavor, graph=graph
                    ),
                )
                for i in range(1, n_stability_runs + 1)
            ]
            stability = float(np.mean(aris))
        rows.append(
            {
                "resolution": res,
                "key": key,
                "n_clusters": int(len(sizes)),
                "smallest_cluster": int(sizes.min()),
                "largest_cluster_fraction": float(sizes.max() / sizes.sum()),
                "modularity": _modularity(conn, codes, graph=graph),
                "stability_ari": stability,
                "ari_previous": np.nan
                if previous is None
                else float(adjusted_rand_score(previous, codes)),
                "chosen": chosen is not None and np.isclose(res, float(chosen)),
            }
        )
        previous = codes
    return pd.DataFrame(rows)


def leiden_multi(
    adata: ad.AnnData,
    settings: ClusteringSettings | None = None,
    *,
    use_rep: str = "X_scVI",
    seed: int = 0,
    n_iterations: int = 2,
    flavor: Literal["igraph", "leidenalg"] = "igraph",
    n_stability_runs: int = 3,
    umap: bool = True,
    umap_min_dist: float = 0.5,
    umap_maxiter: int | None = None,
    knn: Literal["auto", "exact", "approx"] = "auto",
    **overrides: Any,
) -> pd.DataFrame:
    """kNN graph on the integrated space, Leiden at several resolutions, and UMAP.

    The graph is built once (``sc.pp.neighbors`` on ``obsm[use_rep]``, UMAP-weighted
    connectivities; exact or approximate kNN as
    :func:`~sepsis_sc.cluster.graph.knn_method` says) and reused by every
    resolution, so the clusterings differ only by resolution. Same ``seed`` on the same
    machine gives the same clusters and UMAP.

    Parameters
    ----------
    adata
        AnnData with the integrated embedding in ``obsm[use_rep]``.
    use_rep
        ``obsm`` key of the latent space (``X_scVI``, ``X_harmony``, ``X_pca``); the method
        names ``scvi``, ``harmony``, ``pca`` (config ``integration.method``) are accepted too.
    settings
        :class:`~sepsis_sc.config.ClusteringSettings` (e.g.
        ``ClusteringSettings.from_config(cfg["clustering"])``); ``None``: the defaults.
        ``n_neighbors`` (neighbours per cell in the kNN graph), ``resolutions`` (Leiden
        resolutions to compute) and ``resolution`` (the one copied to ``obs["leiden"]``;
        must be one of ``resolutions``) are used.
    seed
        Seed of the kNN search, Leiden and UMAP.
    n_iterations
        Leiden iterations (2 is scanpy's recommendation with the igraph flavor; -1 runs
        to convergence).
    flavor
        ``"igraph"`` (fast, default) or ``"leidenalg"``.
    n_stability_runs
        Extra Leiden runs per resolution for ``stability_ari`` (see :func:`resolution_summary`).
    umap
        Compute ``obsm["X_umap"]``.
    umap_min_dist, umap_maxiter
        UMAP settings (``maxiter`` None = scanpy's default: 500 epochs below 10,000 cells,
        200 above).
    knn
        kNN search: ``"auto"`` (:func:`~sepsis_sc.cluster.graph.knn_method`), ``"exact"`` or
        ``"approx"``.
    **overrides
        Fields of ``settings`` to change (``n_neighbors=``, ``resolutions=``,
        ``resolution=``).

    Returns
    -------
    The per-resolution summary of :func:`resolution_summary` (also what the workflow writes
    to ``cluster/resolutions.tsv``). Writes ``obsp["connectivities"]``, ``obsp["distances"]``,
    ``uns["neighbors"]``, ``obs["leiden_r{res}"]`` per resolution, ``obs["leiden"]``,
    ``obsm["X_umap"]``, ``uns["umap"]`` and ``uns["leiden_multi"]``.
    """
    settings = (settings or ClusteringSettings()).with_overrides(overrides)
    n_neighbors = settings.n_neighbors
    use_rep = _resolve_rep(adata, use_rep)
    res_list = _check_leiden_inputs(
        adata, use_rep, n_neighbors, settings.resolutions, settings.resolution
    )
    method = neighbors(adata, n_neighbors=n_neighbors, use_rep=use_rep, seed=seed, knn=knn)
    logger.info(
        "kNN graph: %d neighbours on %s (%d cells, %s search)",
        n_neighbors,
        use_rep,
        adata.n_obs,
        method,
    )
    conn = adata.obsp["connectivities"]
    graph = _igraph(conn) if flavor == "igraph" else None
    for res in res_list:
        labels = _run_leiden(conn, res, seed, n_iterations=n_iterations, flavor=flavor, graph=graph)
        adata.obs[leiden_key(res)] = _clusters_by_size(labels)
        logger.info(
            "Leiden resolution %s: %d clusters", res, len(adata.obs[leiden_key(res)].cat.categories)
        )
    chosen = float(settings.resolution)
    adata.obs["leiden"] = adata.obs[leiden_key(chosen)].copy()
    adata.uns["leiden_multi"] = {
        "use_rep": use_rep,
        "n_neighbors": int(n_neighbors),
        "resolutions": res_list,
        "resolution": chosen,
        "seed": int(seed),
        "n_iterations": int(n_iterations),
        "flavor": flavor,
        "knn": method,
    }
    if umap:
        sc.tl.umap(adata, min_dist=umap_min_dist, random_state=seed, maxiter=umap_maxiter)
    summary = _resolution_rows(
        adata,
        res_list,
        seed=seed,
        n_stability_runs=n_stability_runs,
        n_iterations=n_iterations,
        flavor=flavor,
        chosen=chosen,
        graph=graph,
    )
    logger.info("resolution summary:\n%s", summary.to_string(index=False))
    return summary


def _resolve_rep(adata: ad.AnnData, use_rep: str) -> str:
    """The ``obsm`` key: ``use_rep`` itself, or the key of a method name (``scvi`` ...)."""
    aliases = {"scvi": "X_scVI", "harmony": "X_harmony", "pca": "X_pca"}
    if use_rep not in adata.obsm and use_rep.lower() in aliases:
        use_rep = aliases[use_rep.lower()]
    if use_rep not in adata.obsm:
        raise KeyError(
            f"obsm[{use_rep!r}] not found (available: {list(adata.obsm)}); run the integration "
            "first or set integration.method to the embedding you computed."
        )
    return use_rep


def _check_leiden_inputs(
    adata: ad.AnnData,
    use_rep: str,
    n_neighbors: int,
    resolutions: Sequence[float],
    resolution: float,
) -> list[float]:
    """A finite embedding, more cells than neighbours, and the chosen resolution among the
    resolutions; returns the checked resolutions."""
    x = adata.obsm[use_rep]
    if not np.isfinite(np.asarray(x)).all():
        raise ValueError(f"obsm[{use_rep!r}] contains NaN or infinite values")
    if adata.n_obs <= n_neighbors:
        raise ValueError(f"{adata.n_obs} cells is too few for n_neighbors={n_neighbors}")
    res_list = _check_resolutions(resolutions)
    if not any(np.isclose(float(resolution), r) for r in res_list):
        raise ValueError(
            f"resolution {resolution} is not one of the resolutions {res_list} "
            "(config keys clustering.resolution and clustering.resolutions)."
        )
    return res_list


def _clusters_by_size(labels: np.ndarray) -> pd.Categorical:
    """Leiden labels renamed by size ("0" = largest; scanpy's order is arbitrary), ties in
    label order."""
    order = np.argsort(-np.bincount(labels), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return pd.Categorical(rank[labels].astype(str), categories=[str(i) for i in range(len(order))])
