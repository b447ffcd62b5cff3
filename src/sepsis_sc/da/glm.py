"""Differential abundance of neighbourhoods with donors as the units: counts summed per unit
of the design engine, a negative binomial GLM per neighbourhood (PyDESeq2, the project's DE
fit, t p-values on the residual degrees of freedom), and Milo's spatial FDR.

* :func:`test_nhoods`: one row per neighbourhood: ``log2fc``, ``pvalue``, ``spatial_fdr``;
* :func:`spatial_fdr`: Benjamini-Hochberg weighted by the inverse of each neighbourhood's
  k-distance (Milo's ``graphSpatialFDR``, ``fdr.weighting = "k-distance"``): overlapping
  neighbourhoods in dense regions count less, so the FDR is over regions of the graph, not
  over overlapping neighbourhoods.
"""

from __future__ import annotations

import logging
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from sepsis_sc.config import DASettings
from sepsis_sc.da.nhoods import nhood_counts
from sepsis_sc.de import fit_deseq
from sepsis_sc.design import SampleDesign

__all__ = ["spatial_fdr", "test_nhoods", "NHOOD_COLUMNS"]

logger = logging.getLogger(__name__)

#: test columns of :func:`test_nhoods`
NHOOD_COLUMNS = [
    "nhood",
    "n_cells_tested",
    "mean_count",
    "log2fc",
    "lfc_se",
    "pvalue",
    "spatial_fdr",
    "significant",
    "direction",
]


def spatial_fdr(pvalues: np.ndarray, kth_distance: np.ndarray) -> np.ndarray:
    """Weighted Benjamini-Hochberg with weights 1 / k-distance (Milo's spatial FDR); NaN
    p-values stay NaN and are not counted."""
    p = np.asarray(pvalues, dtype=float)
    w = 1.0 / np.asarray(kth_distance, dtype=float)
    w[~np.isfinite(w)] = 1.0
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if not ok.any():
        return out
    pp, ww = p[ok], w[ok]
    o = np.argsort(pp, kind="stable")
    adj = ww.sum() * pp[o] / np.cumsum(ww[o])
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    res = np.empty_like(pp)
    res[o] = np.minimum(adj, 1.0)
    out[ok] = res
    return out


def test_nhoods(
    adata: ad.AnnData,
    design: SampleDesign,
    settings: DASettings | None = None,
    *,
    sample_key: str = "sample_id",
    n_cpus: int = 1,
    **overrides: Any,
) -> pd.DataFrame:
    """Case vs control abundance of every neighbourhood (:func:`make_nhoods` first).

    Cells are counted per sample and the samples of one unit of ``design`` (a donor at one
    level of the contrast) summed, so a patient sampled twice counts once; donor blocks and
    covariates enter exactly as the design resolved them. Each neighbourhood's unit counts
    are fitted with a negative binomial GLM (PyDESeq2: size factors across neighbourhoods,
    dispersion shrinkage, Wald test of the case coefficient with t p-values on the residual
    degrees of freedom), neighbourhoods with a mean of fewer than ``min_mean_count`` cells per
    unit are not tested, and the p-values are adjusted with the spatial FDR.

    Returns
    -------
    pandas.DataFrame
        :data:`NHOOD_COLUMNS`: ``log2fc`` (case / control), ``pvalue``, ``spatial_fdr``,
        ``significant`` (``spatial_fdr <= alpha``), ``direction`` (``expanded`` /
        ``depleted`` in the case group, where significant).
    """
    settings = (settings or DASettings()).with_overrides(overrides)
    counts = nhood_counts(adata, sample_key)
    units = design.aggregate_sum(counts.T.astype(float)).fillna(0).astype(np.int64)
    mean = units.mean(axis=0)
    keep = (mean >= settings.min_mean_count).to_numpy()
    out = pd.DataFrame(
        {
            "nhood": counts.index,
            "n_cells_tested": units.sum(axis=0).to_numpy(),
            "mean_count": mean.to_numpy(),
        }
    )
    for c in ("log2fc", "lfc_se", "pvalue"):
        out[c] = np.nan
    if design.testable and keep.sum() >= 2:
        sub = units.loc[:, keep]
        sub.columns = [f"n{c}" for c in sub.columns]
        fit = fit_deseq(sub, design.matrix, shrink=False, n_cpus=n_cpus)
        where = np.flatnonzero(keep)
        out.loc[where, "log2fc"] = fit["log2fc"].to_numpy(float)
        out.loc[where, "lfc_se"] = fit["lfc_se"].to_numpy(float)
        out.loc[where, "pvalue"] = fit["pvalue"].to_numpy(float)
    out["spatial_fdr"] = spatial_fdr(
        out["pvalue"].to_numpy(), np.asarray(adata.uns["nhoods"]["kth_distance"])
    )
    out["significant"] = out["spatial_fdr"] <= settings.alpha
    out["direction"] = np.where(
        out["significant"], np.where(out["log2fc"] > 0, "expanded", "depleted"), ""
    )
    logger.info(
        "%d of %d neighbourhoods tested (%s vs %s, %d vs %d units): %d at spatial FDR <= %g",
        int(keep.sum()),
        keep.size,
        design.contrast.case,
        design.contrast.control,
        design.n_case,
        design.n_control,
        int(out["significant"].sum()),
        settings.alpha,
    )
    return out[NHOOD_COLUMNS]
