"""Adaptive per-sample thresholds (median ± k MADs) and the outlier flags they give.

* :func:`adaptive_thresholds`: per sample and metric ``median ± k * MAD`` (unscaled), in
  natural units, tightened by the optional hard limits of :class:`~sepsis_sc.config.QCSettings`;
* :func:`flag_outliers`: ``obs["qc_reason"]`` / ``obs["qc_outlier"]`` from that table;
* :func:`add_reason`: append a reason to ``obs["qc_reason"]`` (used by the later steps).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from sepsis_sc.config import QCSettings
from sepsis_sc.qc.metrics import sample_ids, unscaled_mad

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_NMADS", "adaptive_thresholds", "flag_outliers", "add_reason"]

#: default number of MADs per metric (Heumos et al. 2023: 5 for counts/genes, 3 for mito),
#: the schema's ``qc.nmads_counts``, ``qc.nmads_genes``, ``qc.nmads_mt``
DEFAULT_NMADS: dict[str, float] = QCSettings().nmads

# metric -> (obs column in natural units, stem of the threshold/reason names)
_CANONICAL: dict[str, tuple[str, str]] = {
    "log1p_total_counts": ("total_counts", "counts"),
    "total_counts": ("total_counts", "counts"),
    "log1p_n_genes_by_counts": ("n_genes_by_counts", "genes"),
    "n_genes_by_counts": ("n_genes_by_counts", "genes"),
    "pct_counts_mt": ("pct_counts_mt", "pct_mt"),
}


def adaptive_thresholds(
    adata: ad.AnnData,
    settings: QCSettings | None = None,
    *,
    batch_key: str | None = "sample_id",
    upper: bool = True,
    **overrides: Any,
) -> pd.DataFrame:
    """Per-sample outlier thresholds: median ± k·MAD, tightened by optional hard limits.

    For each sample and each metric of ``settings.nmads`` the threshold is ``median ± k * MAD``
    (unscaled MAD). Percentage metrics (``pct_*``) get an upper threshold only; the others
    (log counts, log genes) get both. Log-scale thresholds are converted to natural units
    (``min_counts``, ``max_counts``, ``min_genes``, ``max_genes``), and the hard limits, when
    given, tighten them: the effective lower threshold is ``max(adaptive, floor)`` and the
    upper one ``min(adaptive, ceiling)``. A metric whose MAD is 0 in a sample gets no
    adaptive threshold there (a warning is logged) instead of flagging every cell off
    the median.

    Parameters
    ----------
    adata
        AnnData after :func:`qc_metrics`.
    settings
        QC settings (:class:`~sepsis_sc.config.QCSettings`; ``None``: the schema defaults).
        Used here: ``nmads_counts``, ``nmads_genes``, ``nmads_mt`` (MADs for
        ``log1p_total_counts``, ``log1p_n_genes_by_counts``, ``pct_counts_mt``: 5, 5, 3);
        the hard floors / ceilings ``min_counts``, ``max_counts`` (total UMI counts per
        cell), ``min_genes``, ``max_genes`` (detected genes) and ``max_pct_mt`` (cells above
        it always fail); ``None`` means adaptive only; and ``mt_threshold_floor``: the
        mitochondrial threshold is never set below this percentage (applied before
        ``max_pct_mt``). Without it, 3 MADs around a lymphocyte-dominated median (about
        2.8 % +- 0.7 % in 10x PBMC) cut at about 5 % and remove a large part of the
        monocytes, whose healthy mitochondrial fraction is 4-7 %: a cell-type bias that
        Heumos et al. 2023 warn about. 8 % is the fixed cut-off of their tutorial, used
        here as a lower bound on the adaptive threshold. ``None`` = purely adaptive.
    batch_key
        ``obs`` column naming the sample; thresholds are computed within each sample.
        ``None`` (or a missing column) treats all cells as one sample.
    upper
        Give count and gene metrics an adaptive upper threshold too (``False``: lower side
        only; hard ``max_counts`` / ``max_genes`` still apply). A sample-wide upper cut
        depends on the cell mix: in a sample of 80 % low-UMI neutrophils it falls near
        6,000 UMIs and removes healthy monocytes and plasmablasts (``docs/qc.md``), so
        :func:`run_qc` replaces it by per-lineage cuts (``upper_tail="lineage"``).
    **overrides
        Any :class:`~sepsis_sc.config.QCSettings` field by name (e.g. ``min_counts=500``).

    Returns
    -------
    One row per sample (index: sample id) with ``n_cells``; for each metric
    ``<metric>_median``, ``<metric>_mad``, ``<metric>_lower``, ``<metric>_upper``
    (adaptive, in the metric's units, NaN when not used); and the effective thresholds
    in natural units ``min_counts``, ``max_counts``, ``min_genes``, ``max_genes``,
    ``max_pct_mt`` (NaN = no threshold), plus ``min_<metric>`` / ``max_<metric>`` for any
    other metric. :func:`flag_outliers` applies exactly these columns.
    """
    settings = (settings or QCSettings()).with_overrides(overrides)
    nmads = settings.nmads
    _check_nmads(adata, nmads)
    hard = {
        "min_counts": settings.min_counts,
        "max_counts": settings.max_counts,
        "min_genes": settings.min_genes,
        "max_genes": settings.max_genes,
        "max_pct_mt": settings.max_pct_mt,
    }
    _check_hard_limits(hard)
    samples = sample_ids(adata, batch_key)
    rows: dict[str, dict[str, float]] = {}
    for sample in pd.unique(samples):
        mask = (samples == sample).to_numpy()
        rows[str(sample)] = _sample_threshold_row(
            adata.obs, sample, mask, nmads, hard, settings.mt_threshold_floor, upper=upper
        )
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "sample_id"
    return table


def _check_nmads(adata: ad.AnnData, nmads: Mapping[str, float]) -> None:
    """Every metric of ``nmads`` must be an ``obs`` column with a positive k."""
    for metric, k in nmads.items():
        if metric not in adata.obs:
            raise ValueError(
                f"obs has no QC metric {metric!r} (from nmads); run sepsis_sc.qc.qc_metrics "
                f"first or choose among {sorted(c for c in adata.obs if c.startswith(('log1p_', 'pct_', 'n_genes', 'total_')))}."
            )
        if k is None or not np.isfinite(k) or k <= 0:
            raise ValueError(f"nmads[{metric!r}] must be a positive number, not {k!r}.")


def _check_hard_limits(hard: Mapping[str, float | None]) -> None:
    """Hard limits are ``None`` or non-negative finite numbers."""
    for name, value in hard.items():
        if value is not None and (not np.isfinite(value) or value < 0):
            raise ValueError(f"{name} must be a non-negative number or None, not {value!r}.")


def _sample_threshold_row(
    obs: pd.DataFrame,
    sample: str,
    mask: np.ndarray,
    nmads: Mapping[str, float],
    hard: Mapping[str, float | None],
    mt_threshold_floor: float | None,
    *,
    upper: bool = True,
) -> dict[str, float]:
    """One sample's row of :func:`adaptive_thresholds`: MAD statistics per metric, then the
    effective thresholds in natural units."""
    row: dict[str, float] = {"n_cells": int(mask.sum())}
    if mask.sum() < 30:
        logger.warning(
            "sample %s has only %d cells: MAD-based thresholds are unstable", sample, mask.sum()
        )
    effective: dict[str, float] = {
        "min_counts": np.nan,
        "max_counts": np.nan,
        "min_genes": np.nan,
        "max_genes": np.nan,
        "max_pct_mt": np.nan,
    }
    for metric, k in nmads.items():
        values = obs[metric].to_numpy(dtype=float)[mask]
        lo, up = _mad_bounds(values, metric, k, sample, row)
        if not upper and not metric.startswith("pct_"):
            up = np.nan
        _tighten_adaptive(effective, metric, lo, up)
    _apply_hard_limits(effective, hard, mt_threshold_floor)
    row.update(effective)
    return row


def _mad_bounds(
    values: np.ndarray, metric: str, k: float, sample: str, row: dict[str, float]
) -> tuple[float, float]:
    """``median ± k·MAD`` of one metric in one sample, in the metric's units.

    Percentages get no lower bound; a MAD of 0 gives no bound at all (NaN, logged).
    Writes ``<metric>_median|_mad|_lower|_upper`` into ``row`` and returns (lower, upper).
    """
    med = float(np.nanmedian(values))
    mad = unscaled_mad(values)
    lower, upper = med - k * mad, med + k * mad
    if metric.startswith("pct_"):
        lower = np.nan
    if mad == 0:
        logger.warning(
            "sample %s: MAD of %s is 0 (median %.3g); no adaptive threshold on it",
            sample,
            metric,
            med,
        )
        lower = upper = np.nan
    row.update(
        {
            f"{metric}_median": med,
            f"{metric}_mad": mad,
            f"{metric}_lower": lower,
            f"{metric}_upper": upper,
        }
    )
    return lower, upper


def _tighten_adaptive(effective: dict[str, float], metric: str, lower: float, upper: float) -> None:
    """Fold one metric's adaptive bounds, converted to natural units (``expm1`` for
    ``log1p_*``), into the effective ``min_<stem>`` / ``max_<stem>`` thresholds."""
    to_natural = np.expm1 if metric.startswith("log1p_") else (lambda v: v)
    lo_nat, up_nat = float(to_natural(lower)), float(to_natural(upper))
    if metric in _CANONICAL:
        stem = _CANONICAL[metric][1]
        lo_key, up_key = f"min_{stem}", f"max_{stem}"
    else:
        lo_key, up_key = f"min_{metric}", f"max_{metric}"
    effective.setdefault(lo_key, np.nan)
    effective.setdefault(up_key, np.nan)
    if not metric.startswith("pct_"):
        effective[lo_key] = np.nanmax([effective[lo_key], lo_nat, -np.inf])
    effective[up_key] = np.nanmin([effective[up_key], up_nat, np.inf])


def _apply_hard_limits(
    effective: dict[str, float],
    hard: Mapping[str, float | None],
    mt_threshold_floor: float | None,
) -> None:
    """Raise the mito threshold to ``mt_threshold_floor``, then let the hard limits tighten
    the thresholds; non-finite thresholds become NaN (= no threshold)."""
    if mt_threshold_floor is not None and np.isfinite(effective["max_pct_mt"]):
        effective["max_pct_mt"] = max(effective["max_pct_mt"], float(mt_threshold_floor))
    for name, value in hard.items():
        if value is None:
            continue
        if name.startswith("min_"):
            effective[name] = np.nanmax([effective[name], value])
        else:
            effective[name] = np.nanmin([effective[name], value])
    for key, value in effective.items():
        effective[key] = np.nan if not np.isfinite(value) else float(value)


def _threshold_columns(thresholds: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """Map each effective-threshold column to (obs column, reason)."""
    out: dict[str, tuple[str, str]] = {}
    natural = {"counts": "total_counts", "genes": "n_genes_by_counts", "pct_mt": "pct_counts_mt"}
    for col in thresholds.columns:
        if not col.startswith(("min_", "max_")):
            continue
        side, stem = col.split("_", 1)
        obs_col = natural.get(stem, stem)
        if stem == "pct_mt":
            reason = "high_mt" if side == "max" else "low_mt"
        else:
            reason = f"{'low' if side == 'min' else 'high'}_{stem}"
        out[col] = (obs_col, reason)
    return out


def flag_outliers(
    adata: ad.AnnData, thresholds: pd.DataFrame, *, batch_key: str | None = "sample_id"
) -> None:
    """Flag cells outside their sample's thresholds.

    Parameters
    ----------
    adata
        AnnData after :func:`qc_metrics`.
    thresholds
        Table from :func:`adaptive_thresholds` (index: sample id).
    batch_key
        ``obs`` column naming the sample.

    Returns
    -------
    None. Writes ``obs["qc_reason"]`` (``"pass"`` or semicolon-joined reasons among
    ``low_counts``, ``high_counts``, ``low_genes``, ``high_genes``, ``high_mt`` and
    ``low_/high_<metric>`` for extra metrics) and ``obs["qc_outlier"]`` (True = fails).
    Doublets and the low-RNA rescue are added by :func:`run_qc`.
    """
    samples = sample_ids(adata, batch_key)
    missing = set(pd.unique(samples)) - set(thresholds.index.astype(str))
    if missing:
        raise ValueError(
            f"thresholds have no row for sample(s) {sorted(missing)}; compute them with "
            "adaptive_thresholds on the same AnnData and batch_key."
        )
    reasons = [[] for _ in range(adata.n_obs)]
    tab = thresholds.copy()
    tab.index = tab.index.astype(str)
    for col, (obs_col, reason) in _threshold_columns(tab).items():
        limit = samples.map(tab[col]).to_numpy(dtype=float)
        values = adata.obs[obs_col].to_numpy(dtype=float)
        with np.errstate(invalid="ignore"):
            bad = values < limit if col.startswith("min_") else values > limit
        bad &= np.isfinite(limit)
        for i in np.flatnonzero(bad):
            reasons[i].append(reason)
    adata.obs["qc_reason"] = [";".join(r) if r else "pass" for r in reasons]
    adata.obs["qc_outlier"] = adata.obs["qc_reason"].ne("pass").to_numpy()


def add_reason(adata: ad.AnnData, mask: np.ndarray, reason: str) -> None:
    """Append ``reason`` to ``qc_reason`` of the cells in ``mask``."""
    if not mask.any():
        return
    reasons = adata.obs["qc_reason"].astype(str).to_numpy(dtype=object)
    for i in np.flatnonzero(mask):
        reasons[i] = reason if reasons[i] == "pass" else f"{reasons[i]};{reason}"
    adata.obs["qc_reason"] = reasons
    adata.obs["qc_outlier"] = adata.obs["qc_reason"].ne("pass").to_numpy()
