"""Figures of the annotation stage (:func:`sepsis_sc.annotate.annotate` outputs).

* :func:`marker_dotplot`: dot plot of the most specific markers of each observed label.
* :func:`umap_cell_types`: UMAP coloured by annotation with the shared palettes.

Each function writes a PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData

from sepsis_sc.annotate import (
    UNASSIGNED,
    _group_matrix,
    _marker_symbols,
    _resolve_genes,
    load_markers,
    load_vocabulary,
)
from sepsis_sc.data import counts_csr, log_normalise, resolve_organism
from sepsis_sc.pl.style import cell_type_palette, lineage_palette, savefig, set_style, wrap

__all__ = ["marker_dotplot", "umap_cell_types"]


def marker_dotplot(
    adata: AnnData,
    path: str | PathLike[str],
    *,
    groupby: str = "cell_type",
    markers: str | PathLike[str] | Mapping[str, Any] | None = None,
    organism: Literal["human", "mouse"] | None = None,
    layer: str | None = "counts",
    n_genes: int = 3,
    counts_file: str | PathLike[str] | None = None,
    min_cells: int = 5,
) -> Path:
    """Dot plot of the top markers of each observed label (rows) across labels (groups).

    Parameters
    ----------
    adata
        Annotated AnnData (``obs[groupby]``), raw counts in ``layers[layer]`` or integer ``X``.
    path
        Output PNG.
    groupby
        ``obs`` column with labels (``cell_type`` or ``lineage``).
    markers
        Marker sets (default: packaged file of the organism).
    organism
        Default: ``uns["annotation"]["params"]["organism"]`` or detected from symbols.
    layer
        Layer with raw counts; expression shown is log1p(CP10k).
    n_genes
        Up-markers shown per label, in marker-file order, among genes present in the data.
    counts_file
        Read the marker genes' counts from ``layers[layer]`` of this ``.h5ad`` (streamed)
        instead of from ``adata``, which then needs no matrix.
    min_cells
        Labels with fewer cells are left out.

    Returns
    -------
    pathlib.Path
        The written file.
    """

    if groupby not in adata.obs:
        raise KeyError(f"{groupby!r} not in adata.obs; run annotate() first.")
    if organism is None:
        organism = adata.uns.get("annotation", {}).get("params", {}).get("organism")
        if organism is None:
            organism = resolve_organism(adata.var_names, "auto", what="the data")
    vocab = load_vocabulary()
    mk = load_markers(markers, organism, vocabulary=vocab)
    groups = adata.obs[groupby].astype(str)
    present = _labels_to_plot(groups, vocab, min_cells, groupby)
    gene_pos = _resolve_genes(sorted(_marker_symbols(mk)), adata.var_names, mk["aliases"])
    cand = _candidate_markers(mk, vocab, present, gene_pos)
    all_genes = list(dict.fromkeys(g for gs in cand.values() for g in gs))
    if not all_genes:
        raise ValueError("None of the marker genes of the plotted labels are in the data.")
    cols = np.array([gene_pos[g] for g in all_genes])
    if counts_file is None:
        E_all = log_normalise(counts_csr(adata, layer), columns=cols)
    else:  # the marker columns streamed from the file, size factors from all genes
        from sepsis_sc.store import FileCounts

        src = FileCounts(counts_file, layer or "X")
        E_all = log_normalise(src.columns(cols), totals=src.totals)
    keep = groups.isin(present).to_numpy()
    codes = pd.Categorical(groups[keep], categories=present).codes
    means = np.asarray((_group_matrix(np.asarray(codes), len(present)) @ E_all[keep]).todense())
    var_groups = _most_specific(means, present, cand, all_genes, n_genes)
    names = [g for gs in var_groups.values() for g in gs]
    col_of = {g: i for i, g in enumerate(all_genes)}
    plot_ad = AnnData(
        X=E_all[:, [col_of[g] for g in names]][keep],
        obs=pd.DataFrame(
            {groupby: pd.Categorical(groups[keep], categories=present)},
            index=adata.obs_names[keep],
        ),
        var=pd.DataFrame(index=names),
    )
    return savefig(_draw_dotplot(plot_ad, groupby, var_groups), path)


def _labels_to_plot(groups: pd.Series, vocab: Any, min_cells: int, groupby: str) -> list[str]:
    """Labels with at least ``min_cells`` cells, in vocabulary order (others after them)."""
    vc = groups.value_counts()
    order_all = list(vocab.cell_types.index) + list(vocab.lineages.index)
    present = [g for g in dict.fromkeys(order_all) if vc.get(g, 0) >= min_cells and g != UNASSIGNED]
    present += [g for g in vc.index if vc[g] >= min_cells and g not in present and g != UNASSIGNED]
    if not present:
        raise ValueError(f"No label of {groupby!r} has >= {min_cells} cells to plot.")
    return present


def _candidate_markers(
    mk: Mapping[str, Any], vocab: Any, present: list[str], gene_pos: Mapping[str, int]
) -> dict[str, list[str]]:
    """Up-markers of each label present in the data (a subset borrows its lineage's markers
    when it is its lineage's only subset or has none of its own)."""
    by_target: dict[str, list[str]] = {}
    for s in mk["subset_sets"] + mk["lineage_sets"]:
        by_target.setdefault(s["target"], []).extend(s["up"])
    cand: dict[str, list[str]] = {}
    for lab in present:
        lin = vocab.lineage_of(lab)
        genes = list(by_target.get(lab, []))
        if lab in vocab.lineages.index or len(vocab.subsets_of(lin)) == 1 or not genes:
            genes += by_target.get(lab if lab in vocab.lineages.index else lin, [])
        cand[lab] = [g for g in dict.fromkeys(genes) if g in gene_pos]
    return cand


def _most_specific(
    means: np.ndarray,
    present: list[str],
    cand: Mapping[str, list[str]],
    all_genes: list[str],
    n_genes: int,
) -> dict[str, list[str]]:
    """Per label, its ``n_genes`` most specific candidates (own mean - others' max), each gene
    shown once (for the first label that takes it)."""
    col_of = {g: i for i, g in enumerate(all_genes)}
    var_groups: dict[str, list[str]] = {}
    used: set[str] = set()
    for k, lab in enumerate(present):
        others = np.delete(means, k, axis=0)
        spec = {
            g: means[k, col_of[g]] - (others[:, col_of[g]].max() if len(others) else 0.0)
            for g in cand[lab]
            if g not in used
        }
        genes = sorted(spec, key=spec.get, reverse=True)[:n_genes]
        if genes:
            var_groups[lab] = genes
            used.update(genes)
    return var_groups


def _draw_dotplot(plot_ad: AnnData, groupby: str, var_groups: Mapping[str, list[str]]):
    """scanpy's dot plot, transposed, with the label brackets of :func:`_label_gene_groups`."""
    set_style()
    # genes in rows, labels in columns: 20+ labels x 3 genes side by side are 3,000 px wide
    dp = sc.pl.dotplot(
        plot_ad,
        var_names=list(plot_ad.var_names),
        groupby=groupby,
        standard_scale="var",
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
    path: str | PathLike[str],
    *,
    key: str = "cell_type",
    basis: str = "X_umap",
    point_size: float | None = None,
) -> Path:
    """UMAP coloured by annotation with the shared cell-type/lineage palette.

    Parameters
    ----------
    adata
        AnnData with ``obsm[basis]`` and ``obs[key]``.
    path
        Output PNG.
    key
        ``obs`` column: ``cell_type`` (cell-type palette) or ``lineage`` (lineage palette).
    basis
        ``obsm`` key of the 2-D embedding.
    point_size
        Marker size; default scales with the number of cells.

    Returns
    -------
    pathlib.Path
        The written file.
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
    return savefig(fig, path)
