"""Marker genes per cluster: scanpy's Wilcoxon rank-sum test (each cluster vs the rest),
computed from the non-zero entries of the log-normalised matrix in gene blocks.

:func:`cluster_markers` reads the matrix through a :class:`sepsis_sc.store.CountSource`
(``X`` in memory, or streamed from the ``.h5ad``), ``genes_per_block`` genes at a time, and
gives what ``sc.tl.rank_genes_groups(method="wilcoxon", reference="rest", pts=True)`` gives,
in the same ``uns`` layout, without a dense copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from sepsis_sc import store
from sepsis_sc.config import ClusteringSettings
from sepsis_sc.data import looks_like_counts
from sepsis_sc.store import CountSource

logger = logging.getLogger(__name__)

__all__ = ["cluster_markers"]


def cluster_markers(
    adata: ad.AnnData,
    settings: ClusteringSettings | None = None,
    *,
    counts: CountSource | None = None,
    groupby: str = "leiden",
    genes_per_block: int = 2000,
    chunk_rows: int = store.DEFAULT_CHUNK_ROWS,
    **overrides: Any,
) -> pd.DataFrame:
    """Top marker genes per cluster (one cluster vs the rest) from the log-normalised ``X``.

    These describe clusters for annotation; they are not condition tests. Their p-values are
    cell-level and computed on the same data that defined the clusters ("double dipping"),
    so use them to rank genes, not as evidence.

    The test is scanpy's Wilcoxon rank-sum test computed on the non-zero entries only: the
    same scores, fold changes, p-values, adjusted p-values, detection rates and ``uns``
    layout as ``sc.tl.rank_genes_groups(method="wilcoxon", reference="rest", pts=True)``,
    several times faster (105 s -> 19 s at 88k cells). The per-gene statistics (rank sums,
    non-zero counts and value sums per group) are computed ``genes_per_block`` genes at a
    time: the block's columns are read over all cells in row chunks of ``chunk_rows``,
    stacked, and dropped before the next block. From a file, memory follows one block (its
    CSR and CSC copies, about ``2 * genes_per_block / n_vars`` of the matrix) plus one row
    chunk, not the matrix (about 20 GB at a million cells for the matrix and its CSC copy);
    the price is one read of the file per block.

    Parameters
    ----------
    adata
        AnnData with ``obs[groupby]`` and, unless ``counts`` is given, the log-normalised
        ``X`` (sparse or dense, non-negative). With ``counts`` it may hold no matrix
        (``sepsis_sc.store.read(path)``). Gets ``uns["rank_genes_{groupby}"]``; a
        non-categorical ``obs[groupby]`` is made categorical.
    settings
        :class:`~sepsis_sc.config.ClusteringSettings`; ``n_marker_genes`` (markers kept per
        cluster, the highest scores, i.e. up-regulated) is used. ``None``: the defaults.
    counts
        The log-normalised matrix of ``adata``'s cells and genes (e.g.
        ``store.FileCounts.matching(path, "X", adata)``); ``None``: ``adata.X`` in memory.
    groupby
        ``obs`` column with clusters (groups with < 2 cells are not tested).
    genes_per_block
        Genes whose columns are in memory at once.
    chunk_rows
        Rows read at once.
    **overrides
        Fields of ``settings`` to change (``n_marker_genes=``).

    Returns
    -------
    Tidy table: ``cluster``, ``rank`` (1 = best), ``gene``, ``score``, ``logfoldchange``,
    ``pval``, ``pval_adj``, ``pct_in_cluster``, ``pct_out_cluster``. The full result is in
    ``uns["rank_genes_{groupby}"]``.

    Raises
    ------
    KeyError
        ``obs[groupby]`` is missing.
    ValueError
        The matrix looks like raw counts or has negative values, does not hold ``adata``'s
        cells and genes, or fewer than two groups have >= 2 cells.
    """
    n_genes = (settings or ClusteringSettings()).with_overrides(overrides).n_marker_genes
    if genes_per_block < 1:
        raise ValueError(f"genes_per_block must be >= 1, not {genes_per_block}")
    src = store.count_source(adata, counts, layer=None, check=False)
    first = next(iter(src.chunks(chunk_rows)), None)
    _check_marker_inputs(
        adata, groupby, first[2] if first is not None else sp.csr_matrix((0, adata.n_vars))
    )
    del first
    groups, _ = _marker_groups(adata, groupby)
    key = f"rank_genes_{groupby}"

    def rank_sums(codes: np.ndarray) -> tuple[np.ndarray, ...]:
        return _rank_sums_blocks(
            src, codes, genes_per_block=int(genes_per_block), chunk_rows=int(chunk_rows)
        )

    adata.uns[key] = _sparse_wilcoxon_markers(adata, groupby, groups, n_genes, rank_sums)
    df = _markers_table(adata, key, groups, n_genes)
    if isinstance(src, store.FileCounts):
        logger.info(
            "markers: top %d genes for %d groups of %s (streamed from %s, %d genes per block)",
            n_genes,
            len(groups),
            groupby,
            src.where,
            genes_per_block,
        )
    else:
        logger.info("markers: top %d genes for %d groups of %s", n_genes, len(groups), groupby)
    return df


def _rank_sums_blocks(
    src: CountSource,
    codes: np.ndarray,
    *,
    genes_per_block: int,
    chunk_rows: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_rank_sums_sparse` of the whole matrix, one block of ``genes_per_block`` genes
    at a time (each gene's numbers come from its column alone, so the blocks' columns make
    up the whole). Only one block's columns are in memory."""
    n_vars = src.shape[1]
    n_codes = int(codes.max()) + 2
    sizes = np.bincount(codes.astype(np.int64) + 1, minlength=n_codes).astype(np.float64)
    rank_sum, nnz, total = (np.empty((n_codes, n_vars)) for _ in range(3))
    for lo in range(0, n_vars, genes_per_block):
        hi = min(lo + genes_per_block, n_vars)
        mask = np.zeros(n_vars, dtype=bool)
        mask[lo:hi] = True
        parts = [c for _, _, c in src.chunks(chunk_rows, genes=mask)]
        block = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, hi - lo))
        del parts
        if block.shape[0] != len(codes):
            raise ValueError(f"{src.where} has {block.shape[0]} rows for {len(codes)} cells")
        if block.nnz and block.data.min() < 0:
            raise ValueError(
                f"{src.where} has negative values; markers are ranked on log-normalised data"
            )
        _, rank_sum[:, lo:hi], nnz[:, lo:hi], total[:, lo:hi] = _rank_sums_sparse(block, codes)
        del block
        logger.debug("markers: genes %d-%d of %d", lo, hi, n_vars)
    return sizes, rank_sum, nnz, total


