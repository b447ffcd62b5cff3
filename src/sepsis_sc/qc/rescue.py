"""Low-RNA immune rescue: keep low-UMI cells with low mito and a clear immune identity.

Neutrophils, in sepsis PBMC the low-density neutrophils, carry few UMIs and genes
(Wigerblad et al. 2022, J Immunol, PMID 35858733) and fall under a lower count/gene
threshold set by lymphocytes and monocytes. :func:`rescue_low_rna_immune` keeps a cell that
fails *only* the lower count/gene thresholds, and marks it ``obs["low_rna_immune"] = True``,
when all of these hold:

* its mitochondrial percentage is low (within the sample's median + 2 MADs, or below
  ``rescue_max_pct_mt``): damaged cells lose cytoplasmic RNA and keep mitochondrial RNA,
  so high-mito cells are never rescued;
* it is not a predicted doublet and it has at least ``rescue_min_counts`` UMIs and
  ``rescue_min_genes`` genes (below that it is an empty droplet whatever it contains);
* its UMIs carry a clear immune identity: at least ``rescue_min_markers`` distinct
  genes of a marker set are detected (defaults, :data:`RESCUE_MARKERS`: neutrophil markers
  FCGR3B, CSF3R, CXCR2, CMTM2, FPR1, S100A8/9/12, G0S2, NAMPT ...; mouse Ly6g, S100a8/9,
  Retnlg, Ngp, Camp, Ltf ...; and platelet markers PPBP, PF4, GP9, ITGA2B, TUBB1 ...,
  because platelets are also low-RNA and their expansion is a sepsis read-out, Qiu et al.
  2021), and the fraction of its UMIs in the set is at least ``rescue_min_enrichment``
  times the pooled fraction in the sample's passing cells, with a one-sided binomial test
  against that pooled fraction below ``rescue_alpha``. The pooled profile of the sample
  stands in for ambient RNA: an empty or broken droplet holds a sample of the soup and
  therefore no enrichment. Where neutrophils are the majority (whole blood) they set the
  median themselves and are seldom below the lower thresholds, so the rule matters mainly
  for PBMC with low-density neutrophils, where it was designed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse, stats

from sepsis_sc.config import QCSettings
from sepsis_sc.data import get_counts, resolve_organism
from sepsis_sc.qc.metrics import sample_ids, unscaled_mad

logger = logging.getLogger(__name__)

__all__ = ["RESCUE_MARKERS", "rescue_low_rna_immune"]

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


def rescue_low_rna_immune(
    adata: ad.AnnData,
    settings: QCSettings | None = None,
    *,
    batch_key: str | None = "sample_id",
    organism: str = "auto",
    soup: pd.Series | Mapping[str, pd.Series] | None = None,
    **overrides: Any,
) -> pd.Series:
    """Keep low-RNA immune cells (e.g. low-density neutrophils) that only fail low counts/genes.

    A cell whose only reasons are ``low_counts`` and/or ``low_genes`` is rescued when its
    mitochondrial percentage is low, it is not a predicted doublet, it has at least
    ``rescue_min_counts`` UMIs and ``rescue_min_genes`` genes, and a marker set is clearly
    enriched in it (see the module docstring for the rationale): at least
    ``rescue_min_markers`` distinct set genes detected, set UMI fraction >=
    ``rescue_min_enrichment`` x the pooled fraction in the sample's passing cells, and a
    one-sided binomial p-value below ``rescue_alpha`` against that pooled fraction.

    Parameters
    ----------
    adata
        AnnData after :func:`qc_metrics` and :func:`flag_outliers` (and optionally
        :func:`detect_doublets`).
    settings
        QC settings (:class:`~sepsis_sc.config.QCSettings`; ``None``: the schema defaults).
        Used here: ``rescue_markers``, the marker sets ``{name: [genes]}`` (``None``:
        :data:`RESCUE_MARKERS` for the organism); ``rescue_max_pct_mt``, the highest
        mitochondrial percentage a rescued cell may have (``None`` uses the sample's median
        ``pct_counts_mt`` + 2 MADs, the typical range of intact cells; broken cells lose
        cytoplasmic RNA and sit far above it); ``rescue_min_counts``,
        ``rescue_min_genes``, absolute floors below which a droplet is never rescued;
        ``rescue_min_markers``, distinct marker genes that must be detected;
        ``rescue_min_enrichment``, fold enrichment of the marker UMI fraction over the
        sample's passing cells; ``rescue_alpha``, significance level of the one-sided
        binomial enrichment test. (The switch ``rescue_low_rna_immune`` is
        :func:`run_qc`'s: calling this function rescues.)
    batch_key
        ``obs`` column naming the sample.
    organism
        Picks the default marker sets (``"auto"``: from the gene symbols).
    soup
        The estimated soup profile (:func:`sepsis_sc.qc.estimate_soup`; one Series over
        ``var_names``, or a mapping sample -> Series). When given, the enrichment is tested
        against the soup's fraction of the set instead of the pooled passing cells: a droplet
        of soup carries the soup's share of S100A8/A9 or PPBP, which in blood can exceed the
        average cell's, so only the soup is the right null for "this droplet holds a cell".
    **overrides
        Any :class:`~sepsis_sc.config.QCSettings` field by name (e.g.
        ``rescue_min_markers=2``).

    Returns
    -------
    Boolean Series (index: ``obs_names``), True for rescued cells. Writes
    ``obs["low_rna_immune"]``; rescued cells get ``qc_outlier = False`` and
    ``qc_reason = "pass"``.
    """
    settings = (settings or QCSettings()).with_overrides(overrides)
    _require_rescue_inputs(adata)
    organism = resolve_organism(adata.var_names, organism)
    markers = settings.rescue_markers
    markers = dict(RESCUE_MARKERS[organism] if markers is None else markers)
    min_markers = settings.rescue_min_markers
    samples = sample_ids(adata, batch_key)
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
                max_pct_mt=settings.rescue_max_pct_mt,
                min_counts=settings.rescue_min_counts,
                min_genes=settings.rescue_min_genes,
                min_markers=min_markers,
                min_enrichment=settings.rescue_min_enrichment,
                alpha=settings.rescue_alpha,
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
        mt_cap = float(np.nanmedian(mt_in) + 2 * unscaled_mad(mt_in))
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
