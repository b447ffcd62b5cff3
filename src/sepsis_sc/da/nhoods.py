"""Neighbourhoods of the integrated kNN graph (Milo, Dann et al. 2022, DOI
10.1038/s41587-021-01033-z): index cells by refined sampling, each neighbourhood the index
cell and its k nearest neighbours, counted per sample, labelled by what they hold.

* :func:`make_nhoods`: ``obsm["nhoods"]`` (cells x neighbourhoods, sparse 0/1),
  ``uns["nhoods"]`` (index cells, the distance to their k-th neighbour for the spatial FDR);
* :func:`nhood_counts`: neighbourhoods x samples cell counts;
* :func:`describe_nhoods`: each neighbourhood's size, majority cell type, lineage and state
  call, and where its index cell sits on the UMAP.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sepsis_sc.config import DASettings

__all__ = ["make_nhoods", "nhood_counts", "describe_nhoods", "knn_index"]

logger = logging.getLogger(__name__)


def knn_index(x: np.ndarray, k: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest neighbours of every row of ``x`` (itself first) and their distances:
    exact search (scikit-learn) up to 150,000 rows, pynndescent above (as the clustering)."""
    from sepsis_sc.cluster import knn_method

    k = min(k, x.shape[0])
    if knn_method(x.shape[0]) == "exact":
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=k).fit(x)
        dist, idx = nn.kneighbors(x)
    else:
        from pynndescent import NNDescent

        index = NNDescent(x, n_neighbors=k, random_state=seed)
        idx, dist = index.neighbor_graph
    return idx, dist


def make_nhoods(
    adata: ad.AnnData,
    settings: DASettings | None = None,
    *,
    use_rep: str = "X_scVI",
    seed: int = 0,
    **overrides: Any,
) -> None:
    """Milo neighbourhoods on ``obsm[use_rep]``, refined sampling of the index cells.

    A random ``prop`` of the cells (at most ``max_nhoods``) is drawn; each is replaced by the
    cell nearest to the median position of its k nearest neighbours (Milo's refined
    sampling, which moves index cells off the sparse edges of the graph), duplicates are
    dropped, and each neighbourhood is its index cell with its neighbours in the undirected
    kNN graph (its k nearest, and the cells that have it among theirs), as in Milo.

    Writes ``obsm["nhoods"]`` (cells x neighbourhoods CSR, 1 = member) and
    ``uns["nhoods"]``: ``index`` (index cell positions), ``kth_distance`` (distance of each
    index cell to its k-th neighbour: the weight of the spatial FDR), ``k``, ``use_rep``.
    """
    settings = (settings or DASettings()).with_overrides(overrides)
    if use_rep not in adata.obsm:
        raise KeyError(
            f"obsm[{use_rep!r}] missing: neighbourhood DA runs on the integrated latent space "
            "(sepsis_sc.integrate) of the cells"
        )
    x = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    n = x.shape[0]
    k = min(settings.k, n)
    idx, dist = knn_index(x, k, seed=seed)
    rng = np.random.default_rng(seed)
    n_index = min(max(1, int(round(settings.prop * n))), settings.max_nhoods, n)
    sampled = rng.choice(n, size=n_index, replace=False)
    medians = np.median(x[idx[sampled]], axis=1)
    index = np.unique(_nearest(x, medians))
    # the undirected kNN graph (as Milo's): v's neighbourhood is v, its k nearest neighbours
    # and the cells that have v among theirs
    graph = sp.csr_matrix(
        (np.ones(idx.size, dtype=np.float32), (np.repeat(np.arange(n), idx.shape[1]), idx.ravel())),
        shape=(n, n),
    )
    graph = ((graph + graph.T) > 0).astype(np.float32).tocsc()
    member = sp.csr_matrix(graph[:, index])
    adata.obsm["nhoods"] = member
    adata.uns["nhoods"] = {
        "index": index.astype(np.int64),
        "kth_distance": dist[index, -1].astype(float),
        "k": int(k),
        "use_rep": use_rep,
        "prop": float(settings.prop),
        "seed": int(seed),
    }
    sizes = np.asarray(member.sum(axis=0)).ravel()
    logger.info(
        "%d neighbourhoods (k=%d) of %d cells, median size %d", index.size, k, n, np.median(sizes)
    )


