"""Figures of the therapy axes (:mod:`sepsis_sc.ccc` tables).

* :func:`axes_heatmap`: axes x samples, each sample's axis score as a z against the control
  samples (:func:`sepsis_sc.ccc.axis_z`), samples grouped by condition; beside each axis its
  case vs control effect, FDR and evidence for its therapy.

Each function returns a matplotlib Figure; save it with :func:`sepsis_sc.pl.style.savefig`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sepsis_sc.ccc import axis_z
from sepsis_sc.pl.style import condition_palette, set_style

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["axes_heatmap"]


def _plt():
    import matplotlib.pyplot as plt

    set_style()
    return plt


def axes_heatmap(
    per_sample: pd.DataFrame,
    axes: pd.DataFrame,
    *,
    groups: pd.Series,
    case: str,
    control: str,
    alpha: float = 0.05,
    zmax: float = 3.0,
) -> Figure:
    """Axes x samples heatmap of z vs the controls, samples ordered control then case.

    ``per_sample``: :func:`sepsis_sc.ccc.axis_scores` (``ccc/per_sample.tsv``); ``axes``:
    :func:`sepsis_sc.ccc.test_axes` (``ccc/<contrast>/axes.tsv``); ``groups``: each sample's
    level of the contrast column (index sample IDs). Grey cells: no score (too few source or
    target cells, or genes absent). Right margin: effect, FDR and evidence per axis.
    """
    plt = _plt()
    groups = groups.copy()
    groups.index = groups.index.astype(str)
    controls = groups.index[groups == control]
    z = axis_z(per_sample, controls)
    order = [s for lev in (control, case) for s in groups.index[groups == lev] if s in z.columns]
    order += [s for s in z.columns if s not in order]
    axis_order = [a for a in axes["axis"] if a in z.index] if not axes.empty else list(z.index)
    z = z.loc[axis_order, order]
    info = axes.set_index("axis") if not axes.empty else pd.DataFrame()
    labels = [str(info.loc[a, "label"]) if a in info.index else a for a in z.index]
    fig_w = min(4.5 + 0.32 * len(order), 22)
    fig, ax = plt.subplots(figsize=(fig_w, 2.4 + 0.42 * len(z)))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#e0e0e0")
    im = ax.imshow(
        np.ma.masked_invalid(z.to_numpy(float)),
        aspect="auto",
        cmap=cmap,
        vmin=-zmax,
        vmax=zmax,
        interpolation="nearest",
    )
    ax.set_yticks(range(len(z)), labels)
    ax.set_xticks(range(len(order)), order, rotation=90, fontsize=7)
    pal = condition_palette(case, control)
    for i, s in enumerate(order):
        ax.get_xticklabels()[i].set_color(pal.get(str(groups.get(s, "")), "#000000"))
    n_ctrl = int((groups.reindex(order) == control).sum())
    if 0 < n_ctrl < len(order):
        ax.axvline(n_ctrl - 0.5, color="black", lw=1)
    for i, a in enumerate(z.index):
        if a not in info.index:
            continue
        r = info.loc[a]
        if np.isfinite(r["fdr"]):
            star = " *" if r["fdr"] <= alpha else ""
            txt = f"{r['effect']:+.2f}, FDR {r['fdr']:.2g}{star} ({r['evidence']})"
        else:
            txt = "not tested"
        ax.text(len(order) - 0.3, i, "  " + txt, va="center", fontsize=7, clip_on=False)
    cb = fig.colorbar(
        im, ax=ax, orientation="horizontal", fraction=0.035, pad=0.2, aspect=40, shrink=0.5
    )
    cb.set_label(f"z vs {control}")
    ax.set_title(
        f"Therapy axes per sample ({control} | {case}); right: {case} - {control} "
        "effect on lr_means",
        fontsize=9,
        loc="left",
    )
    ax.grid(False)
    fig.tight_layout()
    return fig
