"""Per-sample quality control to current best practice, with care for low-RNA immune cells.

The recipe follows Heumos et al. 2023 (Nat Rev Genet, "Best practices for single-cell
analysis across modalities") and its online book:

1. **Gene flags and metrics** (:func:`flag_genes`, :func:`qc_metrics`): mitochondrial,
   ribosomal and haemoglobin genes are flagged in ``var`` and
   :func:`scanpy.pp.calculate_qc_metrics` is run on the raw counts.
2. **Adaptive thresholds per sample** (:func:`adaptive_thresholds`): a cell is an outlier
   when a metric lies more than *k* median absolute deviations (MAD) from the sample's
   median: both sides for log counts and log genes (k = 5), the upper side only for the
   mitochondrial percentage (k = 3). Thresholds are computed per sample, never on pooled
   samples, because sequencing depth differs between libraries. Optional hard floors and
   ceilings from the config (``min_counts``, ``min_genes``, ``max_pct_mt`` ...) tighten
   them. The MAD is unscaled (``scipy.stats.median_abs_deviation`` with ``scale=1``), as in
   the best-practice book; 5 unscaled MADs are about 3.4 standard deviations.
3. **Doublets per sample** (:func:`detect_doublets`): Scrublet (Wolock et al. 2019) via
   :func:`scanpy.pp.scrublet`, run on each sample separately, with the expected doublet
   rate derived from the number of cells recovered (10x rule of thumb: about 0.8 % per
   1,000 cells recovered) or loaded.
4. **Low-RNA immune rescue** (:func:`rescue_low_rna_immune`): neutrophils, in sepsis
   PBMC the low-density neutrophils, carry few UMIs and genes (Wigerblad et al. 2022,
   J Immunol, PMID 35858733) and fall under a lower count/gene threshold set by
   lymphocytes and monocytes. A cell that fails *only* the lower count/gene thresholds is
   kept, and marked ``obs["low_rna_immune"] = True``, when all of these hold:

   * its mitochondrial percentage is low (within the sample's median + 2 MADs, or below
     ``rescue_max_pct_mt``): damaged cells lose cytoplasmic RNA and keep mitochondrial RNA,
     so high-mito cells are never rescued;
   * it is not a predicted doublet and it has at least ``rescue_min_counts`` UMIs and
     ``rescue_min_genes`` genes (below that it is an empty droplet whatever it contains);
   * its UMIs carry a clear immune identity: at least ``rescue_min_markers`` distinct
     genes of a marker set are detected (defaults: neutrophil markers FCGR3B, CSF3R,
     CXCR2, CMTM2, FPR1, S100A8/9/12, G0S2, NAMPT ...; mouse Ly6g, S100a8/9, Retnlg,
     Ngp, Camp, Ltf ...; and platelet markers PPBP, PF4, GP9, ITGA2B, TUBB1 ..., because
     platelets are also low-RNA and their expansion is a sepsis read-out, Qiu et al.
     2021), and the fraction of its UMIs in the set is at least
     ``rescue_min_enrichment`` times the pooled fraction in the sample's passing cells,
     with a one-sided binomial test against that pooled fraction below ``rescue_alpha``.
     The pooled profile of the sample stands in for ambient RNA: an empty or broken
     droplet holds a sample of the soup and therefore no enrichment. Where neutrophils
     are the majority (whole blood) they set the median themselves and are seldom below
     the lower thresholds, so the rule matters mainly for PBMC with low-density
     neutrophils, where it was designed.

5. **Reasons and summary** (:func:`run_qc`): ``obs["qc_outlier"]`` (True = removed) and
   ``obs["qc_reason"]`` (``"pass"`` or the semicolon-joined reasons such as
   ``"low_counts;low_genes"``, ``"high_mt"``, ``"doublet"``), plus a one-row-per-sample
   table of what was removed and why, with the thresholds used. Its thresholds and switches
   travel together as a :class:`QCParams` (``QCParams.from_config(config["qc"])``).
6. **Merge and normalise** (:func:`merge_samples`, :func:`normalize`): outer join of the
   filtered samples (absent genes are zero), gene filter on the merged object,
   ``X = log1p(CP10k)`` from ``layers["counts"]``.

Slots written (see ``docs/architecture.md``): ``var["mt"|"ribo"|"hb"]``; ``obs`` columns
``total_counts``, ``n_genes_by_counts``, ``log1p_total_counts``, ``log1p_n_genes_by_counts``,
``pct_counts_mt|ribo|hb``, ``doublet_score``, ``predicted_doublet``, ``qc_outlier``,
``qc_reason``, ``low_rna_immune``; ``uns["qc"]`` (parameters, thresholds, summary).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import sparse, stats
from scipy.ndimage import uniform_filter1d

from sepsis_sc import ambient as _ambient
from sepsis_sc.data import get_counts, log_normalise, resolve_organism

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_NMADS",
    "RESCUE_MARKERS",
    "QC_REASONS",
    "flag_genes",
    "qc_metrics",
    "adaptive_thresholds",
    "flag_outliers",
    "expected_doublet_rate",
    "detect_doublets",
    "rescue_low_rna_immune",
    "lineage_upper_flags",
    "flag_platelet_monocyte",
    "DOUBLET_RATE_PER_1000",
    "QCParams",
    "run_qc",
    "filter_cells_qc",
    "merge_samples",
    "normalize",
]

#: default number of MADs per metric (Heumos et al. 2023: 5 for counts/genes, 3 for mito)
DEFAULT_NMADS: dict[str, float] = {
    "log1p_total_counts": 5.0,
    "log1p_n_genes_by_counts": 5.0,
    "pct_counts_mt": 3.0,
}

#: marker sets for the low-RNA immune rescue (biology reference §1.2, neutrophil row:
#: Wigerblad 2022 PMID 35858733; Kwok 2023 PMID 37095375; mouse Xie 2020 GSE137539;
#: platelet row: Azimuth PBMC, Hao 2021 PMID 34062119)
RESCUE_MARKERS: dict[str, dict[str, list[str]]] = {
    "human": {
        "neutrophil": [
            "FCGR3B",
            "CSF3R",
            "CXCR2",
            "CXCR1",
            "CMTM2",
            "FPR1",
            "MNDA",
            "S100A8",
            "S100A9",
            "S100A12",
            "G0S2",
            "NAMPT",
            "PROK2",
        ],
        "platelet": ["PPBP", "PF4", "GP9", "ITGA2B", "TUBB1", "GNG11", "NRGN", "CAVIN2", "CLU"],
    },
    "mouse": {
        "neutrophil": [
            "Ly6g",
            "S100a8",
            "S100a9",
            "Retnlg",
            "Cxcr2",
            "Csf3r",
            "Ngp",
            "Camp",
            "Ltf",
            "Lcn2",
            "Mmp9",
            "G0s2",
        ],
        "platelet": ["Ppbp", "Pf4", "Itga2b", "Gp9", "Gp1bb", "Tubb1"],
    },
}

#: removal reasons in the order used to attribute a cell to one reason in bar charts
QC_REASONS: tuple[str, ...] = (
    "ambient_droplet",
    "doublet",
    "platelet_monocyte",
    "high_mt",
    "low_counts",
    "low_genes",
    "high_counts",
    "high_genes",
)

# metric -> (obs column in natural units, stem of the threshold/reason names)
_CANONICAL: dict[str, tuple[str, str]] = {
    "log1p_total_counts": ("total_counts", "counts"),
    "total_counts": ("total_counts", "counts"),
    "log1p_n_genes_by_counts": ("n_genes_by_counts", "genes"),
    "n_genes_by_counts": ("n_genes_by_counts", "genes"),
    "pct_counts_mt": ("pct_counts_mt", "pct_mt"),
}

_GENE_PATTERNS: dict[str, dict[str, str]] = {
    # mitochondrially encoded genes
    "mt": {"human": r"^MT-", "mouse": r"^mt-"},
    # cytosolic ribosomal proteins (RPL*/RPS*, RPLP0-2, RPSA); excludes kinases such as
    # RPS6KA1 and mitochondrial ribosomal MRPL/MRPS genes
    "ribo": {
        "human": r"^RP[SL]\d+[A-Z]?\d*$|^RPLP\d$|^RPSA$",
        "mouse": r"^Rp[sl]\d+[a-z]?\d*$|^Rplp\d$|^Rpsa$",
    },
    # haemoglobin chains; `^HB[^(P)]` of the tutorials also catches HBEGF and HBS1L
    "hb": {
        "human": r"^HB(?:A1|A2|B|D|E1|G1|G2|M|Q1|Z)$",
        "mouse": r"^Hb[ab]-",
    },
}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _sample_ids(adata: ad.AnnData, batch_key: str | None) -> pd.Series:
    if batch_key is None or batch_key not in adata.obs:
        if batch_key is not None:
            logger.info("obs has no %r column: treating all cells as one sample", batch_key)
        return pd.Series("sample", index=adata.obs_names, dtype=object)
    return adata.obs[batch_key].astype(str)


def _mad(x: np.ndarray) -> float:
    return float(stats.median_abs_deviation(x, scale=1.0, nan_policy="omit"))


# --------------------------------------------------------------------------------------
# gene flags and metrics
# --------------------------------------------------------------------------------------


def flag_genes(adata: ad.AnnData, organism: str = "auto") -> str:
    """Flag mitochondrial, ribosomal and haemoglobin genes in ``var``.

    Parameters
    ----------
    adata
        AnnData with gene symbols as ``var_names``.
    organism
        ``"human"``, ``"mouse"`` or ``"auto"`` (decided from ``MT-``/``mt-`` genes, else
        from the letter case of the symbols).

    Returns
    -------
    The organism used. Writes boolean ``var["mt"]`` (``MT-`` / ``mt-``), ``var["ribo"]``
    (cytosolic ribosomal proteins ``RPL*``/``RPS*``, ``RPLP*``, ``RPSA``; kinases such as
    ``RPS6KA1`` excluded) and ``var["hb"]`` (haemoglobin chains; human ``HBA1 HBA2 HBB HBD
    HBE1 HBG1 HBG2 HBM HBQ1 HBZ``, mouse ``^Hb[ab]-``).
    """
    organism = resolve_organism(adata.var_names, organism)
    names = pd.Series(adata.var_names.astype(str), index=adata.var_names)
    for flag, patterns in _GENE_PATTERNS.items():
        adata.var[flag] = names.str.contains(patterns[organism], regex=True).to_numpy()
    if not adata.var["mt"].any():
        logger.warning(
            "no mitochondrial genes (%s) found among %d genes: pct_counts_mt will be 0 and "
            "the mitochondrial filter has no effect",
            _GENE_PATTERNS["mt"][organism],
            adata.n_vars,
        )
    logger.info(
        "flagged %d mt, %d ribo, %d hb genes (%s)",
        int(adata.var["mt"].sum()),
        int(adata.var["ribo"].sum()),
        int(adata.var["hb"].sum()),
        organism,
    )
    return organism


def qc_metrics(adata: ad.AnnData, organism: str = "auto") -> str:
    """Flag genes and compute per-cell QC metrics on the raw counts.

    Runs :func:`flag_genes` and :func:`scanpy.pp.calculate_qc_metrics` on
    ``layers["counts"]`` (or ``X`` when there is no counts layer).

    Parameters
    ----------
    adata
        AnnData with raw integer UMI counts.
    organism
        ``"human"``, ``"mouse"`` or ``"auto"``.

    Returns
    -------
    The organism used. Writes ``obs`` columns ``total_counts``, ``n_genes_by_counts``,
    ``log1p_total_counts``, ``log1p_n_genes_by_counts`` and ``total_counts_<flag>``,
    ``log1p_total_counts_<flag>``, ``pct_counts_<flag>`` for ``mt``, ``ribo``, ``hb``.
    ``var`` keeps only the flags (per-sample gene metrics would not survive a merge).

    Raises
    ------
    ValueError
        If the counts are not non-negative integers (e.g. a log-normalised matrix).
    """
    if adata.n_obs == 0:
        raise ValueError("adata has no cells; nothing to compute QC metrics on.")
    get_counts(adata, max_values=None)
    organism = flag_genes(adata, organism)
    obs_metrics, _ = sc.pp.calculate_qc_metrics(
        adata,
        qc_vars=["mt", "ribo", "hb"],
        percent_top=None,
        layer="counts" if "counts" in adata.layers else None,
        log1p=True,
        inplace=False,
    )
    for col in obs_metrics.columns:
        adata.obs[col] = obs_metrics[col].to_numpy()
    return organism


# --------------------------------------------------------------------------------------
# thresholds and outliers
# --------------------------------------------------------------------------------------


def _reason_names(metric: str) -> tuple[str, str]:
    if metric in _CANONICAL:
        stem = _CANONICAL[metric][1]
        if stem == "pct_mt":
            return ("low_mt", "high_mt")
        return (f"low_{stem}", f"high_{stem}")
    return (f"low_{metric}", f"high_{metric}")


def _natural(metric: str) -> str:
    return _CANONICAL[metric][0] if metric in _CANONICAL else metric


def adaptive_thresholds(
    adata: ad.AnnData,
    *,
    batch_key: str | None = "sample_id",
    nmads: Mapping[str, float] | None = None,
    min_counts: float | None = None,
    max_counts: float | None = None,
    min_genes: float | None = None,
    max_genes: float | None = None,
    max_pct_mt: float | None = None,
    mt_threshold_floor: float | None = 8.0,
    upper: bool = True,
) -> pd.DataFrame:
    """Per-sample outlier thresholds: median ± k·MAD, tightened by optional hard limits.

    For each sample and each metric in ``nmads`` the threshold is ``median ± k * MAD``
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
    batch_key
        ``obs`` column naming the sample; thresholds are computed within each sample.
        ``None`` (or a missing column) treats all cells as one sample.
    nmads
        Number of MADs per ``obs`` metric; default :data:`DEFAULT_NMADS`
        (``log1p_total_counts`` 5, ``log1p_n_genes_by_counts`` 5, ``pct_counts_mt`` 3).
    min_counts, max_counts
        Hard floor / ceiling on total UMI counts per cell (``None``: adaptive only).
    min_genes, max_genes
        Hard floor / ceiling on detected genes per cell.
    max_pct_mt
        Hard ceiling on the mitochondrial percentage: cells above it always fail.
    mt_threshold_floor
        The mitochondrial threshold is never set below this percentage (applied before
        ``max_pct_mt``). Without it, 3 MADs around a lymphocyte-dominated median (about
        2.8 % +- 0.7 % in 10x PBMC) cut at about 5 % and remove a large part of the
        monocytes, whose healthy mitochondrial fraction is 4-7 %: a cell-type bias that
        Heumos et al. 2023 warn about. 8 % is the fixed cut-off of their tutorial, used
        here as a lower bound on the adaptive threshold. ``None`` = purely adaptive.
    upper
        Give count and gene metrics an adaptive upper threshold too (``False``: lower side
        only; hard ``max_counts`` / ``max_genes`` still apply). A sample-wide upper cut
        depends on the cell mix: in a sample of 80 % low-UMI neutrophils it falls near
        6,000 UMIs and removes healthy monocytes and plasmablasts (``docs/qc.md``), so
        :func:`run_qc` replaces it by per-lineage cuts (``upper_tail="lineage"``).

    Returns
    -------
    One row per sample (index: sample id) with ``n_cells``; for each metric
    ``<metric>_median``, ``<metric>_mad``, ``<metric>_lower``, ``<metric>_upper``
    (adaptive, in the metric's units, NaN when not used); and the effective thresholds
    in natural units ``min_counts``, ``max_counts``, ``min_genes``, ``max_genes``,
    ``max_pct_mt`` (NaN = no threshold), plus ``min_<metric>`` / ``max_<metric>`` for any
    other metric. :func:`flag_outliers` applies exactly these columns.
    """
    nmads = dict(DEFAULT_NMADS if nmads is None else nmads)
    _check_nmads(adata, nmads)
    hard = {
        "min_counts": min_counts,
        "max_counts": max_counts,
        "min_genes": min_genes,
        "max_genes": max_genes,
        "max_pct_mt": max_pct_mt,
    }
    _check_hard_limits(hard)
    samples = _sample_ids(adata, batch_key)
    rows: dict[str, dict[str, float]] = {}
    for sample in pd.unique(samples):
        mask = (samples == sample).to_numpy()
        rows[str(sample)] = _sample_threshold_row(
            adata.obs, sample, mask, nmads, hard, mt_threshold_floor, upper=upper
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
    mad = _mad(values)
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
    samples = _sample_ids(adata, batch_key)
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


# --------------------------------------------------------------------------------------
# doublets
# --------------------------------------------------------------------------------------


#: multiplet rate per 1,000 cells recovered, by 10x chemistry (sheet column ``chemistry``):
#: 3' v2 and v3/v3.1 user guides ~0.8 % per 1,000 cells; the HT (high-throughput, v3.1 HT)
#: guide ~0.8 % per 2,000 cells, i.e. 0.4 % per 1,000
DOUBLET_RATE_PER_1000: dict[str, float] = {"v2": 0.008, "v3": 0.008, "v3.1": 0.008, "HT": 0.004}


def expected_doublet_rate(
    n_cells: int, cells_loaded: float | None = None, chemistry: str | None = None
) -> float:
    """10x rule of thumb: about 0.8 % multiplets per 1,000 cells recovered (0.4 % for HT).

    Parameters
    ----------
    n_cells
        Cells recovered (barcodes called as cells) in the sample.
    cells_loaded
        Cells loaded on the chip, when the sample sheet has it; recovery is about
        1,000 of 1,650 loaded (10x Chromium 3' v3.1 user guide), so the rate becomes
        ``rate_per_1000 * cells_loaded / 1650``.
    chemistry
        ``"v2"``, ``"v3"``, ``"v3.1"`` or ``"HT"`` (:data:`DOUBLET_RATE_PER_1000`); ``None``
        or empty: 0.8 % per 1,000.

    Returns
    -------
    The expected doublet fraction, clipped to [0.001, 0.5].
    """
    per_1000 = 0.008
    if chemistry not in (None, "") and not (isinstance(chemistry, float) and np.isnan(chemistry)):
        key = str(chemistry).strip()
        match = {k.lower(): v for k, v in DOUBLET_RATE_PER_1000.items()}.get(key.lower())
        if match is None:
            raise ValueError(
                f"unknown chemistry {chemistry!r}; use one of {sorted(DOUBLET_RATE_PER_1000)} "
                "or leave the sheet's 'chemistry' column empty."
            )
        per_1000 = match
    if cells_loaded is not None and np.isfinite(cells_loaded) and cells_loaded > 0:
        rate = per_1000 * float(cells_loaded) / 1650.0
    else:
        rate = per_1000 * float(n_cells) / 1000.0
    return float(np.clip(rate, 0.001, 0.5))


def _threshold_minimum(values: np.ndarray, nbins: int = 256, max_iter: int = 10_000) -> float:
    """Minimum between the two modes of a histogram (port of skimage's threshold_minimum).

    Scrublet's automatic threshold needs scikit-image; this is the same algorithm.
    """
    hist, edges = np.histogram(values[np.isfinite(values)], bins=nbins)
    centers = (edges[:-1] + edges[1:]) / 2
    smooth = hist.astype(np.float64)

    def maxima(h: np.ndarray) -> list[int]:
        idx, direction = [], 1
        for i in range(h.shape[0] - 1):
            if direction > 0:
                if h[i + 1] < h[i]:
                    direction = -1
                    idx.append(i)
            elif h[i + 1] > h[i]:
                direction = 1
        return idx

    peaks = maxima(smooth)
    for _ in range(max_iter):
        smooth = uniform_filter1d(smooth, 3)
        peaks = maxima(smooth)
        if len(peaks) < 3:
            break
    if len(peaks) != 2:
        raise RuntimeError("simulated doublet scores are not bimodal")
    i = int(np.argmin(smooth[peaks[0] : peaks[1] + 1]))
    return float(centers[peaks[0] + i])


#: Largest sample (cells) for which :func:`detect_doublets` uses exact kNN by default.
#: Measured on 2 cores: 5,000 cells 8 s exact vs 71 s approximate; 20,000 cells 33 s vs
#: 152 s (exact search grows quadratically, so very large samples go approximate).
EXACT_KNN_MAX_CELLS = 30_000


def detect_doublets(
    adata: ad.AnnData,
    *,
    batch_key: str | None = "sample_id",
    expected_rate: float | None = None,
    cells_loaded: float | Mapping[str, float] | None = None,
    threshold: float | None = None,
    min_cells: int = 100,
    use_approx_neighbors: bool | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Score and call doublets with Scrublet, separately in each sample.

    Doublet simulation pairs random cells, so pooling samples would simulate
    cross-sample doublets that cannot exist; each sample is scored on its own.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``layers["counts"]`` (or ``X``).
    batch_key
        ``obs`` column naming the sample (``None``: one sample).
    expected_rate
        Expected doublet fraction for every sample; ``None`` derives it per sample with
        :func:`expected_doublet_rate` from the cells recovered, or from ``cells_loaded``.
    cells_loaded
        Cells loaded per sample: one number, a mapping sample → number, or ``None``
        (then an ``obs["cells_loaded"]`` column from the sample sheet is used if present).
    threshold
        Doublet-score threshold; ``None`` finds it per sample at the minimum between the
        two modes of the simulated-doublet score histogram (Scrublet's automatic rule),
        falling back to the ``1 - expected_rate`` quantile of observed scores when the
        histogram is not bimodal.
    min_cells
        Samples with fewer cells are not scored (a warning is logged; scores NaN).
    use_approx_neighbors
        Scrublet's kNN search: ``False`` exact (scikit-learn), ``True`` approximate
        (pynndescent). ``None`` chooses exact for samples of up to
        :data:`EXACT_KNN_MAX_CELLS` cells: same scores (r > 0.9999 on a 5,000-cell
        sample) and 5-9x faster there, because pynndescent's numba compilation (about a
        minute) is paid again in every per-sample process.
    seed
        Random seed for doublet simulation and PCA.

    Returns
    -------
    One row per sample: ``n_cells``, ``expected_doublet_rate``, ``doublet_threshold``,
    ``threshold_method`` and ``n_predicted_doublets``. Writes ``obs["doublet_score"]``
    (float, NaN when not scored) and ``obs["predicted_doublet"]`` (bool).
    """
    samples = _sample_ids(adata, batch_key)
    counts, _ = get_counts(adata, check=False)
    if not sparse.issparse(counts):
        counts = sparse.csr_matrix(counts)
    counts = sparse.csr_matrix(counts)
    scores = np.full(adata.n_obs, np.nan)
    calls = np.zeros(adata.n_obs, dtype=bool)
    rows = {}
    for sample in pd.unique(samples):
        idx = np.flatnonzero((samples == sample).to_numpy())
        loaded = _sample_cells_loaded(adata, cells_loaded, sample, idx)
        rate = (
            float(expected_rate)
            if expected_rate is not None
            else expected_doublet_rate(idx.size, loaded)
        )
        rows[sample], scored = _doublets_in_sample(
            adata, counts, idx, sample, rate, threshold, min_cells, use_approx_neighbors, seed
        )
        if scored is not None:
            scores[idx], calls[idx] = scored
    adata.obs["doublet_score"] = scores
    adata.obs["predicted_doublet"] = calls
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "sample_id"
    return table


def _sample_cells_loaded(
    adata: ad.AnnData,
    cells_loaded: float | Mapping[str, float] | None,
    sample: str,
    idx: np.ndarray,
) -> float | None:
    """Cells loaded for one sample: the number given, the mapping's entry, or (when ``None``)
    the first parseable value of ``obs["cells_loaded"]`` in the sample."""
    loaded = cells_loaded
    if isinstance(cells_loaded, Mapping):
        loaded = cells_loaded.get(sample)
    elif cells_loaded is None and "cells_loaded" in adata.obs:
        vals = pd.to_numeric(adata.obs["cells_loaded"].iloc[idx], errors="coerce")
        loaded = float(vals.iloc[0]) if vals.notna().any() else None
    return loaded


def _doublets_in_sample(
    adata: ad.AnnData,
    counts: sparse.csr_matrix,
    idx: np.ndarray,
    sample: str,
    rate: float,
    threshold: float | None,
    min_cells: int,
    use_approx_neighbors: bool | None,
    seed: int,
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray] | None]:
    """Score and call one sample (cells ``idx``).

    Returns the sample's table row and ``(scores, calls)``, or ``None`` for a sample under
    ``min_cells`` (not scored).
    """
    n = idx.size
    row = {
        "n_cells": n,
        "expected_doublet_rate": rate,
        "doublet_threshold": np.nan,
        "threshold_method": "not_scored",
        "n_predicted_doublets": 0,
    }
    if n < min_cells:
        logger.warning("sample %s has %d cells (< %d): doublets not scored", sample, n, min_cells)
        return row, None
    approx = n > EXACT_KNN_MAX_CELLS if use_approx_neighbors is None else use_approx_neighbors
    obs_scores, sim_scores = _scrublet_scores(adata, counts, idx, rate, bool(approx), seed)
    thr, method = _doublet_threshold(obs_scores, sim_scores, threshold, rate, sample)
    with np.errstate(invalid="ignore"):
        called = obs_scores > thr
    row.update(
        doublet_threshold=float(thr),
        threshold_method=method,
        n_predicted_doublets=int(called.sum()),
    )
    logger.info(
        "sample %s: %d/%d predicted doublets (expected rate %.3f, threshold %.3f, %s)",
        sample,
        called.sum(),
        n,
        rate,
        thr,
        method,
    )
    return row, (obs_scores, called)


def _scrublet_scores(
    adata: ad.AnnData,
    counts: sparse.csr_matrix,
    idx: np.ndarray,
    rate: float,
    approx: bool,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Scrublet on the cells ``idx``: (observed scores, simulated-doublet scores).

    Scrublet is run with ``threshold=inf``: the call is made by :func:`_doublet_threshold`
    (no scikit-image needed).
    """
    n = idx.size
    sub = ad.AnnData(X=counts[idx].astype(np.float32))
    sub.obs_names = adata.obs_names[idx]
    sub.var_names = adata.var_names
    n_pcs = int(min(30, n - 1, max(2, n // 10)))
    with warnings.catch_warnings():
        # threshold=inf makes scrublet's own "detectable fraction" 0/0; we call below
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        sc.pp.scrublet(
            sub,
            expected_doublet_rate=rate,
            n_prin_comps=n_pcs,
            threshold=np.inf,  # doublets are called below (no scikit-image needed)
            use_approx_neighbors=approx,
            random_state=seed,
            verbose=False,
        )
    obs_scores = sub.obs["doublet_score"].to_numpy(dtype=float)
    sim_scores = np.asarray(sub.uns["scrublet"]["doublet_scores_sim"], dtype=float)
    return obs_scores, sim_scores


def _doublet_threshold(
    obs_scores: np.ndarray,
    sim_scores: np.ndarray,
    threshold: float | None,
    rate: float,
    sample: str,
) -> tuple[float, str]:
    """The score threshold and how it was found: ``"user"`` (given), ``"scrublet_minimum"``
    (between the modes of the simulated scores) or ``"expected_rate_quantile"`` (the top
    ``rate`` of observed scores, when the simulated scores are not bimodal)."""
    if threshold is not None:
        return threshold, "user"
    try:
        return _threshold_minimum(sim_scores), "scrublet_minimum"
    except RuntimeError:
        thr = float(np.nanquantile(obs_scores, 1.0 - rate))
        logger.warning(
            "sample %s: simulated doublet scores not bimodal; calling the top %.1f%% "
            "of cells as doublets",
            sample,
            100 * rate,
        )
        return thr, "expected_rate_quantile"


# --------------------------------------------------------------------------------------
# low-RNA immune rescue
# --------------------------------------------------------------------------------------


def rescue_low_rna_immune(
    adata: ad.AnnData,
    *,
    batch_key: str | None = "sample_id",
    organism: str = "auto",
    markers: Mapping[str, Sequence[str]] | None = None,
    max_pct_mt: float | None = None,
    min_counts: int = 100,
    min_genes: int = 50,
    min_markers: int = 3,
    min_enrichment: float = 2.0,
    alpha: float = 1e-3,
    soup: pd.Series | Mapping[str, pd.Series] | None = None,
) -> pd.Series:
    """Keep low-RNA immune cells (e.g. low-density neutrophils) that only fail low counts/genes.

    A cell whose only reasons are ``low_counts`` and/or ``low_genes`` is rescued when its
    mitochondrial percentage is low, it is not a predicted doublet, it has at least
    ``min_counts`` UMIs and ``min_genes`` genes, and a marker set is clearly enriched in
    it (see the module docstring for the rationale): at least ``min_markers`` distinct
    set genes detected, set UMI fraction >= ``min_enrichment`` x the pooled fraction in the
    sample's passing cells, and a one-sided binomial p-value below ``alpha`` against that
    pooled fraction.

    Parameters
    ----------
    adata
        AnnData after :func:`qc_metrics` and :func:`flag_outliers` (and optionally
        :func:`detect_doublets`).
    batch_key
        ``obs`` column naming the sample.
    organism
        Picks the default marker sets (``"auto"``: from the gene symbols).
    markers
        Marker sets ``{name: [genes]}``; default :data:`RESCUE_MARKERS` for the organism.
    max_pct_mt
        Highest mitochondrial percentage a rescued cell may have; ``None`` uses the
        sample's median ``pct_counts_mt`` + 2 MADs (the typical range of intact cells;
        broken cells lose cytoplasmic RNA and sit far above it).
    min_counts, min_genes
        Absolute floors below which a droplet is never rescued.
    min_markers
        Distinct marker genes that must be detected.
    min_enrichment
        Fold enrichment of the marker UMI fraction over the sample's passing cells.
    alpha
        Significance level of the one-sided binomial enrichment test.
    soup
        The estimated soup profile (:func:`sepsis_sc.ambient.estimate_soup`; one Series over
        ``var_names``, or a mapping sample -> Series). When given, the enrichment is tested
        against the soup's fraction of the set instead of the pooled passing cells: a droplet
        of soup carries the soup's share of S100A8/A9 or PPBP, which in blood can exceed the
        average cell's, so only the soup is the right null for "this droplet holds a cell".

    Returns
    -------
    Boolean Series (index: ``obs_names``), True for rescued cells. Writes
    ``obs["low_rna_immune"]``; rescued cells get ``qc_outlier = False`` and
    ``qc_reason = "pass"``.
    """
    _require_rescue_inputs(adata)
    organism = resolve_organism(adata.var_names, organism)
    markers = dict(RESCUE_MARKERS[organism] if markers is None else markers)
    samples = _sample_ids(adata, batch_key)
    cells = _RescueCells.from_obs(adata)
    counts = sparse.csr_matrix(get_counts(adata, check=False)[0])
    rescued = np.zeros(adata.n_obs, dtype=bool)
    var_index = pd.Index(adata.var_names.astype(str))
    for set_name, genes_in_set in markers.items():
        cols = _marker_columns(var_index, genes_in_set, set_name, min_markers)
        if cols is None:
            continue
        sub = counts[:, cols]
        k = np.asarray(sub.sum(axis=1)).ravel()
        n_detected = np.asarray((sub > 0).sum(axis=1)).ravel()
        for sample in pd.unique(samples):
            in_sample = (samples == sample).to_numpy()
            s_profile = soup.get(sample) if isinstance(soup, Mapping) else soup
            p_soup = (
                None
                if s_profile is None
                else float(s_profile.reindex(var_index[cols]).fillna(0.0).sum())
            )
            hit = _rescue_in_sample(
                cells,
                k,
                n_detected,
                in_sample,
                max_pct_mt=max_pct_mt,
                min_counts=min_counts,
                min_genes=min_genes,
                min_markers=min_markers,
                min_enrichment=min_enrichment,
                alpha=alpha,
                label=(sample, set_name),
                p_soup=p_soup,
            )
            rescued[hit] = True
    _mark_rescued(adata, rescued)
    return pd.Series(rescued, index=adata.obs_names, name="low_rna_immune")


def _require_rescue_inputs(adata: ad.AnnData) -> None:
    """The rescue needs the QC metrics and the reasons of :func:`flag_outliers`."""
    for col in ("qc_reason", "total_counts", "n_genes_by_counts", "pct_counts_mt"):
        if col not in adata.obs:
            raise ValueError(
                f"obs has no {col!r}; run qc_metrics and flag_outliers before the rescue."
            )


@dataclass(frozen=True)
class _RescueCells:
    """Per-cell arrays the rescue reads from ``obs``."""

    only_low: np.ndarray  # fails only low_counts and/or low_genes
    total: np.ndarray
    genes: np.ndarray
    pct_mt: np.ndarray
    doublet: np.ndarray
    passing: np.ndarray  # qc_reason == "pass"

    @classmethod
    def from_obs(cls, adata: ad.AnnData) -> _RescueCells:
        """Read the arrays; no ``predicted_doublet`` column means no doublets."""
        reasons = adata.obs["qc_reason"].astype(str)
        only_low = reasons.map(
            lambda r: r != "pass" and set(r.split(";")) <= {"low_counts", "low_genes"}
        ).to_numpy(dtype=bool)
        doublet = (
            adata.obs["predicted_doublet"].to_numpy(dtype=bool)
            if "predicted_doublet" in adata.obs
            else np.zeros(adata.n_obs, dtype=bool)
        )
        return cls(
            only_low=only_low,
            total=adata.obs["total_counts"].to_numpy(dtype=float),
            genes=adata.obs["n_genes_by_counts"].to_numpy(dtype=float),
            pct_mt=adata.obs["pct_counts_mt"].to_numpy(dtype=float),
            doublet=doublet,
            passing=reasons.eq("pass").to_numpy(),
        )


def _marker_columns(
    var_index: pd.Index, genes_in_set: Sequence[str], set_name: str, min_markers: int
) -> np.ndarray | None:
    """Columns of the set's genes present in ``var_names``; ``None`` (logged) when fewer
    than ``min_markers`` are, so the set cannot meet the detection rule."""
    cols = var_index.get_indexer(list(genes_in_set))
    cols = cols[cols >= 0]
    if cols.size < min_markers:
        logger.warning(
            "rescue marker set %r: only %d of its genes are in var_names (< min_markers=%d); "
            "set skipped",
            set_name,
            cols.size,
            min_markers,
        )
        return None
    return cols


def _rescue_in_sample(
    cells: _RescueCells,
    k: np.ndarray,
    n_detected: np.ndarray,
    in_sample: np.ndarray,
    *,
    max_pct_mt: float | None,
    min_counts: int,
    min_genes: int,
    min_markers: int,
    min_enrichment: float,
    alpha: float,
    label: tuple[str, str],
    p_soup: float | None = None,
) -> np.ndarray:
    """Indices of the sample's cells rescued by one marker set (``k`` set UMIs and
    ``n_detected`` set genes per cell): candidates that fail only low counts/genes, are no
    doublets, have low mito and enough UMIs/genes/markers, and are enriched for the set
    over the pooled fraction of the sample's passing cells (binomial test), or over the
    soup's fraction ``p_soup`` when the soup was estimated."""
    if p_soup is not None:
        p0 = max(float(p_soup), 1e-6)
    else:
        ref = in_sample & cells.passing
        if not ref.any():
            ref = in_sample
        p0 = float(k[ref].sum() / max(cells.total[ref].sum(), 1.0))
        p0 = max(p0, 1e-6)
    if max_pct_mt is None:
        mt_in = cells.pct_mt[in_sample]
        mt_cap = float(np.nanmedian(mt_in) + 2 * _mad(mt_in))
    else:
        mt_cap = float(max_pct_mt)
    cand = (
        in_sample
        & cells.only_low
        & ~cells.doublet
        & (cells.pct_mt <= mt_cap)
        & (cells.total >= min_counts)
        & (cells.genes >= min_genes)
        & (n_detected >= min_markers)
    )
    if not cand.any():
        return np.flatnonzero(cand)
    total = cells.total
    frac = k[cand] / np.maximum(total[cand], 1.0)
    pval = stats.binom.sf(k[cand] - 1, total[cand].astype(int), p0)
    ok = (frac >= min_enrichment * p0) & (pval < alpha)
    hit = np.flatnonzero(cand)[ok]
    logger.info(
        "sample %s: rescued %d low-RNA cells with %r markers (null fraction %.4f, mito cap %.2f%%)",
        label[0],
        hit.size,
        label[1],
        p0,
        mt_cap,
    )
    return hit


def _mark_rescued(adata: ad.AnnData, rescued: np.ndarray) -> None:
    """Write ``obs["low_rna_immune"]``; rescued cells pass (reason ``pass``, no outlier)."""
    adata.obs["low_rna_immune"] = rescued
    if rescued.any():
        qc_reason = adata.obs["qc_reason"].astype(str).to_numpy(dtype=object)
        qc_reason[rescued] = "pass"
        adata.obs["qc_reason"] = qc_reason
        adata.obs["qc_outlier"] = adata.obs["qc_reason"].ne("pass").to_numpy()


# --------------------------------------------------------------------------------------
# the per-sample driver
# --------------------------------------------------------------------------------------


def _resolve_sample(adata: ad.AnnData, sample_id: str | None, batch_key: str) -> None:
    if batch_key in adata.obs:
        present = pd.unique(adata.obs[batch_key].astype(str))
        if sample_id is not None and (len(present) != 1 or present[0] != str(sample_id)):
            raise ValueError(
                f"sample_id={sample_id!r} but obs[{batch_key!r}] holds {list(present)[:5]}; "
                f"pass sample_id=None to QC each sample in obs[{batch_key!r}] separately."
            )
        return
    adata.obs[batch_key] = pd.Categorical([str(sample_id or "sample")] * adata.n_obs)


@dataclass(frozen=True)
class QCParams:
    """Thresholds and switches of :func:`run_qc`, one bundle per QC run.

    Field defaults are the config schema's (``workflow/schemas/config.schema.yaml``,
    section ``qc``; a test keeps them equal); fields the schema does not expose keep the
    defaults of the step functions. Build it from a config section with
    :meth:`from_config` or directly, and change single fields with
    :func:`dataclasses.replace`.

    Attributes
    ----------
    nmads
        MADs per ``obs`` metric (config ``nmads_counts``, ``nmads_genes``, ``nmads_mt``);
        see :func:`adaptive_thresholds`.
    min_counts, max_counts, min_genes, max_genes, max_pct_mt
        Hard limits that tighten the adaptive thresholds (``None``: adaptive only).
    mt_threshold_floor
        Lower bound on the adaptive mitochondrial threshold (``None``: purely adaptive).
    doublet_method
        ``"scrublet"`` or ``"none"`` (no doublet detection).
    remove_doublets
        Count predicted doublets as QC failures (reason ``doublet``).
    expected_doublet_rate, doublet_threshold
        Fixed doublet rate / Scrublet score threshold; ``None``: per sample (see
        :func:`detect_doublets`).
    rescue
        Apply :func:`rescue_low_rna_immune` (config key ``rescue_low_rna_immune``).
    rescue_markers, rescue_max_pct_mt, rescue_min_counts, rescue_min_genes, \
rescue_min_markers, rescue_min_enrichment, rescue_alpha
        Parameters of :func:`rescue_low_rna_immune` (without the ``rescue_`` prefix).
    upper_tail
        Upper count / gene cut: ``"lineage"`` (k MADs within each first-pass lineage of a
        sample, :func:`lineage_upper_flags`), ``"sample"`` (k MADs over the whole sample,
        the old rule, which depends on the cell mix) or ``"none"``.
    ambient
        ``"auto"``: estimate the soup (SoupX from raw droplets when given, else the pooled
        cells) and the contamination per sample; ``"none"``: skip.
    ambient_without_raw
        Without raw droplets: ``"report"`` the estimate only (the sample is not corrected)
        or ``"correct"`` with the pooled-cell soup anyway.
    soup_max_counts
        Raw droplets with fewer UMIs are soup (SoupX ``soupRange``).
    flag_soup_droplets
        Remove droplets better explained by the soup than by any lineage (reason
        ``ambient_droplet``); only with a soup from raw droplets.
    platelet_monocyte
        Platelet-monocyte aggregates (``doublet_type == "platelet_monocyte"``): ``"flag"``
        (kept) or ``"remove"`` (reason ``platelet_monocyte``).
    """

    nmads: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_NMADS))
    min_counts: float | None = None
    max_counts: float | None = None
    min_genes: float | None = None
    max_genes: float | None = None
    max_pct_mt: float | None = 20.0
    mt_threshold_floor: float | None = 8.0
    doublet_method: Literal["scrublet", "none"] = "scrublet"
    remove_doublets: bool = True
    expected_doublet_rate: float | None = None
    doublet_threshold: float | None = None
    rescue: bool = True
    rescue_markers: Mapping[str, Sequence[str]] | None = None
    rescue_max_pct_mt: float | None = None
    rescue_min_counts: int = 100
    rescue_min_genes: int = 50
    rescue_min_markers: int = 3
    rescue_min_enrichment: float = 2.0
    rescue_alpha: float = 1e-3
    upper_tail: Literal["lineage", "sample", "none"] = "lineage"
    ambient: Literal["auto", "none"] = "auto"
    ambient_without_raw: Literal["report", "correct"] = "report"
    soup_max_counts: float = 100.0
    flag_soup_droplets: bool = True
    platelet_monocyte: Literal["flag", "remove"] = "flag"

    def __post_init__(self) -> None:
        nmads = DEFAULT_NMADS if self.nmads is None else self.nmads
        object.__setattr__(self, "nmads", dict(nmads))  # a private copy, in the given order

    #: config key (section ``qc``) -> field, where the names differ
    _CONFIG_NAMES: ClassVar[dict[str, str]] = {"rescue_low_rna_immune": "rescue"}
    #: ``qc`` config keys that belong to other steps (merge, run_qc's ``on_empty``)
    _NOT_PARAMS: ClassVar[frozenset[str]] = frozenset(
        {
            "min_cells_per_gene",
            "on_empty",
            "min_cells_per_sample",
            "on_small_sample",
            "downstream_layer",
        }
    )
    _NMADS_KEYS: ClassVar[dict[str, str]] = {
        "nmads_counts": "log1p_total_counts",
        "nmads_genes": "log1p_n_genes_by_counts",
        "nmads_mt": "pct_counts_mt",
    }

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> QCParams:
        """Build from the config's ``qc`` section; missing keys take the defaults.

        Raises ``ValueError`` on a key that is neither a field nor another step's key.
        """
        kwargs: dict[str, Any] = {}
        nmads = dict(DEFAULT_NMADS)
        names = {f.name for f in fields(cls)} - {"nmads"}  # the config has nmads_<metric>
        for key, value in section.items():
            if key in cls._NMADS_KEYS:
                nmads[cls._NMADS_KEYS[key]] = value
            elif key in cls._NOT_PARAMS:
                continue
            elif cls._CONFIG_NAMES.get(key, key) in names:
                kwargs[cls._CONFIG_NAMES.get(key, key)] = value
            else:
                raise ValueError(f"unknown qc config key {key!r}")
        return cls(nmads=nmads, **kwargs)

    def with_overrides(self, overrides: Mapping[str, Any]) -> QCParams:
        """A copy with the given fields changed; ``rescue_low_rna_immune`` means ``rescue``.

        Raises ``TypeError`` on a name that is no field (as a misspelt keyword would).
        """
        overrides = dict(overrides)
        if "rescue_low_rna_immune" in overrides:  # run_qc's keyword before QCParams
            if "rescue" in overrides:
                raise TypeError("pass rescue or rescue_low_rna_immune, not both")
            overrides["rescue"] = overrides.pop("rescue_low_rna_immune")
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"run_qc got unexpected keyword argument(s) {sorted(unknown)}")
        return replace(self, **overrides) if overrides else self