def _nearest(x: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Position of the row of ``x`` nearest to each query (exact, in blocks)."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=1).fit(x)
    return nn.kneighbors(queries, return_distance=False)[:, 0]


def nhood_counts(adata: ad.AnnData, sample_key: str = "sample_id") -> pd.DataFrame:
    """Neighbourhoods x samples: cells of each sample in each neighbourhood."""
    if "nhoods" not in adata.obsm:
        raise KeyError("obsm['nhoods'] missing: run sepsis_sc.da.make_nhoods first")
    samples = adata.obs[sample_key].astype("category")
    ind = sp.csr_matrix(
        (np.ones(adata.n_obs), (np.arange(adata.n_obs), samples.cat.codes.to_numpy())),
        shape=(adata.n_obs, len(samples.cat.categories)),
    )
    counts = (sp.csr_matrix(adata.obsm["nhoods"]).T @ ind).toarray()
    return pd.DataFrame(
        counts.astype(np.int64),
        index=pd.RangeIndex(counts.shape[0], name="nhood"),
        columns=pd.Index(samples.cat.categories.astype(str), name=sample_key),
    )


def _majority(member: sp.csc_matrix, codes: np.ndarray, names: Sequence[str]) -> tuple:
    """Per neighbourhood: the most frequent label among its cells and its share."""
    ok = codes >= 0
    ind = sp.csr_matrix(
        (np.ones(int(ok.sum())), (np.flatnonzero(ok), codes[ok])),
        shape=(member.shape[0], len(names)),
    )
    tab = (member.T @ ind).toarray()
    sizes = np.asarray(member.sum(axis=0)).ravel()
    best = tab.argmax(axis=1)
    frac = tab[np.arange(tab.shape[0]), best] / np.maximum(sizes, 1)
    return np.asarray(names, dtype=object)[best], frac


def describe_nhoods(
    adata: ad.AnnData,
    *,
    label_keys: Sequence[str] = ("cell_type", "lineage"),
    states: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per neighbourhood: ``size``, ``index_cell``, for each of ``label_keys`` the
    majority label and its share (``<key>``, ``<key>_fraction``), ``state`` (the discrete
    state called in most of its cells, among ``states``) with ``state_fraction``, and the
    index cell's UMAP position (``umap_1``, ``umap_2``) when ``obsm["X_umap"]`` exists."""
    member = sp.csc_matrix(adata.obsm["nhoods"])
    index = np.asarray(adata.uns["nhoods"]["index"])
    out = pd.DataFrame(
        {
            "size": np.asarray(member.sum(axis=0)).ravel().astype(int),
            "index_cell": adata.obs_names[index].astype(str),
        },
        index=pd.RangeIndex(member.shape[1], name="nhood"),
    )
    for key in label_keys:
        if key not in adata.obs:
            continue
        cat = adata.obs[key].astype("category")
        lab, frac = _majority(
            member, cat.cat.codes.to_numpy(), list(cat.cat.categories.astype(str))
        )
        out[key], out[f"{key}_fraction"] = lab, frac
    called = [s for s in states if s in adata.obs]
    if called:
        calls = np.column_stack(
            [adata.obs[s].astype("boolean").fillna(False).to_numpy(dtype=bool) for s in called]
        ).astype(float)
        share = (member.T @ calls) / np.maximum(out["size"].to_numpy()[:, None], 1)
        best = share.argmax(axis=1)
        frac = share[np.arange(share.shape[0]), best]
        out["state"] = np.where(frac > 0, np.asarray(called, dtype=object)[best], "")
        out["state_fraction"] = frac
    else:
        out["state"], out["state_fraction"] = "", 0.0
    if "X_umap" in adata.obsm:
        umap = np.asarray(adata.obsm["X_umap"])[index]
        out["umap_1"], out["umap_2"] = umap[:, 0], umap[:, 1]
    return out