def _check_marker_inputs(adata: ad.AnnData, groupby: str, x) -> None:
    """``obs[groupby]`` is there and ``x`` (the matrix, or its first row chunk) is not raw counts."""
    if groupby not in adata.obs:
        raise KeyError(f"obs[{groupby!r}] not found; run leiden_multi first or pick a column.")
    if looks_like_counts(x):
        raise ValueError(
            "X looks like raw counts (integers > 30); markers are ranked on log-normalised X. "
            "Normalise first (sc.pp.normalize_total(adata, target_sum=1e4); sc.pp.log1p(adata))."
        )


def _marker_groups(adata: ad.AnnData, groupby: str) -> tuple[list[str], list[str]]:
    """Groups tested (>= 2 cells; at least two needed) and groups skipped (logged).

    Makes ``obs[groupby]`` categorical when it is not.
    """
    if not isinstance(adata.obs[groupby].dtype, pd.CategoricalDtype):
        adata.obs[groupby] = adata.obs[groupby].astype(str).astype("category")
    sizes = adata.obs[groupby].value_counts()
    groups = [str(g) for g in adata.obs[groupby].cat.categories if sizes.get(g, 0) >= 2]
    if len(groups) < 2:
        raise ValueError(f"obs[{groupby!r}] needs at least two groups with >= 2 cells")
    skipped = [str(g) for g in adata.obs[groupby].cat.categories if sizes.get(g, 0) < 2]
    if skipped:
        logger.warning("no markers for groups with < 2 cells: %s", skipped)
    return groups, skipped


