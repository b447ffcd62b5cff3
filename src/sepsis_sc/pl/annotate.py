"""Figures of the annotation stage (:func:`sepsis_sc.annotate.annotate` outputs).

* :func:`marker_dotplot`: dot plot of the most specific markers of each observed label, as
  chosen by :func:`sepsis_sc.annotate.dotplot_markers`.
* :func:`umap_cell_types`: UMAP coloured by annotation with the shared palettes.

Each function returns a matplotlib Figure; save it with :func:`sepsis_sc.pl.style.savefig`.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData

from sepsis_sc.annotate import UNASSIGNED
from sepsis_sc.pl.style import cell_type_palette, lineage_palette, set_style, wrap

__all__ = ["marker_dotplot", "umap_cell_types"]


def marker_dotplot(table: pd.DataFrame, *, groupby: str | None = None) -> plt.Figure:
    """Dot plot of the top markers of each observed label (rows) across labels (columns).

    Parameters
    ----------
    table
        :func:`sepsis_sc.annotate.dotplot_markers`'s table: ``marker_of``, ``gene``,
        ``group``, ``mean_expression`` (log1p CP10k), ``fraction_expressing``. Colour is the
        mean scaled per gene (0 to 1 across labels), dot size the fraction expressing.
    groupby
        Name of the labels in the title; default ``table.attrs["groupby"]``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    groupby = groupby or table.attrs.get("groupby", "cell_type")
    genes = list(dict.fromkeys(table["gene"]))
    groups = list(dict.fromkeys(table["group"]))
    var_groups: dict[str, list[str]] = {}
    for label, gene in table[["marker_of", "gene"]].drop_duplicates().itertuples(index=False):
        var_groups.setdefault(label, []).append(gene)
    mean = table.pivot(index="group", columns="gene", values="mean_expression").loc[groups, genes]
    frac = table.pivot(index="group", columns="gene", values="fraction_expressing")
    frac = frac.loc[groups, genes]
    color = mean - mean.min(axis=0)  # scanpy's standard_scale="var"
    color = (color / color.max(axis=0)).fillna(0)
    plot_ad = AnnData(
        X=mean.to_numpy(dtype=np.float32),
        obs=pd.DataFrame(
            {groupby: pd.Categorical(groups, categories=groups)},
            index=[f"g{i}" for i in range(len(groups))],
        ),
        var=pd.DataFrame(index=genes),
    )
    return _draw_dotplot(plot_ad, groupby, var_groups, color, frac)


def _draw_dotplot(
    plot_ad: AnnData,
    groupby: str,
    var_groups: Mapping[str, list[str]],
    color: pd.DataFrame,
    size: pd.DataFrame,
) -> plt.Figure:
    """scanpy's dot plot, transposed, with the label brackets of :func:`_label_gene_groups`."""
    set_style()
    # genes in rows, labels in columns: 20+ labels x 3 genes side by side are 3,000 px wide
    dp = sc.pl.dotplot(
        plot_ad,
        var_names=list(plot_ad.var_names),
        groupby=groupby,
        dot_color_df=color,
        dot_size_df=size,
        show=False,
        return_fig=True,
        colorbar_title="mean log1p CP10k\n(scaled per gene)",
        swap_axes=True,
    )
    dp.make_figure()
    ax = dp.ax_dict["mainplot_ax"]
    _label_gene_groups(ax, var_groups)
    ax.set_title(f"Marker genes by {groupby.replace('_', ' ')}", fontsize=12, pad=10)
    return ax.figure


def _label_gene_groups(ax: plt.Axes, var_groups: Mapping[str, list[str]]) -> None:
    """Bracket each label's genes left of the gene names and name the label in full.

    (scanpy's own brackets beside transposed dot plots cut long labels to fit.)
    """
    from matplotlib.transforms import ScaledTranslation

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = ax.get_yticklabels()
    width_pt = max(t.get_window_extent(renderer).width for t in ticks) * 72 / fig.dpi
    x_pt = width_pt + 10  # left of the longest gene name
    line = ax.get_yaxis_transform() + ScaledTranslation(-x_pt / 72, 0, fig.dpi_scale_trans)
    text = ax.get_yaxis_transform() + ScaledTranslation(-(x_pt + 5) / 72, 0, fig.dpi_scale_trans)
    ys = ax.get_yticks()
    start = 0
    for label, genes in var_groups.items():
        y0, y1 = sorted((ys[start], ys[start + len(genes) - 1]))
        start += len(genes)
        ax.plot(
            [0, 0], [y0 - 0.35, y1 + 0.35], color="black", lw=1.2, transform=line, clip_on=False
        )
        ax.text(
            0,
            (y0 + y1) / 2,
            wrap(label, 24),
            ha="right",
            va="center",
            fontsize=9,
            transform=text,
            clip_on=False,
        )


def umap_cell_types(
    adata: AnnData,
    *,
    key: str = "cell_type",
    basis: str = "X_umap",
    point_size: float | None = None,
) -> plt.Figure:
    """UMAP coloured by annotation with the shared cell-type/lineage palette.

    Parameters
    ----------
    adata
        AnnData with ``obsm[basis]`` and ``obs[key]``.
    key
        ``obs`` column: ``cell_type`` (cell-type palette) or ``lineage`` (lineage palette).
    basis
        ``obsm`` key of the 2-D embedding.
    point_size
        Marker size; default scales with the number of cells.

    Returns
    -------
    matplotlib.figure.Figure
    """

    if basis not in adata.obsm:
        raise KeyError(
            f"obsm[{basis!r}] not found; compute a UMAP first (scanpy.tl.umap, stored as X_umap)."
        )
    if key not in adata.obs:
        raise KeyError(f"{key!r} not in adata.obs; run annotate() first.")
    xy = np.asarray(adata.obsm[basis])[:, :2]
    labels = adata.obs[key].astype(str).to_numpy()
    vc = pd.Series(labels).value_counts()
    palette = lineage_palette(vc.index) if "lineage" in key else cell_type_palette(vc.index)
    set_style()
    fig, ax = plt.subplots(figsize=(7.5, 6))
    size = point_size if point_size is not None else float(np.clip(12000 / len(labels), 1, 20))
    order = [lab for lab in vc.index if lab != UNASSIGNED] + (
        [UNASSIGNED] if UNASSIGNED in vc.index else []
    )
    for lab in [UNASSIGNED] + [x for x in order if x != UNASSIGNED]:  # Unassigned drawn first
        m = labels == lab
        if not m.any():
            continue
        ax.scatter(xy[m, 0], xy[m, 1], s=size, c=palette[lab], linewidths=0, rasterized=True)
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=palette[lab], label=f"{lab} ({vc[lab]})")
        for lab in order
    ]
    ax.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
        title=key.replace("_", " "),
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(f"{key.replace('_', ' ').capitalize()} ({len(labels):,} cells)")
    return fig
