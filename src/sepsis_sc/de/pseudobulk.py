"""Raw counts summed per sample x label, and one label's sums per unit (donor x level).

* :func:`levels_pseudobulk`: every label of several obs columns in one pass over the counts
  (:func:`sepsis_sc.data.pseudobulk` over a :class:`~sepsis_sc.store.CountSource`);
  :func:`label_pseudobulk` for one column.
* :func:`label_units`: one label's per-sample sums -> per-unit sums and the design rows
  for the units left after the ``min_cells`` gate.
* :func:`tested_units`: the unit sums each tested label was fitted on (the heatmap's input).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

from sepsis_sc import store
from sepsis_sc.config import DESettings
from sepsis_sc.data import pseudobulk
from sepsis_sc.design import SampleDesign

__all__ = ["label_pseudobulk", "levels_pseudobulk", "label_units", "tested_units"]

_CHUNK_CELLS = 50_000  # cells per block of the sums (bounds the float64 copy)


def _codes(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Integer codes (-1 = missing) and category names of an obs column, categories in order."""
    cat = values.astype("category") if values.dtype.name != "category" else values
    cats = [str(c) for c in cat.cat.categories]
    return cat.cat.codes.to_numpy().astype(np.int64), cats


def label_pseudobulk(
    adata: Any,
    *,
    label_key: str,
    sample_key: str = "sample_id",
    counts: store.CountSource | None = None,
    layer: str | None = "counts",
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Raw counts summed per sample x label.

    The count matrix is read in blocks of cells (:func:`sepsis_sc.data.pseudobulk`), so the
    cells x genes matrix is never densified (only one block is copied to float64 at a time,
    which keeps sums exact).

    Parameters
    ----------
    adata
        Cells x genes with ``obs[label_key]`` and ``obs[sample_key]``; raw counts in
        ``layers[layer]`` or, when that layer is absent, an integer-valued ``X``.
    label_key
        obs column with the labels (e.g. ``cell_type``, ``lineage``). Cells without a label
        (NaN) are not counted.
    sample_key
        obs column with the sample IDs.
    counts
        The counts to sum (e.g. :meth:`sepsis_sc.store.FileCounts.matching`, streamed from
        the ``.h5ad``; ``adata`` then needs only obs and var). None: ``adata``'s ``layer``.
    layer
        Layer with the raw counts (None: ``X``).

    Returns
    -------
    counts
        ``{label: samples x genes DataFrame}`` of int64 sums, for the samples that have at
        least one cell of the label (index = sample IDs, columns = ``var_names``).
    n_cells
        Samples x labels table of cell numbers (zeros included).

    Raises
    ------
    KeyError
        ``label_key`` or ``sample_key`` missing from obs.
    ValueError
        The counts are not non-negative integers (the message names the matrix and the fix).
    """
    return levels_pseudobulk(adata, [label_key], sample_key=sample_key, counts=counts, layer=layer)[
        label_key
    ]


def levels_pseudobulk(
    adata: Any,
    levels: Sequence[str],
    *,
    sample_key: str = "sample_id",
    counts: store.CountSource | None = None,
    layer: str | None = "counts",
) -> dict[str, tuple[dict[str, pd.DataFrame], pd.DataFrame]]:
    """:func:`label_pseudobulk` of every obs column in ``levels``, in one pass over the counts.

    Returns
    -------
    dict
        ``{level: (counts, n_cells)}`` as :func:`label_pseudobulk` returns them.
    """
    for level in levels:
        _check_obs_columns(adata, level, sample_key)
    s_codes, samples = _codes(adata.obs[sample_key])
    groupings = []
    for level in levels:
        l_codes, labels = _codes(adata.obs[level])
        n_lab = max(len(labels), 1)
        groups, inverse, codes = _group_codes(s_codes, l_codes, n_lab)
        groupings.append((labels, n_lab, groups, inverse, codes))
    source = _Watched(store.count_source(adata, counts, layer, check=False))
    sums = pseudobulk(
        source,
        [g[4] for g in groupings],
        [g[2].size for g in groupings],
        chunk_rows=_CHUNK_CELLS,
    )
    genes = pd.Index(adata.var_names.astype(str))
    out = {}
    for level, (labels, n_lab, groups, inverse, _), total in zip(levels, groupings, sums):
        _check_sums(total, source)
        g_sample, g_label = groups // n_lab, groups % n_lab
        nc = np.zeros((len(samples), len(labels)), dtype=np.int64)
        nc[g_sample, g_label] = np.bincount(inverse, minlength=groups.size)
        n_cells = pd.DataFrame(nc, index=pd.Index(samples, name=sample_key), columns=labels)
        tables = _label_tables(total, g_sample, g_label, samples, labels, genes, sample_key)
        out[level] = (tables, n_cells)
    return out


def _check_obs_columns(adata: Any, label_key: str, sample_key: str) -> None:
    """Label and sample columns must be in obs (``KeyError`` naming the columns there are)."""
    for key, what in ((label_key, "label"), (sample_key, "sample")):
        if key not in adata.obs:
            raise KeyError(
                f"obs[{key!r}] ({what} column) is missing; columns: {', '.join(map(str, adata.obs.columns))}"
            )


def _group_codes(
    s_codes: np.ndarray, l_codes: np.ndarray, n_lab: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample x label groups present (code ``sample * n_lab + label``), each labelled cell's
    group index, and every cell's group index (-1: unlabelled, in no group)."""
    ok = (s_codes >= 0) & (l_codes >= 0)
    group = s_codes * n_lab + l_codes
    groups, inverse = np.unique(group[ok], return_inverse=True)
    codes = np.full(s_codes.size, -1, dtype=np.int64)
    codes[ok] = inverse
    return groups, inverse, codes


class _Watched:
    """A count source whose row chunks pass through while their smallest stored value is
    noted (negative counts are refused after the one pass over the matrix)."""

    def __init__(self, source: store.CountSource) -> None:
        self.source, self.shape, self.where = source, source.shape, source.where
        self.min_value = 0.0

    def chunks(self, chunk_rows: int, **kw: Any) -> Iterator[tuple[int, int, Any]]:
        for start, stop, chunk in self.source.chunks(chunk_rows, **kw):
            if chunk.nnz:
                self.min_value = min(self.min_value, float(chunk.data.min()))
            yield start, stop, chunk


def _check_sums(sums: np.ndarray, source: _Watched) -> None:
    """Error unless the summed matrix held non-negative integers."""
    if source.min_value < 0 or not np.all(np.mod(sums, 1) == 0):
        raise ValueError(
            f"{source.where} does not hold raw integer counts (found negative or fractional values): "
            "pseudobulk DE sums raw UMI counts. Pass layer=<name of the raw-count layer> "
            "(the workflow keeps them in layers['counts']), or restore them with "
            "adata.layers['counts'] = <raw matrix> before normalising."
        )


def _label_tables(
    sums: np.ndarray,
    g_sample: np.ndarray,
    g_label: np.ndarray,
    samples: list[str],
    labels: list[str],
    genes: pd.Index,
    sample_key: str,
) -> dict[str, pd.DataFrame]:
    """``{label: samples x genes int64}`` from the group sums (samples with cells of it)."""
    counts: dict[str, pd.DataFrame] = {}
    for j, lab in enumerate(labels):
        rows = np.flatnonzero(g_label == j)
        if rows.size == 0:
            continue
        counts[lab] = pd.DataFrame(
            sums[rows].astype(np.int64),
            index=pd.Index([samples[i] for i in g_sample[rows]], name=sample_key),
            columns=genes,
        )
    return counts


def label_units(
    counts: pd.DataFrame,
    n_cells: pd.Series,
    design: SampleDesign,
    *,
    min_cells: int = 10,
) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    """One label's per-sample counts -> per-unit counts and the design rows for those units.

    Samples of the contrast with fewer than ``min_cells`` cells of the label are left out
    (per sample, before aggregation); the remaining samples are summed per unit
    (:meth:`SampleDesign.aggregate_sum`) and the design is restricted to the units left
    (:meth:`SampleDesign.restrict`: full rank, pairs kept only when both units are left).

    Parameters
    ----------
    counts
        Samples x genes raw counts of one label (from :func:`label_pseudobulk`).
    n_cells
        Cells of the label per sample (index = sample IDs).
    design
        The resolved contrast.
    min_cells
        Fewest cells of the label for a sample to be used.

    Returns
    -------
    unit_counts
        Units x genes int64 sums, rows = the units of ``matrix`` (or every unit with a
        usable sample when ``matrix`` is None).
    matrix
        Design rows for those units (None: contrast not estimable on them).
    note
        What was left out (empty when nothing).
    """
    samples = design.sample_unit.index
    nc = n_cells.reindex(samples).fillna(0)
    use = nc >= min_cells
    notes = []
    n_low = int((~use).sum())
    if n_low:
        notes.append(f"{n_low} sample(s) with < {min_cells} cells left out")
    used = samples[use.to_numpy()]
    units_with = pd.Index(design.sample_unit.loc[used].unique())
    keep = design.units.index.isin(units_with)
    table = counts.reindex(used).fillna(0)
    summed = design.aggregate_sum(table).loc[keep]
    matrix: pd.DataFrame | None
    if keep.sum() == 0:
        matrix, note = None, "no unit left"
    else:
        matrix, note = design.restrict(keep)
    if note:
        notes.append(note)
    if matrix is not None:
        summed = summed.loc[matrix.index]
    return summed.astype(np.int64), matrix, "; ".join(notes)


def tested_units(
    adata: Any,
    design: SampleDesign,
    summary: pd.DataFrame,
    settings: DESettings | None = None,
    *,
    sample_key: str = "sample_id",
    counts: store.CountSource | None = None,
    layer: str | None = "counts",
    **overrides: Any,
) -> dict[tuple[str, str], pd.DataFrame]:
    """The units x genes raw counts each tested label of :func:`~sepsis_sc.de.pseudobulk_de`
    was fitted on (its ``summary`` rows with status ``tested``), recomputed from the cells.

    Parameters
    ----------
    adata, design
        As given to :func:`~sepsis_sc.de.pseudobulk_de`.
    summary
        Its summary table (``level``, ``label``, ``status``).
    settings
        The DE settings it ran with (``min_cells``; keyword overrides as there).
    sample_key, counts, layer
        As in :func:`label_pseudobulk`.

    Returns
    -------
    dict
        ``{(level, label): units x genes int64}`` (:func:`label_units`), the input of
        :func:`sepsis_sc.pl.de.top_genes_heatmap`.
    """
    settings = (settings or DESettings()).with_overrides(overrides)
    tested = summary[summary["status"] == "tested"]
    if not len(tested):
        return {}
    levels = list(dict.fromkeys(tested["level"]))
    sums = levels_pseudobulk(adata, levels, sample_key=sample_key, counts=counts, layer=layer)
    out = {}
    for level, labels in tested.groupby("level")["label"]:
        per_sample, n_cells = sums[level]
        for label in labels:
            out[(level, label)] = label_units(
                per_sample[label], n_cells[label], design, min_cells=settings.min_cells
            )[0]
    return out
