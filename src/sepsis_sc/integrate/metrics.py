"""scib-style integration metrics (Luecken et al. 2022, Nat Methods 19:41).

The definitions of scib re-implemented with numpy/scikit-learn, so no jax-based
``scib-metrics`` is needed: :func:`lisi` (local inverse Simpson's index) and
:func:`integration_metrics` (iLISI, batch ASW, graph connectivity, cLISI, label ASW,
NMI/ARI of an optimised Leiden clustering, and their summaries), each scaled to [0, 1],
higher = better.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from sepsis_sc.config import IntegrationSettings
from sepsis_sc.integrate.batches import one_batch_note, require_obs

logger = logging.getLogger(__name__)

__all__ = ["lisi", "integration_metrics"]


def _knn(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of each row (self excluded): (distances, indices), n x k."""
    n = x.shape[0]
    k = min(k, n - 1)
    if n <= 50_000:
        from sklearn.neighbors import NearestNeighbors

        dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    else:
        from pynndescent import NNDescent

        index = NNDescent(x, n_neighbors=k + 1, random_state=seed, n_jobs=1)
        idx, dist = index.neighbor_graph
    rows = np.arange(n)[:, None]
    is_self = idx == rows
    # drop self where found, else the farthest neighbour, keeping k per row
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(n), drop] = False
    return dist[keep].reshape(n, k), idx[keep].reshape(n, k)


def lisi(
    distances: np.ndarray,
    indices: np.ndarray,
    labels: np.ndarray,
    *,
    perplexity: float | None = None,
    tol: float = 1e-5,
    n_iter: int = 50,
) -> np.ndarray:
    """Local inverse Simpson's index of each cell (Korsunsky et al. 2019).

    For each cell, Gaussian weights over its k neighbours are calibrated (binary search on the
    precision) to the given perplexity, as in t-SNE; LISI = 1 / sum_c p_c^2 where p_c is the
    weight of label c. It ranges from 1 (all neighbours share one label) to the number of
    labels (perfect mixing). Same computation as scib / scib-metrics (``perplexity`` defaults
    to k / 3); distances are shifted by their row minimum for numerical stability (the
    calibrated weights are unchanged by the shift).

    Parameters
    ----------
    distances, indices
        n x k neighbour distances and indices (self excluded).
    labels
        Label of each cell (length n).
    perplexity
        Effective number of neighbours (default ``floor(k / 3)``).
    tol, n_iter
        Binary-search tolerance on the entropy and maximum steps.

    Returns
    -------
    LISI per cell (NaN where the weights could not be calibrated).
    """
    codes, _ = pd.factorize(np.asarray(labels))
    n_cat = int(codes.max()) + 1
    d = np.asarray(distances, dtype=np.float64)
    d = d - d.min(axis=1, keepdims=True)
    k = d.shape[1]
    if perplexity is None:
        perplexity = float(np.floor(k / 3))
    log_u = np.log(perplexity)
    n = d.shape[0]
    beta = np.ones(n)
    beta_min = np.full(n, -np.inf)
    beta_max = np.full(n, np.inf)

    def h_beta(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = np.exp(-d * b[:, None])
        sum_p = p.sum(axis=1)
        ok = sum_p > 0
        h = np.zeros(n)
        h[ok] = np.log(sum_p[ok]) + b[ok] * (d[ok] * p[ok]).sum(axis=1) / sum_p[ok]
        p[ok] /= sum_p[ok, None]
        p[~ok] = 0
        return h, p

    h, p = h_beta(beta)
    for _ in range(n_iter):
        diff = h - log_u
        active = np.abs(diff) >= tol
        if not active.any():
            break
        up = active & (diff > 0)
        down = active & (diff <= 0)
        beta_min[up] = beta[up]
        beta[up] = np.where(np.isinf(beta_max[up]), beta[up] * 2, (beta[up] + beta_max[up]) / 2)
        beta_max[down] = beta[down]
        beta[down] = np.where(
            np.isinf(beta_min[down]), beta[down] / 2, (beta[down] + beta_min[down]) / 2
        )
        h, p = h_beta(beta)
    label_of = codes[np.asarray(indices)]
    simpson = np.zeros(n)
    for c in range(n_cat):
        pc = (p * (label_of == c)).sum(axis=1)
        simpson += pc**2
    out = np.full(n, np.nan)
    ok = (h != 0) & (simpson > 0)
    out[ok] = 1.0 / simpson[ok]
    return out


def _silhouette_subsample(n: int, max_cells: int, seed: int) -> np.ndarray:
    if n <= max_cells:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_cells, replace=False))


