"""Figures of the clustering stage (:mod:`sepsis_sc.cluster`).

* :func:`resolutions`: number of clusters and stability against the Leiden resolution.
* :func:`umaps`: UMAP panels coloured by clusters, sample, batch and condition.

Each function returns a matplotlib Figure; save it with :func:`sepsis_sc.pl.style.savefig`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sepsis_sc.pl.style import (
    categorical_palette,
    condition_palette,
    legend_right,
    set_style,
)

logger = logging.getLogger(__name__)

__all__ = ["resolutions", "umaps"]


def resolutions(table: pd.DataFrame, *, chosen: float | None = None) -> plt.Figure:
    """Number of clusters and stability against the Leiden resolution; chosen one marked.

    Parameters
    ----------
    table
        Output of :func:`sepsis_sc.cluster.resolution_summary` / :func:`sepsis_sc.cluster.leiden_multi`.
    chosen
        Resolution used downstream (default: the ``chosen`` column).

    Returns
    -------
    The figure.
    """

    set_style()
    if chosen is None and "chosen" in table and table["chosen"].any():
        chosen = float(table.loc[table["chosen"].astype(bool), "resolution"].iloc[0])
    res = table["resolution"].to_numpy(dtype=float)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8.4, 3.4))
    ax1.plot(res, table["n_clusters"], "o-", color="#1f77b4")
    for r, n in zip(res, table["n_clusters"]):
        ax1.annotate(str(int(n)), (r, n), textcoords="offset points", xytext=(0, 6), ha="center")
    ax1.set_xlabel("Leiden resolution")
    ax1.set_ylabel("number of clusters")
    ax1.set_ylim(0, table["n_clusters"].max() * 1.2 + 1)
    ax1.set_title("Clusters per resolution")
    if "stability_ari" in table and table["stability_ari"].notna().any():
        ax2.plot(res, table["stability_ari"], "o-", color="#2ca02c", label="vs other seeds")
    ax2.plot(res, table["ari_previous"], "s--", color="#ff7f0e", label="vs previous resolution")
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("Leiden resolution")
    ax2.set_ylabel("adjusted Rand index")
    ax2.set_title("Stability of the clusters")
    ax2.legend(frameon=False, loc="lower left")
    if chosen is not None:
        for ax in (ax1, ax2):
            ax.axvline(chosen, color="0.4", ls=":", lw=1)
        ax1.text(chosen, ax1.get_ylim()[1], f" chosen {chosen:g}", va="top", ha="left", fontsize=9)
    fig.tight_layout()
    return fig


def umaps(
    adata: ad.AnnData,
    *,
    keys: Sequence[str] = ("leiden", "sample_id", "batch", "condition"),
    case: str | None = None,
    control: str | None = None,
    condition_key: str = "condition",
) -> plt.Figure:
    """UMAP panels coloured by clusters, sample, batch and condition.

    Clusters are labelled at their centroids; the other panels have legends. Condition uses
    the shared case/control palette when ``case`` and ``control`` are given.

    Parameters
    ----------
    adata
        AnnData with ``obsm["X_umap"]``.
    keys
        ``obs`` columns, one panel each (absent columns are skipped with a warning).
    case, control
        Condition levels of the contrast (colours of :func:`sepsis_sc.pl.style.condition_palette`).
    condition_key
        Column coloured with the condition palette.

    Returns
    -------
    The figure.
    """

    set_style()
    if "X_umap" not in adata.obsm:
        raise KeyError("obsm['X_umap'] not found; run leiden_multi(umap=True) first")
    present = [k for k in keys if k in adata.obs]
    missing = [k for k in keys if k not in adata.obs]
    if missing:
        logger.warning("UMAP panels skipped for missing obs columns: %s", missing)
    if not present:
        raise KeyError(f"none of the obs columns {list(keys)} exist")
    n = len(present)
    n_cols = 2 if n > 1 else 1
    n_rows = int(np.ceil(n / n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5.6 * n_cols, 4.4 * n_rows), squeeze=False)
    um = np.asarray(adata.obsm["X_umap"])
    order = np.random.default_rng(0).permutation(adata.n_obs)
    size = max(1.5, min(20.0, 60_000 / adata.n_obs))
    for ax, key in zip(axes.ravel(), present):
        condition = key == condition_key and case is not None and control is not None
        _umap_panel(
            ax, um, adata.obs[key], key, order, size, (case, control) if condition else None
        )
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _categories(column: pd.Series) -> list[str]:
    """The column's levels as strings: categorical order, else sorted."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return [str(c) for c in column.cat.categories]
    return [str(c) for c in sorted(column.astype(str).unique())]


def _umap_panel(
    ax: plt.Axes,
    um: np.ndarray,
    column: pd.Series,
    key: str,
    order: np.ndarray,
    size: float,
    contrast: tuple[str, str] | None,
) -> None:
    """One UMAP coloured by ``column``: clusters named at their medians, others in a legend
    (up to 30 levels); ``contrast`` (case, control) gives the condition colours."""
    values = column.astype(str)
    cats = _categories(column)
    pal = categorical_palette(cats)
    if contrast is not None:
        pal = {**pal, **condition_palette(*contrast)}
    v = values.to_numpy()[order]
    ax.scatter(um[order, 0], um[order, 1], c=[pal[c] for c in v], s=size, lw=0, rasterized=True)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(key)
    if key.startswith("leiden"):
        for c in cats:
            m = values.to_numpy() == c
            if m.any():
                cx, cy = np.median(um[m], axis=0)
                ax.text(cx, cy, c, ha="center", va="center", fontsize=8, weight="bold")
    elif len(cats) <= 30:
        legend_right(ax, pal, cats)
