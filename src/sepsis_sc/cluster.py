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
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Literal

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata.io import read_elem

from sepsis_sc import store
from sepsis_sc.data import looks_like_counts

logger = logging.getLogger(__name__)

__all__ = [
    "leiden_key",
    "leiden_multi",
    "resolution_summary",
    "cluster_markers",
    "cluster_markers_streamed",
]

DEFAULT_RESOLUTIONS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0)


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


#: Largest cohort (cells) for which the kNN graph is exact by default (see :func:`knn_method`).
EXACT_KNN_MAX_CELLS = 150_000


def knn_method(n_obs: int, knn: Literal["auto", "exact", "approx"] = "auto") -> str:
    """The kNN search :func:`leiden_multi` uses for ``n_obs`` cells: ``"exact"`` or ``"approx"``.

    ``"auto"`` is exact (scikit-learn, brute force on the latent space) up to
    :data:`EXACT_KNN_MAX_CELLS` cells and approximate (pynndescent) above. On a latent space
    of 10-50 dimensions exact search is cheap at these sizes, and it avoids pynndescent's
    numba compilation (about 50 s in every fresh process, 75 % of the clustering job at
    10,000 cells). Measured on 2 cores, 30 dimensions: exact 43 s at 100,000 cells and
    105 s at 200,000, pynndescent 85 s at 200,000 (compilation included).
    """
    if knn not in ("auto", "exact", "approx"):
        raise ValueError(f"knn must be 'auto', 'exact' or 'approx', not {knn!r}")
    if knn == "auto":
        return "exact" if n_obs <= EXACT_KNN_MAX_CELLS else "approx"
    return knn


def neighbors(
    adata: ad.AnnData,
    *,
    n_neighbors: int,
    use_rep: str | None,
    seed: int,
    knn: Literal["auto", "exact", "approx"] = "auto",
) -> str:
    """``sc.pp.neighbors`` with the kNN search of :func:`knn_method`; returns the method used."""
    method = knn_method(adata.n_obs, knn)
    sc.pp.neighbors(
        adata,
        n_neighbors=n_neighbors,
        use_rep=use_rep,
        random_state=seed,
        transformer="sklearn" if method == "exact" else "pynndescent",
    )
    return method