def _batch_asw(x: np.ndarray, batches: np.ndarray, labels: np.ndarray | None) -> float:
    from sklearn.metrics import silhouette_samples

    groups = np.zeros(len(batches), dtype=int) if labels is None else pd.factorize(labels)[0]
    per_label = []
    for g in np.unique(groups):
        m = groups == g
        b = batches[m]
        nb = len(np.unique(b))
        if nb < 2 or nb >= m.sum():
            continue
        s = silhouette_samples(x[m], b)
        per_label.append(float(np.mean(1 - np.abs(s))))
    return float(np.mean(per_label)) if per_label else np.nan


def _graph_connectivity(conn: sp.spmatrix, labels: np.ndarray) -> float:
    from scipy.sparse.csgraph import connected_components

    conn = sp.csr_matrix(conn)
    fractions = []
    for lab in pd.unique(labels):
        idx = np.flatnonzero(labels == lab)
        _, comp = connected_components(conn[idx][:, idx], directed=False)
        fractions.append(np.bincount(comp).max() / len(idx))
    return float(np.mean(fractions))


def _best_leiden_nmi_ari(
    tmp: ad.AnnData, labels: np.ndarray, resolutions: Sequence[float], seed: int
) -> tuple[float, float, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    best = (-1.0, np.nan, np.nan)
    for res in resolutions:
        sc.tl.leiden(
            tmp,
            resolution=res,
            key_added="_leiden",
            random_state=seed,
            flavor="igraph",
            n_iterations=2,
            directed=False,
        )
        clusters = tmp.obs["_leiden"].to_numpy()
        nmi = normalized_mutual_info_score(labels, clusters)
        if nmi > best[0]:
            best = (nmi, adjusted_rand_score(labels, clusters), res)
    return best


def integration_metrics(
    adata: ad.AnnData,
    settings: IntegrationSettings | None = None,
    *,
    embed_keys: Sequence[str],
    label_key: str | None = None,
    cluster_key: str | Mapping[str, str] | None = None,
    n_neighbors: int = 15,
    n_neighbors_lisi: int = 90,
    max_cells_silhouette: int = 20_000,
    leiden_resolutions: Sequence[float] = tuple(round(0.2 * i, 1) for i in range(1, 11)),
    seed: int = 0,
    skipped: Mapping[str, str] | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Score embeddings for batch removal and, with labels, conservation of biology.

    Definitions (scib; Luecken et al. 2022), all in [0, 1], higher = better:

    - ``ilisi``: (median LISI over batches - 1) / (n_batches - 1), on ``n_neighbors_lisi``
      neighbours with perplexity ``n_neighbors_lisi / 3``.
    - ``batch_asw``: within each label, silhouette of cells by batch, turned into
      ``1 - |s|`` per cell and averaged; then averaged over labels (labels present in one
      batch only are skipped). Without ``label_key`` all cells form one group, which mixes
      biology into the score: prefer giving labels.
    - ``clisi``: (n_labels - median LISI over labels) / (n_labels - 1).
    - ``label_asw``: (silhouette of cells by label + 1) / 2.
    - ``graph_connectivity``: per label, the fraction of its cells in the largest connected
      component of the kNN graph (``n_neighbors``, scanpy connectivities) restricted to the
      label; averaged over labels.
    - ``nmi``, ``ari``: Leiden clusters vs labels. Without ``cluster_key``, Leiden is run on
      each embedding's kNN graph at ``leiden_resolutions`` and the clustering with the best
      NMI is kept (scib's optimised clustering); ``leiden_resolution`` reports which.
    - ``batch_correction``: mean of ilisi, batch_asw, graph_connectivity (available ones);
      ``bio_conservation``: mean of clisi, label_asw, nmi, ari; ``overall``: 0.4 x batch +
      0.6 x bio (scib's weighting, over this subset of its metrics).

    Silhouettes use a seeded random subsample of ``max_cells_silhouette`` cells when there
    are more cells; kNN search is exact up to 50,000 cells (pynndescent above).

    With one level of ``obs[batch_key]`` (one sequencing run; ``sample_id`` with one sample)
    there is no batch to mix: the batch-removal terms (``ilisi``, ``batch_asw``,
    ``graph_connectivity``, hence ``batch_correction`` and ``overall``) are NaN, the
    biology-conservation terms are computed when labels are given, and a ``note`` column says
    ``"skipped: one batch level ..."``. With two or more levels the table has no ``note``
    column (unless ``skipped`` is given) and is unchanged.

    Parameters
    ----------
    adata
        AnnData with the embeddings in ``obsm``.
    settings
        :class:`~sepsis_sc.config.IntegrationSettings`; ``batch_key`` (``obs`` column with
        the batch) is used. ``None``: the defaults.
    embed_keys
        ``obsm`` keys to score (e.g. ``["X_pca", "X_harmony", "X_scVI"]``).
    label_key
        ``obs`` column with known cell labels (e.g. simulated truth); ``None`` leaves the
        label metrics NaN.
    cluster_key
        ``obs`` column (or mapping embedding -> column) with clusters to use for NMI/ARI
        instead of the optimised Leiden.
    n_neighbors, n_neighbors_lisi
        Neighbours for the graph metrics and for LISI.
    max_cells_silhouette
        Subsample size for silhouettes.
    leiden_resolutions
        Resolutions tried for NMI/ARI.
    seed
        Seed for subsampling, neighbours and Leiden.
    skipped
        Embeddings that were not computed, mapped to why (e.g. Harmony skipped as a
        comparison with one batch, see :func:`sepsis_sc.integrate.integrate`): each gets a
        row with NaN metrics and the reason in ``note``, after the scored rows.
    **overrides
        Fields of ``settings`` to change (``batch_key=``).

    Returns
    -------
    One row per embedding: ``embedding``, ``n_cells``, ``n_batches``, ``n_labels``, the
    metrics above, ``leiden_resolution`` (and ``note`` when batch terms or embeddings were
    skipped).
    """
    batch_key = (settings or IntegrationSettings()).with_overrides(overrides).batch_key
    if not embed_keys:
        raise ValueError("embed_keys is empty; give at least one obsm key")
    cells = _MetricCells.from_obs(adata, batch_key, label_key, max_cells_silhouette, seed)
    rows = []
    for key in embed_keys:
        x = _embedding(adata, key)
        t0 = time.perf_counter()
        row: dict[str, Any] = {
            "embedding": key,
            "n_cells": adata.n_obs,
            "n_batches": cells.n_batches,
            "n_labels": cells.n_labels,
        }
        dist, idx = _batch_terms(row, x, cells, n_neighbors_lisi=n_neighbors_lisi, seed=seed)
        ckey = cluster_key.get(key) if isinstance(cluster_key, Mapping) else cluster_key
        row.update(
            _label_terms(
                adata,
                x,
                dist,
                idx,
                cells,
                cluster_key=ckey,
                n_neighbors=n_neighbors,
                leiden_resolutions=leiden_resolutions,
                seed=seed,
            )
        )
        _summary_scores(row, cells)
        rows.append(row)
        _log_metrics(row, time.perf_counter() - t0)
    rows += _skipped_rows(skipped or {}, adata.n_obs, cells)
    return _metrics_table(rows)


#: columns of the integration-metrics table, in order (``note`` is added when present)
_METRIC_COLUMNS = (
    "embedding",
    "n_cells",
    "n_batches",
    "n_labels",
    "ilisi",
    "batch_asw",
    "graph_connectivity",
    "clisi",
    "label_asw",
    "nmi",
    "ari",
    "batch_correction",
    "bio_conservation",
    "overall",
    "leiden_resolution",
)


@dataclass(frozen=True)
class _MetricCells:
    """What every embedding's metrics share: batches, labels, the silhouette subsample."""

    batches: np.ndarray
    n_batches: int
    batch_note: str | None  # set when there is one batch level (no batch-removal terms)
    labels: np.ndarray | None
    n_labels: int
    sub: np.ndarray  # silhouette subsample (cell indices)

    @property
    def one_batch(self) -> bool:
        return self.n_batches < 2

    @classmethod
    def from_obs(
        cls,
        adata: ad.AnnData,
        batch_key: str,
        label_key: str | None,
        max_cells_silhouette: int,
        seed: int,
    ) -> _MetricCells:
        """Check the keys, read batches and labels, note (and log) a single batch level."""
        require_obs(adata, [batch_key], "batch key for metrics")
        if label_key is not None:
            require_obs(adata, [label_key], "label key for metrics")
        batches = adata.obs[batch_key].astype(str).to_numpy()
        n_batches = len(np.unique(batches))
        batch_note = None
        if n_batches < 2:
            batch_note = one_batch_note(
                [batch_key],
                list(np.unique(batches)),
                "batch-removal terms (iLISI, batch ASW, graph connectivity) not computed",
            )
            logger.info(
                "batch key %r has one level (%r): batch-removal metrics skipped; "
                "biology-conservation metrics %s",
                batch_key,
                batches[0] if len(batches) else None,
                "computed" if label_key is not None else "need labels (none given)",
            )
        labels = None if label_key is None else adata.obs[label_key].astype(str).to_numpy()
        return cls(
            batches=batches,
            n_batches=n_batches,
            batch_note=batch_note,
            labels=labels,
            n_labels=0 if labels is None else len(np.unique(labels)),
            sub=_silhouette_subsample(adata.n_obs, max_cells_silhouette, seed),
        )


def _embedding(adata: ad.AnnData, key: str) -> np.ndarray:
    """``obsm[key]`` as float32; it must exist and be finite."""
    if key not in adata.obsm:
        raise KeyError(f"obsm[{key!r}] not found; available: {list(adata.obsm)}")
    x = np.asarray(adata.obsm[key], dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"obsm[{key!r}] has non-finite values")
    return x


def _batch_terms(
    row: dict[str, Any], x: np.ndarray, cells: _MetricCells, *, n_neighbors_lisi: int, seed: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """iLISI and batch ASW into ``row`` (NaN with one batch level).

    Returns the LISI neighbours (distances, indices), also needed by cLISI; ``(None, None)``
    when neither needs them (one batch level, no labels).
    """
    dist = idx = None
    if cells.one_batch:
        row["ilisi"] = row["batch_asw"] = np.nan
        if cells.labels is not None:
            dist, idx = _knn(x, n_neighbors_lisi, seed)
        return dist, idx
    dist, idx = _knn(x, n_neighbors_lisi, seed)
    row["ilisi"] = (np.nanmedian(lisi(dist, idx, cells.batches)) - 1) / (cells.n_batches - 1)
    sub = cells.sub
    row["batch_asw"] = _batch_asw(
        x[sub], cells.batches[sub], None if cells.labels is None else cells.labels[sub]
    )
    return dist, idx


def _label_terms(
    adata: ad.AnnData,
    x: np.ndarray,
    dist: np.ndarray | None,
    idx: np.ndarray | None,
    cells: _MetricCells,
    *,
    cluster_key: str | None,
    n_neighbors: int,
    leiden_resolutions: Sequence[float],
    seed: int,
) -> dict[str, float]:
    """cLISI, label ASW, graph connectivity, NMI/ARI (and the Leiden resolution used) on
    the embedding's kNN graph; all NaN without labels."""
    from sklearn.metrics import silhouette_score

    labels, n_labels, sub = cells.labels, cells.n_labels, cells.sub
    if labels is None:
        return dict(
            clisi=np.nan,
            label_asw=np.nan,
            graph_connectivity=np.nan,
            nmi=np.nan,
            ari=np.nan,
            leiden_resolution=np.nan,
        )
    tmp = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names), obsm={"X_emb": x})
    sc.pp.neighbors(tmp, n_neighbors=n_neighbors, use_rep="X_emb", random_state=seed)
    out = {
        "clisi": (
            (n_labels - np.nanmedian(lisi(dist, idx, labels))) / (n_labels - 1)
            if n_labels > 1
            else np.nan
        ),
        "label_asw": (silhouette_score(x[sub], labels[sub]) + 1) / 2 if n_labels > 1 else np.nan,
        "graph_connectivity": (
            np.nan if cells.one_batch else _graph_connectivity(tmp.obsp["connectivities"], labels)
        ),
    }
    out.update(_cluster_agreement(adata, tmp, labels, cluster_key, leiden_resolutions, seed))
    return out


def _cluster_agreement(
    adata: ad.AnnData,
    tmp: ad.AnnData,
    labels: np.ndarray,
    cluster_key: str | None,
    leiden_resolutions: Sequence[float],
    seed: int,
) -> dict[str, float]:
    """NMI and ARI of clusters vs labels: the given ``obs[cluster_key]``, else the Leiden
    resolution with the best NMI on ``tmp``'s graph (``leiden_resolution`` says which)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    if cluster_key is None:
        nmi, ari, res = _best_leiden_nmi_ari(tmp, labels, leiden_resolutions, seed)
        return {"nmi": nmi, "ari": ari, "leiden_resolution": res}
    require_obs(adata, [cluster_key], "cluster key for NMI/ARI")
    clusters = adata.obs[cluster_key].astype(str).to_numpy()
    return {
        "nmi": normalized_mutual_info_score(labels, clusters),
        "ari": adjusted_rand_score(labels, clusters),
        "leiden_resolution": np.nan,
    }


def _summary_scores(row: dict[str, Any], cells: _MetricCells) -> None:
    """``batch_correction``, ``bio_conservation`` (means of the available terms),
    ``overall`` (0.4 x batch + 0.6 x bio) and the one-batch ``note`` into ``row``."""
    batch_part = [row["ilisi"], row["batch_asw"], row["graph_connectivity"]]
    bio_part = [row["clisi"], row["label_asw"], row["nmi"], row["ari"]]
    row["batch_correction"] = np.nan if cells.one_batch else float(np.nanmean(batch_part))
    if cells.batch_note is not None:
        row["note"] = cells.batch_note
    row["bio_conservation"] = (
        float(np.nanmean(bio_part)) if not np.all(np.isnan(bio_part)) else np.nan
    )
    row["overall"] = 0.4 * row["batch_correction"] + 0.6 * row["bio_conservation"]


def _log_metrics(row: Mapping[str, Any], seconds: float) -> None:
    """One log line per scored embedding."""
    logger.info(
        "metrics for %s (%.1f s): iLISI %.3f, batch ASW %.3f, cLISI %s, ARI %s",
        row["embedding"],
        seconds,
        row["ilisi"],
        row["batch_asw"],
        f"{row['clisi']:.3f}",
        f"{row['ari']:.3f}",
    )


def _skipped_rows(
    skipped: Mapping[str, str], n_cells: int, cells: _MetricCells
) -> list[dict[str, Any]]:
    """Rows (NaN metrics, the reason in ``note``) for embeddings that were not computed."""
    rows = []
    for key, why in skipped.items():
        rows.append(
            {
                "embedding": key,
                "n_cells": n_cells,
                "n_batches": cells.n_batches,
                "n_labels": cells.n_labels,
                "note": why,
            }
        )
        logger.info("metrics for %s skipped: %s", key, why)
    return rows


def _metrics_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The rows in :data:`_METRIC_COLUMNS` order, plus ``note`` when any row has one."""
    cols = list(_METRIC_COLUMNS)
    if any("note" in row for row in rows):
        cols.append("note")
    return pd.DataFrame(rows).reindex(columns=cols)
