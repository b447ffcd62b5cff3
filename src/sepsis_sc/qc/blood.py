"""QC rules fair to whole blood: upper tails per lineage and platelet-monocyte aggregates.

* :func:`lineage_upper_flags`: upper count / gene cuts within each first-pass lineage of a
  sample (:func:`sepsis_sc.qc.first_pass_lineage`), so the cut does not move with the
  neutrophil share;
* :func:`flag_platelet_monocyte`: monocytes carrying platelet RNA beyond what their soup
  brings (:data:`PLATELET_GENES`), their own category rather than plain doublets.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse, stats

from sepsis_sc.config import QCSettings
from sepsis_sc.data import get_counts
from sepsis_sc.qc.metrics import sample_ids, unscaled_mad
from sepsis_sc.qc.thresholds import add_reason

logger = logging.getLogger(__name__)

__all__ = ["lineage_upper_flags", "PLATELET_GENES", "flag_platelet_monocyte"]


def lineage_upper_flags(
    adata: ad.AnnData,
    settings: QCSettings | None = None,
    *,
    batch_key: str = "sample_id",
    lineage_key: str = "qc_lineage",
    min_cells: int = 30,
    **overrides: Any,
) -> pd.DataFrame:
    """Upper count / gene cuts per (sample, first-pass lineage): median + k MADs of log values.

    A sample-wide upper cut moves with the cell mix (neutrophils carry ~1,000 UMIs,
    monocytes ~4,500, plasmablasts ~8,000): in an 80 %-neutrophil sample it removes most
    plasmablasts. Within a lineage the distribution does not depend on the mix. Statistics
    use the cells that passed the lower and mitochondrial filters; lineages with fewer than
    ``min_cells`` such cells in a sample get no upper cut (logged in the table).

    Parameters
    ----------
    adata
        AnnData after the lower and mitochondrial filters (``obs["qc_reason"]``) with the
        first-pass lineage in ``obs[lineage_key]``.
    settings
        QC settings (:class:`~sepsis_sc.config.QCSettings`; ``None``: the schema defaults);
        ``nmads_counts`` and ``nmads_genes`` are the k of the cuts.
    batch_key
        ``obs`` column naming the sample.
    lineage_key
        ``obs`` column with the first-pass lineage.
    min_cells
        Fewest passing cells of a lineage in a sample for it to get a cut.
    **overrides
        Any :class:`~sepsis_sc.config.QCSettings` field by name (e.g. ``nmads_counts=4``).

    Returns
    -------
    One row per (sample, lineage): ``n_cells``, ``max_counts``, ``max_genes`` (NaN = no cut),
    ``flagged_high_counts``, ``flagged_high_genes``. Appends ``high_counts`` /
    ``high_genes`` to ``obs["qc_reason"]``.
    """
    settings = (settings or QCSettings()).with_overrides(overrides)
    nmads = settings.nmads
    samples = sample_ids(adata, batch_key)
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
            mad = unscaled_mad(vals)
            if mad == 0:
                continue
            cut = float(np.expm1(np.median(vals) + k * mad))
            bad = adata.obs[nat_col].to_numpy(dtype=float)[members] > cut
            flags[stem][members[bad]] = True
            row[f"max_{stem}"] = cut
            row[f"flagged_high_{stem}"] = int(bad.sum())
        rows.append(row)
    for stem, mask in flags.items():
        add_reason(adata, mask, f"high_{stem}")
    return pd.DataFrame(rows)


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
        samples = sample_ids(adata, batch_key)
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
