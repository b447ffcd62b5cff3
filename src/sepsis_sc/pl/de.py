"""Figures of the pseudobulk DE stage (:func:`sepsis_sc.de.pseudobulk_de` outputs).

* :func:`volcano`: small multiples, one volcano per tested label; genes at FDR < alpha in
  the case colour (up) or the control colour (down), the top genes named.
* :func:`top_genes_heatmap`: the top DE genes of the labels with the most DE genes, as
  z-scored log2 CPM per unit (:func:`sepsis_sc.data.log2cpm`), units grouped by condition
  under a colour bar.

Each returns a matplotlib Figure; callers save it with :func:`sepsis_sc.pl.style.savefig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sepsis_sc.data import log2cpm
from sepsis_sc.pl.style import condition_palette, set_style

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["volcano", "top_genes_heatmap"]

_GREY = "#b0b0b0"


def _plt():
    import matplotlib.pyplot as plt

    set_style()
    return plt


def _tested(summary: pd.DataFrame, results: pd.DataFrame) -> list[tuple[str, str]]:
    """(level, label) pairs with results, in summary order."""
    have = set(zip(results["level"].astype(str), results["label"].astype(str)))
    tested = summary[summary["status"] == "tested"]
    return [
        (str(lv), str(lb))
        for lv, lb in zip(tested["level"], tested["label"])
        if (str(lv), str(lb)) in have
    ]


def _repel(ax, texts, points: np.ndarray, n_iter: int = 300) -> None:
    """Move text labels apart (display space) so that none overlap; keep them in the axes.

    A small deterministic repulsion: overlapping label boxes (and labels covering one of the
    labelled points) are pushed apart along the axis of least overlap, boxes leaving the
    axes are pushed back; a thin line joins a moved label to its point.
    """
    if not texts:
        return
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inv = ax.transData.inverted()
    frame = ax.get_window_extent(renderer)
    anchor = np.array([ax.transData.transform(t.get_position()) for t in texts], dtype=float)
    boxes = [t.get_window_extent(renderer) for t in texts]
    size = np.array([(bb.width + 3, bb.height + 1) for bb in boxes])
    # box centre relative to the text anchor (depends on the alignment)
    shift = np.array([((bb.x0 + bb.x1) / 2, (bb.y0 + bb.y1) / 2) for bb in boxes]) - anchor
    centre = anchor + shift
    pts = ax.transData.transform(points)
    half = size / 2
    lo = np.array([frame.x0, frame.y0]) + half + 1
    hi = np.array([frame.x1, frame.y1]) - half - 1
    for _ in range(n_iter):
        moved = False
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                d = centre[j] - centre[i]
                over = half[i] + half[j] - np.abs(d)
                if (over > 0).all():
                    moved = True
                    k = 1 if over[1] <= over[0] else 0  # stack vertically when possible
                    sgn = 1.0 if d[k] >= 0 else -1.0
                    centre[i, k] -= sgn * (over[k] / 2 + 0.5)
                    centre[j, k] += sgn * (over[k] / 2 + 0.5)
            for q in pts:  # labelled points stay visible
                d = centre[i] - q
                over = half[i] + 3 - np.abs(d)
                if (over > 0).all() and np.hypot(*(anchor[i] - q)) > 1:
                    moved = True
                    k = 1 if over[1] <= over[0] else 0
                    centre[i, k] += (1.0 if d[k] >= 0 else -1.0) * (over[k] + 0.5)
        centre = np.clip(centre, lo, np.maximum(lo, hi))
        if not moved:
            break
    for t, c, q, h, off in zip(texts, centre, pts, half, shift):
        t.set_position(inv.transform(c - off))
        near = np.clip(q, c - h, c + h)  # closest point of the box to the gene's point
        if np.hypot(*(near - q)) > 6:
            a, b = inv.transform(q), inv.transform(near)
            ax.plot([a[0], b[0]], [a[1], b[1]], color="#555555", lw=0.5, zorder=2)


def volcano(
    results: pd.DataFrame,
    summary: pd.DataFrame,
    *,
    case: str,
    control: str,
    alpha: float = 0.05,
    n_labels: int = 6,
    shrunk: bool = False,
    ncols: int = 4,
) -> Figure:
    """Volcano plots, one panel per tested label (log2 fold change vs -log10 p).

    Parameters
    ----------
    results, summary
        From :func:`sepsis_sc.de.pseudobulk_de` (or the TSV files it writes).
    case, control
        Contrast values (colours from :func:`sepsis_sc.pl.style.condition_palette`).
    alpha
        FDR level: genes with ``padj < alpha`` are coloured, case colour for up in
        ``case``, control colour for down.
    n_labels
        Significant genes named per panel (lowest padj first).
    shrunk
        Plot the apeGLM-shrunk log2 fold change when the results have it (default: the
        maximum-likelihood one; with few donors apeGLM pulls almost every gene to 0, which
        hides the shape of the volcano; the shrunk values stay in the table for ranking).
    ncols
        Panels per row.

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _plt()
    pal = condition_palette(case, control)
    keys = _tested(summary, results)
    if not keys:
        return _nothing_tested(plt, summary)
    levels = {lv for lv, _ in keys}
    ncols = max(1, min(ncols, len(keys)))
    nrows = int(np.ceil(len(keys) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.7 * ncols, 3.5 * nrows + 0.6), squeeze=False)
    summ = summary.set_index(["level", "label"])
    for ax, (level, label) in zip(axes.ravel(), keys):
        sub = results[(results["level"] == level) & (results["label"] == label)]
        title = label if len(levels) == 1 else f"{label} ({level})"
        row = summ.loc[(level, label)]
        title = (
            f"{title}\n{int(row['n_case'])} vs {int(row['n_control'])} units, "
            f"{int(row['n_up'])} up, {int(row['n_down'])} down"
        )
        _volcano_panel(
            ax,
            sub,
            title,
            pal=pal,
            case=case,
            control=control,
            alpha=alpha,
            n_labels=n_labels,
            shrunk=shrunk,
        )
    for ax in axes.ravel()[len(keys) :]:
        ax.axis("off")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=pal[case], label=f"higher in {case}"),
        plt.Line2D([], [], marker="o", ls="", color=pal[control], label=f"higher in {control}"),
        plt.Line2D([], [], marker="o", ls="", color=_GREY, label="not significant"),
    ]
    fig.suptitle(
        f"Pseudobulk differential expression, {case} vs {control} (coloured: FDR < {alpha})",
        x=0.01,
        ha="left",
    )
    fig.tight_layout(rect=(0, 0.05 if nrows == 1 else 0.03, 1, 1 - 0.35 / fig.get_figheight()))
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    return fig


