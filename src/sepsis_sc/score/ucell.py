"""Signed UCell scores per cell (Andreatta & Carmona 2021, DOI 10.1016/j.csbj.2021.06.043).

:func:`ucell_scores` ranks each cell's genes on the sparse matrix, chunk by chunk (only the
non-zero entries are sorted; zeros tie at the bottom), and scores every signature from the
ranks of its genes. The counts are read through a :class:`~sepsis_sc.store.CountSource`: an
AnnData's layer in memory, or the workflow's file streamed in row chunks, one code path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sepsis_sc import store
from sepsis_sc.config import ScoringSettings
from sepsis_sc.score.signatures import signature_list

logger = logging.getLogger(__name__)


def _chunk_ranks(block: sp.csr_matrix, query: np.ndarray, max_rank: int) -> np.ndarray:
    """Per-cell descending ranks (ties averaged, as UCell) of the ``query`` gene columns.

    Only the non-zero entries of each row are sorted; zeros tie at the bottom with the
    average rank ``nnz + (n_genes - nnz + 1) / 2``. Ranks above ``max_rank`` become
    ``max_rank + 1``.
    """
    block = sp.csr_matrix(block, copy=True)
    block.sum_duplicates()
    block.eliminate_zeros()
    n_rows, n_genes = block.shape
    data = block.data
    if data.size and data.min() < 0:
        raise ValueError(
            "negative values in the matrix used for ranking; UCell needs counts or "
            "log-normalised expression, not scaled/centred data (use layer='counts')."
        )
    nnz = np.diff(block.indptr)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), nnz)
    qvals = block[:, query].toarray()  # n_rows x n_query, small
    if data.size and np.all(data == np.round(data)) and data.max() < 2**40:
        codes = data.astype(np.int64)
        n_codes = int(codes.max()) + 1 if codes.size else 1
        qcodes = np.round(qvals).astype(np.int64)
    else:
        uniq, codes = np.unique(data, return_inverse=True)
        n_codes = max(len(uniq), 1)
        qcodes = np.searchsorted(uniq, qvals)
        qcodes = np.minimum(qcodes, n_codes - 1)
    # key sorts rows ascending, values descending inside a row
    keys = np.sort(rows * n_codes + (n_codes - 1 - codes))
    qrow = np.arange(n_rows, dtype=np.int64)[:, None]
    qkeys = qrow * n_codes + (n_codes - 1 - qcodes)
    left = np.searchsorted(keys, qkeys, side="left")
    right = np.searchsorted(keys, qkeys, side="right")
    start = block.indptr[:-1].astype(np.int64)[:, None]
    rank_nz = (left - start) + (right - left + 1) / 2.0
    rank_zero = nnz[:, None] + (n_genes - nnz[:, None] + 1) / 2.0
    ranks = np.where(qvals > 0, rank_nz, np.broadcast_to(rank_zero, qvals.shape))
    return np.where(ranks > max_rank, max_rank + 1.0, ranks)


def _u_score(ranks: np.ndarray, max_rank: int) -> np.ndarray:
    """UCell's normalised Mann-Whitney U (1 = all genes at the top, 0 = none in max_rank)."""
    n = ranks.shape[1]
    u = ranks.sum(axis=1) - n * (n + 1) / 2.0
    auc = 1.0 - u / (n * max_rank)
    auc[np.all(ranks > max_rank, axis=1)] = 0.0
    return auc


