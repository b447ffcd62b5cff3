"""The kNN graph of the clustering stage: exact (scikit-learn) or approximate (pynndescent)
neighbours on the latent space (:func:`knn_method`, :func:`neighbors`)."""

from __future__ import annotations

from typing import Literal

import anndata as ad
import scanpy as sc

__all__ = ["EXACT_KNN_MAX_CELLS", "knn_method", "neighbors"]

#: Largest cohort (cells) for which the kNN graph is exact by default (see :func:`knn_method`).
EXACT_KNN_MAX_CELLS = 150_000


def knn_method(n_obs: int, knn: Literal["auto", "exact", "approx"] = "auto") -> str:
    """The kNN search of :func:`sepsis_sc.cluster.leiden_multi` for ``n_obs`` cells:
    ``"exact"`` or ``"approx"``.

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