#: what :func:`run_qc` uses without ``params``: the schema defaults except ``max_pct_mt``,
#: which has always been ``None`` (adaptive only) for keyword callers of the library
_RUN_QC_DEFAULTS = QCParams(max_pct_mt=None)


def run_qc(
    adata: ad.AnnData,
    params: QCParams | None = None,
    *,
    sample_id: str | None = None,
    batch_key: str = "sample_id",
    organism: str = "auto",
    cells_loaded: float | Mapping[str, float] | None = None,
    seed: int = 0,
    on_empty: Literal["error", "drop"] = "error",
    raw: ad.AnnData | Mapping[str, ad.AnnData] | None = None,
    chemistry: str | Mapping[str, str] | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Full QC of one sample (or of each sample in ``obs[batch_key]``), annotating in place.

    Steps: :func:`qc_metrics` → first-pass lineage
    (:func:`sepsis_sc.ambient.first_pass_lineage`) → soup profile and soup-only droplets
    (:mod:`sepsis_sc.ambient`) → :func:`adaptive_thresholds` (lower side, mito) and
    :func:`flag_outliers` → upper tail per lineage (:func:`lineage_upper_flags`) →
    contamination → :func:`detect_doublets` on the cells that passed so far, and
    platelet-monocyte aggregates (:func:`flag_platelet_monocyte`) →
    :func:`rescue_low_rna_immune` against the soup → SoupX correction into
    ``layers["soupx_counts"]``. Cells are not removed here; use :func:`filter_cells_qc`.

    Parameters
    ----------
    adata
        Raw integer counts in ``layers["counts"]`` or ``X`` (a counts layer is created from
        ``X`` when missing, kept sparse).
    params
        Thresholds and switches (:class:`QCParams`, e.g. ``QCParams.from_config(cfg["qc"])``).
        ``None``: the :class:`QCParams` defaults, except ``max_pct_mt=None`` (no hard
        mitochondrial ceiling, as the keyword defaults always were).
    sample_id
        Name of the sample when ``obs[batch_key]`` is absent (it is then written there).
        ``None`` with a multi-sample ``obs[batch_key]`` QCs every sample separately.
    batch_key
        ``obs`` column naming the sample.
    organism
        ``"human"``, ``"mouse"`` or ``"auto"``.
    cells_loaded
        Cells loaded per sample (number or mapping); see :func:`detect_doublets`.
    seed
        Random seed (doublet simulation).
    on_empty
        What to do when a sample has no cell left: ``"error"`` raises ``ValueError`` naming
        the sample and the thresholds; ``"drop"`` logs a warning and marks the summary row
        ``empty = True``.
    raw
        The raw (unfiltered) droplet matrix of the sample (or a mapping sample -> matrix),
        for the SoupX soup profile; ``None``: the soup is the pooled cells' profile.
    chemistry
        10x chemistry (``v2``, ``v3``, ``v3.1``, ``HT``; one value or per sample) for the
        expected doublet rate; ``None`` reads ``obs["chemistry"]`` when present.
    **overrides
        Any :class:`QCParams` field by name (``nmads``, ``min_counts``, ``max_counts``,
        ``min_genes``, ``max_genes``, ``max_pct_mt``, ``mt_threshold_floor``,
        ``doublet_method``, ``remove_doublets``, ``expected_doublet_rate``,
        ``doublet_threshold``, ``rescue`` (also accepted as ``rescue_low_rna_immune``),
        ``rescue_markers``, ``rescue_max_pct_mt``, ``rescue_min_counts``,
        ``rescue_min_genes``, ``rescue_min_markers``, ``rescue_min_enrichment``,
        ``rescue_alpha``); they replace the fields of ``params``.

    Returns
    -------
    Summary with one row per sample: ``sample_id``, ``organism``, ``cells_in``,
    ``cells_out``, ``frac_removed``, ``flagged_<reason>`` (cells with that reason, reasons
    overlap), ``removed_<reason>`` (each removed cell counted once, for the first reason
    in :data:`QC_REASONS` it has), ``rescued_low_rna_immune``, the effective thresholds
    (``min_counts`` ... ``max_pct_mt``), ``expected_doublet_rate``, ``doublet_threshold``
    and ``empty``. Writes the ``obs``/``var`` slots listed in the module docstring,
    ``layers["counts"]`` and ``uns["qc"]`` (``params``, ``thresholds``, ``summary``).

    Raises
    ------
    ValueError
        Non-integer counts, an empty input, or (with ``on_empty="error"``) a sample with
        no cell passing QC.
    """
    p = (_RUN_QC_DEFAULTS if params is None else params).with_overrides(overrides)
    _check_run_qc_args(adata, p, sample_id=sample_id, on_empty=on_empty)
    _resolve_sample(adata, sample_id, batch_key)
    organism = qc_metrics(adata, organism)  # validates integer counts
    _ensure_counts_layer(adata)
    _ambient.first_pass_lineage(adata)
    soups = _soup_step(adata, p, batch_key=batch_key, raw=raw)
    thresholds = _sample_thresholds(adata, p, batch_key)
    flag_outliers(adata, thresholds, batch_key=batch_key)
    _add_reason(adata, adata.obs["soup_droplet"].to_numpy(dtype=bool), "ambient_droplet")
    upper = _upper_tail_step(adata, p, batch_key=batch_key)
    _contamination_step(adata, soups, batch_key=batch_key)
    doublets = _doublet_step(
        adata,
        p,
        thresholds.index,
        batch_key=batch_key,
        cells_loaded=cells_loaded,
        chemistry=chemistry,
        seed=seed,
    )
    flag_platelet_monocyte(adata, soups, batch_key=batch_key)
    _rescue_step(adata, p, batch_key=batch_key, organism=organism, soups=soups)
    _finalise_reasons(
        adata, remove_doublets=p.remove_doublets, platelet_monocyte=p.platelet_monocyte
    )
    _correction_step(adata, p, soups, batch_key=batch_key, seed=seed)
    summary = _summarise(adata, thresholds, doublets, batch_key, organism)
    summary = _add_blood_columns(summary, adata, soups, upper, p, batch_key=batch_key)
    adata.uns["qc"] = {
        "params": _params_record(p, organism=organism, seed=seed),
        "thresholds": thresholds.reset_index(),
        "upper_tail": upper,
        "summary": summary.copy(),
    }
    _handle_empty_samples(summary, thresholds, on_empty=on_empty)
    return summary


def _correction_step(
    adata: ad.AnnData,
    p: QCParams,
    soups: dict[str, dict[str, Any]],
    *,
    batch_key: str,
    seed: int,
) -> None:
    """SoupX subtraction per sample into ``layers["soupx_counts"]`` (integers); samples not
    corrected (no estimate, or no raw droplets with ``ambient_without_raw="report"``) get
    their raw counts there. Without any corrected sample the layer is not written (no
    second copy of the raw counts; :func:`sepsis_sc.data.counts_layer` then reads
    ``layers["counts"]``)."""
    samples = _sample_ids(adata, batch_key)
    counts = sparse.csr_matrix(get_counts(adata, check=False)[0])
    blocks, order = [], []
    for sample, info in soups.items():
        idx = np.flatnonzero((samples == sample).to_numpy())
        rho = info.get("rho", np.nan)
        use = info["soup"] is not None and np.isfinite(rho) and rho > 0
        use = use and (info["source"] == "raw" or p.ambient_without_raw == "correct")
        info["corrected"] = bool(use)
        if use:
            sub = _sample_sub(adata, idx, ["qc_lineage"])
            _ambient.correct_counts(sub, info["soup"], rho, seed=seed)
            blocks.append(sub.layers["soupx_counts"])
        else:
            blocks.append(counts[idx])
        order.append(idx)
    if not any(info.get("corrected") for info in soups.values()):
        adata.layers.pop("soupx_counts", None)
        return
    stacked = sparse.vstack(blocks, format="csr")
    inverse = np.argsort(np.concatenate(order))
    adata.layers["soupx_counts"] = sparse.csr_matrix(stacked[inverse], dtype=np.float32)


def _add_blood_columns(
    summary: pd.DataFrame,
    adata: ad.AnnData,
    soups: Mapping[str, Mapping[str, Any]],
    upper: pd.DataFrame,
    p: QCParams,
    *,
    batch_key: str,
) -> pd.DataFrame:
    """Ambient, upper-tail, aggregate and per-lineage columns of the QC summary.

    ``contamination`` (NaN = not estimated), ``contamination_source`` (``raw`` = SoupX on
    empty droplets, ``filtered_pooled`` = pooled cells, ``not_estimated``),
    ``contamination_sets``, ``ambient_corrected``, ``soup_droplets``, ``upper_tail_rule``,
    ``platelet_monocyte`` (aggregates flagged), ``platelet_monocyte_action``, and per
    first-pass lineage ``lineage_n_<lineage>``, ``lineage_removed_frac_<lineage>``.
    """
    samples = _sample_ids(adata, batch_key)
    lineage = adata.obs["qc_lineage"].astype(str)
    removed = adata.obs["qc_outlier"].to_numpy(dtype=bool)
    pm = adata.obs["doublet_type"].astype(str).eq("platelet_monocyte").to_numpy()
    extra = []
    for sample in summary["sample_id"]:
        m = (samples == sample).to_numpy()
        info = soups.get(sample, {})
        row: dict[str, Any] = {
            "contamination": float(info.get("rho", np.nan)),
            "contamination_source": info.get("source", "not_estimated")
            if np.isfinite(info.get("rho", np.nan))
            else "not_estimated",
            "contamination_sets": info.get("sets", ""),
            "ambient_corrected": bool(info.get("corrected", False)),
            "soup_droplets": int(adata.obs["soup_droplet"].to_numpy(dtype=bool)[m].sum()),
            "upper_tail_rule": p.upper_tail,
            "platelet_monocyte": int(pm[m].sum()),
            "platelet_monocyte_action": p.platelet_monocyte,
        }
        for lin in _ambient.LINEAGES:
            in_lin = m & (lineage == lin).to_numpy()
            row[f"lineage_n_{lin}"] = int(in_lin.sum())
            row[f"lineage_removed_frac_{lin}"] = (
                float(removed[in_lin].mean()) if in_lin.any() else np.nan
            )
        extra.append(row)
    return pd.concat([summary.reset_index(drop=True), pd.DataFrame(extra)], axis=1)


def _check_run_qc_args(
    adata: ad.AnnData, p: QCParams, *, sample_id: str | None, on_empty: str
) -> None:
    """Reject an unknown ``on_empty`` or ``doublet_method`` and an input without cells."""
    if on_empty not in ("error", "drop"):
        raise ValueError(f"on_empty must be 'error' or 'drop', not {on_empty!r}.")
    if p.doublet_method not in ("scrublet", "none"):
        raise ValueError(f"doublet_method must be 'scrublet' or 'none', not {p.doublet_method!r}.")
    choices = {
        "upper_tail": ("lineage", "sample", "none"),
        "ambient": ("auto", "none"),
        "ambient_without_raw": ("report", "correct"),
        "platelet_monocyte": ("flag", "remove"),
    }
    for name, allowed in choices.items():
        if getattr(p, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, not {getattr(p, name)!r}.")
    if adata.n_obs == 0:
        raise ValueError(f"sample {sample_id or ''} has no cells before QC; check the input.")


def _ensure_counts_layer(adata: ad.AnnData) -> None:
    """Create ``layers["counts"]`` (sparse) from ``X`` when the input has no counts layer."""
    if "counts" not in adata.layers:
        adata.layers["counts"] = (
            adata.X.copy() if sparse.issparse(adata.X) else sparse.csr_matrix(adata.X)
        )


def _sample_thresholds(adata: ad.AnnData, p: QCParams, batch_key: str) -> pd.DataFrame:
    """:func:`adaptive_thresholds` with the limits of ``p``."""
    return adaptive_thresholds(
        adata,
        batch_key=batch_key,
        nmads=p.nmads,
        min_counts=p.min_counts,
        max_counts=p.max_counts,
        min_genes=p.min_genes,
        max_genes=p.max_genes,
        max_pct_mt=p.max_pct_mt,
        mt_threshold_floor=p.mt_threshold_floor,
        upper=p.upper_tail == "sample",
    )


def _sample_sub(adata: ad.AnnData, idx: np.ndarray, cols: Sequence[str]) -> ad.AnnData:
    """A light AnnData of the cells ``idx``: raw counts in ``X`` and the ``obs`` columns."""
    counts = sparse.csr_matrix(get_counts(adata, check=False)[0])[idx]
    keep = [c for c in cols if c in adata.obs]
    return ad.AnnData(
        X=counts,
        obs=adata.obs.iloc[idx][keep].copy(),
        var=pd.DataFrame(index=adata.var_names.copy()),
    )


def _raw_for(raw: ad.AnnData | Mapping[str, ad.AnnData] | None, sample: str, n_samples: int):
    if raw is None:
        return None
    if isinstance(raw, Mapping):
        return raw.get(sample)
    if n_samples > 1:
        raise ValueError("pass raw as a mapping {sample_id: raw AnnData} for several samples.")
    return raw


def _soup_step(
    adata: ad.AnnData,
    p: QCParams,
    *,
    batch_key: str,
    raw: ad.AnnData | Mapping[str, ad.AnnData] | None,
) -> dict[str, dict[str, Any]]:
    """Soup profile per sample and (raw soup only) the soup-only droplets.

    Returns ``{sample: {"soup": Series or None, "source": str, ...}}`` and writes
    ``obs["soup_droplet"]`` and ``obs["soup_loglik_ratio"]``.
    """
    samples = _sample_ids(adata, batch_key)
    adata.obs["soup_droplet"] = False
    adata.obs["soup_loglik_ratio"] = np.nan
    out: dict[str, dict[str, Any]] = {}
    uniq = pd.unique(samples)
    for sample in uniq:
        idx = np.flatnonzero((samples == sample).to_numpy())
        if p.ambient == "none":
            out[sample] = {"soup": None, "source": "not_estimated"}
            continue
        sub = _sample_sub(adata, idx, ["qc_lineage"])
        soup, source = _ambient.estimate_soup(
            sub, _raw_for(raw, sample, len(uniq)), soup_max_counts=p.soup_max_counts
        )
        out[sample] = {"soup": soup, "source": source}
        if source == "raw" and p.flag_soup_droplets:
            flag = _ambient.flag_soup_droplets(sub, soup)
            col = adata.obs.columns.get_loc("soup_droplet")
            adata.obs.iloc[idx, col] = flag
            col = adata.obs.columns.get_loc("soup_loglik_ratio")
            adata.obs.iloc[idx, col] = sub.obs["soup_loglik_ratio"].to_numpy()
    return out


def _add_reason(adata: ad.AnnData, mask: np.ndarray, reason: str) -> None:
    """Append ``reason`` to ``qc_reason`` of the cells in ``mask``."""
    if not mask.any():
        return
    reasons = adata.obs["qc_reason"].astype(str).to_numpy(dtype=object)
    for i in np.flatnonzero(mask):
        reasons[i] = reason if reasons[i] == "pass" else f"{reasons[i]};{reason}"
    adata.obs["qc_reason"] = reasons
    adata.obs["qc_outlier"] = adata.obs["qc_reason"].ne("pass").to_numpy()


def lineage_upper_flags(
    adata: ad.AnnData,
    *,
    batch_key: str = "sample_id",
    lineage_key: str = "qc_lineage",
    nmads: Mapping[str, float] | None = None,
    min_cells: int = 30,
) -> pd.DataFrame:
    """Upper count / gene cuts per (sample, first-pass lineage): median + k MADs of log values.

    A sample-wide upper cut moves with the cell mix (neutrophils carry ~1,000 UMIs,
    monocytes ~4,500, plasmablasts ~8,000): in an 80 %-neutrophil sample it removes most
    plasmablasts. Within a lineage the distribution does not depend on the mix. Statistics
    use the cells that passed the lower and mitochondrial filters; lineages with fewer than
    ``min_cells`` such cells in a sample get no upper cut (logged in the table).

    Returns
    -------
    One row per (sample, lineage): ``n_cells``, ``max_counts``, ``max_genes`` (NaN = no cut),
    ``flagged_high_counts``, ``flagged_high_genes``. Appends ``high_counts`` /
    ``high_genes`` to ``obs["qc_reason"]``.
    """
    nmads = dict(DEFAULT_NMADS if nmads is None else nmads)
    samples = _sample_ids(adata, batch_key)
    lineage = adata.obs[lineage_key].astype(str)
    passing = adata.obs["qc_reason"].astype(str).eq("pass").to_numpy()
    metrics = {
        "counts": ("log1p_total_counts", "total_counts"),
        "genes": ("log1p_n_genes_by_counts", "n_genes_by_counts"),
    }
    flags = {stem: np.zeros(adata.n_obs, dtype=bool) for stem in metrics}
    rows = []
    for (sample, lin), grp in pd.DataFrame({"s": samples, "l": lineage}).groupby(
        ["s", "l"], sort=True, observed=True
    ):
        members = adata.obs_names.get_indexer(grp.index)
        ref = members[passing[members]]
        row: dict[str, Any] = {"sample_id": sample, "lineage": lin, "n_cells": int(members.size)}
        for stem, (log_col, nat_col) in metrics.items():
            row[f"max_{stem}"] = np.nan
            row[f"flagged_high_{stem}"] = 0
            k = nmads.get(log_col)
            if k is None or ref.size < min_cells:
                continue
            vals = adata.obs[log_col].to_numpy(dtype=float)[ref]
            mad = _mad(vals)
            if mad == 0:
                continue
            cut = float(np.expm1(np.median(vals) + k * mad))
            bad = adata.obs[nat_col].to_numpy(dtype=float)[members] > cut
            flags[stem][members[bad]] = True
            row[f"max_{stem}"] = cut
            row[f"flagged_high_{stem}"] = int(bad.sum())
        rows.append(row)
    for stem, mask in flags.items():
        _add_reason(adata, mask, f"high_{stem}")
    return pd.DataFrame(rows)


def _upper_tail_step(adata: ad.AnnData, p: QCParams, *, batch_key: str) -> pd.DataFrame:
    """The per-lineage upper cuts (``upper_tail="lineage"``), else an empty table."""
    if p.upper_tail == "lineage":
        return lineage_upper_flags(adata, batch_key=batch_key, nmads=p.nmads)
    return pd.DataFrame(
        columns=[
            "sample_id",
            "lineage",
            "n_cells",
            "max_counts",
            "max_genes",
            "flagged_high_counts",
            "flagged_high_genes",
        ]
    )


def _contamination_step(
    adata: ad.AnnData, soups: dict[str, dict[str, Any]], *, batch_key: str
) -> None:
    """SoupX contamination per sample, from the cells that passed so far (no soup droplets,
    no damaged cells); stored in ``soups[sample]``."""
    samples = _sample_ids(adata, batch_key)
    passing = adata.obs["qc_reason"].astype(str).eq("pass").to_numpy()
    for sample, info in soups.items():
        info.update(rho=np.nan, sets="", n_cells_used=0)
        if info["soup"] is None:
            continue
        idx = np.flatnonzero((samples == sample).to_numpy())
        sub = _sample_sub(adata, idx, ["qc_lineage"])
        est = _ambient.estimate_contamination(
            sub, info["soup"], source=info["source"], cells=passing[idx]
        )
        info.update(rho=est["rho"], sets=",".join(est["sets"]), n_cells_used=est["n_cells_used"])


#: platelet genes for the platelet-monocyte aggregate call (biology reference §1.2)
PLATELET_GENES: dict[str, list[str]] = {
    "human": ["PPBP", "PF4", "GP9", "ITGA2B", "TUBB1", "GNG11", "NRGN", "CAVIN2"],
    "mouse": ["Ppbp", "Pf4", "Itga2b", "Gp9", "Gp1bb", "Tubb1"],
}


def flag_platelet_monocyte(
    adata: ad.AnnData,
    soups: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    batch_key: str = "sample_id",
    lineage_key: str = "qc_lineage",
    min_excess: float = 10.0,
    min_genes: int = 2,
    alpha: float = 1e-4,
    rho_unknown: float = 0.2,
) -> np.ndarray:
    """Platelet-monocyte aggregates: monocytes carrying platelet RNA beyond the soup's.

    A droplet labelled ``Monocyte`` by the first-pass lineage is an aggregate when its
    platelet-gene UMIs (:data:`PLATELET_GENES`) exceed what its contamination brings
    (``rho x UMIs x soup fraction of the set``; ``rho_unknown`` = 0.2, a high contamination,
    when rho was not estimated; where the soup holds haemoglobin, at least what the droplet's
    own haemoglobin UMIs imply, since droplets differ in how much soup they take up) by at least ``min_excess`` UMIs with a one-sided Poisson
    p-value below ``alpha``, with at least ``min_genes`` platelet genes detected. Aggregates
    rise in sepsis (Rondina 2015; Qiu 2021) and are biology, so they are their own category
    (``obs["doublet_type"] = "platelet_monocyte"``), kept or removed by the config.

    Returns the mask and writes ``obs["doublet_type"]`` (``"platelet_monocyte"``,
    ``"heterotypic"`` for other predicted doublets, ``""``).
    """
    counts = sparse.csr_matrix(get_counts(adata, check=False)[0])
    index = pd.Index(adata.var_names.astype(str))
    genes = [g for gl in PLATELET_GENES.values() for g in gl if g in index]
    pm = np.zeros(adata.n_obs, dtype=bool)
    if genes:
        cols = index.get_indexer(genes)
        k = np.asarray(counts[:, cols].sum(axis=1)).ravel()
        n_det = np.asarray((counts[:, cols] > 0).sum(axis=1)).ravel()
        total = adata.obs["total_counts"].to_numpy(dtype=float)
        samples = _sample_ids(adata, batch_key)
        mono = adata.obs[lineage_key].astype(str).eq("Monocyte").to_numpy()
        if "soup_droplet" in adata.obs:  # a soup droplet holds no cell at all
            mono &= ~adata.obs["soup_droplet"].to_numpy(dtype=bool)
        pooled = np.asarray(counts.sum(axis=0), dtype=float).ravel()
        for sample in pd.unique(samples):
            m = (samples == sample).to_numpy()
            info = (soups or {}).get(sample, {})
            soup = info.get("soup")
            frac = (
                float(soup.reindex(genes).fillna(0).sum())
                if soup is not None
                else float(pooled[cols].sum() / max(pooled.sum(), 1))
            )
            rho = info.get("rho", np.nan)
            rho = float(rho) if rho is not None and np.isfinite(rho) else rho_unknown
            mu = np.maximum(rho * total * frac, 1e-3)
            # contamination varies between droplets: where the soup holds haemoglobin (no
            # leukocyte or platelet makes it), a droplet's own HB UMIs say how much soup it
            # took up, and its platelet UMIs are judged against that
            hb = [g for g in ("HBB", "HBA1", "HBA2", "Hbb-bs", "Hba-a1") if g in index]
            hb_frac = float(soup.reindex(hb).fillna(0).sum()) if soup is not None and hb else 0.0
            if hb_frac >= 1e-3:
                k_hb = np.asarray(counts[:, index.get_indexer(hb)].sum(axis=1)).ravel()
                mu = np.maximum(mu, (k_hb + 1.0) * frac / hb_frac)
            pval = stats.poisson.sf(k - 1, mu)
            pm |= m & mono & (k - mu >= min_excess) & (pval < alpha) & (n_det >= min_genes)
    dtype = np.full(adata.n_obs, "", dtype=object)
    if "predicted_doublet" in adata.obs:
        dtype[adata.obs["predicted_doublet"].to_numpy(dtype=bool)] = "heterotypic"
    dtype[pm] = "platelet_monocyte"
    adata.obs["doublet_type"] = dtype
    logger.info("%d platelet-monocyte aggregates flagged", pm.sum())
    return pm


def _doublet_step(
    adata: ad.AnnData,
    p: QCParams,
    samples: pd.Index,
    *,
    batch_key: str,
    cells_loaded: float | Mapping[str, float] | None,
    seed: int,
    chemistry: str | Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Scrublet per sample on the cells that passed the filters so far, or
    (``doublet_method="none"``) no scores and no doublets.

    Damaged cells and soup droplets would enter Scrublet's simulated doublets and its kNN
    graph as if they were cells, so they are left out; the expected rate still comes from
    all barcodes recovered (and the chemistry), since it is a property of the loading.
    Returns the per-sample doublet table (NaN rate and threshold when not scored).
    """
    adata.obs["doublet_score"] = np.nan
    adata.obs["predicted_doublet"] = False
    if p.doublet_method != "scrublet":
        return pd.DataFrame(
            {"expected_doublet_rate": np.nan, "doublet_threshold": np.nan}, index=samples
        )
    ids = _sample_ids(adata, batch_key)
    passing = adata.obs["qc_reason"].astype(str).eq("pass").to_numpy()
    rows = []
    scores = np.full(adata.n_obs, np.nan)
    calls = np.zeros(adata.n_obs, dtype=bool)
    for sample in pd.unique(ids):
        all_idx = np.flatnonzero((ids == sample).to_numpy())
        idx = all_idx[passing[all_idx]]
        chem = chemistry.get(sample) if isinstance(chemistry, Mapping) else chemistry
        if chem is None and "chemistry" in adata.obs:
            chem = str(adata.obs["chemistry"].iloc[all_idx[0]])
        loaded = _sample_cells_loaded(adata, cells_loaded, sample, all_idx)
        rate = (
            float(p.expected_doublet_rate)
            if p.expected_doublet_rate is not None
            else expected_doublet_rate(all_idx.size, loaded, chem)
        )
        sub = _sample_sub(adata, idx, [batch_key])
        table = detect_doublets(
            sub, batch_key=batch_key, expected_rate=rate, threshold=p.doublet_threshold, seed=seed
        )
        scores[idx] = sub.obs["doublet_score"].to_numpy()
        calls[idx] = sub.obs["predicted_doublet"].to_numpy(dtype=bool)
        table = table.assign(chemistry=chem or "", n_scored=idx.size)
        rows.append(table)
    adata.obs["doublet_score"] = scores
    adata.obs["predicted_doublet"] = calls
    return pd.concat(rows)


def _rescue_step(
    adata: ad.AnnData,
    p: QCParams,
    *,
    batch_key: str,
    organism: str,
    soups: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """:func:`rescue_low_rna_immune` with the settings of ``p``; else no cell is rescued."""
    if not p.rescue:
        adata.obs["low_rna_immune"] = False
        return
    rescue_low_rna_immune(
        adata,
        batch_key=batch_key,
        organism=organism,
        markers=p.rescue_markers,
        max_pct_mt=p.rescue_max_pct_mt,
        min_counts=p.rescue_min_counts,
        min_genes=p.rescue_min_genes,
        min_markers=p.rescue_min_markers,
        min_enrichment=p.rescue_min_enrichment,
        alpha=p.rescue_alpha,
        soup={s: v["soup"] for s, v in (soups or {}).items() if v.get("soup") is not None} or None,
    )


def _finalise_reasons(
    adata: ad.AnnData, *, remove_doublets: bool, platelet_monocyte: str = "flag"
) -> None:
    """Add the reason ``doublet`` to predicted doublets (which are then never rescued) and
    set ``obs["qc_outlier"]`` from the final ``qc_reason``. Platelet-monocyte aggregates
    (``obs["doublet_type"]``) are their own category: kept (``"flag"``) or removed with
    the reason ``platelet_monocyte``, never as plain doublets."""
    pm = (
        adata.obs["doublet_type"].astype(str).eq("platelet_monocyte").to_numpy()
        if "doublet_type" in adata.obs
        else np.zeros(adata.n_obs, dtype=bool)
    )
    if platelet_monocyte == "remove" and pm.any():
        reason = adata.obs["qc_reason"].astype(str).to_numpy(dtype=object)
        for i in np.flatnonzero(pm):
            reason[i] = (
                "platelet_monocyte" if reason[i] == "pass" else f"{reason[i]};platelet_monocyte"
            )
        adata.obs["qc_reason"] = reason
        adata.obs["low_rna_immune"] = adata.obs["low_rna_immune"].to_numpy(dtype=bool) & ~pm
    if remove_doublets:
        dbl = adata.obs["predicted_doublet"].to_numpy(dtype=bool) & ~pm
        reason = adata.obs["qc_reason"].astype(str).to_numpy(dtype=object)
        for i in np.flatnonzero(dbl):
            reason[i] = "doublet" if reason[i] == "pass" else f"{reason[i]};doublet"
        adata.obs["qc_reason"] = reason
        low_rna = adata.obs["low_rna_immune"].to_numpy(dtype=bool)
        adata.obs["low_rna_immune"] = low_rna & ~dbl
    adata.obs["qc_outlier"] = adata.obs["qc_reason"].astype(str).ne("pass").to_numpy()


def _params_record(p: QCParams, *, organism: str, seed: int) -> dict[str, Any]:
    """``uns["qc"]["params"]``: the settings used, keys that are ``None`` left out (an
    ``.h5ad`` file cannot store ``None``; a missing key reads as "not set")."""
    record = {
        "organism": organism,
        "nmads": dict(p.nmads),
        "min_counts": p.min_counts,
        "max_counts": p.max_counts,
        "min_genes": p.min_genes,
        "max_genes": p.max_genes,
        "max_pct_mt": p.max_pct_mt,
        "mt_threshold_floor": p.mt_threshold_floor,
        "doublet_method": p.doublet_method,
        "remove_doublets": p.remove_doublets,
        "expected_doublet_rate": p.expected_doublet_rate,
        "doublet_threshold": p.doublet_threshold,
        "rescue_low_rna_immune": p.rescue,
        "rescue_max_pct_mt": p.rescue_max_pct_mt,
        "rescue_min_counts": p.rescue_min_counts,
        "rescue_min_genes": p.rescue_min_genes,
        "rescue_min_markers": p.rescue_min_markers,
        "rescue_min_enrichment": p.rescue_min_enrichment,
        "rescue_alpha": p.rescue_alpha,
        "upper_tail": p.upper_tail,
        "ambient": p.ambient,
        "ambient_without_raw": p.ambient_without_raw,
        "soup_max_counts": p.soup_max_counts,
        "flag_soup_droplets": p.flag_soup_droplets,
        "platelet_monocyte": p.platelet_monocyte,
        "seed": seed,
    }
    return {key: value for key, value in record.items() if value is not None}


def _handle_empty_samples(
    summary: pd.DataFrame, thresholds: pd.DataFrame, *, on_empty: str
) -> None:
    """Raise (``on_empty="error"``) or warn for each sample with no cell left, naming the
    thresholds used and the cells flagged per reason."""
    empty = summary.loc[summary["cells_out"] == 0]
    for _, row in empty.iterrows():
        msg = _empty_sample_message(row, thresholds.loc[row["sample_id"]], summary.columns)
        if on_empty == "error":
            raise ValueError(msg)
        logger.warning("%s Sample marked empty and dropped.", msg)


def _empty_sample_message(row: pd.Series, thr: pd.Series, columns: pd.Index) -> str:
    """The message for a sample that QC emptied: thresholds used, cells flagged by reason."""
    used = ", ".join(
        f"{name}={thr[name]:.4g}"
        for name in ("min_counts", "max_counts", "min_genes", "max_genes", "max_pct_mt")
        if name in thr and np.isfinite(thr[name])
    )
    removed = ", ".join(
        f"{c.removeprefix('flagged_')}: {int(row[c])}"
        for c in columns
        if c.startswith("flagged_") and row[c] > 0
    )
    return (
        f"QC removed all {int(row['cells_in'])} cells of sample {row['sample_id']!r} "
        f"(thresholds used: {used}; cells flagged by reason: {removed}). Loosen the "
        "config keys qc.nmads_counts / qc.nmads_genes / qc.nmads_mt / qc.min_counts / "
        "qc.min_genes / qc.max_pct_mt, check that the input holds cells rather than empty "
        "droplets, or set qc.on_empty: drop."
    )


def _primary_reason(reason: str) -> str | None:
    if reason == "pass":
        return None
    parts = reason.split(";")
    for r in QC_REASONS:
        if r in parts:
            return r
    return parts[0]


def _summarise(
    adata: ad.AnnData,
    thresholds: pd.DataFrame,
    doublets: pd.DataFrame,
    batch_key: str,
    organism: str,
) -> pd.DataFrame:
    samples = _sample_ids(adata, batch_key)
    reasons = adata.obs["qc_reason"].astype(str)
    all_reasons = sorted({p for r in reasons.unique() if r != "pass" for p in r.split(";")})
    ordered = [r for r in QC_REASONS] + [r for r in all_reasons if r not in QC_REASONS]
    rows = []
    for sample in pd.unique(samples):
        mask = (samples == sample).to_numpy()
        r = reasons[mask]
        n_in = int(mask.sum())
        n_out = int((r == "pass").sum())
        row: dict[str, Any] = {
            "sample_id": sample,
            "organism": organism,
            "cells_in": n_in,
            "cells_out": n_out,
            "frac_removed": (n_in - n_out) / n_in if n_in else np.nan,
        }
        split = r[r != "pass"].str.split(";")
        primary = r.map(_primary_reason)
        for name in ordered:
            row[f"flagged_{name}"] = int(split.map(lambda parts, n=name: n in parts).sum())
        for name in ordered:
            row[f"removed_{name}"] = int((primary == name).sum())
        row["rescued_low_rna_immune"] = int(adata.obs["low_rna_immune"].to_numpy()[mask].sum())
        thr = thresholds.loc[sample]
        for name in ("min_counts", "max_counts", "min_genes", "max_genes", "max_pct_mt"):
            row[name] = float(thr[name]) if name in thr else np.nan
        if sample in doublets.index:
            row["expected_doublet_rate"] = float(doublets.loc[sample, "expected_doublet_rate"])
            row["doublet_threshold"] = float(doublets.loc[sample, "doublet_threshold"])
        row["empty"] = n_out == 0
        rows.append(row)
    return pd.DataFrame(rows)


def filter_cells_qc(adata: ad.AnnData, *, min_cells_per_gene: int = 0) -> ad.AnnData:
    """Return a copy holding only the cells that passed QC (``obs["qc_outlier"] == False``).

    Parameters
    ----------
    adata
        AnnData annotated by :func:`run_qc`.
    min_cells_per_gene
        Also drop genes detected in fewer cells of the copy (0 keeps all genes; gene
        filtering is best done once on the merged object, see :func:`merge_samples`).

    Returns
    -------
    A new AnnData (counts stay sparse in ``layers["counts"]``).
    """
    if "qc_outlier" not in adata.obs:
        raise ValueError("obs has no 'qc_outlier'; run sepsis_sc.qc.run_qc first.")
    keep = ~adata.obs["qc_outlier"].to_numpy(dtype=bool)
    out = adata[keep].copy()
    if min_cells_per_gene > 0:
        detected = np.asarray((get_counts(out, check=False)[0] > 0).sum(axis=0)).ravel()
        out = out[:, detected >= min_cells_per_gene].copy()
    logger.info("kept %d of %d cells after QC", out.n_obs, adata.n_obs)
    return out


# --------------------------------------------------------------------------------------
# merge and normalise
# --------------------------------------------------------------------------------------


def select_samples(
    summary: pd.DataFrame,
    *,
    min_cells: int = 50,
    on_small: Literal["drop", "stop"] = "drop",
) -> pd.DataFrame:
    """Decide which samples enter the cohort: those with at least ``min_cells`` after QC.

    A sample with a handful of cells left would enter the sample-level statistics at full
    weight (its 3 cells set its cell-type fractions), so it is left out of the merged cohort
    (``on_small="drop"``, the default) or stops the run (``"stop"``). Samples with no cells
    at all were already handled by :func:`run_qc` (``qc.on_empty``).

    Parameters
    ----------
    summary
        Per-sample QC summary (``run_qc`` output, concatenated): ``sample_id``, ``cells_out``.
    min_cells
        ``qc.min_cells_per_sample``; 0 keeps every sample with at least one cell.
    on_small
        ``qc.on_small_sample``.

    Returns
    -------
    A copy of ``summary`` with ``included`` (bool) and ``excluded_reason`` ("" when included).

    Raises
    ------
    ValueError
        With ``on_small="stop"``, naming the small samples and the config keys.
    """
    if on_small not in ("drop", "stop"):
        raise ValueError(f"on_small must be 'drop' or 'stop', not {on_small!r}.")
    out = summary.copy()
    n = out["cells_out"].astype(int)
    empty = n == 0
    small = (n > 0) & (n < int(min_cells))
    out["included"] = ~(empty | small)
    out["excluded_reason"] = ""
    out.loc[empty, "excluded_reason"] = "no cells after QC"
    out.loc[small, "excluded_reason"] = [
        f"{k} cells after QC < qc.min_cells_per_sample ({int(min_cells)})" for k in n[small]
    ]
    if small.any() and on_small == "stop":
        names = ", ".join(f"{s} ({k} cells)" for s, k in zip(out.loc[small, "sample_id"], n[small]))
        raise ValueError(
            f"sample(s) with fewer than qc.min_cells_per_sample ({int(min_cells)}) cells after "
            f"QC: {names}. Remove them from the sheet, loosen QC for them, lower "
            "qc.min_cells_per_sample, or set qc.on_small_sample: drop to leave them out."
        )
    if small.any():
        logger.warning(
            "left out of the cohort (too few cells after QC): %s",
            ", ".join(out.loc[small, "sample_id"].astype(str)),
        )
    return out


def merge_samples(
    adatas: Iterable[ad.AnnData] | Mapping[str, ad.AnnData],
    *,
    batch_key: str = "sample_id",
    min_cells_per_gene: int = 3,
    drop_outliers: bool = True,
    organism: str = "auto",
) -> ad.AnnData:
    """Concatenate per-sample AnnData objects into one (outer join on genes, zeros filled).

    Each object is reduced to its raw counts, ``obs`` and gene identifiers as it arrives, so
    a generator that reads the samples one at a time (as the workflow's ``qc_merge`` does)
    keeps peak memory near three copies of the merged count matrix, not one per layer and
    per intermediate object.

    Parameters
    ----------
    adatas
        Filtered per-sample objects: a list, any iterable (e.g. a generator of
        ``anndata.read_h5ad`` calls) or a mapping ``{sample_id: adata}`` (the key fills
        ``obs[batch_key]`` when that column is missing). Only ``layers["counts"]`` (or ``X``
        when there is no such layer), ``obs`` and ``var["gene_ids"/"gene_symbols"]`` are used.
    batch_key
        ``obs`` column naming the sample.
    min_cells_per_gene
        Drop genes detected in fewer cells of the merged object (Heumos et al. 2023
        suggest about 20 for large data; 3 is permissive for small cohorts). 0 keeps all.
    drop_outliers
        Remove cells still marked ``qc_outlier`` (when an unfiltered object is passed).
    organism
        For re-flagging ``mt``/``ribo``/``hb`` on the merged gene list.

    Returns
    -------
    The merged AnnData: ``X`` and ``layers["counts"]`` hold the raw counts (CSR, separate
    matrices), ``var`` keeps ``gene_ids``/``gene_symbols`` (first non-missing value) and the
    gene flags, ``obs_names`` are unique. Call :func:`normalize` next.
    """
    items = adatas.items() if isinstance(adatas, Mapping) else ((None, a) for a in adatas)
    parts = []
    n_seen = 0
    for i, (key, a) in enumerate(items):
        n_seen += 1
        part = _slim_sample(a, key, i, batch_key=batch_key, drop_outliers=drop_outliers)
        if part is not None:
            parts.append(part)
        del a, part  # the sample's other layers can be freed now
    if n_seen == 0:
        raise ValueError("merge_samples got no AnnData objects.")
    if not parts:
        raise ValueError("every sample passed to merge_samples is empty; nothing to merge.")
    n_parts = len(parts)
    if any("soupx_counts" in p.layers for p in parts):  # samples QC'd without it: raw
        for part in parts:
            part.layers.setdefault("soupx_counts", part.X.copy())
    merged = ad.concat(parts, join="outer", fill_value=0, merge="first", index_unique=None)
    del parts
    _tidy_merged_obs(merged, batch_key)
    merged.X = sparse.csr_matrix(merged.X)
    merged = _drop_rare_genes(merged, min_cells_per_gene)
    merged.layers["counts"] = merged.X.copy()
    flag_genes(merged, organism)
    logger.info("merged %d samples: %d cells x %d genes", n_parts, *merged.shape)
    return merged


def _slim_sample(
    a: ad.AnnData, key: str | None, i: int, *, batch_key: str, drop_outliers: bool
) -> ad.AnnData | None:
    """One sample reduced to its raw counts (CSR), ``obs`` and gene identifiers.

    ``None`` for an empty sample (logged). The mapping key fills a missing
    ``obs[batch_key]``; cells marked ``qc_outlier`` are dropped with ``drop_outliers``.
    """
    if a.n_obs == 0:
        logger.warning("skipping empty sample %s", key if key is not None else i)
        return None
    obs = a.obs.copy()
    if batch_key not in obs:
        if key is None:
            raise ValueError(
                f"object {i} has no obs[{batch_key!r}]; pass a dict {{sample_id: adata}} "
                "or set the column."
            )
        obs[batch_key] = str(key)
    if "counts" in a.layers:
        counts = a.layers["counts"]
    else:
        counts, _ = get_counts(a, max_values=None)
    counts = sparse.csr_matrix(counts)  # no copy when already CSR
    if drop_outliers and "qc_outlier" in obs and obs["qc_outlier"].any():
        keep = ~obs["qc_outlier"].to_numpy(dtype=bool)
        logger.info("sample %s: dropping %d cells marked qc_outlier", key or i, (~keep).sum())
        counts, obs = counts[keep], obs.loc[keep]
    keep_var = [c for c in ("gene_ids", "gene_symbols") if c in a.var]
    corrected = a.layers.get("soupx_counts")
    if corrected is not None:
        corrected = sparse.csr_matrix(corrected)
        if drop_outliers and "qc_outlier" in a.obs and a.obs["qc_outlier"].any():
            corrected = corrected[~a.obs["qc_outlier"].to_numpy(dtype=bool)]
    out = ad.AnnData(X=counts, obs=obs, var=a.var[keep_var].copy())
    if corrected is not None:
        out.layers["soupx_counts"] = corrected
    return out


def _tidy_merged_obs(merged: ad.AnnData, batch_key: str) -> None:
    """Require unique cell names; object columns become ``str`` and the batch categorical."""
    if not merged.obs_names.is_unique:
        raise ValueError(
            "cell names repeat across samples; name cells '{sample_id}_{barcode}' at ingest "
            "(sepsis_sc.io.ingest_sample does) or call adata.obs_names_make_unique()."
        )
    for col in merged.obs.columns:
        if merged.obs[col].dtype == object:
            merged.obs[col] = merged.obs[col].astype(str)
    merged.obs[batch_key] = pd.Categorical(merged.obs[batch_key].astype(str))


def _drop_rare_genes(merged: ad.AnnData, min_cells_per_gene: int) -> ad.AnnData:
    """Genes detected in at least ``min_cells_per_gene`` cells (0 keeps all; CSR ``X``)."""
    if min_cells_per_gene > 0:
        x = merged.X
        detected = np.bincount(x.indices[x.data > 0], minlength=merged.n_vars)
        n_drop = int((detected < min_cells_per_gene).sum())
        if n_drop:
            merged = merged[:, detected >= min_cells_per_gene].copy()
        logger.info("dropped %d genes detected in < %d cells", n_drop, min_cells_per_gene)
    return merged


def merge_samples_to_file(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    batch_key: str = "sample_id",
    min_cells_per_gene: int = 3,
    drop_outliers: bool = True,
    organism: str = "auto",
    normalize_layer: str = "counts",
    target_sum: float = 1e4,
    uns: Mapping[str, Any] | None = None,
) -> tuple[int, int]:
    """:func:`merge_samples` then :func:`normalize`, streamed from per-sample files to ``out``.

    The same result as ``merged = merge_samples(read(p) for p in paths); normalize(merged)``
    written with :func:`sepsis_sc.utils.write_h5ad`, but the merged matrices are never in
    memory: a first pass over the samples collects ``obs``, the gene union and how many
    cells detect each gene; a second pass reads each sample again and appends its rows of
    ``layers["counts"]`` (and ``layers["soupx_counts"]`` when any sample has it), and of
    ``X``, log-normalised per cell from ``normalize_layer`` exactly as :func:`normalize`
    does, to the output (:class:`sepsis_sc.store.MatrixWriter`). Peak memory is one sample
    plus the merged ``obs``; the output is written atomically.

    Returns
    -------
    (cells, genes) of the merged file. ``uns`` entries given are stored with the
    normalisation record.
    """
    from sepsis_sc import store
    from sepsis_sc.utils import atomic_path

    if not paths:
        raise ValueError("merge_samples_to_file got no sample files.")
    obs_parts, var_parts, detected, any_soupx = [], [], [], False
    for i, path in enumerate(paths):  # pass 1: obs, genes, detection
        part = _slim_sample(
            _read_sample(path), None, i, batch_key=batch_key, drop_outliers=drop_outliers
        )
        if part is None:
            continue
        obs_parts.append((i, part.obs))
        var_parts.append(part.var)
        x = part.X
        detected.append(np.bincount(x.indices[x.data > 0], minlength=part.n_vars))
        any_soupx |= "soupx_counts" in part.layers
        del part, x
    if not obs_parts:
        raise ValueError("every sample passed to merge_samples is empty; nothing to merge.")
    genes = functools.reduce(lambda a, b: a.union(b), (v.index for v in var_parts))
    n_detected = np.zeros(len(genes), dtype=np.int64)
    for v, d in zip(var_parts, detected, strict=True):
        n_detected[genes.get_indexer(v.index)] += d
    keep = n_detected >= min_cells_per_gene if min_cells_per_gene > 0 else np.ones(len(genes), bool)
    logger.info("dropped %d genes detected in < %d cells", int((~keep).sum()), min_cells_per_gene)
    var = _first_values(var_parts, genes)[keep]
    light = ad.AnnData(obs=pd.concat([o for _, o in obs_parts], join="outer"), var=var)
    _tidy_merged_obs(light, batch_key)
    flag_genes(light, organism)
    if not any_soupx and normalize_layer == "soupx_counts":
        logger.warning("no layers[%r]: X is normalised from the raw counts", normalize_layer)
        normalize_layer = "counts"
    light.uns.update(dict(uns or {}))
    light.uns["log1p"] = {"base": None}
    light.uns["normalization"] = {
        "method": "log1p_cp",
        "target_sum": float(target_sum),
        "layer": normalize_layer,
    }
    keys = ["X", "layers/counts"] + (["layers/soupx_counts"] if any_soupx else [])
    final = pd.Index(light.var_names)
    with atomic_path(out) as tmp:
        light.write_h5ad(tmp)
        with store.MatrixWriter(tmp, keys, n_vars=light.n_vars, n_obs=light.n_obs) as w:
            for i, _ in obs_parts:  # pass 2: rows, sample by sample
                part = _slim_sample(
                    _read_sample(paths[i]),
                    None,
                    i,
                    batch_key=batch_key,
                    drop_outliers=drop_outliers,
                )
                cols = final.get_indexer(part.var_names)
                mats = {"counts": part.X, "soupx_counts": part.layers.get("soupx_counts", part.X)}
                for name, m in mats.items():
                    if name == "counts" or any_soupx:
                        mats[name] = _reindex_columns(sparse.csr_matrix(m), cols, light.n_vars)
                        w.append(f"layers/{name}", mats[name])
                chunk = ad.AnnData(
                    X=sparse.csr_matrix(mats[normalize_layer], dtype=np.float32, copy=True)
                )
                log_normalise(
                    chunk, target_sum=target_sum
                )  # per cell: chunks give normalize's floats
                w.append("X", chunk.X)
                del part, mats, chunk
    logger.info("merged %d samples: %d cells x %d genes", len(obs_parts), light.n_obs, light.n_vars)
    return light.n_obs, light.n_vars


def _first_values(var_parts: Sequence[pd.DataFrame], genes: pd.Index) -> pd.DataFrame:
    """Gene identifier columns over the union ``genes``: each gene's first non-missing value
    (as ``anndata.concat(merge="first")``)."""
    cols = list(dict.fromkeys(c for v in var_parts for c in v.columns))
    out = pd.DataFrame(index=genes, columns=cols, dtype=object)
    for v in var_parts:
        for c in v.columns:
            fill = out[c].isna() & out.index.isin(v.index)
            if fill.any():
                out.loc[fill, c] = v[c].reindex(out.index[fill]).to_numpy()
    return out


def _reindex_columns(m: sparse.csr_matrix, cols: np.ndarray, n_vars: int) -> sparse.csr_matrix:
    """``m``'s columns moved to positions ``cols`` of ``n_vars`` (-1: dropped)."""
    if m.shape[1] == n_vars and np.array_equal(cols, np.arange(n_vars)):
        return m
    new = cols[m.indices]
    ok = new >= 0
    indptr = np.concatenate(
        [[0], np.cumsum(np.add.reduceat(ok, m.indptr[:-1]) * (np.diff(m.indptr) > 0))]
    )
    out = sparse.csr_matrix(
        (m.data[ok], new[ok].astype(m.indices.dtype), indptr), shape=(m.shape[0], n_vars)
    )
    out.has_sorted_indices = False
    out.sort_indices()
    return out


def _read_sample(path: str | os.PathLike[str]) -> ad.AnnData:
    """A per-sample QC file with only the matrices the merge uses (its count layers)."""
    from sepsis_sc import store

    wanted = [k for k in ("counts", "soupx_counts") if k in store.layer_names(path)]
    return store.read(path, X=not wanted, layers=wanted, obsm=False, obsp=False, uns=False)


def normalize(adata: ad.AnnData, *, target_sum: float = 1e4, layer: str = "counts") -> None:
    """Log-normalise: ``X = log1p(counts / total * target_sum)`` from ``layers[layer]``.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``layers["counts"]`` (created from ``X`` when missing).
    target_sum
        Counts per cell after scaling (1e4: CP10k).
    layer
        Counts ``X`` is computed from: ``"counts"`` (raw) or ``"soupx_counts"``
        (ambient-corrected, config ``qc.downstream_layer``); a missing ``soupx_counts``
        falls back to the raw counts (logged). Recorded in ``uns["normalization"]``.

    Returns
    -------
    None. Writes ``X`` (sparse CSR, float32) and ``uns["log1p"]``; ``layers["counts"]``
    is untouched. Running it twice gives the same result.
    """
    counts, _ = get_counts(adata, max_values=None)
    if "counts" not in adata.layers:
        adata.layers["counts"] = (
            counts.copy() if sparse.issparse(counts) else sparse.csr_matrix(counts)
        )
    if layer not in adata.layers:
        logger.warning("no layers[%r]: X is normalised from the raw counts", layer)
        layer = "counts"
    adata.X = sparse.csr_matrix(adata.layers[layer], dtype=np.float32, copy=True)
    adata.uns.pop("log1p", None)
    log_normalise(adata, target_sum=target_sum)
    adata.uns["normalization"] = {
        "method": "log1p_cp",
        "target_sum": float(target_sum),
        "layer": layer,
    }