def leiden_multi(
    adata: ad.AnnData,
    *,
    use_rep: str = "X_scVI",
    n_neighbors: int = 15,
    resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
    default_resolution: float = 1.0,
    seed: int = 0,
    n_iterations: int = 2,
    flavor: Literal["igraph", "leidenalg"] = "igraph",
    n_stability_runs: int = 3,
    umap: bool = True,
    umap_min_dist: float = 0.5,
    umap_maxiter: int | None = None,
    knn: Literal["auto", "exact", "approx"] = "auto",
) -> pd.DataFrame:
    """kNN graph on the integrated space, Leiden at several resolutions, and UMAP.

    The graph is built once (``sc.pp.neighbors`` on ``obsm[use_rep]``, UMAP-weighted
    connectivities; exact or approximate kNN as :func:`knn_method` says) and reused by every
    resolution, so the clusterings differ only by resolution. Same ``seed`` on the same
    machine gives the same clusters and UMAP.

    Parameters
    ----------
    adata
        AnnData with the integrated embedding in ``obsm[use_rep]``.
    use_rep
        ``obsm`` key of the latent space (``X_scVI``, ``X_harmony``, ``X_pca``); the method
        names ``scvi``, ``harmony``, ``pca`` (config ``integration.method``) are accepted too.
    n_neighbors
        Neighbours per cell in the kNN graph.
    resolutions
        Leiden resolutions to compute.
    default_resolution
        The resolution copied to ``obs["leiden"]`` (must be in ``resolutions``).
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
        kNN search: ``"auto"`` (:func:`knn_method`), ``"exact"`` or ``"approx"``.

    Returns
    -------
    The per-resolution summary of :func:`resolution_summary` (also what the workflow writes
    to ``cluster/resolutions.tsv``). Writes ``obsp["connectivities"]``, ``obsp["distances"]``,
    ``uns["neighbors"]``, ``obs["leiden_r{res}"]`` per resolution, ``obs["leiden"]``,
    ``obsm["X_umap"]``, ``uns["umap"]`` and ``uns["leiden_multi"]``.
    """
    use_rep = _resolve_rep(adata, use_rep)
    res_list = _check_leiden_inputs(adata, use_rep, n_neighbors, resolutions, default_resolution)
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
    chosen = float(default_resolution)
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
    default_resolution: float,
) -> list[float]:
    """A finite embedding, more cells than neighbours, and a default resolution among the
    resolutions; returns the checked resolutions."""
    x = adata.obsm[use_rep]
    if not np.isfinite(np.asarray(x)).all():
        raise ValueError(f"obsm[{use_rep!r}] contains NaN or infinite values")
    if adata.n_obs <= n_neighbors:
        raise ValueError(f"{adata.n_obs} cells is too few for n_neighbors={n_neighbors}")
    res_list = _check_resolutions(resolutions)
    if not any(np.isclose(float(default_resolution), r) for r in res_list):
        raise ValueError(
            f"default_resolution {default_resolution} is not one of the resolutions {res_list} "
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


def _wilcoxon_vs_rest(
    sums: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    tested: Sequence[int],
    *,
    n_genes: int,
    var_names: pd.Index,
    groups: Sequence[str],
    expm1=np.expm1,
) -> dict[str, object]:
    """Scanpy's Wilcoxon rank-sum test (each group vs the rest), from the non-zeros' sums.

    Gives what ``sc.tl.rank_genes_groups(method="wilcoxon", reference="rest", pts=True,
    tie_correct=False)`` gives, in the same ``uns`` layout, for a sparse, non-negative matrix.
    scanpy ranks every cell of every gene (a dense chunk per 1,000 genes or so) and subsets
    rows once per group for means and detection rates; here all cells with a zero share one
    tied rank, ``(n_zero + 1) / 2``, so only the non-zeros are sorted, and the group sums,
    means and non-zero counts come from one pass over each gene's column (about 10x faster
    at 100k cells and 10% density, no dense copy).

    ``sums`` is :func:`_rank_sums_sparse`'s ``(sizes, rank_sum, nnz, total)`` over *all*
    genes (of the matrix in memory, or gathered gene block by gene block from a file by
    :func:`_rank_sums_streamed`): the Benjamini-Hochberg adjustment and the top
    ``n_genes`` are taken over all of them here. ``tested`` are the group codes to test.
    """
    sizes, rank_sum, nnz, total = sums
    n_cells = int(sizes.sum())
    all_nnz = nnz.sum(axis=0)
    all_total = total.sum(axis=0)
    out: dict[str, dict[str, np.ndarray]] = {
        k: {} for k in ("names", "scores", "pvals", "pvals_adj", "logfoldchanges")
    }
    pts, pts_rest = {}, {}
    for name, code in zip(groups, tested, strict=True):
        s = code + 1
        n1 = sizes[s]
        n2 = n_cells - n1
        scores, pvals, pvals_adj = _rank_sum_test(rank_sum[s], n1, n2, n_cells)
        mean_in = total[s] / n1
        mean_rest = (all_total - total[s]) / n2
        lfc = np.log2((expm1(mean_in) + 1e-9) / (expm1(mean_rest) + 1e-9))
        top = _top_n(scores, n_genes)
        out["names"][name] = np.asarray(var_names[top], dtype=object)
        out["scores"][name] = scores[top]
        out["pvals"][name] = pvals[top]
        out["pvals_adj"][name] = pvals_adj[top]
        out["logfoldchanges"][name] = lfc[top]
        pts[name] = nnz[s] / n1
        pts_rest[name] = (all_nnz - nnz[s]) / n2
    return _rank_genes_result(out, pts, pts_rest, var_names)


def _rank_sums_sparse(
    x: sp.spmatrix, codes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group slot (0 = no group, then code + 1) and gene: rank sums over all cells,
    non-zero counts and value sums, from one pass over each gene's non-zeros; plus the slot
    sizes. Cells with a zero share one tied rank, ``(n_zero + 1) / 2``.

    ``codes`` is the group code of each cell (-1 = in no group: counted in every "rest").
    Each gene's numbers depend on its column only, so a block of columns gives that block's
    columns of the result (:func:`_rank_sums_streamed`)."""
    from scipy.stats import rankdata

    csc = sp.csc_matrix(x, copy=True)
    csc.eliminate_zeros()  # stored zeros tie with the implicit ones
    csc.sort_indices()
    n_cells, n_var = csc.shape
    n_codes = int(codes.max()) + 2  # slot 0 holds cells outside every group (code -1)
    slot = codes.astype(np.int64) + 1
    sizes = np.bincount(slot, minlength=n_codes).astype(np.float64)
    rank_sum = np.empty((n_codes, n_var))
    nnz = np.empty((n_codes, n_var))
    total = np.empty((n_codes, n_var))
    indptr, indices, data = csc.indptr, csc.indices, csc.data
    for j in range(n_var):
        lo, hi = indptr[j], indptr[j + 1]
        where = slot[indices[lo:hi]]
        vals = data[lo:hi]
        n_zero = n_cells - (hi - lo)
        nz_in = np.bincount(where, minlength=n_codes)
        # ranks over all cells: zeros take the mean rank (n_zero + 1) / 2, non-zeros follow
        rank_sum[:, j] = (
            np.bincount(where, weights=rankdata(vals) + n_zero, minlength=n_codes)
            + (sizes - nz_in) * (n_zero + 1) / 2.0
        )
        nnz[:, j] = nz_in
        total[:, j] = np.bincount(where, weights=vals, minlength=n_codes)
    return sizes, rank_sum, nnz, total


def _rank_sum_test(
    rank_sum: np.ndarray, n1: float, n2: float, n_cells: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z-scores of a group's rank sums (no tie correction, as scanpy's default), two-sided
    p-values and Benjamini-Hochberg adjusted p-values."""
    from scipy.stats import norm
    from statsmodels.stats.multitest import multipletests

    std = np.sqrt(n1 * n2 * (n_cells + 1) / 12.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = (rank_sum - n1 * (n_cells + 1) / 2.0) / std
    scores[np.isnan(scores)] = 0
    pvals = 2 * norm.sf(np.abs(scores))
    pvals_adj = multipletests(pvals, alpha=0.05, method="fdr_bh")[1]
    return scores, pvals, pvals_adj


def _rank_genes_result(
    out: Mapping[str, Mapping[str, np.ndarray]],
    pts: Mapping[str, np.ndarray],
    pts_rest: Mapping[str, np.ndarray],
    var_names: pd.Index,
) -> dict[str, object]:
    """The per-group arrays in scanpy's ``rank_genes_groups`` layout (record arrays with
    its dtypes, ``pts``/``pts_rest`` frames)."""
    dtypes = {
        "names": "O",
        "scores": "float32",
        "logfoldchanges": "float32",
        "pvals": "float64",
        "pvals_adj": "float64",
    }
    result: dict[str, object] = {
        k: pd.DataFrame(v).to_records(index=False, column_dtypes=dtypes[k]) for k, v in out.items()
    }
    result["pts"] = pd.DataFrame(pts, index=var_names)
    result["pts_rest"] = pd.DataFrame(pts_rest, index=var_names)
    return result


def _top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest scores, best first (scanpy's ``_select_top_n``)."""
    n = min(n, len(scores))
    part = np.argpartition(scores, -n)[-n:]
    return part[np.argsort(scores[part])[::-1]]


def cluster_markers(
    adata: ad.AnnData,
    *,
    groupby: str = "leiden",
    n_genes: int = 25,
    method: Literal["wilcoxon", "t-test", "t-test_overestim_var", "logreg"] = "wilcoxon",
) -> pd.DataFrame:
    """Top marker genes per cluster (one cluster vs the rest) from the log-normalised ``X``.

    These describe clusters for annotation; they are not condition tests. Their p-values are
    cell-level and computed on the same data that defined the clusters ("double dipping"),
    so use them to rank genes, not as evidence.

    Parameters
    ----------
    adata
        AnnData with log-normalised ``X`` and ``obs[groupby]``.
    groupby
        ``obs`` column with clusters.
    n_genes
        Markers kept per cluster (the highest scores, i.e. up-regulated).
    method
        Test of ``sc.tl.rank_genes_groups``. ``"wilcoxon"`` on a sparse, non-negative ``X``
        (log-normalised counts) runs scanpy's test on the non-zero entries only: the same
        numbers and ``uns`` layout, several times faster (105 s -> 19 s at 88k cells);
        other inputs and methods call scanpy.

    Returns
    -------
    Tidy table: ``cluster``, ``rank`` (1 = best), ``gene``, ``score``, ``logfoldchange``,
    ``pval``, ``pval_adj``, ``pct_in_cluster``, ``pct_out_cluster``. The full result is in
    ``uns["rank_genes_{groupby}"]``.
    """
    _check_marker_inputs(adata, groupby, adata.X)
    groups, skipped = _marker_groups(adata, groupby)
    key = f"rank_genes_{groupby}"
    x = adata.X
    if method == "wilcoxon" and sp.issparse(x) and (x.nnz == 0 or x.data.min() >= 0):
        adata.uns[key] = _sparse_wilcoxon_markers(adata, groupby, groups, n_genes)
    else:
        with warnings.catch_warnings():  # scanpy fills its result table column by column
            warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
            sc.tl.rank_genes_groups(
                adata,
                groupby,
                groups=groups if skipped else "all",
                reference="rest",
                method=method,
                use_raw=False,
                n_genes=n_genes,
                pts=True,
                key_added=key,
            )
    df = _markers_table(adata, key, groups, n_genes)
    logger.info("markers: top %d genes for %d groups of %s", n_genes, len(groups), groupby)
    return df


def cluster_markers_streamed(
    adata: ad.AnnData,
    path: str | os.PathLike[str],
    *,
    key: str = "X",
    groupby: str = "leiden",
    n_genes: int = 25,
    genes_per_block: int = 2000,
    chunk_rows: int = store.DEFAULT_CHUNK_ROWS,
) -> pd.DataFrame:
    """:func:`cluster_markers` (Wilcoxon) read from the ``.h5ad`` in gene blocks.

    At a million cells the log-normalised matrix is about 9 GB, and :func:`cluster_markers`
    needs it whole plus a column-major (CSC) copy for the per-gene ranks: about 20 GB. Here
    the per-gene statistics (:func:`_rank_sums_sparse`: rank sums, non-zero counts and value
    sums per group) are computed ``genes_per_block`` genes at a time: the block's columns
    are read over all cells in row chunks of ``chunk_rows`` (:func:`sepsis_sc.store.iter_rows`),
    stacked, and dropped before the next block. Memory follows one block (its CSR and CSC
    copies, about ``2 * genes_per_block / n_vars`` of the matrix) plus one full row chunk
    while it is read, not the matrix; the price is one read of the file per block.

    The tests, Benjamini-Hochberg adjustment (over all genes, per group), top-``n_genes``
    selection, ``uns`` layout and table are the code :func:`cluster_markers` runs on a
    sparse, non-negative ``X``, on the same numbers: the result is the same as
    ``cluster_markers(adata_with_X, method="wilcoxon")`` (same genes and order, scores,
    fold changes, p-values, adjusted p-values and detection rates).

    Parameters
    ----------
    adata
        The light AnnData of the same file (``obs`` with ``groupby``, ``var``, ``uns`` with
        ``log1p``; e.g. :func:`sepsis_sc.store.read`), without the matrix. Gets
        ``uns["rank_genes_{groupby}"]``; a non-categorical ``obs[groupby]`` is made categorical.
    path
        The ``.h5ad`` holding the log-normalised matrix as CSR (external links are followed).
    key
        The matrix: ``"X"`` or ``"layers/<name>"``.
    groupby
        ``obs`` column with clusters (groups with < 2 cells are not tested, as in
        :func:`cluster_markers`).
    n_genes
        Markers kept per cluster.
    genes_per_block
        Genes whose columns are in memory at once.
    chunk_rows
        Rows read from the file at once.

    Returns
    -------
    The tidy table of :func:`cluster_markers`; the full result is in
    ``uns["rank_genes_{groupby}"]``.
    """
    if genes_per_block < 1:
        raise ValueError(f"genes_per_block must be >= 1, not {genes_per_block}")
    first = next(store.iter_rows(path, key, chunk_rows=chunk_rows), None)
    _check_marker_inputs(
        adata, groupby, first[2] if first is not None else sp.csr_matrix((0, adata.n_vars))
    )
    del first
    _check_same_axes(adata, path)
    groups, _ = _marker_groups(adata, groupby)
    uns_key = f"rank_genes_{groupby}"
    rank_sums = partial(
        _rank_sums_streamed,
        path,
        key,
        n_vars=adata.n_vars,
        genes_per_block=int(genes_per_block),
        chunk_rows=int(chunk_rows),
    )
    adata.uns[uns_key] = _sparse_wilcoxon_markers(adata, groupby, groups, n_genes, rank_sums)
    if key != "X":
        adata.uns[uns_key]["params"]["layer"] = key.removeprefix("layers/")
    df = _markers_table(adata, uns_key, groups, n_genes)
    logger.info(
        "markers: top %d genes for %d groups of %s (streamed from %s:%s, %d genes per block)",
        n_genes,
        len(groups),
        groupby,
        path,
        key,
        genes_per_block,
    )
    return df


def _check_same_axes(adata: ad.AnnData, path: str | os.PathLike[str]) -> None:
    """The cells and genes of ``adata`` are those of the file, in the same order."""
    with h5py.File(path, "r") as f:
        names = {
            axis: pd.Index(read_elem(f[axis][f[axis].attrs["_index"]]).astype(str))
            for axis in ("obs", "var")
        }
    for axis, mine in (("obs", adata.obs_names), ("var", adata.var_names)):
        if not names[axis].equals(pd.Index(mine.astype(str))):
            raise ValueError(
                f"{axis}_names of the AnnData ({len(mine)}) are not those of {path} "
                f"({len(names[axis])}) in the same order; read it from that file (store.read)"
            )


def _rank_sums_streamed(
    path: str | os.PathLike[str],
    key: str,
    codes: np.ndarray,
    *,
    n_vars: int,
    genes_per_block: int,
    chunk_rows: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_rank_sums_sparse` of the CSR matrix ``path:key``, one block of
    ``genes_per_block`` genes at a time (each gene's numbers come from its column alone, so
    the blocks' columns make up the whole). Only one block's columns are in memory."""
    n_codes = int(codes.max()) + 2
    sizes = np.bincount(codes.astype(np.int64) + 1, minlength=n_codes).astype(np.float64)
    rank_sum, nnz, total = (np.empty((n_codes, n_vars)) for _ in range(3))
    for lo in range(0, n_vars, genes_per_block):
        hi = min(lo + genes_per_block, n_vars)
        mask = np.zeros(n_vars, dtype=bool)
        mask[lo:hi] = True
        parts = [c for _, _, c in store.iter_rows(path, key, chunk_rows=chunk_rows, genes=mask)]
        block = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, hi - lo))
        del parts
        if block.shape[0] != len(codes):
            raise ValueError(f"{path}:{key} has {block.shape[0]} rows for {len(codes)} cells")
        if block.nnz and block.data.min() < 0:
            raise ValueError(
                f"{path}:{key} has negative values; markers are ranked on log-normalised data "
                "(use cluster_markers for other inputs)"
            )
        _, rank_sum[:, lo:hi], nnz[:, lo:hi], total[:, lo:hi] = _rank_sums_sparse(block, codes)
        del block
        logger.debug("markers: genes %d-%d of %d", lo, hi, n_vars)
    return sizes, rank_sum, nnz, total


def _check_marker_inputs(adata: ad.AnnData, groupby: str, x) -> None:
    """``obs[groupby]`` is there and ``x`` (the matrix, or its first row chunk) is not raw counts."""
    if groupby not in adata.obs:
        raise KeyError(f"obs[{groupby!r}] not found; run leiden_multi first or pick a column.")
    if looks_like_counts(x):
        raise ValueError(
            "X looks like raw counts (integers > 30); markers are ranked on log-normalised X. "
            "Normalise first (sc.pp.normalize_total(adata, target_sum=1e4); sc.pp.log1p(adata))."
        )


def _marker_groups(adata: ad.AnnData, groupby: str) -> tuple[list[str], list[str]]:
    """Groups tested (>= 2 cells; at least two needed) and groups skipped (logged).

    Makes ``obs[groupby]`` categorical when it is not.
    """
    if not isinstance(adata.obs[groupby].dtype, pd.CategoricalDtype):
        adata.obs[groupby] = adata.obs[groupby].astype(str).astype("category")
    sizes = adata.obs[groupby].value_counts()
    groups = [str(g) for g in adata.obs[groupby].cat.categories if sizes.get(g, 0) >= 2]
    if len(groups) < 2:
        raise ValueError(f"obs[{groupby!r}] needs at least two groups with >= 2 cells")
    skipped = [str(g) for g in adata.obs[groupby].cat.categories if sizes.get(g, 0) < 2]
    if skipped:
        logger.warning("no markers for groups with < 2 cells: %s", skipped)
    return groups, skipped


def _sparse_wilcoxon_markers(
    adata: ad.AnnData,
    groupby: str,
    groups: list[str],
    n_genes: int,
    rank_sums: Callable[[np.ndarray], tuple[np.ndarray, ...]] | None = None,
) -> dict[str, object]:
    """``uns["rank_genes_<groupby>"]`` from :func:`_wilcoxon_vs_rest` (fold changes
    un-logged with ``uns["log1p"]["base"]`` when set).

    ``rank_sums(codes)`` gives :func:`_rank_sums_sparse`'s statistics over all genes for
    the cells' group codes: by default of ``adata.X`` in memory; :func:`cluster_markers_streamed`
    passes its gene-block pass over the file (:func:`_rank_sums_streamed`).
    """
    base = adata.uns.get("log1p", {}).get("base")
    cats = adata.obs[groupby].cat.categories
    codes = adata.obs[groupby].cat.codes.to_numpy().astype(np.int64)
    tested = [int(np.flatnonzero(cats.astype(str) == g)[0]) for g in groups]
    n_top = min(int(n_genes), adata.n_vars)
    if rank_sums is None:
        rank_sums = partial(_rank_sums_sparse, adata.X)
    result = _wilcoxon_vs_rest(
        rank_sums(codes),
        tested,
        n_genes=n_top,
        var_names=adata.var_names,
        groups=groups,
        expm1=np.expm1 if base is None else (lambda v: np.expm1(v * np.log(base))),
    )
    return {
        "params": {
            "groupby": groupby,
            "reference": "rest",
            "method": "wilcoxon",
            "use_raw": False,
            "layer": None,
            "corr_method": "benjamini-hochberg",
        },
        **result,
    }


#: columns of the marker table, in order
_MARKER_COLUMNS = (
    "cluster",
    "rank",
    "gene",
    "score",
    "logfoldchange",
    "pval",
    "pval_adj",
    "pct_in_cluster",
    "pct_out_cluster",
)


def _markers_table(adata: ad.AnnData, key: str, groups: list[str], n_genes: int) -> pd.DataFrame:
    """Tidy top-``n_genes`` table per group from ``uns[key]`` (see :func:`cluster_markers`)."""
    df = sc.get.rank_genes_groups_df(adata, group=None, key=key)
    if "group" not in df:  # a single group comes back without the column
        df.insert(0, "group", groups[0])
    df["rank"] = df.groupby("group", observed=True).cumcount() + 1
    df = df.rename(
        columns={
            "group": "cluster",
            "names": "gene",
            "scores": "score",
            "logfoldchanges": "logfoldchange",
            "pvals": "pval",
            "pvals_adj": "pval_adj",
            "pct_nz_group": "pct_in_cluster",
            "pct_nz_reference": "pct_out_cluster",
        }
    )
    df = df[[c for c in _MARKER_COLUMNS if c in df]]
    return df[df["rank"] <= n_genes].reset_index(drop=True)
