"""Figures of the integration stage (:func:`sepsis_sc.integrate.integration_metrics`).

* :func:`metrics`: grouped bars of the scib-style metrics, one bar per embedding, with the
  table's notes (skipped batch terms, embeddings not computed) printed under the bars.
* :func:`embedding_umaps`: a UMAP of each embedding, coloured by batch and by label.

Each function returns a matplotlib Figure; save it with :func:`sepsis_sc.pl.style.savefig`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc

from sepsis_sc.integrate.batches import require_obs
from sepsis_sc.pl.style import (
    categorical_palette,
    cell_type_palette,
    legend_right,
    lineage_palette,
    set_style,
    wrap,
)

__all__ = ["metrics", "embedding_umaps"]

_METRIC_LABELS = {
    "ilisi": "iLISI",
    "batch_asw": "batch ASW",
    "graph_connectivity": "graph conn.",
    "clisi": "cLISI",
    "label_asw": "label ASW",
    "nmi": "NMI",
    "ari": "ARI",
}
_METHOD_NAMES = {"X_pca": "PCA (unintegrated)", "X_harmony": "Harmony", "X_scVI": "scVI"}
_METHOD_COLOURS = {"PCA (unintegrated)": "#7f7f7f", "Harmony": "#9467bd", "scVI": "#ff7f0e"}


def metrics(table: pd.DataFrame) -> plt.Figure:
    """Grouped bars: one group per metric, one bar per embedding.

    Batch-removal metrics are on the left, biology-conservation metrics (only when labels were
    given) on the right. Colours follow the embedding (a fixed fallback palette). Notes of the
    table (``note`` column: batch terms skipped with one batch level, embeddings not computed)
    are printed under the bars; rows without any value get no bars, and a table with no
    values at all but notes gives a figure with the notes only.

    Parameters
    ----------
    table
        Output of :func:`sepsis_sc.integrate.integration_metrics`.

    Returns
    -------
    The figure.
    """

    set_style()
    metrics = [m for m in _METRIC_LABELS if m in table and table[m].notna().any()]
    notes = _metric_notes(table, metrics)
    if not metrics:
        if not notes:
            raise ValueError("table has no metric columns with values")
        return _plot_notes_only(notes)
    if notes:  # rows with no value at all (skipped embeddings) get no bars
        table = table[table[metrics].notna().any(axis=1)]
    names = [_METHOD_NAMES.get(k, k) for k in table["embedding"]]
    colours = categorical_palette(names, _METHOD_COLOURS)
    n_methods = len(names)
    width = 0.8 / n_methods
    fig, ax = plt.subplots(figsize=(1.0 + 1.1 * len(metrics), 3.6))
    xs = np.arange(len(metrics))
    for i, (name, (_, row)) in enumerate(zip(names, table.iterrows())):
        vals = [row[m] for m in metrics]
        ax.bar(xs + (i - (n_methods - 1) / 2) * width, vals, width, label=name, color=colours[name])
    n_batch = sum(m in ("ilisi", "batch_asw", "graph_connectivity") for m in metrics)
    if 0 < n_batch < len(metrics):
        ax.axvline(n_batch - 0.5, color="0.6", lw=0.8, ls="--")
        ax.text(n_batch / 2 - 0.5, 1.04, "batch removal", ha="center", fontsize=9)
        ax.text((n_batch + len(metrics)) / 2 - 0.5, 1.04, "biology kept", ha="center", fontsize=9)
    elif notes and n_batch == 0:
        ax.text((len(metrics) - 1) / 2, 1.04, "biology kept", ha="center", fontsize=9)
    ax.set_xticks(xs)
    ax.set_xticklabels([_METRIC_LABELS[m] for m in metrics])
    ax.set_ylim(0, 1.1)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("score (higher = better)")
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Integration metrics (scib definitions)")
    if notes:
        ax.text(
            0.0,
            -0.14,
            _wrap_notes(notes, width=max(60, int(18 * len(metrics)))),
            transform=ax.transAxes,
            ha="left",
            va="top",
            fontsize=8,
            color="0.25",
        )
    return fig


def _metric_notes(table: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """Distinct notes of a metrics table, in row order.

    A note found only on rows without any value (embeddings not computed) next to scored rows
    is prefixed with their names; others (batch terms skipped) are given as they are.
    """
    if "note" not in table:
        return []
    scored = table[list(metrics)].notna().any(axis=1).to_numpy() if metrics else None
    notes: dict[str, list[str]] = {}
    for i, (key, note) in enumerate(zip(table["embedding"], table["note"])):
        if not isinstance(note, str) or not note:
            continue
        names = notes.setdefault(note, [])
        if scored is None or not scored[i]:
            names.append(_METHOD_NAMES.get(key, key))
        else:
            names.append("")
    out = []
    for note, names in notes.items():
        unscored_only = scored is not None and scored.any() and all(names)
        out.append(f"{', '.join(names)}: {note}" if unscored_only else note)
    return out


def _wrap_notes(notes: Sequence[str], width: int) -> str:
    return "\n".join(textwrap.fill(n, width=width, subsequent_indent="  ") for n in notes)


def _plot_notes_only(notes: Sequence[str]) -> plt.Figure:
    """A figure with the notes only: no metric could be computed (one batch and no labels)."""

    fig, ax = plt.subplots(figsize=(6.0, 0.6 + 0.4 * len(notes)))
    ax.axis("off")
    ax.set_title("Integration metrics (scib definitions)")
    body = (
        "No metric could be computed: batch-removal metrics need two or more batches and "
        "biology-conservation metrics need known labels (integration.metrics_label_key)."
    )
    ax.text(
        0.0,
        1.0,
        _wrap_notes([body, *notes], width=80),
        ha="left",
        va="top",
        fontsize=9,
        transform=ax.transAxes,
    )
    return fig


def embedding_umaps(
    adata: ad.AnnData,
    *,
    embed_keys: Sequence[str],
    batch_key: str,
    label_key: str | None = None,
    label_title: str | None = None,
    n_neighbors: int = 15,
    seed: int = 0,
) -> plt.Figure:
    """UMAP of each embedding, coloured by batch and (if given) by label.

    One row per embedding; columns: batch, label. UMAPs are computed on temporary objects,
    so ``adata`` is not modified. With one batch level the batch panels are one colour and
    their titles say so. Labels take the shared palette (:func:`~sepsis_sc.pl.style.lineage_palette`
    for a ``lineage`` column, else :func:`~sepsis_sc.pl.style.cell_type_palette`), so a cell
    type has the colour it has in the annotation UMAP.

    Parameters
    ----------
    adata
        AnnData with the embeddings in ``obsm``.
    embed_keys
        ``obsm`` keys.
    batch_key, label_key
        ``obs`` columns to colour by.
    label_title
        Name of the label colouring in the panel titles (default: ``label_key``), e.g.
        ``"simulated truth cell type"`` when the labels are the simulator's planted truth.
    n_neighbors, seed
        kNN graph size and UMAP/neighbour seed.

    Returns
    -------
    The figure.
    """

    set_style()
    colour_keys = [batch_key] + ([label_key] if label_key is not None else [])
    require_obs(adata, colour_keys, "colour for UMAP")
    obs = adata.obs[colour_keys].astype(str).astype("category")
    palettes = _palettes(obs, batch_key, label_key)
    titles = {batch_key: batch_key, label_key: label_title or label_key}
    n_rows, n_cols = len(embed_keys), len(colour_keys)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(4.2 * n_cols + 1.8, 3.8 * n_rows), squeeze=False
    )
    size = max(2.0, min(20.0, 60_000 / adata.n_obs))
    order = np.random.default_rng(seed).permutation(adata.n_obs)  # no batch drawn on top
    for r, key in enumerate(embed_keys):
        um = _umap(obs, np.asarray(adata.obsm[key]), n_neighbors, seed)[order]
        for c, ck in enumerate(colour_keys):
            one_level = ck == batch_key and len(obs[ck].cat.categories) == 1
            suffix = " (one level: no batch to mix)" if one_level else ""
            title = f"{_METHOD_NAMES.get(key, key)} — {titles[ck]}{suffix}"
            _coloured_umap(axes[r, c], um, obs[ck], order, palettes[ck], title, size)
        axes[r, 0].set_ylabel("UMAP 2")
    for c in range(n_cols):
        axes[-1, c].set_xlabel("UMAP 1")
    fig.tight_layout()
    return fig


def _palettes(obs: pd.DataFrame, batch_key: str, label_key: str | None) -> dict[str, dict]:
    """Colours per colouring column: a fallback palette for batches, the shared lineage or
    cell-type palette for labels (the colours of the annotation UMAP)."""
    palettes = {batch_key: categorical_palette(obs[batch_key].cat.categories)}
    if label_key is not None:
        cats = obs[label_key].cat.categories
        lineage = "lineage" in label_key
        palettes[label_key] = lineage_palette(cats) if lineage else cell_type_palette(cats)
    return palettes


def _umap(obs: pd.DataFrame, embedding: np.ndarray, n_neighbors: int, seed: int) -> np.ndarray:
    """2-D UMAP of one embedding, computed on a temporary object (the caller's is untouched)."""
    tmp = ad.AnnData(obs=obs.copy(), obsm={"X_emb": embedding})
    sc.pp.neighbors(tmp, n_neighbors=n_neighbors, use_rep="X_emb", random_state=seed)
    sc.tl.umap(tmp, random_state=seed)
    return tmp.obsm["X_umap"]


def _coloured_umap(
    ax: plt.Axes,
    um: np.ndarray,
    column: pd.Series,
    order: np.ndarray,
    pal: Mapping[str, str],
    title: str,
    size: float,
) -> None:
    """One panel: cells (in ``order``, as ``um`` is) coloured by ``column``, legend beside it
    (up to 30 levels)."""
    cats = column.to_numpy()[order]
    ax.scatter(um[:, 0], um[:, 1], c=[pal[v] for v in cats], s=size, lw=0, rasterized=True)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(wrap(title, 40))
    if len(column.cat.categories) <= 30:
        legend_right(ax, pal, column.cat.categories, markerscale=1.2)
