"""Which differentially abundant neighbourhoods a named population or state explains, and
which moved without a name (:func:`explain_nhoods`, :func:`unexplained_per_sample`).

A significant neighbourhood is *explained* when its majority cell type or lineage changed
in the same direction in the composition test, or when most of its cells carry a discrete
state call whose share changed in the same direction in the sample-level state tests. The
rest are ``unexplained``: cells that expand or shrink with the condition and that no label
or signature of the pipeline names (the way the MS1 state was found: Reyes et al. 2020).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["explain_nhoods", "unexplained_per_sample", "UNEXPLAINED"]

#: readout names of cells in unexplained DA neighbourhoods (therapy table, patient profiles)
UNEXPLAINED = {"expanded": "unexplained_expansion", "depleted": "unexplained_depletion"}


def _significant(table: pd.DataFrame, key: str) -> dict[str, float]:
    """``{name: effect}`` of the significant rows of a results table."""
    if table is None or table.empty or "significant" not in table:
        return {}
    sig = table[table["significant"].astype(bool)]
    return dict(zip(sig[key].astype(str), sig["effect"].astype(float), strict=True))


def explain_nhoods(
    nhoods: pd.DataFrame,
    *,
    composition: pd.DataFrame | None = None,
    effects: pd.DataFrame | None = None,
    min_fraction: float = 0.5,
) -> pd.DataFrame:
    """Add ``explained_by`` and ``unexplained`` to the DA table of :func:`test_nhoods`
    joined with :func:`describe_nhoods`.

    ``composition`` is :func:`sepsis_sc.stats.composition_test`'s table (any levels; its
    ``level`` column names the obs column of the labels), ``effects`` the condition-effects
    table (the ``fraction`` rows of discrete states are used). A significant neighbourhood
    is explained by its majority label when at least ``min_fraction`` of its cells carry it
    and that label changed in the same direction; likewise by its most called state.
    """
    out = nhoods.copy()
    comp = {}
    if composition is not None and not composition.empty:
        for level, tab in composition.groupby("level"):
            comp[str(level)] = _significant(tab, "label")
    frac = {}
    if effects is not None and not effects.empty:
        frac = _significant(effects[effects["metric"] == "fraction"], "state")
    reasons = []
    for r in out.itertuples(index=False):
        if not r.significant:
            reasons.append("")
            continue
        sign = 1.0 if r.log2fc > 0 else -1.0
        why = []
        for level, moved in comp.items():
            label = getattr(r, level, None)
            share = getattr(r, f"{level}_fraction", 0.0)
            if label in moved and share >= min_fraction and np.sign(moved[label]) == sign:
                why.append(f"composition: {label}")
        state = getattr(r, "state", "")
        if state in frac and r.state_fraction >= min_fraction and np.sign(frac[state]) == sign:
            why.append(f"state: {state}")
        reasons.append("; ".join(why))
    out["explained_by"] = reasons
    out["unexplained"] = out["significant"].astype(bool) & (out["explained_by"] == "")
    return out


def unexplained_per_sample(
    adata: ad.AnnData, nhoods: pd.DataFrame, *, sample_key: str = "sample_id"
) -> pd.DataFrame:
    """Per sample: the share of its cells in unexplained expanded (and depleted)
    neighbourhoods, one row per sample x readout (:data:`UNEXPLAINED`), with ``n_cells``."""
    member = sp.csc_matrix(adata.obsm["nhoods"])
    samples = adata.obs[sample_key].astype(str).to_numpy()
    ids = list(dict.fromkeys(samples))
    rows = []
    for direction, readout in UNEXPLAINED.items():
        cols = nhoods.index[(nhoods["unexplained"]) & (nhoods["direction"] == direction)]
        inside = (
            np.asarray(member[:, np.asarray(cols, dtype=int)].sum(axis=1)).ravel() > 0
            if len(cols)
            else np.zeros(adata.n_obs, dtype=bool)
        )
        for sid in ids:
            m = samples == sid
            rows.append(
                {
                    "sample_id": sid,
                    "readout": readout,
                    "value": float(inside[m].mean()) if m.any() else np.nan,
                    "n_cells": int(m.sum()),
                    "n_nhoods": len(cols),
                }
            )
    return pd.DataFrame(rows)