def _sparse_wilcoxon_markers(
    adata: ad.AnnData,
    groupby: str,
    groups: list[str],
    n_genes: int,
    rank_sums: Callable[[np.ndarray], tuple[np.ndarray, ...]],
) -> dict[str, object]:
    """``uns["rank_genes_<groupby>"]`` from :func:`_wilcoxon_vs_rest` (fold changes
    un-logged with ``uns["log1p"]["base"]`` when set).

    ``rank_sums(codes)`` gives :func:`_rank_sums_sparse`'s statistics over all genes for
    the cells' group codes (:func:`_rank_sums_blocks`, gene block by gene block).
    """
    base = adata.uns.get("log1p", {}).get("base")
    cats = adata.obs[groupby].cat.categories
    codes = adata.obs[groupby].cat.codes.to_numpy().astype(np.int64)
    tested = [int(np.flatnonzero(cats.astype(str) == g)[0]) for g in groups]
    n_top = min(int(n_genes), adata.n_vars)
    result = _wilcoxon_vs_rest(
        rank_sums(codes),
        tested,
        n_genes=n_top,
        var_names=adata.var_names,
        groups=groups,
        expm1=np.expm1 if base is None else (lambda v: np.expm1(v * np.log(base))),
    )
    return {
        "params": {
            "groupby": groupby,
            "reference": "rest",
            "method": "wilcoxon",
            "use_raw": False,
            "layer": None,
            "corr_method": "benjamini-hochberg",
        },
        **result,
    }


#: columns of the marker table, in order
_MARKER_COLUMNS = (
    "cluster",
    "rank",
    "gene",
    "score",
    "logfoldchange",
    "pval",
    "pval_adj",
    "pct_in_cluster",
    "pct_out_cluster",
)


def _markers_table(adata: ad.AnnData, key: str, groups: list[str], n_genes: int) -> pd.DataFrame:
    """Tidy top-``n_genes`` table per group from ``uns[key]`` (see :func:`cluster_markers`)."""
    df = sc.get.rank_genes_groups_df(adata, group=None, key=key)
    if "group" not in df:  # a single group comes back without the column
        df.insert(0, "group", groups[0])
    df["rank"] = df.groupby("group", observed=True).cumcount() + 1
    df = df.rename(
        columns={
            "group": "cluster",
            "names": "gene",
            "scores": "score",
            "logfoldchanges": "logfoldchange",
            "pvals": "pval",
            "pvals_adj": "pval_adj",
            "pct_nz_group": "pct_in_cluster",
            "pct_nz_reference": "pct_out_cluster",
        }
    )
    df = df[[c for c in _MARKER_COLUMNS if c in df]]
    return df[df["rank"] <= n_genes].reset_index(drop=True)


def _wilcoxon_vs_rest(
    sums: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    tested: Sequence[int],
    *,
    n_genes: int,
    var_names: pd.Index,
    groups: Sequence[str],
    expm1=np.expm1,
) -> dict[str, object]:
    """Scanpy's Wilcoxon rank-sum test (each group vs the rest), from the non-zeros' sums.

    Gives what ``sc.tl.rank_genes_groups(method="wilcoxon", reference="rest", pts=True,
    tie_correct=False)`` gives, in the same ``uns`` layout, for a sparse, non-negative matrix.
    scanpy ranks every cell of every gene (a dense chunk per 1,000 genes or so) and subsets
    rows once per group for means and detection rates; here all cells with a zero share one
    tied rank, ``(n_zero + 1) / 2``, so only the non-zeros are sorted, and the group sums,
    means and non-zero counts come from one pass over each gene's column (about 10x faster
    at 100k cells and 10% density, no dense copy).

    ``sums`` is :func:`_rank_sums_sparse`'s ``(sizes, rank_sum, nnz, total)`` over *all*
    genes (gathered gene block by gene block by :func:`_rank_sums_blocks`): the
    Benjamini-Hochberg adjustment and the top
    ``n_genes`` are taken over all of them here. ``tested`` are the group codes to test.
    """
    sizes, rank_sum, nnz, total = sums
    n_cells = int(sizes.sum())
    all_nnz = nnz.sum(axis=0)
    all_total = total.sum(axis=0)
    out: dict[str, dict[str, np.ndarray]] = {
        k: {} for k in ("names", "scores", "pvals", "pvals_adj", "logfoldchanges")
    }
    pts, pts_rest = {}, {}
    for name, code in zip(groups, tested, strict=True):
        s = code + 1
        n1 = sizes[s]
        n2 = n_cells - n1
        scores, pvals, pvals_adj = _rank_sum_test(rank_sum[s], n1, n2, n_cells)
        mean_in = total[s] / n1
        mean_rest = (all_total - total[s]) / n2
        lfc = np.log2((expm1(mean_in) + 1e-9) / (expm1(mean_rest) + 1e-9))
        top = _top_n(scores, n_genes)
        out["names"][name] = np.asarray(var_names[top], dtype=object)
        out["scores"][name] = scores[top]
        out["pvals"][name] = pvals[top]
        out["pvals_adj"][name] = pvals_adj[top]
        out["logfoldchanges"][name] = lfc[top]
        pts[name] = nnz[s] / n1
        pts_rest[name] = (all_nnz - nnz[s]) / n2
    return _rank_genes_result(out, pts, pts_rest, var_names)


