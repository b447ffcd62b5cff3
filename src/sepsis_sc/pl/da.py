"""Figures of neighbourhood differential abundance (:mod:`sepsis_sc.da` tables).

* :func:`beeswarm`: log2 fold change of every tested neighbourhood, one row per majority
  cell type (Milo's ``plotDAbeeswarm``); significant ones coloured, unexplained ones ringed.
* :func:`nhood_umap`: the neighbourhoods on the UMAP at their index cells, sized by their
  cells, coloured by log2 fold change where significant.

Each function returns a matplotlib Figure; save it with :func:`sepsis_sc.pl.style.savefig`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sepsis_sc.pl.style import set_style, wrap

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["beeswarm", "nhood_umap"]

_UP, _DOWN, _NS = "#b2182b", "#2166ac", "#bdbdbd"


def _plt():
    import matplotlib.pyplot as plt

    set_style()
    return plt


def beeswarm(
    nhoods: pd.DataFrame,
    *,
    case: str,
    control: str,
    alpha: float = 0.1,
    label_key: str = "cell_type",
    seed: int = 0,
) -> Figure:
    """log2 fold change (``case`` / ``control``) of each tested neighbourhood, one row per
    majority label (``nhoods[label_key]``), rows ordered by their median fold change.
    Neighbourhoods at ``spatial_fdr <= alpha`` are red (expanded) or blue (depleted), the
    others grey; those no named population or state explains (``unexplained``) are ringed
    in black."""
    plt = _plt()
    tab = nhoods[np.isfinite(nhoods["log2fc"].to_numpy(float))].copy()
    fig_h = 1.2 + 0.38 * max(tab[label_key].nunique() if len(tab) else 1, 1)
    fig, ax = plt.subplots(figsize=(8.5, fig_h))
    if tab.empty:
        ax.text(0.5, 0.5, "no neighbourhood tested", ha="center", va="center")
        ax.set_axis_off()
        return fig
    order = tab.groupby(label_key)["log2fc"].median().sort_values().index.tolist()
    rng = np.random.default_rng(seed)
    for i, lab in enumerate(order):
        sub = tab[tab[label_key] == lab]
        y = i + rng.uniform(-0.3, 0.3, len(sub))
        sig = sub["spatial_fdr"].to_numpy(float) <= alpha
        colour = np.where(~sig, _NS, np.where(sub["log2fc"] > 0, _UP, _DOWN))
        unexplained = sub.get("unexplained", pd.Series(False, index=sub.index)).to_numpy(bool)
        ax.scatter(sub["log2fc"], y, s=14, c=colour, alpha=0.8, linewidths=0)
        if unexplained.any():
            ax.scatter(
                sub["log2fc"][unexplained],
                y[unexplained],
                s=42,
                facecolors="none",
                edgecolors="black",
                linewidths=0.9,
            )
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([wrap(o, 28) for o in order], fontsize=8)
    ax.set_xlabel(f"log2 fold change of neighbourhood abundance ({case} / {control})")
    n_sig = int((tab["spatial_fdr"] <= alpha).sum())
    ax.set_title(
        f"Neighbourhood DA: {n_sig} of {len(tab)} tested at spatial FDR <= {alpha:g}; "
        "black rings: no named cell type or state explains them",
        loc="left",
        fontsize=9,
    )
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], ls="", marker="o", color=_UP, label=f"more in {case}"),
        Line2D([], [], ls="", marker="o", color=_DOWN, label=f"fewer in {case}"),
        Line2D([], [], ls="", marker="o", color=_NS, label="not significant"),
        Line2D([], [], ls="", marker="o", mfc="none", mec="black", label="unexplained"),
    ]
    ax.legend(
        handles=handles, frameon=False, fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5)
    )
    fig.tight_layout()
    return fig


def nhood_umap(
    nhoods: pd.DataFrame,
    cells_umap: np.ndarray | None = None,
    *,
    case: str,
    control: str,
    alpha: float = 0.1,
) -> Figure:
    """The neighbourhoods at their index cells on the UMAP (``umap_1``, ``umap_2``), area
    proportional to their cells, colour the log2 fold change where ``spatial_fdr <= alpha``
    (grey otherwise), unexplained ones ringed; all cells (``cells_umap``) in light grey
    behind."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 6.0))
    if cells_umap is not None and len(cells_umap):
        ax.scatter(
            cells_umap[:, 0], cells_umap[:, 1], s=1, c="#eeeeee", linewidths=0, rasterized=True
        )
    if "umap_1" not in nhoods or nhoods.empty:
        ax.text(0.5, 0.5, "no UMAP (obsm['X_umap']) for the neighbourhoods", ha="center")
        ax.set_axis_off()
        return fig
    size = 6 + 60 * nhoods["size"].to_numpy(float) / max(float(nhoods["size"].max()), 1.0)
    sig = (nhoods["spatial_fdr"].to_numpy(float) <= alpha) & np.isfinite(nhoods["log2fc"])
    ax.scatter(
        nhoods.loc[~sig, "umap_1"],
        nhoods.loc[~sig, "umap_2"],
        s=size[~sig],
        c=_NS,
        alpha=0.5,
        linewidths=0,
    )
    lim = float(np.nanmax(np.abs(nhoods.loc[sig, "log2fc"]))) if sig.any() else 1.0
    pts = ax.scatter(
        nhoods.loc[sig, "umap_1"],
        nhoods.loc[sig, "umap_2"],
        s=size[sig],
        c=nhoods.loc[sig, "log2fc"],
        cmap="RdBu_r",
        vmin=-lim,
        vmax=lim,
        linewidths=0,
    )
    un = nhoods.get("unexplained", pd.Series(False, index=nhoods.index)).to_numpy(bool)
    if un.any():
        ax.scatter(
            nhoods.loc[un, "umap_1"],
            nhoods.loc[un, "umap_2"],
            s=size[un] * 1.6,
            facecolors="none",
            edgecolors="black",
            linewidths=0.8,
        )
    cb = fig.colorbar(pts, ax=ax, shrink=0.6)
    cb.set_label(f"log2 fold change ({case} / {control}), significant only")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(
        f"Neighbourhoods on the UMAP: {int(sig.sum())} at spatial FDR <= {alpha:g} "
        f"(rings: unexplained)",
        loc="left",
        fontsize=9,
    )
    fig.tight_layout()
    return fig