def _ucell_params(adata: ad.AnnData, max_rank: int, chunk_size: int) -> int:
    """Check the UCell settings and the gene names; return ``max_rank`` capped at n_genes."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not pd.Index(adata.var_names).is_unique:
        raise ValueError("adata.var_names are not unique; call adata.var_names_make_unique()")
    if max_rank > adata.n_vars:
        logger.info(
            "max_rank %d > number of genes %d; using %d", max_rank, adata.n_vars, adata.n_vars
        )
        return adata.n_vars
    return max_rank


def _signature_columns(
    sigs: Sequence[Mapping[str, Any]], var_names: pd.Index
) -> tuple[np.ndarray, dict[str, tuple[list[int], list[int]]]]:
    """Gene columns to rank (the union over sets) and each set's up/down positions in them.

    Genes absent from ``var_names`` are dropped; a repeated gene counts once.
    """
    var_index = pd.Index(var_names)
    present: dict[str, int] = {}
    parts: dict[str, tuple[list[int], list[int]]] = {}
    for s in sigs:
        cols = []
        for key in ("up", "down"):
            genes = [g for g in dict.fromkeys(s[key]) if g in var_index]
            for g in genes:
                present.setdefault(g, len(present))
            cols.append([present[g] for g in genes])
        parts[s["name"]] = (cols[0], cols[1])
    return var_index.get_indexer(list(present)), parts


def _signed_scores(
    ranks: np.ndarray,
    sigs: Sequence[Mapping[str, Any]],
    parts: Mapping[str, tuple[list[int], list[int]]],
    max_rank: int,
    w_neg: float,
    clip: bool,
) -> np.ndarray:
    """``U(up) - w_neg * U(down)`` per cell and set (NaN for a set with no genes present)."""
    out = np.full((ranks.shape[0], len(sigs)), np.nan)
    for j, s in enumerate(sigs):
        up, down = parts[s["name"]]
        if not up and not down:
            continue
        score = _u_score(ranks[:, up], max_rank) if up else np.zeros(ranks.shape[0])
        if down:
            score = score - w_neg * _u_score(ranks[:, down], max_rank)
        if clip:
            score = np.maximum(score, 0.0)
        out[:, j] = score
    return out


def ucell_scores(
    adata: ad.AnnData,
    signatures: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    *,
    max_rank: int = ScoringSettings().max_rank,
    w_neg: float = 1.0,
    counts: store.CountSource | None = None,
    layer: str | None = "counts",
    clip: bool = False,
    chunk_size: int = 2000,
    mask: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per-cell signed UCell scores.

    For each cell, genes are ranked by expression (highest = 1, ties averaged); ranks above
    ``max_rank`` are set to ``max_rank + 1``. A set's score is the normalised Mann-Whitney U
    statistic ``1 - (sum(ranks) - n(n+1)/2) / (n * max_rank)`` over its ``n`` genes found in
    the data (UCell). A signed set scores ``U(up) - w_neg * U(down)``. Ranks inside a cell do
    not change under per-cell scaling, so the score is the same on raw counts and on
    log1p(CP10k), and robust to library size. Ranking is done on the sparse matrix, chunk by
    chunk: only non-zero entries are sorted; zeros tie at the bottom.

    Parameters
    ----------
    adata
        AnnData with gene symbols as ``var_names``.
    signatures
        Mapping ``name -> {"up": [...], "down": [...]}`` (or ``name -> [genes]``), or a list
        of signature dicts with a ``name`` (as returned by :func:`load_signatures`).
    max_rank
        UCell ``maxRank``: genes ranked below it count as absent (default: config
        ``scoring.max_rank``, 1500 as UCell).
    w_neg
        Weight of the ``down`` score (UCell ``w_neg``, default 1).
    counts
        The matrix to rank (:class:`~sepsis_sc.store.CountSource`, e.g. the workflow's
        ``store.FileCounts.matching(path, layer, adata)``: ``adata`` then needs only obs and
        var); None: ``adata``'s ``layer``. The scores are the same: each cell is ranked on
        its own.
    layer
        Raw-count layer to rank when ``counts`` is None (default ``"counts"``; when absent,
        an integer-valued ``X`` is used). ``None`` ranks ``adata.X`` whatever it holds. Must
        be non-negative.
    clip
        If True, clip signed scores at 0 as UCell does. Default False keeps the signed
        score (range ``[-w_neg, 1]``): clipping piles cells at 0 and discards exactly the
        loss of ``down`` genes that defines states such as HLA-DR-low monocytes.
    chunk_size
        Cells ranked at a time (memory ~ 24 bytes x non-zeros of a chunk).
    mask
        Optional boolean vector over cells; other cells get NaN and are not ranked.

    Returns
    -------
    pandas.DataFrame
        Cells x signatures (index ``adata.obs_names``). Genes absent from ``var_names`` are
        dropped from a set; a set with no genes present scores NaN. Nothing is written to
        ``adata``.
    """
    max_rank = _ucell_params(adata, max_rank, chunk_size)
    sigs = signature_list(signatures)
    query_idx, parts = _signature_columns(sigs, adata.var_names)
    cells = np.arange(adata.n_obs) if mask is None else np.flatnonzero(np.asarray(mask, bool))
    out = np.full((adata.n_obs, len(sigs)), np.nan)
    if query_idx.size and cells.size:
        source = store.count_source(adata, counts, layer, check=False)
        for idx, block in _ranked_blocks(source, cells, chunk_size):
            ranks = _chunk_ranks(block, query_idx, max_rank)
            out[idx] = _signed_scores(ranks, sigs, parts, max_rank, w_neg, clip)
    return pd.DataFrame(out, index=adata.obs_names, columns=[s["name"] for s in sigs])


def _ranked_blocks(
    source: store.CountSource, cells: np.ndarray, chunk_size: int
) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
    """``(cell positions, CSR rows)`` blocks of at most ``chunk_size`` of the given cells
    (ascending positions), in one pass over ``source``'s row chunks."""
    wanted = np.zeros(source.shape[0], bool)
    wanted[cells] = True
    for start, stop, chunk in source.chunks(rows=wanted):
        idx = cells[(cells >= start) & (cells < stop)]
        for lo in range(0, idx.size, chunk_size):
            yield idx[lo : lo + chunk_size], chunk[lo : lo + chunk_size]
