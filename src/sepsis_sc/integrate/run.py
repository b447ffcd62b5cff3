"""The stage's dispatchers: :func:`integrate` computes one latent space (scVI, Harmony or PCA)
on shared HVGs and writes its record to ``uns["integration"]``; :func:`integrate_methods`
computes the downstream one and those it is compared with."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad

from sepsis_sc.config import EMBEDDING_KEYS, IntegrationSettings
from sepsis_sc.integrate.batches import batch_levels, one_batch_note, require_obs
from sepsis_sc.integrate.hvg import select_hvgs
from sepsis_sc.integrate.linear import run_harmony, run_pca
from sepsis_sc.integrate.scvi import run_scvi
from sepsis_sc.store import CountSource

logger = logging.getLogger(__name__)

__all__ = ["integrate", "integrate_methods"]


def integrate(
    adata: ad.AnnData,
    settings: IntegrationSettings | None = None,
    *,
    seed: int = 0,
    comparison: bool = False,
    model_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    counts: CountSource | None = None,
    layer: str | None = "counts",
    **overrides: Any,
) -> str | None:
    """Compute one latent space: selects HVGs if needed, then runs the method.

    Parameters
    ----------
    adata
        Merged, QC-filtered AnnData (``layers["counts"]``, log-normalised ``X``).
    settings
        :class:`~sepsis_sc.config.IntegrationSettings` (e.g.
        ``IntegrationSettings.from_config(cfg["integration"])``); ``None``: the defaults.
        ``method`` picks ``"scvi"`` (:func:`run_scvi`), ``"harmony"`` (:func:`run_harmony`)
        or ``"pca"`` (:func:`run_pca`, no batch correction); ``batch_key`` is the ``obs``
        column with the batch, ``n_hvg`` the HVGs selected when ``var["highly_variable"]``
        is absent, ``n_pcs`` the PCs of ``pca``/``harmony``, and the scVI fields go to
        :func:`run_scvi`.
    seed
        Random seed.
    comparison
        The embedding is computed only to be compared in the integration metrics (not used
        downstream). A batch-correction method with nothing to correct is then skipped rather
        than run: Harmony when ``obs[batch_key]`` has one level (it would equal PCA, which is
        compared anyway). Downstream (``False``), Harmony with one level writes the PCA
        embedding under ``X_harmony`` with a warning (see :func:`run_harmony`).
    model_dir
        Folder the scVI model is saved to (``method="scvi"``; ``None``: not saved).
    threads
        CPU threads of scVI's torch or of harmonypy (``None``: their defaults).
    counts, layer
        The raw counts for the HVGs and scVI (:func:`select_hvgs`, :func:`run_scvi`):
        a :class:`~sepsis_sc.store.CountSource`, or ``None`` for ``adata.layers[layer]``.
    **overrides
        Fields of ``settings`` to change (e.g. ``method="pca"``, ``max_epochs=``,
        ``accelerator=``).

    Returns
    -------
    The ``obsm`` key of the embedding (``X_scVI``, ``X_harmony`` or ``X_pca``), or ``None``
    when a comparison method was skipped (``uns["integration"]`` then records
    ``skipped: True`` and a ``note``). For ``pca``, ``uns["integration"]`` records
    ``method="pca"``.
    """
    settings = (settings or IntegrationSettings()).with_overrides(overrides)
    method, batch_key = settings.method, settings.batch_key
    if method not in EMBEDDING_KEYS:
        raise ValueError(
            f"unknown integration method {method!r}; choose one of {sorted(EMBEDDING_KEYS)} "
            "(config key integration.method)."
        )
    if "highly_variable" not in adata.var:
        select_hvgs(adata, settings, counts=counts, layer=layer)
    if method == "scvi":
        run_scvi(
            adata,
            settings,
            seed=seed,
            model_dir=model_dir,
            threads=threads,
            counts=counts,
            layer=layer,
        )
    elif method == "harmony":
        if batch_key is None:
            raise ValueError("method='harmony' needs a batch_key")
        require_obs(adata, [batch_key], "Harmony batch key")
        levels = batch_levels(adata, [batch_key])
        if comparison and len(levels) < 2:
            adata.uns["integration"] = _skipped_harmony_record(batch_key, levels)
            return None
        run_harmony(adata, settings, seed=seed, threads=threads)
    else:
        t0 = time.perf_counter()
        run_pca(adata, settings, seed=seed)
        adata.uns["integration"] = _pca_record(adata, batch_key, seed, time.perf_counter() - t0)
    return EMBEDDING_KEYS[method]


def integrate_methods(
    adata: ad.AnnData,
    settings: IntegrationSettings | None = None,
    *,
    methods: Sequence[str],
    seed: int = 0,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, dict[str, Any]]:
    """Compute the latent space of each method: the first one is used downstream, the others
    are computed to be compared (:func:`integrate` with ``comparison=True``: Harmony with one
    batch level is skipped).

    Parameters
    ----------
    adata
        As for :func:`integrate`.
    settings
        :class:`~sepsis_sc.config.IntegrationSettings`; ``None``: the defaults. Its
        ``method`` is replaced by each of ``methods`` in turn.
    methods
        Methods (``"scvi"``, ``"harmony"``, ``"pca"``), the downstream one first.
    seed
        Random seed.
    method_kwargs
        Keyword arguments of :func:`integrate` per method, e.g.
        ``{"scvi": {"model_dir": ..., "threads": 4, "layer": "counts"}}``.
    **overrides
        Fields of ``settings`` to change.

    Returns
    -------
    The record of each method (its ``uns["integration"]``, with ``embedding`` ``None`` when
    it was skipped), in the order of ``methods``. Writes each method's ``obsm`` key,
    ``uns["integration"]`` (the downstream method's record) and ``uns["integration_runs"]``
    (every record, without its ``None`` values).
    """
    settings = (settings or IntegrationSettings()).with_overrides(overrides)
    records: dict[str, dict[str, Any]] = {}
    main = methods[0]
    for method in methods:
        key = integrate(
            adata,
            settings,
            method=method,
            seed=seed,
            comparison=method != main,
            **(method_kwargs or {}).get(method, {}),
        )
        records[method] = dict(adata.uns["integration"], embedding=key)
        if key is None:
            logger.info("%s skipped: %s", method, records[method].get("note"))
            continue
        logger.info("%s -> obsm[%r] on %s", method, key, records[method].get("device"))
        if records[method].get("note"):
            logger.info("%s: %s", method, records[method]["note"])
    adata.uns["integration"] = records[main]
    adata.uns["integration_runs"] = {
        m: {k: v for k, v in r.items() if v is not None} for m, r in records.items()
    }
    return records


def _skipped_harmony_record(batch_key: str, levels: list[str]) -> dict[str, Any]:
    """Record (and log line) of Harmony skipped as a comparison: one batch level."""
    note = one_batch_note(
        [batch_key],
        levels,
        "Harmony not run as a comparison (nothing to correct; it equals PCA)",
    )
    logger.info(
        "batch key %r has one level (%r): Harmony skipped as a comparison method "
        "(nothing to correct; it would equal PCA)",
        batch_key,
        levels[0] if levels else None,
    )
    return {
        "method": "harmony",
        "embedding": None,
        "skipped": True,
        "batch_key": batch_key,
        "n_batches": len(levels),
        "batch_corrected": False,
        "note": note,
    }


def _pca_record(
    adata: ad.AnnData, batch_key: str | None, seed: int, seconds: float
) -> dict[str, Any]:
    """``uns["integration"]`` of the plain PCA embedding."""
    return {
        "method": "pca",
        "embedding": "X_pca",
        "device": "cpu",
        "epochs_trained": None,
        "max_epochs": None,
        "seed": int(seed),
        "batch_key": batch_key,
        "n_hvg": int(adata.var["highly_variable"].sum()),
        "n_cells": int(adata.n_obs),
        "n_pcs": int(adata.obsm["X_pca"].shape[1]),
        "seconds": round(seconds, 2),
    }