def _rank_sums_sparse(
    x: sp.spmatrix, codes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group slot (0 = no group, then code + 1) and gene: rank sums over all cells,
    non-zero counts and value sums, from one pass over each gene's non-zeros; plus the slot
    sizes. Cells with a zero share one tied rank, ``(n_zero + 1) / 2``.

    ``codes`` is the group code of each cell (-1 = in no group: counted in every "rest").
    Each gene's numbers depend on its column only, so a block of columns gives that block's
    columns of the result (:func:`_rank_sums_blocks`)."""
    from scipy.stats import rankdata

    csc = sp.csc_matrix(x, copy=True)
    csc.eliminate_zeros()  # stored zeros tie with the implicit ones
    csc.sort_indices()
    n_cells, n_var = csc.shape
    n_codes = int(codes.max()) + 2  # slot 0 holds cells outside every group (code -1)
    slot = codes.astype(np.int64) + 1
    sizes = np.bincount(slot, minlength=n_codes).astype(np.float64)
    rank_sum = np.empty((n_codes, n_var))
    nnz = np.empty((n_codes, n_var))
    total = np.empty((n_codes, n_var))
    indptr, indices, data = csc.indptr, csc.indices, csc.data
    for j in range(n_var):
        lo, hi = indptr[j], indptr[j + 1]
        where = slot[indices[lo:hi]]
        vals = data[lo:hi]
        n_zero = n_cells - (hi - lo)
        nz_in = np.bincount(where, minlength=n_codes)
        # ranks over all cells: zeros take the mean rank (n_zero + 1) / 2, non-zeros follow
        rank_sum[:, j] = (
            np.bincount(where, weights=rankdata(vals) + n_zero, minlength=n_codes)
            + (sizes - nz_in) * (n_zero + 1) / 2.0
        )
        nnz[:, j] = nz_in
        total[:, j] = np.bincount(where, weights=vals, minlength=n_codes)
    return sizes, rank_sum, nnz, total


def _rank_sum_test(
    rank_sum: np.ndarray, n1: float, n2: float, n_cells: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z-scores of a group's rank sums (no tie correction, as scanpy's default), two-sided
    p-values and Benjamini-Hochberg adjusted p-values."""
    from scipy.stats import norm
    from statsmodels.stats.multitest import multipletests

    std = np.sqrt(n1 * n2 * (n_cells + 1) / 12.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = (rank_sum - n1 * (n_cells + 1) / 2.0) / std
    scores[np.isnan(scores)] = 0
    pvals = 2 * norm.sf(np.abs(scores))
    pvals_adj = multipletests(pvals, alpha=0.05, method="fdr_bh")[1]
    return scores, pvals, pvals_adj


def _rank_genes_result(
    out: Mapping[str, Mapping[str, np.ndarray]],
    pts: Mapping[str, np.ndarray],
    pts_rest: Mapping[str, np.ndarray],
    var_names: pd.Index,
) -> dict[str, object]:
    """The per-group arrays in scanpy's ``rank_genes_groups`` layout (record arrays with
    its dtypes, ``pts``/``pts_rest`` frames)."""
    dtypes = {
        "names": "O",
        "scores": "float32",
        "logfoldchanges": "float32",
        "pvals": "float64",
        "pvals_adj": "float64",
    }
    result: dict[str, object] = {
        k: pd.DataFrame(v).to_records(index=False, column_dtypes=dtypes[k]) for k, v in out.items()
    }
    result["pts"] = pd.DataFrame(pts, index=var_names)
    result["pts_rest"] = pd.DataFrame(pts_rest, index=var_names)
    return result


def _top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest scores, best first (scanpy's ``_select_top_n``)."""
    n = min(n, len(scores))
    part = np.argpartition(scores, -n)[-n:]
    return part[np.argsort(scores[part])[::-1]]
