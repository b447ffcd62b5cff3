"""The genes a marker dot plot shows and their expression per label (drawn by
:func:`sepsis_sc.pl.annotate.marker_dotplot`).

For each label observed in ``obs[groupby]`` the candidates are its up-markers in the marker
file (a subset borrows its lineage's when it is the lineage's only subset or has none of its
own); the ``n_genes`` most specific (own mean minus the other labels' highest) are shown, each
gene once.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from sepsis_sc.annotate.lineage import group_matrix
from sepsis_sc.annotate.markers import (
    UNASSIGNED,
    Vocabulary,
    load_markers,
    load_vocabulary,
    marker_symbols,
    read_counts,
    resolve_genes,
)
from sepsis_sc.data import log_normalise, resolve_organism
from sepsis_sc.store import CountSource

__all__ = ["dotplot_markers"]


def dotplot_markers(
    adata: AnnData,
    *,
    groupby: str = "cell_type",
    markers: str | PathLike[str] | Mapping[str, Any] | None = None,
    organism: Literal["human", "mouse"] | None = None,
    counts: CountSource | None = None,
    layer: str | None = "counts",
    n_genes: int = 3,
    min_cells: int = 5,
) -> pd.DataFrame:
    """The top markers of each observed label and their expression in every label.

    Parameters
    ----------
    adata
        Annotated AnnData (``obs[groupby]``), raw counts in ``layers[layer]`` or integer ``X``
        unless ``counts`` is given.
    groupby
        ``obs`` column with labels (``cell_type`` or ``lineage``).
    markers
        Marker sets (default: packaged file of the organism).
    organism
        Default: ``uns["annotation"]["params"]["organism"]`` or detected from symbols.
    counts
        The raw counts as a :class:`sepsis_sc.store.CountSource` with ``adata``'s cells and
        genes (``store.FileCounts.matching(path, layer, adata)`` streams the marker genes'
        columns from the ``.h5ad``, so ``adata`` needs no matrix); default ``adata``'s
        (:func:`sepsis_sc.annotate.markers.read_counts`).
    layer
        Layer with raw counts; expression is log1p(CP10k), size factors from all genes.
    n_genes
        Up-markers shown per label, in marker-file order, among genes present in the data.
    min_cells
        Labels with fewer cells are left out.

    Returns
    -------
    pandas.DataFrame
        One row per shown gene and label, genes grouped by the label they mark (in plot
        order), labels in vocabulary order: ``marker_of`` (the label the gene is shown for),
        ``gene``, ``group`` (the label of the cells), ``mean_expression`` (mean log1p CP10k of
        the group's cells) and ``fraction_expressing`` (fraction of them with a count).
        ``.attrs["groupby"]`` holds ``groupby``.
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
    gene_pos = resolve_genes(sorted(marker_symbols(mk)), adata.var_names, mk["aliases"])
    cand = _candidate_markers(mk, vocab, present, gene_pos)
    all_genes = list(dict.fromkeys(g for gs in cand.values() for g in gs))
    if not all_genes:
        raise ValueError("None of the marker genes of the plotted labels are in the data.")
    cols = np.array([gene_pos[g] for g in all_genes])
    src = read_counts(adata, counts, layer)
    # the marker columns only, size factors from all genes
    E_all = log_normalise(src.columns(cols), totals=src.totals)
    keep = groups.isin(present).to_numpy()
    codes = np.asarray(pd.Categorical(groups[keep], categories=present).codes)
    n_groups = len(present)
    G = group_matrix(codes, n_groups)
    sizes = np.bincount(codes, minlength=n_groups)
    E = E_all[keep]
    means = np.asarray((G @ E).todense())
    var_groups = _most_specific(means, present, cand, all_genes, n_genes)
    col_of = {g: i for i, g in enumerate(all_genes)}
    rows = []
    for label, genes in var_groups.items():
        for g in genes:
            j = col_of[g]
            on = E[:, j].toarray().ravel() > 0
            frac = np.bincount(codes, weights=on, minlength=n_groups) / sizes
            for k, group in enumerate(present):
                rows.append(
                    {
                        "marker_of": label,
                        "gene": g,
                        "group": group,
                        "mean_expression": float(means[k, j]),
                        "fraction_expressing": float(frac[k]),
                    }
                )
    cols_out = ["marker_of", "gene", "group", "mean_expression", "fraction_expressing"]
    out = pd.DataFrame(rows, columns=cols_out)
    out.attrs["groupby"] = groupby
    return out


def _labels_to_plot(
    groups: pd.Series, vocab: Vocabulary, min_cells: int, groupby: str
) -> list[str]:
    """Labels with at least ``min_cells`` cells, in vocabulary order (others after them)."""
    vc = groups.value_counts()
    order_all = list(vocab.cell_types.index) + list(vocab.lineages.index)
    present = [g for g in dict.fromkeys(order_all) if vc.get(g, 0) >= min_cells and g != UNASSIGNED]
    present += [g for g in vc.index if vc[g] >= min_cells and g not in present and g != UNASSIGNED]
    if not present:
        raise ValueError(f"No label of {groupby!r} has >= {min_cells} cells to plot.")
    return present


def _candidate_markers(
    mk: Mapping[str, Any], vocab: Vocabulary, present: list[str], gene_pos: Mapping[str, int]
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