def _nothing_tested(plt, summary: pd.DataFrame):
    """A text-only figure: no label was tested, and the first reasons why."""
    fig, ax = plt.subplots(figsize=(6.5, 2.2))
    ax.axis("off")
    reasons = summary["reason"].replace("", np.nan).dropna().astype(str).unique()[:6]
    text = "No label was tested for differential expression."
    if len(reasons):
        text += "\nReasons: " + "\n".join(reasons)
    ax.text(0, 0.5, text, va="center", ha="left", fontsize=10, wrap=True)
    return fig


def _volcano_panel(
    ax,
    sub: pd.DataFrame,
    title: str,
    *,
    pal: Mapping[str, str],
    case: str,
    control: str,
    alpha: float,
    n_labels: int,
    shrunk: bool,
) -> None:
    """One label's volcano: grey genes, significant ones in the condition colours, the top
    ``n_labels`` named."""
    x_col = "log2fc_shrunk" if shrunk and sub["log2fc_shrunk"].notna().any() else "log2fc"
    x = sub[x_col].to_numpy(float)
    p = np.clip(sub["pvalue"].to_numpy(float), 1e-300, 1)
    y = -np.log10(p)
    padj = sub["padj"].to_numpy(float)
    ok = np.isfinite(x) & np.isfinite(y)
    sig = ok & (padj < alpha)
    up, down = sig & (x > 0), sig & (x < 0)
    ax.scatter(x[ok & ~sig], y[ok & ~sig], s=4, c=_GREY, lw=0, rasterized=True)
    ax.scatter(x[down], y[down], s=9, c=pal[control], lw=0, label=f"higher in {control}")
    ax.scatter(x[up], y[up], s=9, c=pal[case], lw=0, label=f"higher in {case}")
    ax.axvline(0, color="black", lw=0.6, ls=":")
    if ok.any():
        lim = float(np.nanmax(np.abs(x[ok]))) * 1.08 or 1.0
        ax.set_xlim(-lim, lim)
        ax.set_ylim(0, float(np.nanmax(y[ok])) * 1.12 + 0.2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(f"log2 fold change{' (shrunk)' if x_col == 'log2fc_shrunk' else ''}")
    ax.set_ylabel("-log10 p")
    named = _pick_genes(sub[sig], n_labels, alpha)
    _name_genes(ax, sub.assign(_y=y).set_index("gene").loc[named].reset_index(), x_col)


def _name_genes(ax, top: pd.DataFrame, x_col: str) -> None:
    """Gene names beside their points (up genes to the right, down to the left), repelled."""
    texts = [
        ax.text(
            float(r[x_col]),
            float(r["_y"]),
            f" {r['gene']}" if r[x_col] >= 0 else f"{r['gene']} ",
            fontsize=8,
            ha="left" if r[x_col] >= 0 else "right",
            va="center",
            zorder=4,
        )
        for _, r in top.iterrows()
    ]
    _repel(ax, texts, top[[x_col, "_y"]].to_numpy(float))


def _pick_genes(sub: pd.DataFrame, n_genes: int, alpha: float) -> list[str]:
    """Top genes of one label: half up, half down (lowest padj), filled from the other side."""
    sig = sub[sub["padj"] < alpha].sort_values("padj")
    up = sig[sig["log2fc"] > 0]["gene"].tolist()
    down = sig[sig["log2fc"] < 0]["gene"].tolist()
    n_up = min(len(up), max(n_genes - min(len(down), n_genes // 2), 0))
    n_down = min(len(down), n_genes - n_up)
    return up[:n_up] + down[:n_down]


def top_genes_heatmap(
    results: pd.DataFrame,
    pseudobulk: Mapping[tuple[str, str], pd.DataFrame],
    units: pd.DataFrame,
    *,
    case: str,
    control: str,
    alpha: float = 0.05,
    n_genes: int = 10,
    max_labels: int = 6,
) -> Figure:
    """Heatmap of the top DE genes: z-scored log2 CPM per unit, one row block per label.

    Parameters
    ----------
    results
        Long results of :func:`sepsis_sc.de.pseudobulk_de`.
    pseudobulk
        ``{(level, label): units x genes raw counts}`` of the tested labels, e.g. from
        :func:`sepsis_sc.de.tested_units` (the units each label was tested on).
    units
        :attr:`SampleDesign.units` (index = unit IDs, columns ``donor`` and ``level``).
    case, control
        Contrast values (column groups and colour bar).
    alpha
        FDR level for a gene to be shown.
    n_genes
        Genes per label (half up, half down when both exist).
    max_labels
        Labels shown: those with the most genes at FDR < alpha.

    Returns
    -------
    matplotlib.figure.Figure
        Rows = label x gene (genes on the right, labels on the left), columns = units
        (control first, then case; ticks = donor), grey = unit not used for that label.
    """
    plt = _plt()
    pal = condition_palette(case, control)
    counts = results[results["padj"] < alpha].groupby(["level", "label"], sort=False).size()
    keys = [k for k in counts.sort_values(ascending=False, kind="stable").index if k in pseudobulk]
    keys = keys[:max_labels]
    if not keys:
        fig, ax = plt.subplots(figsize=(6.5, 1.6))
        ax.axis("off")
        ax.text(
            0,
            0.5,
            f"No gene at FDR < {alpha} in any tested label: no heatmap.",
            va="center",
            ha="left",
        )
        return fig
    order = units[units["level"].isin([control, case])].copy()
    order["_g"] = (order["level"] == case).astype(int)
    order = order.sort_values(["_g", "donor"])
    blocks = _heatmap_blocks(results, pseudobulk, keys, list(order.index), n_genes, alpha)
    mat = np.vstack([b[1].to_numpy(float) for b in blocks])
    genes = [g for _, z in blocks for g in z.index]
    fig, ax, ax_bar, ax_cb = _heatmap_layout(plt, blocks, genes, order, mat.shape)
    _condition_bar(plt, ax_bar, order, pal, case, control)
    ax_bar.set_title(f"Top DE genes, {case} vs {control} (FDR < {alpha})", loc="left", pad=22)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#e0e0e0")
    lim = float(np.nanmax(np.abs(mat))) if np.isfinite(mat).any() else 1.0
    im = ax.imshow(
        np.ma.masked_invalid(mat),
        aspect="auto",
        cmap=cmap,
        vmin=-lim,
        vmax=lim,
        interpolation="nearest",
    )
    ax.set_yticks(np.arange(mat.shape[0]), genes, fontsize=8)
    ax.yaxis.tick_right()
    ax.set_xticks(
        np.arange(mat.shape[1]), [str(d) for d in order["donor"]], rotation=90, fontsize=8
    )
    ax.set_xlabel("unit (donor)")
    start = 0
    for name, z in blocks:
        end = start + len(z)
        if start:
            ax.axhline(start - 0.5, color="white", lw=2)
        ax.text(
            -0.6,
            (start + end - 1) / 2,
            name,
            ha="right",
            va="center",
            fontsize=9,
            transform=ax.transData,
            clip_on=False,
        )
        start = end
    for s in ax.spines.values():
        s.set_visible(False)
    ax.axvline(int((order["level"] == control).sum()) - 0.5, color="black", lw=1)
    cb = fig.colorbar(im, cax=ax_cb)
    cb.set_label("z-score of log2 CPM")
    return fig


def _heatmap_blocks(
    results: pd.DataFrame,
    pseudobulk: Mapping[tuple[str, str], pd.DataFrame],
    keys: list[tuple[str, str]],
    cols: list[str],
    n_genes: int,
    alpha: float,
) -> list[tuple[str, pd.DataFrame]]:
    """(name, genes x units z-scores) per label: its top genes' log2 CPM, z-scored per gene
    over the label's units, NaN for units the label was not tested on."""
    blocks = []
    levels = {lv for lv, _ in keys}
    for level, label in keys:
        sub = results[(results["level"] == level) & (results["label"] == label)]
        genes = _pick_genes(sub, n_genes, alpha)
        expr = log2cpm(pseudobulk[(level, label)])[genes]
        z = (expr - expr.mean()) / expr.std(ddof=1).replace(0, np.nan)
        z = z.reindex(cols).T
        name = label if len(levels) == 1 else f"{label} ({level})"
        blocks.append((name, z))
    return blocks


def _heatmap_layout(plt, blocks, genes: list[str], order: pd.DataFrame, shape: tuple[int, int]):
    """Figure and axes sized in inches: block names | heatmap | gene names | colour bar, with
    the condition bar above the heatmap. Returns (fig, heatmap, condition bar, colour bar)."""
    n_rows, n_cols = shape
    left = 0.3 + 0.075 * max(len(b[0]) for b in blocks)
    hm_w = max(1.6, 0.32 * n_cols)
    gene_w = 0.25 + 0.07 * max(len(g) for g in genes)
    bottom = 0.55 + 0.065 * max(len(str(d)) for d in order["donor"])
    hm_h, bar_h, top = 0.2 * n_rows, 0.3, 0.75
    fig_w, fig_h = left + hm_w + gene_w + 0.15 + 0.9, bottom + hm_h + 0.08 + bar_h + top
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((left / fig_w, bottom / fig_h, hm_w / fig_w, hm_h / fig_h))
    ax_bar = fig.add_axes(
        (left / fig_w, (bottom + hm_h + 0.08) / fig_h, hm_w / fig_w, bar_h / fig_h), sharex=ax
    )
    cb_h = min(hm_h, 2.5)
    ax_cb = fig.add_axes(
        ((left + hm_w + gene_w) / fig_w, (bottom + hm_h - cb_h) / fig_h, 0.15 / fig_w, cb_h / fig_h)
    )
    return fig, ax, ax_bar, ax_cb


def _condition_bar(plt, ax_bar, order: pd.DataFrame, pal, case: str, control: str) -> None:
    """The units' condition as a colour strip, with its legend above."""
    from matplotlib.colors import ListedColormap

    bar = (order["level"] == case).astype(int).to_numpy()[None, :]
    ax_bar.imshow(
        bar,
        aspect="auto",
        cmap=ListedColormap([pal[control], pal[case]]),
        vmin=0,
        vmax=1,
        interpolation="nearest",
    )
    ax_bar.set_yticks([])
    ax_bar.tick_params(bottom=False, labelbottom=False)
    for s in ax_bar.spines.values():
        s.set_visible(False)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=pal[control], label=control),
        plt.Rectangle((0, 0), 1, 1, color=pal[case], label=case),
    ]
    ax_bar.legend(
        handles=handles,
        loc="lower left",
        bbox_to_anchor=(0, 1.05),
        ncol=2,
        frameon=False,
        borderaxespad=0,
    )
