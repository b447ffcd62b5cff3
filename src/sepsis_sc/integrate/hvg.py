"""Highly variable genes: scanpy's ``seurat_v3`` ranking computed from a count source.

:func:`select_hvgs` reads the raw counts through a :class:`sepsis_sc.store.CountSource`
(in memory, or streamed from the ``.h5ad`` in row chunks at cohort scale) in two passes of
per-batch sums, and gives scanpy's genes, ranks, batch counts and normalised variances to
the last bit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numba
import numpy as np
import pandas as pd

from sepsis_sc import store
from sepsis_sc.config import IntegrationSettings
from sepsis_sc.data import check_counts
from sepsis_sc.integrate.batches import one_level_batch, require_obs
from sepsis_sc.store import CountSource

logger = logging.getLogger(__name__)

__all__ = ["FLAG_COLUMNS", "select_hvgs"]

#: ``var`` columns whose genes may not be HVGs by default (mitochondrial, ribosomal,
#: haemoglobin)
FLAG_COLUMNS = ("mt", "ribo", "hb")

#: stored values checked to be counts (evenly spaced over each chunk)
_COUNT_CHECK_VALUES = 200_000


def select_hvgs(
    adata: ad.AnnData,
    settings: IntegrationSettings | None = None,
    *,
    counts: CountSource | None = None,
    layer: str | None = "counts",
    exclude_flags: Sequence[str] = FLAG_COLUMNS,
    span: float = 0.3,
    chunk_rows: int = store.DEFAULT_CHUNK_ROWS,
    **overrides: Any,
) -> None:
    """Select highly variable genes across batches (scanpy's ``seurat_v3`` flavor).

    Genes are ranked by the variance of their standardised raw counts (Stuart et al. 2019)
    within each batch, and ranked across batches by the number of batches in which they are
    variable, then by median rank. Genes flagged in ``var[flag]`` for each ``flag`` in
    ``exclude_flags`` (mitochondrial, ribosomal, haemoglobin) are excluded before ranking:
    they reflect cell stress, size and red-cell contamination more than cell identity.

    The counts are read through a count source in row chunks and never held whole: memory
    is one chunk plus a few (batches x genes) float64 accumulators, not the ~9 GB of a
    million-cell matrix (plus the per-batch copies scanpy makes). It re-implements scanpy's
    ``seurat_v3`` HVGs (``_highly_variable_genes_seurat_v3``, scanpy 1.11.5) in two passes
    over the chunks, per batch of ``obs[batch_key]``:

    1. per-gene sums and sums of squares, hence mean and variance (ddof=1); a LOESS fit
       (``skmisc``, degree 2, ``span``) of log10 variance on log10 mean over the genes with
       variance > 0 gives each gene's expected standard deviation ``reg_std`` and clip value
       ``reg_std * sqrt(n_cells) + mean``;
    2. per-gene sums and sums of squares of the counts clipped at that value, hence the
       variance of the standardised counts (``variances_norm``).

    Genes are then ranked within each batch and combined across batches (number of batches
    where a gene is in the top ``n_hvg``, then median rank) exactly as scanpy does. The
    sums are added in the order scanpy adds them (cells in file order), so the results are
    the same to the last bit, not only to rounding.

    Parameters
    ----------
    adata
        Merged AnnData: ``obs[batch_key]`` and the ``var`` flag columns are read from it, the
        results written to it. With ``counts`` it may hold no matrix
        (``sepsis_sc.store.read(path)``).
    settings
        :class:`~sepsis_sc.config.IntegrationSettings`; ``n_hvg`` (number of HVGs, clamped
        to the number of eligible genes) and ``batch_key`` (``obs`` column: HVGs are chosen
        per batch and combined; ``None`` for no batches) are used. ``None``: the defaults.
    counts
        The raw counts (e.g. ``store.FileCounts.matching(path, "counts", adata)``);
        ``None``: ``adata.layers[layer]`` in memory (:func:`sepsis_sc.store.count_source`).
    layer
        Layer with raw counts when ``counts`` is not given.
    exclude_flags
        Boolean ``var`` columns whose genes may not be HVGs (columns absent are skipped).
    span
        LOESS span of the ``seurat_v3`` mean-variance fit.
    chunk_rows
        Cells per chunk read.
    **overrides
        Fields of ``settings`` to change (``n_hvg=``, ``batch_key=``).

    Returns
    -------
    None. Writes ``var["highly_variable"]`` (bool), ``var["highly_variable_rank"]``,
    ``var["highly_variable_nbatches"]`` (with a batch key) and ``var["variances_norm"]``
    (NaN for excluded genes), and ``uns["hvg"]`` (settings used).

    Raises
    ------
    ValueError
        The counts are not raw counts (non-integer, negative or non-finite values, checked
        on an evenly spaced sample of each chunk), the source does not hold ``adata``'s cells
        and genes, or a batch's LOESS fit fails.
    KeyError
        No raw counts (no ``layers[layer]``, no file key), or ``obs`` has no ``batch_key``.
    """
    settings = (settings or IntegrationSettings()).with_overrides(overrides)
    plan = _hvg_plan(adata, settings.n_hvg, settings.batch_key, exclude_flags)
    src = store.count_source(adata, counts, layer, check=False)
    codes, n_cells = _hvg_batch_codes(adata, plan.batch_key)
    n_batches, keep = len(n_cells), plan.keep
    sums, sq_sums = _batch_sums(src, codes, n_batches, chunk_rows)
    mean, reg_std, clip = [], [], np.full((n_batches, adata.n_vars), np.inf)
    for b, n in enumerate(n_cells):
        m, s, clip[b, keep] = _seurat_v3_loess(
            sums[b, keep], sq_sums[b, keep], int(n), span, batch_key=plan.batch_key
        )
        mean.append(m)
        reg_std.append(s)
    sums, sq_sums = _batch_sums(src, codes, n_batches, chunk_rows, clip=clip)
    norm_gene_vars = np.concatenate(
        [
            _seurat_v3_norm_var(mean[b], reg_std[b], sums[b, keep], sq_sums[b, keep], int(n))
            for b, n in enumerate(n_cells)
        ]
    )
    df = _seurat_v3_table(norm_gene_vars, adata.var_names[keep], plan.n, plan.batch_key)
    how = f", streamed from {os.fspath(src.path)}" if isinstance(src, store.FileCounts) else ""
    _record_hvgs(adata, df, plan, flavor="seurat_v3", how=how)


@dataclass(frozen=True)
class _HvgPlan:
    """What :func:`select_hvgs` decides before ranking."""

    batch_key: str | None  # None with one batch level
    one_batch: dict  # uns["hvg"]'s one-batch entries (empty with batches)
    excluded: np.ndarray  # genes flagged by exclude_flags
    used_flags: list[str]
    n: int  # number of HVGs: n_hvg clamped to the eligible genes

    @property
    def keep(self) -> np.ndarray:
        return ~self.excluded


def _hvg_plan(
    adata: ad.AnnData, n_top_genes: int, batch_key: str | None, exclude_flags: Sequence[str]
) -> _HvgPlan:
    """Check ``n_top_genes``, resolve the batch key and the excluded genes."""
    if n_top_genes < 2:
        raise ValueError(f"n_hvg must be >= 2, got {n_top_genes}")
    batch_key, one_batch = _hvg_batch_key(adata, batch_key)
    excluded, used_flags = _flagged_genes(adata, exclude_flags)
    n_eligible = int((~excluded).sum())
    n = min(n_top_genes, n_eligible)
    if n < n_top_genes:
        logger.warning("only %d eligible genes; selecting all of them as HVGs", n_eligible)
    return _HvgPlan(batch_key, one_batch, excluded, used_flags, n)


def _record_hvgs(
    adata: ad.AnnData, df: pd.DataFrame, plan: _HvgPlan, *, flavor: str, how: str = ""
) -> None:
    """Write the ``var`` columns of ``df`` (eligible genes) and ``uns["hvg"]``, and log."""
    hv = _write_hvg_columns(adata, df, plan.keep)
    adata.uns["hvg"] = {
        "flavor": flavor,
        "n_top_genes": int(hv.sum()),
        "batch_key": plan.batch_key,
        "excluded_flags": plan.used_flags,
        "n_excluded": int(plan.excluded.sum()),
        **plan.one_batch,
    }
    logger.info(
        "selected %d HVGs (%s%s, batch_key=%s; %d genes excluded by flags %s)",
        hv.sum(),
        flavor,
        how,
        plan.batch_key,
        plan.excluded.sum(),
        plan.used_flags,
    )


def _hvg_batch_key(adata: ad.AnnData, batch_key: str | None) -> tuple[str | None, dict]:
    """The batch key for HVG selection and ``uns["hvg"]``'s one-batch entries.

    A batch key with one level gives ``None`` (HVGs over all cells) and
    ``batch_key_requested``, ``n_batches`` and a ``note``.
    """
    if batch_key is None:
        return None, {}
    require_obs(adata, [batch_key], "batch key for HVG selection")
    return one_level_batch(
        adata,
        batch_key,
        "HVGs chosen over all cells, without batches",
        "batch key %r has one level (%r): HVGs chosen over all cells without a "
        "batch key (seurat_v3 with one batch ranks the same genes)",
    )


def _flagged_genes(adata: ad.AnnData, flags: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Genes flagged in any of the ``var`` columns ``flags`` (absent columns skipped), and
    the columns used."""
    excluded = np.zeros(adata.n_vars, dtype=bool)
    used_flags = []
    for flag in flags:
        if flag in adata.var:
            excluded |= adata.var[flag].fillna(False).to_numpy(dtype=bool)
            used_flags.append(flag)
    return excluded, used_flags


def _hvg_failure(flavor: str, batch_key: str | None, err: Exception) -> ValueError:
    """The error raised when the per-batch LOESS fit fails."""
    return ValueError(
        f"HVG selection ({flavor}, batch_key={batch_key!r}) failed: {err}. A batch with very "
        "few cells can break the per-batch LOESS fit; merge small batches, raise `span`, or "
        "use a coarser batch_key."
    )


def _write_hvg_columns(adata: ad.AnnData, df: pd.DataFrame, keep: np.ndarray) -> np.ndarray:
    """``var["highly_variable"]`` and the rank/nbatches/variance columns of ``df`` (NaN
    for excluded genes); returns the HVG mask."""
    hv = np.zeros(adata.n_vars, dtype=bool)
    hv[keep] = df["highly_variable"].to_numpy(dtype=bool)
    adata.var["highly_variable"] = hv
    for col in ("highly_variable_rank", "highly_variable_nbatches", "variances_norm"):
        if col in df:
            full = np.full(adata.n_vars, np.nan)
            full[keep] = df[col].to_numpy(dtype=float)
            adata.var[col] = full
    return hv


def _hvg_batch_codes(adata: ad.AnnData, batch_key: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's batch (0.. in scanpy's order, ``np.unique`` of ``obs[batch_key]``) and the
    cells per batch; one batch without a key."""
    if batch_key is None:
        return np.zeros(adata.n_obs, dtype=np.intp), np.array([adata.n_obs])
    _, codes = np.unique(adata.obs[batch_key].to_numpy(), return_inverse=True)
    codes = codes.astype(np.intp).ravel()
    return codes, np.bincount(codes)


def _batch_sums(
    src: CountSource,
    codes: np.ndarray,
    n_batches: int,
    chunk_rows: int,
    *,
    clip: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch per-gene sums and sums of squares of the counts, read in row chunks: of
    the values as stored (each chunk checked to be counts), or, with ``clip`` ((batches x
    genes)), of each value clipped at its batch's and gene's clip value."""
    sums = sq_sums = None
    for start, stop, chunk in src.chunks(chunk_rows):
        if sums is None:
            sums = np.zeros((n_batches, chunk.shape[1]))
            sq_sums = np.zeros_like(sums)
        args = (chunk.indptr, chunk.indices, chunk.data, codes[start:stop], sums, sq_sums)
        if clip is None:
            check_counts(chunk, source=src.where, max_values=_COUNT_CHECK_VALUES)
            _add_batch_sums(*args)
        else:
            _add_clipped_batch_sums(*args, clip)
    if sums is None:  # no cells
        raise ValueError(f"{src.where} has no cells; HVGs need counts")
    return sums, sq_sums


@numba.njit(cache=True)
def _add_batch_sums(indptr, indices, data, codes, sums, sq_sums):  # pragma: no cover - numba
    # as scanpy's sparse_mean_var_minor_axis: the square in the data's dtype
    for r in range(indptr.shape[0] - 1):
        b = codes[r]
        for j in range(indptr[r], indptr[r + 1]):
            value = data[j]
            sums[b, indices[j]] += value
            sq_sums[b, indices[j]] += value * value


@numba.njit(cache=True)
def _add_clipped_batch_sums(
    indptr, indices, data, codes, sums, sq_sums, clip
):  # pragma: no cover - numba
    # as scanpy's _sum_and_sum_squares_clipped, one batch's cells added in file order
    for r in range(indptr.shape[0] - 1):
        b = codes[r]
        for j in range(indptr[r], indptr[r + 1]):
            idx = indices[j]
            element = min(np.float64(data[j]), clip[b, idx])
            sq_sums[b, idx] += element**2
            sums[b, idx] += element


def _seurat_v3_loess(
    sums: np.ndarray, sq_sums: np.ndarray, n_obs: int, span: float, *, batch_key: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One batch's gene means, LOESS standard deviations and clip values from its sums, as
    scanpy computes them (``_get_mean_var``, then the ``seurat_v3`` fit)."""
    from skmisc.loess import loess

    mean = sums / n_obs
    var = sq_sums / n_obs - mean**2
    if n_obs != 1:
        var *= n_obs / (n_obs - 1)
    not_const = var > 0
    estimat_var = np.zeros(mean.shape[0], dtype=np.float64)
    y = np.log10(var[not_const])
    x = np.log10(mean[not_const])
    try:
        model = loess(x, y, span=span, degree=2)
        model.fit()
    except ValueError as err:  # skmisc LOESS fails on batches with too few cells/genes
        raise _hvg_failure("seurat_v3", batch_key, err) from err
    estimat_var[not_const] = model.outputs.fitted_values
    reg_std = np.sqrt(10**estimat_var)
    clip_val = reg_std * np.sqrt(n_obs) + mean
    return mean, reg_std, clip_val


def _seurat_v3_norm_var(
    mean: np.ndarray,
    reg_std: np.ndarray,
    clipped_sums: np.ndarray,
    clipped_sq_sums: np.ndarray,
    n_obs: int,
) -> np.ndarray:
    """One batch's variance of the standardised, clipped counts (a (1, genes) row)."""
    norm_gene_var = (1 / ((n_obs - 1) * np.square(reg_std))) * (
        (n_obs * np.square(mean)) + clipped_sq_sums - 2 * clipped_sums * mean
    )
    return norm_gene_var.reshape(1, -1)


def _seurat_v3_table(
    norm_gene_vars: np.ndarray, var_names: pd.Index, n_top_genes: int, batch_key: str | None
) -> pd.DataFrame:
    """scanpy's ``seurat_v3`` ranking of the (batches x genes) normalised variances: ranks
    per batch, number of batches where a gene ranks in the top ``n_top_genes``, median rank
    (NaN outside the top in every batch), then the top genes by median rank, more batches
    first on ties. Columns as scanpy's ``inplace=False`` table (no nbatches without a key)."""
    # argsort twice gives ranks, small rank means most variable
    ranked = np.argsort(np.argsort(-norm_gene_vars, axis=1), axis=1).astype(np.float32)
    nbatches = np.sum((ranked < n_top_genes).astype(int), axis=0)
    ranked[ranked >= n_top_genes] = np.nan
    median_ranked = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)
    df = pd.DataFrame(index=var_names)
    df["highly_variable_nbatches"] = nbatches
    df["highly_variable_rank"] = median_ranked
    df["variances_norm"] = np.mean(norm_gene_vars, axis=0)
    sort_cols = ["highly_variable_rank", "highly_variable_nbatches"]
    sorted_index = (
        df[sort_cols].sort_values(sort_cols, ascending=[True, False], na_position="last").index
    )
    df["highly_variable"] = False
    df.loc[sorted_index[: int(n_top_genes)], "highly_variable"] = True
    if batch_key is None:
        df = df.drop(["highly_variable_nbatches"], axis=1)
    return df
