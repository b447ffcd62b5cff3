"""Gene flags and per-cell QC metrics, and the per-sample helpers every QC step uses.

* :func:`flag_genes`: mitochondrial, ribosomal and haemoglobin genes flagged in ``var``;
* :func:`qc_metrics`: :func:`scanpy.pp.calculate_qc_metrics` on the raw counts;
* :func:`sample_ids` (the sample of each cell) and :func:`unscaled_mad` (median absolute
  deviation), shared by the threshold, doublet, rescue and blood steps.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import stats

from sepsis_sc.data import get_counts, resolve_organism

logger = logging.getLogger(__name__)

__all__ = ["flag_genes", "qc_metrics", "sample_ids", "unscaled_mad"]

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


def sample_ids(adata: ad.AnnData, batch_key: str | None) -> pd.Series:
    """The sample of each cell as strings: ``obs[batch_key]``, or ``"sample"`` for every cell
    when ``batch_key`` is ``None`` or not a column (logged)."""
    if batch_key is None or batch_key not in adata.obs:
        if batch_key is not None:
            logger.info("obs has no %r column: treating all cells as one sample", batch_key)
        return pd.Series("sample", index=adata.obs_names, dtype=object)
    return adata.obs[batch_key].astype(str)


def unscaled_mad(x: np.ndarray) -> float:
    """Unscaled median absolute deviation (``scale=1``, NaN ignored), as in the best-practice
    book."""
    return float(stats.median_abs_deviation(x, scale=1.0, nan_policy="omit"))


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
