"""The linear latent spaces: PCA of the scaled HVGs (the unintegrated baseline) and Harmony
on it (:func:`run_pca`, :func:`run_harmony`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from sepsis_sc.config import IntegrationSettings
from sepsis_sc.integrate.batches import batch_levels, one_batch_note, require_hvgs, require_obs

logger = logging.getLogger(__name__)

__all__ = ["run_pca", "run_harmony"]


def _scaled_hvg_matrix(adata: ad.AnnData, hvg: np.ndarray, max_value: float) -> sp.csr_matrix:
    """HVG columns of log-normalised X scaled to unit variance, still sparse.

    Centring is left to the PCA (scanpy centres sparse input implicitly), so the matrix keeps
    its zeros. Clipping ``(x - mean) / sd`` at ``max_value`` is applied exactly as the clip
    of ``x / sd`` at ``max_value + mean / sd``; the lower clip at ``-max_value`` only matters
    for genes with ``mean / sd > max_value`` (expressed in nearly every cell) and is skipped.
    """
    x = adata.X[:, np.flatnonzero(hvg)]
    x = sp.csr_matrix(x, dtype=np.float32) if sp.issparse(x) else sp.csr_matrix(np.asarray(x))
    mean = np.asarray(x.mean(axis=0)).ravel()
    sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    n = x.shape[0]
    var = (sq - mean**2) * n / max(n - 1, 1)
    sd = np.sqrt(np.clip(var, 0, None))
    sd[sd == 0] = 1.0
    x = sp.csr_matrix(x.multiply(1.0 / sd[None, :]), dtype=np.float32)
    if max_value is not None:
        ceiling = (max_value + mean / sd).astype(np.float32)
        cols = x.indices
        np.minimum(x.data, ceiling[cols], out=x.data)
    return x


def run_pca(
    adata: ad.AnnData,
    settings: IntegrationSettings | None = None,
    *,
    seed: int = 0,
    max_value: float | None = 10.0,
    key_added: str = "X_pca",
    **overrides: Any,
) -> None:
    """PCA of the scaled, log-normalised HVGs (the unintegrated baseline).

    ``X`` restricted to ``var["highly_variable"]`` is scaled to unit variance per gene and
    clipped at ``max_value`` SDs, keeping the matrix sparse (centring is implicit in the
    sparse PCA), so memory stays ~ the size of the HVG matrix.

    Parameters
    ----------
    adata
        AnnData with log-normalised ``X`` and ``var["highly_variable"]``.
    settings
        :class:`~sepsis_sc.config.IntegrationSettings`; ``n_pcs`` (number of components,
        clamped to ``min(n_obs, n_hvg) - 1``) is used. ``None``: the defaults.
    seed
        Seed of the ARPACK start vector.
    max_value
        Clip scaled values at this many SDs (``None``: no clip).
    key_added
        ``obsm`` key.
    **overrides
        Fields of ``settings`` to change (``n_pcs=``).

    Returns
    -------
    None. Writes ``obsm[key_added]`` (n_obs x n_pcs), ``varm["PCs"]`` (zero for non-HVGs)
    and ``uns["pca"]`` (``variance``, ``variance_ratio``, ``params``).
    """
    n_pcs = (settings or IntegrationSettings()).with_overrides(overrides).n_pcs
    hvg = require_hvgs(adata)
    x = adata.X
    vals = np.asarray(x.data[:100_000] if sp.issparse(x) else np.asarray(x).ravel()[:100_000])
    if vals.size and np.allclose(vals, np.round(vals)) and vals.max() > 30:
        raise ValueError(
            "X looks like raw counts (integers > 30); run_pca expects log-normalised X "
            "(sc.pp.normalize_total(adata, target_sum=1e4); sc.pp.log1p(adata))."
        )
    n_comp = min(n_pcs, adata.n_obs - 1, int(hvg.sum()) - 1)
    if n_comp < 1:
        raise ValueError(f"too few cells ({adata.n_obs}) or HVGs ({int(hvg.sum())}) for PCA")
    if n_comp < n_pcs:
        logger.warning("n_pcs=%d reduced to %d (cells/HVGs available)", n_pcs, n_comp)
    tmp = ad.AnnData(X=_scaled_hvg_matrix(adata, hvg, max_value))
    sc.pp.pca(tmp, n_comps=n_comp, zero_center=True, svd_solver="arpack", random_state=seed)
    adata.obsm[key_added] = np.asarray(tmp.obsm["X_pca"], dtype=np.float32)
    pcs = np.zeros((adata.n_vars, n_comp), dtype=np.float32)
    pcs[hvg] = tmp.varm["PCs"]
    adata.varm["PCs"] = pcs
    adata.uns["pca"] = {
        "variance": np.asarray(tmp.uns["pca"]["variance"]),
        "variance_ratio": np.asarray(tmp.uns["pca"]["variance_ratio"]),
        "params": {"n_comps": int(n_comp), "max_value": max_value, "use_highly_variable": True},
    }
    logger.info(
        "PCA: %d components on %d HVGs explain %.1f%% of their variance",
        n_comp,
        hvg.sum(),
        100 * float(np.sum(tmp.uns["pca"]["variance_ratio"])),
    )


def _harmony_record(
    adata: ad.AnnData,
    key_added: str,
    epochs: int | None,
    max_iter_harmony: int,
    seed: int,
    batch_key: Any,
    keys: list[str],
    n_pcs: int,
    theta: Any,
    seconds: float,
) -> dict[str, Any]:
    """``uns["integration"]`` of a Harmony run (also of the one-batch PCA copy)."""
    return {
        "method": "harmony",
        "embedding": key_added,
        "device": "cpu",
        "epochs_trained": epochs,
        "max_epochs": int(max_iter_harmony),
        "seed": int(seed),
        "batch_key": batch_key if isinstance(batch_key, str) else keys,
        "n_hvg": int(adata.var["highly_variable"].sum()),
        "n_cells": int(adata.n_obs),
        "n_pcs": int(n_pcs),
        "theta": theta,
        "seconds": round(seconds, 2),
    }


def run_harmony(
    adata: ad.AnnData,
    settings: IntegrationSettings | None = None,
    *,
    seed: int = 0,
    theta: float | Sequence[float] = 2.0,
    max_iter_harmony: int = 20,
    threads: int | None = None,
    key_added: str = "X_harmony",
    **overrides: Any,
) -> None:
    """Harmony (Korsunsky et al. 2019) on the PCA embedding.

    Uses ``obsm["X_pca"]`` (computed with :func:`run_pca` when absent or too short). When the
    batch key has one level there is nothing to correct (harmonypy would return the PCs
    unchanged): Harmony is not run, ``obsm[key_added]`` is a copy of the first ``n_pcs`` PCs,
    a warning is logged and ``uns["integration"]`` records ``batch_corrected: False`` and a
    ``note``.

    Parameters
    ----------
    adata
        AnnData with HVGs flagged (and optionally ``obsm["X_pca"]``).
    settings
        :class:`~sepsis_sc.config.IntegrationSettings`; ``batch_key`` (``obs`` column, or
        a list of columns, to integrate over) and ``n_pcs`` (number of PCs corrected) are
        used. ``None``: the defaults.
    seed
        Harmony's random state (k-means initialisation).
    theta
        Diversity penalty (higher = stronger mixing).
    max_iter_harmony
        Maximum Harmony iterations.
    threads
        Threads for harmonypy (``None``: one per physical core).
    key_added
        ``obsm`` key.
    **overrides
        Fields of ``settings`` to change (``batch_key=``, ``n_pcs=``).

    Returns
    -------
    None. Writes ``obsm[key_added]`` (n_obs x n_pcs) and ``uns["integration"]``.
    """
    settings = (settings or IntegrationSettings()).with_overrides(overrides)
    batch_key, n_pcs = settings.batch_key, settings.n_pcs
    keys = [batch_key] if isinstance(batch_key, str) else list(batch_key)
    require_obs(adata, keys, "Harmony batch key")
    levels = batch_levels(adata, keys)
    t0 = time.perf_counter()
    if "X_pca" not in adata.obsm or adata.obsm["X_pca"].shape[1] < n_pcs:
        run_pca(adata, settings, seed=seed)
    if len(levels) < 2:  # nothing to correct: harmonypy returns the PCs unchanged
        pcs = np.asarray(adata.obsm["X_pca"][:, :n_pcs], dtype=np.float32)
        adata.obsm[key_added] = pcs.copy()
        adata.uns["integration"] = {
            **_harmony_record(
                adata,
                key_added,
                0,
                max_iter_harmony,
                seed,
                batch_key,
                keys,
                pcs.shape[1],
                theta,
                time.perf_counter() - t0,
            ),
            **_harmony_one_batch(keys, levels, key_added, pcs.shape[1]),
        }
        return
    pcs = np.asarray(adata.obsm["X_pca"][:, :n_pcs], dtype=np.float64)
    z, epochs = _harmonypy(
        pcs,
        adata.obs[keys],
        keys,
        theta=theta,
        max_iter_harmony=max_iter_harmony,
        seed=seed,
        threads=threads,
    )
    adata.obsm[key_added] = z.astype(np.float32)
    seconds = time.perf_counter() - t0
    adata.uns["integration"] = _harmony_record(
        adata,
        key_added,
        epochs,
        max_iter_harmony,
        seed,
        batch_key,
        keys,
        pcs.shape[1],
        theta,
        seconds,
    )
    logger.info("Harmony on %d PCs over %s: %.1f s", pcs.shape[1], keys, seconds)


def _harmony_one_batch(
    keys: list[str], levels: list[str], key_added: str, n_pcs: int
) -> dict[str, Any]:
    """Record entries (and the warning) for Harmony with one batch level: the PCs copied."""
    note = one_batch_note(
        keys,
        levels,
        f"no batch correction; Harmony not run, obsm[{key_added!r}] is the PCA embedding",
        prefix="one batch level",
    )
    logger.warning(
        "Harmony: batch key %s has one level (%r), so there is nothing to correct; "
        "obsm[%r] is a copy of the first %d PCs (no batch correction)",
        keys,
        levels[0] if levels else None,
        key_added,
        n_pcs,
    )
    return {"n_batches": len(levels), "batch_corrected": False, "note": note}


def _harmonypy(
    pcs: np.ndarray,
    obs: pd.DataFrame,
    keys: list[str],
    *,
    theta: float | Sequence[float],
    max_iter_harmony: int,
    seed: int,
    threads: int | None,
) -> tuple[np.ndarray, int | None]:
    """harmonypy on the PCs: (corrected embedding, cells x PCs; iterations run or None)."""
    import harmonypy

    meta = obs[keys].astype(str).reset_index(drop=True)
    ho = harmonypy.run_harmony(
        pcs,
        meta,
        keys,
        theta=theta,
        max_iter_harmony=max_iter_harmony,
        random_state=seed,
        verbose=False,
        ncores=threads or 0,
    )
    z = np.asarray(ho.Z_corr)
    if z.shape[0] != pcs.shape[0]:  # harmonypy < 2 returns PCs x cells
        z = z.T
    epochs = len(ho.objective_harmony) if hasattr(ho, "objective_harmony") else None
    return z, epochs
