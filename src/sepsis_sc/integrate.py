"""Integration: highly variable genes, scVI / Harmony / PCA latent spaces and scib-style metrics.

The stage reads the merged, QC-filtered AnnData (``layers["counts"]`` raw UMI counts,
``X`` log1p CP10k, ``obs`` ``sample_id``/``batch``/``donor``/``condition``) and adds

- ``var["highly_variable"]`` (plus ``highly_variable_rank``, ``highly_variable_nbatches``,
  ``variances_norm``) and ``uns["hvg"]`` (:func:`select_hvgs`; :func:`select_hvgs_streamed`
  gives the same from the ``.h5ad`` with the counts read in row chunks, for cohort scale);
- ``obsm["X_pca"]`` (:func:`run_pca`), ``obsm["X_harmony"]`` (:func:`run_harmony`),
  ``obsm["X_scVI"]`` (:func:`run_scvi`);
- ``uns["integration"]``: method, device (``cpu``/``cuda``), epochs, seed, ... of the
  embedding used downstream (the last one computed; :func:`integrate` is the dispatcher).

:func:`integration_metrics` scores embeddings with the definitions of scib
(Luecken et al. 2022, Nat Methods 19:41) re-implemented here with numpy/scikit-learn, so
no jax-based ``scib-metrics`` is needed. Each metric is scaled to [0, 1], higher = better.

One batch level (one sequencing run; ``batch_key: sample_id`` with one sample) is decided from
``obs[batch_key]`` in each function and logged: HVGs are chosen without a batch key, scVI is
trained without a batch covariate, Harmony is skipped as a comparison (or, downstream, writes
the PCA embedding with a warning), and the batch-mixing metrics are skipped with a ``note``.
Records say ``batch_corrected: False`` and why. Two or more levels: nothing changes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Literal

# torch before anything that can start numba's OpenMP pool (scanpy's HVG, neighbours, UMAP):
# otherwise torch binds to the system libgomp that numba loaded instead of its own, and scVI
# trains 2-2.5x slower on CPU (measured: 4.2 vs 1.9 s per epoch, 8,000 cells, 2 threads).
try:
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - torch is a dependency; scVI raises its own error
    pass

import anndata as ad
import h5py
import numba
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from sepsis_sc import store
from sepsis_sc.config import EMBEDDING_KEYS
from sepsis_sc.data import check_counts, require_layer

logger = logging.getLogger(__name__)

__all__ = [
    "select_hvgs",
    "select_hvgs_streamed",
    "resolve_accelerator",
    "default_max_epochs",
    "ScviParams",
    "run_scvi",
    "run_pca",
    "run_harmony",
    "integrate",
    "integration_metrics",
    "lisi",
    "EMBEDDING_KEYS",
]

#: obsm key written by each integration method.

_FLAG_COLUMNS = ("mt", "ribo", "hb")


# --------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------
def _require_obs(adata: ad.AnnData, keys: Sequence[str], what: str) -> None:
    for key in keys:
        if key not in adata.obs:
            raise KeyError(
                f"obs column {key!r} ({what}) not found; available columns: "
                f"{', '.join(map(str, adata.obs.columns))}. Set the config key to an existing column."
            )
        if adata.obs[key].isna().any():
            raise ValueError(
                f"obs column {key!r} ({what}) has {int(adata.obs[key].isna().sum())} missing "
                "values; fill them (e.g. 'unknown') or drop those cells."
            )


def _require_hvgs(adata: ad.AnnData) -> np.ndarray:
    if "highly_variable" not in adata.var:
        raise KeyError(
            "var['highly_variable'] is missing; run sepsis_sc.integrate.select_hvgs(adata) first."
        )
    mask = adata.var["highly_variable"].to_numpy(dtype=bool)
    if mask.sum() < 2:
        raise ValueError(f"only {int(mask.sum())} highly variable genes flagged; need at least 2.")
    return mask


#: Note written where a batch step or metric is skipped because the batch key has one level.
ONE_BATCH_NOTE = "skipped: one batch level"


def _batch_levels(adata: ad.AnnData, keys: Sequence[str]) -> list[str]:
    """Distinct values of ``obs[keys]`` among the cells (combinations for several keys)."""
    obs = adata.obs[list(keys)].astype(str)
    values = obs.iloc[:, 0] if len(keys) == 1 else obs.agg(" | ".join, axis=1)
    return sorted(pd.unique(values.to_numpy()))


def _one_batch_note(
    keys: Sequence[str], levels: Sequence[str], what: str, prefix: str = ONE_BATCH_NOTE
) -> str:
    cols = ", ".join(f"obs[{k!r}]" for k in keys)
    level = repr(levels[0]) if levels else "none"
    return f"{prefix} ({level} in {cols}): {what}"


def _one_level_batch(
    adata: ad.AnnData, batch_key: str, what: str, log: str, extra: dict | None = None
) -> tuple[str | None, dict]:
    """``(batch_key, {})`` when ``obs[batch_key]`` has two or more levels; else ``None`` and
    the record's one-batch entries.

    The entries are ``batch_key_requested``, ``n_batches``, then ``extra``, then a ``note``
    saying ``what`` is done instead; ``log`` (formatted with the key and its one level) is
    logged.
    """
    levels = _batch_levels(adata, [batch_key])
    if len(levels) >= 2:
        return batch_key, {}
    one_batch = {
        "batch_key_requested": batch_key,
        "n_batches": len(levels),
        **(extra or {}),
        "note": _one_batch_note([batch_key], levels, what, prefix="one batch level"),
    }
    logger.info(log, batch_key, levels[0] if levels else None)
    return None, one_batch


# --------------------------------------------------------------------------------------
# HVGs
# --------------------------------------------------------------------------------------
def select_hvgs(
    adata: ad.AnnData,
    *,
    n_top_genes: int = 2000,
    batch_key: str | None = "batch",
    flavor: Literal["seurat_v3", "seurat_v3_paper", "seurat", "cell_ranger"] = "seurat_v3",
    layer: str = "counts",
    exclude_flags: Sequence[str] = _FLAG_COLUMNS,
    span: float = 0.3,
) -> None:
    """Select highly variable genes across batches.

    With ``flavor="seurat_v3"`` (default) genes are ranked by the variance of their
    standardised raw counts (Stuart et al. 2019) within each batch, and ranked across
    batches by the number of batches in which they are variable, then by median rank.
    Genes flagged in ``var[flag]`` for each ``flag`` in ``exclude_flags`` (mitochondrial,
    ribosomal, haemoglobin) are excluded before ranking: they reflect cell stress, size and
    red-cell contamination more than cell identity.

    Parameters
    ----------
    adata
        Merged AnnData with raw counts in ``layers[layer]``.
    n_top_genes
        Number of HVGs (clamped to the number of eligible genes).
    batch_key
        ``obs`` column: HVGs are chosen per batch and combined; ``None`` for no batches.
    flavor
        Scanpy HVG flavor; the ``seurat_v3`` flavors use ``layers[layer]`` (raw counts), the
        others use the log-normalised ``X``.
    layer
        Layer with raw counts.
    exclude_flags
        Boolean ``var`` columns whose genes may not be HVGs (columns absent are skipped).
    span
        LOESS span of the ``seurat_v3`` mean-variance fit.

    Returns
    -------
    None. Writes ``var["highly_variable"]`` (bool), ``var["highly_variable_rank"]``,
    ``var["highly_variable_nbatches"]`` and ``var["variances_norm"]`` where the flavor
    gives them (NaN for excluded genes), and ``uns["hvg"]`` (settings used).
    """
    plan = _hvg_plan(adata, n_top_genes, batch_key, exclude_flags)
    counts_flavor = flavor.startswith("seurat_v3")
    if counts_flavor:
        why = "seurat_v3 HVGs model raw UMI counts"
        counts = require_layer(adata, layer, why=why)
        check_counts(counts, source=f"adata.layers[{layer!r}]", max_values=_COUNT_CHECK_VALUES)
    sub = adata[:, plan.keep] if plan.excluded.any() else adata
    df = _scanpy_hvgs(
        sub,
        plan.n,
        batch_key=plan.batch_key,
        flavor=flavor,
        layer=layer if counts_flavor else None,
        span=span,
    )
    _record_hvgs(adata, df, plan, flavor=flavor)


#: stored values checked to be counts (evenly spaced over the matrix, or over each chunk)
_COUNT_CHECK_VALUES = 200_000


@dataclass(frozen=True)
class _HvgPlan:
    """What :func:`select_hvgs` and :func:`select_hvgs_streamed` decide before ranking."""

    batch_key: str | None  # None with one batch level
    one_batch: dict  # uns["hvg"]'s one-batch entries (empty with batches)
    excluded: np.ndarray  # genes flagged by exclude_flags
    used_flags: list[str]
    n: int  # number of HVGs: n_top_genes clamped to the eligible genes

    @property
    def keep(self) -> np.ndarray:
        return ~self.excluded


def _hvg_plan(
    adata: ad.AnnData, n_top_genes: int, batch_key: str | None, exclude_flags: Sequence[str]
) -> _HvgPlan:
    """Check ``n_top_genes``, resolve the batch key and the excluded genes."""
    if n_top_genes < 2:
        raise ValueError(f"n_top_genes must be >= 2, got {n_top_genes}")
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
    _require_obs(adata, [batch_key], "batch key for HVG selection")
    return _one_level_batch(
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


def _scanpy_hvgs(
    sub: ad.AnnData,
    n: int,
    *,
    batch_key: str | None,
    flavor: str,
    layer: str | None,
    span: float,
) -> pd.DataFrame:
    """:func:`scanpy.pp.highly_variable_genes` on ``sub`` (index: its genes), with a clear
    error when the per-batch LOESS fit fails."""
    try:
        df = sc.pp.highly_variable_genes(
            sub,
            n_top_genes=n,
            batch_key=batch_key,
            flavor=flavor,
            layer=layer,
            span=span,
            inplace=False,
        )
    except ValueError as err:  # skmisc LOESS fails on batches with too few cells/genes
        raise _hvg_failure(flavor, batch_key, err) from err
    df.index = sub.var_names
    return df


def _hvg_failure(flavor: str, batch_key: str | None, err: Exception) -> ValueError:
    """The error raised when the per-batch LOESS fit fails."""
    return ValueError(
        f"HVG selection ({flavor}, batch_key={batch_key!r}) failed: {err}. A batch with very "
        "few cells can break the per-batch LOESS fit; merge small batches, raise `span`, or "
        "use a coarser batch_key."
    )


def _write_hvg_columns(adata: ad.AnnData, df: pd.DataFrame, keep: np.ndarray) -> np.ndarray:
    """``var["highly_variable"]`` and the rank/nbatches/variance columns scanpy gave (NaN
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


# --------------------------------------------------------------------------------------
# HVGs streamed from the .h5ad (cohort scale)
# --------------------------------------------------------------------------------------
def select_hvgs_streamed(
    adata: ad.AnnData,
    path: str | os.PathLike[str],
    *,
    n_top_genes: int = 2000,
    batch_key: str | None = "batch",
    layer: str = "counts",
    exclude_flags: Sequence[str] = _FLAG_COLUMNS,
    span: float = 0.3,
    chunk_rows: int = store.DEFAULT_CHUNK_ROWS,
) -> None:
    """:func:`select_hvgs` (``flavor="seurat_v3"``) with the counts streamed from the file.

    The same genes, ranks, batch counts and normalised variances as :func:`select_hvgs` on
    the whole object, but the count matrix is read from ``path`` in row chunks and never
    held whole: memory is one chunk plus a few (batches x genes) float64 accumulators, not
    the ~9 GB of a million-cell matrix (plus the per-batch copies scanpy makes).

    It re-implements scanpy's ``seurat_v3`` HVGs (``_highly_variable_genes_seurat_v3``,
    scanpy 1.11.5) in two passes over the chunks, per batch of ``obs[batch_key]``:

    1. per-gene sums and sums of squares, hence mean and variance (ddof=1); a LOESS fit
       (``skmisc``, degree 2, ``span``) of log10 variance on log10 mean over the genes with
       variance > 0 gives each gene's expected standard deviation ``reg_std`` and clip value
       ``reg_std * sqrt(n_cells) + mean``;
    2. per-gene sums and sums of squares of the counts clipped at that value, hence the
       variance of the standardised counts (``variances_norm``).

    Genes are then ranked within each batch and combined across batches (number of batches
    where a gene is in the top ``n_top_genes``, then median rank) exactly as scanpy does. The
    sums are added in the order scanpy adds them (cells in file order), so the results are
    the same to the last bit, not only to rounding. Genes flagged by ``exclude_flags`` are
    left out before the fit, as in :func:`select_hvgs`. Only ``flavor="seurat_v3"`` (the
    pipeline's) is streamed.

    Parameters
    ----------
    adata
        The file's cells and genes without matrices (``sepsis_sc.store.read(path)``):
        ``obs[batch_key]`` and the ``var`` flag columns are read from it, the results
        written to it.
    path
        The ``.h5ad`` whose ``layers[layer]`` holds the raw counts (CSR; external links are
        followed).
    n_top_genes, batch_key, layer, exclude_flags, span
        As in :func:`select_hvgs`.
    chunk_rows
        Cells per chunk read.

    Returns
    -------
    None. Writes what :func:`select_hvgs` writes: ``var["highly_variable"]``,
    ``var["highly_variable_rank"]``, ``var["highly_variable_nbatches"]`` (with a batch key),
    ``var["variances_norm"]`` (NaN for excluded genes) and ``uns["hvg"]``.

    Raises
    ------
    ValueError
        The layer is not raw counts (non-integer, negative or non-finite values, checked on
        an evenly spaced sample of each chunk), its shape is not ``adata``'s, or a batch's
        LOESS fit fails (the message of :func:`select_hvgs`).
    KeyError
        The file has no ``layers[layer]``, or ``obs`` has no ``batch_key``.
    """
    plan = _hvg_plan(adata, n_top_genes, batch_key, exclude_flags)
    key = f"layers/{layer}"
    _check_stream_shape(path, key, adata)
    codes, n_cells = _hvg_batch_codes(adata, plan.batch_key)
    n_batches, keep = len(n_cells), plan.keep
    sums, sq_sums = _streamed_batch_sums(path, key, codes, n_batches, chunk_rows)
    mean, reg_std, clip = [], [], np.full((n_batches, adata.n_vars), np.inf)
    for b, n in enumerate(n_cells):
        m, s, clip[b, keep] = _seurat_v3_loess(
            sums[b, keep], sq_sums[b, keep], int(n), span, batch_key=plan.batch_key
        )
        mean.append(m)
        reg_std.append(s)
    sums, sq_sums = _streamed_batch_sums(path, key, codes, n_batches, chunk_rows, clip=clip)
    norm_gene_vars = np.concatenate(
        [
            _seurat_v3_norm_var(mean[b], reg_std[b], sums[b, keep], sq_sums[b, keep], int(n))
            for b, n in enumerate(n_cells)
        ]
    )
    df = _seurat_v3_table(norm_gene_vars, adata.var_names[keep], plan.n, plan.batch_key)
    _record_hvgs(adata, df, plan, flavor="seurat_v3", how=f", streamed from {os.fspath(path)}")


def _check_stream_shape(path: str | os.PathLike[str], key: str, adata: ad.AnnData) -> None:
    """The matrix ``path:key`` (when there: :func:`store.iter_rows` names what is missing)
    has ``adata``'s shape."""
    with h5py.File(path, "r") as f:
        shape = f[key].attrs.get("shape") if key in f else None
    if shape is not None and tuple(int(d) for d in shape) != adata.shape:
        raise ValueError(
            f"{path}:{key} is {shape[0]} cells x {shape[1]} genes but adata is "
            f"{adata.n_obs} x {adata.n_vars}; read adata from the same file "
            "(sepsis_sc.store.read(path))"
        )


def _hvg_batch_codes(adata: ad.AnnData, batch_key: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's batch (0.. in scanpy's order, ``np.unique`` of ``obs[batch_key]``) and the
    cells per batch; one batch without a key."""
    if batch_key is None:
        return np.zeros(adata.n_obs, dtype=np.intp), np.array([adata.n_obs])
    _, codes = np.unique(adata.obs[batch_key].to_numpy(), return_inverse=True)
    codes = codes.astype(np.intp).ravel()
    return codes, np.bincount(codes)


def _streamed_batch_sums(
    path: str | os.PathLike[str],
    key: str,
    codes: np.ndarray,
    n_batches: int,
    chunk_rows: int,
    *,
    clip: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch per-gene sums and sums of squares of ``path:key``, streamed in row chunks:
    of the values as stored (each chunk checked to be counts), or, with ``clip`` ((batches x
    genes)), of each value clipped at its batch's and gene's clip value."""
    sums = sq_sums = None
    for start, stop, chunk in store.iter_rows(path, key, chunk_rows=chunk_rows):
        if sums is None:
            sums = np.zeros((n_batches, chunk.shape[1]))
            sq_sums = np.zeros_like(sums)
        args = (chunk.indptr, chunk.indices, chunk.data, codes[start:stop], sums, sq_sums)
        if clip is None:
            check_counts(chunk, source=f"{path}:{key}", max_values=_COUNT_CHECK_VALUES)
            _add_batch_sums(*args)
        else:
            _add_clipped_batch_sums(*args, clip)
    if sums is None:  # no cells
        raise ValueError(f"{path}:{key} has no cells; HVGs need counts")
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


# --------------------------------------------------------------------------------------
# devices, threads, epochs
# --------------------------------------------------------------------------------------
def resolve_accelerator(accelerator: Literal["auto", "gpu", "cpu"] = "auto") -> str:
    """Resolve the configured accelerator to the device scVI trains on.

    Parameters
    ----------
    accelerator
        ``"auto"`` (CUDA when PyTorch sees a GPU, else CPU), ``"gpu"`` (``"cuda"`` is an
        alias; must be available) or ``"cpu"``.

    Returns
    -------
    ``"cuda"`` or ``"cpu"``.

    Raises
    ------
    RuntimeError
        ``"gpu"`` requested but no CUDA device is visible to PyTorch.
    ValueError
        Unknown value.
    """
    import torch

    acc = str(accelerator).lower()
    if acc not in {"auto", "gpu", "cuda", "cpu"}:
        raise ValueError(
            f"accelerator must be 'auto', 'gpu' or 'cpu', got {accelerator!r} "
            "(config key integration.accelerator)."
        )
    if acc == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if acc in {"gpu", "cuda"} and not available:
        raise RuntimeError(
            f"accelerator={accelerator!r} was requested but PyTorch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). Run on a "
            "GPU node with a CUDA build of torch, or set integration.accelerator to 'auto' or 'cpu'."
        )
    return "cuda" if available else "cpu"


def default_max_epochs(
    n_cells: int,
    *,
    batch_size: int = 256,
    target_updates: int = 10_000,
    min_epochs: int = 10,
    max_epochs: int = 400,
) -> int:
    """Default number of scVI epochs for ``n_cells`` cells.

    scvi-tools uses ``min(400, round(400 * 20000 / n_cells))``: 400 epochs below 20,000 cells
    and ~62,500 minibatch updates (of 128 cells) above. What matters for convergence is the
    number of gradient updates, not of epochs, and the validation ELBO of scVI flattens well
    before 62,500 updates, so on CPU that default mostly buys time. This rule aims at
    ``target_updates`` minibatch updates (10,000 by default, ~6x fewer), within
    ``[min_epochs, max_epochs]``; early stopping on the validation ELBO (see :func:`run_scvi`)
    then ends training once it stops improving, so the cap is an upper bound, not the cost.

    Parameters
    ----------
    n_cells
        Number of cells trained on.
    batch_size
        Minibatch size.
    target_updates
        Gradient updates to aim for.
    min_epochs, max_epochs
        Bounds on the result.

    Returns
    -------
    Number of epochs.
    """
    if n_cells <= 0:
        raise ValueError(f"n_cells must be positive, got {n_cells}")
    epochs = round(target_updates * batch_size / n_cells)
    return int(min(max_epochs, max(min_epochs, epochs)))


@contextmanager
def _torch_threads(threads: int | None):
    """Temporarily set the number of torch intra-op threads."""
    import torch

    previous = torch.get_num_threads()
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS
            threads = os.cpu_count() or 1
        threads = min(threads, previous)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(int(threads))
    try:
        yield int(threads)
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------
# scVI
# --------------------------------------------------------------------------------------
def _epoch_logger(max_epochs: int):
    """Lightning callback that logs the ELBOs about 10 times per training (for rule logs)."""
    import lightning.pytorch as pl

    every = max(1, max_epochs // 10)

    class _EpochLogger(pl.Callback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ARG002
            epoch = trainer.current_epoch + 1
            if epoch % every and epoch != max_epochs:
                return
            m = trainer.callback_metrics
            val = m.get("elbo_validation")
            logger.info(
                "scVI epoch %d/%d: ELBO train %.2f, validation %s (%.1f s)",
                epoch,
                max_epochs,
                float(m.get("elbo_train", float("nan"))),
                f"{float(val):.2f}" if val is not None else "n/a",
                time.perf_counter() - self.t0,
            )

    return _EpochLogger()


def plateau_stopping(
    patience: int = 10,
    min_improvement: float = 2e-3,
    window: int = 10,
    monitor: str = "elbo_validation",
):
    """Early stopping when the smoothed validation ELBO has stopped improving.

    After each validation the loss is averaged over the last ``window`` epochs and compared
    with the same average ``patience`` epochs earlier; training stops once it fell by less
    than ``min_improvement`` of its value (relative; default 0.2 % over 10 epochs).

    scvi-tools' rule (stop after ``patience`` epochs without a new best, any improvement
    counting) follows the noise of the per-epoch validation ELBO: a new best by a hundredth
    restarts the count, so on CPU runs of the same cohort it stopped after 152, 217 and 220
    epochs for three training seeds while the loss had flattened near epoch 140. Averaging
    removes that noise and a relative threshold fits cohorts whose ELBO per cell differs
    with depth and gene panel: the same seeds stop after 118-120 epochs with a validation
    ELBO 2.6-5 units (0.4-0.7 %) from the longest run's best, as good as scvi-tools'
    defaults after 400 epochs (docs/benchmarks.md).

    Returns a Lightning callback for ``model.train(callbacks=[...])`` (scvi-tools'
    ``early_stopping`` off); its ``stopped_epoch`` is 0 when it never stopped training.
    """
    import lightning.pytorch as pl

    if patience < 1 or window < 1:
        raise ValueError(f"patience and window must be >= 1, got {patience}, {window}")

    class _PlateauStopping(pl.Callback):
        def __init__(self) -> None:
            self.history: list[float] = []
            self.stopped_epoch = 0

        def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ARG002
            if trainer.sanity_checking or monitor not in trainer.callback_metrics:
                return
            self.history.append(float(trainer.callback_metrics[monitor]))
            h = np.asarray(self.history)
            if h.size < window + patience:
                return
            now = h[-window:].mean()
            then = h[-window - patience : -patience].mean()
            if (then - now) < min_improvement * abs(now):
                trainer.should_stop = True
                self.stopped_epoch = trainer.current_epoch + 1

    return _PlateauStopping()


@dataclass(frozen=True)
class ScviParams:
    """Model and training settings of :func:`run_scvi`.

    Field defaults are the config schema's where it has the key (section ``integration``;
    a test keeps them equal), else :func:`run_scvi`'s. Build it from the config with
    :meth:`from_config`; change single fields with :func:`dataclasses.replace`. The fields
    are described under :func:`run_scvi`'s parameters of the same names.
    """

    categorical_covariates: tuple[str, ...] = ()
    continuous_covariates: tuple[str, ...] = ()
    n_latent: int = 30
    n_layers: int = 2
    n_hidden: int = 128
    gene_likelihood: Literal["nb", "zinb", "poisson"] = "nb"
    max_epochs: int | None = None
    early_stopping: bool = True
    early_stopping_patience: int = 10
    early_stopping_min_improvement: float = 2e-3
    batch_size: int = 256
    train_size: float = 0.9
    accelerator: Literal["auto", "gpu", "cpu"] = "auto"

    def __post_init__(self) -> None:
        for name in ("categorical_covariates", "continuous_covariates"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    #: keys of the ``integration`` config section that are not scVI settings
    _NOT_PARAMS: ClassVar[frozenset[str]] = frozenset(
        {"method", "compare", "metrics", "batch_key", "n_hvg", "n_pcs"}
        | {"metrics_label_key", "metrics_labels"}
    )

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> ScviParams:
        """Build from the config's ``integration`` section (other methods' keys ignored).

        Raises ``ValueError`` on a key that is neither a field nor another step's key.
        """
        names = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in section.items():
            if key in names:
                kwargs[key] = value
            elif key not in cls._NOT_PARAMS:
                raise ValueError(f"unknown integration config key {key!r}")
        return cls(**kwargs)

    def with_overrides(self, overrides: Mapping[str, Any]) -> ScviParams:
        """A copy with the given fields changed; ``TypeError`` on a name that is no field."""
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"run_scvi got unexpected keyword argument(s) {sorted(unknown)}")
        return replace(self, **overrides) if overrides else self


def run_scvi(
    adata: ad.AnnData,
    params: ScviParams | None = None,
    *,
    batch_key: str | None = "batch",
    seed: int = 0,
    model_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    layer: str = "counts",
    key_added: str = "X_scVI",
    **overrides: Any,
) -> dict[str, Any]:
    """Train scVI (Lopez et al. 2018) on the HVG counts and store its latent space.

    The model sees the raw counts of the HVGs (``var["highly_variable"]``, sparse, never
    densified), with ``batch_key`` as the batch and the covariates as extra conditioning
    variables. A random ``1 - train_size`` of cells is held out; their ELBO is checked each
    epoch and, with ``early_stopping``, training stops after ``early_stopping_patience`` epochs
    without improvement.

    Reproducibility: ``scvi.settings.seed = seed`` seeds Python, NumPy and torch; on CPU with
    the same ``threads`` the same seed gives the same latent space. GPU kernels are not
    bit-reproducible.

    Parameters
    ----------
    adata
        Merged AnnData with raw counts in ``layers[layer]`` and HVGs flagged.
    params
        Model and training settings (:class:`ScviParams`, e.g.
        ``ScviParams.from_config(cfg["integration"])``); ``None``: the defaults. Each of its
        fields (``categorical_covariates`` ... ``accelerator`` below) may also be passed as a
        keyword, which replaces the field.
    batch_key
        ``obs`` column with the batch to correct (``None``: no batch). When it has one level
        (one sequencing run; or ``sample_id`` with one sample) scVI is trained without a batch
        covariate (``batch_key=None``, the same model) and the record says so
        (``batch_corrected: False``, ``batch_key_requested``, ``note``).
    categorical_covariates, continuous_covariates
        Extra ``obs`` columns regressed out (e.g. ``donor``; ``pct_counts_mt``).
    n_latent, n_layers, n_hidden
        Latent dimensions, hidden layers and units per layer.
    gene_likelihood
        ``"nb"`` (default; UMI data show no zero inflation beyond NB), ``"zinb"``, ``"poisson"``.
    max_epochs
        Upper bound on epochs; ``None`` = :func:`default_max_epochs`.
    early_stopping, early_stopping_patience, early_stopping_min_improvement
        Stop when the validation ELBO, averaged over 10 epochs, improved by less than
        ``early_stopping_min_improvement`` of its value over the last
        ``early_stopping_patience`` epochs (:func:`plateau_stopping`).
    batch_size
        Minibatch size. 256 (scvi-tools uses 128): on 2 CPU cores it trains 1.25x more cells
        per second than 128, and with early stopping it reached a better validation ELBO
        than scvi-tools' defaults in a third of their time (``benchmarks/scvi_cpu.py``,
        docs/benchmarks.md). Larger batches were faster per epoch but needed more epochs.
    train_size
        Fraction of cells used for training; the rest gives the validation ELBO.
    accelerator
        ``"auto"``, ``"gpu"`` or ``"cpu"`` (see :func:`resolve_accelerator`).
    seed
        Random seed.
    model_dir
        Folder to save the trained model to (overwritten); ``None``: not saved.
    threads
        torch CPU threads during training (``None``: the CPUs this process may use, at most
        torch's default). Restored afterwards.
    layer
        Layer with raw counts.
    key_added
        ``obsm`` key of the latent space.

    Returns
    -------
    The integration record, also stored in ``uns["integration"]``: ``method``, ``device``,
    ``epochs_trained``, ``max_epochs``, ``early_stopped``, ``seed``, ``batch_key``,
    ``n_hvg``, ``elbo_train_final``, ``elbo_validation_final``, ``seconds``,
    ``seconds_per_epoch``, ``threads`` and the model settings. Writes ``obsm[key_added]``
    (n_obs x n_latent, float32).
    """
    import scvi  # noqa: F401 - imported first, as always (it sets up torch and lightning)

    p = (ScviParams() if params is None else params).with_overrides(overrides)
    counts = require_layer(adata, layer, why="scVI models raw UMI counts")
    check_counts(counts, source=f"adata.layers[{layer!r}]", max_values=200_000)
    hvg = _require_hvgs(adata)
    keys = _scvi_obs_keys(batch_key, p)
    _require_obs(adata, keys, "scVI batch/covariate")
    batch_key, one_batch = _scvi_batch_key(adata, batch_key)
    if not 0 < p.train_size <= 1:
        raise ValueError(f"train_size must be in (0, 1], got {p.train_size}")
    device = resolve_accelerator(p.accelerator)
    sub = _scvi_input(adata, hvg, keys, layer)
    n_train = int(round(sub.n_obs * p.train_size))
    max_epochs = _scvi_max_epochs(p, n_train)
    model, latent, n_threads, seconds = _train_scvi(
        sub,
        p,
        batch_key=batch_key,
        device=device,
        max_epochs=max_epochs,
        n_train=n_train,
        seed=seed,
        threads=threads,
    )
    adata.obsm[key_added] = np.asarray(latent, dtype=np.float32)
    record = _scvi_record(
        adata,
        p,
        model.history,
        key_added=key_added,
        device=device,
        n_threads=n_threads,
        max_epochs=max_epochs,
        seed=seed,
        batch_key=batch_key,
        n_hvg=int(hvg.sum()),
        seconds=seconds,
        one_batch=one_batch,
    )
    if model_dir is not None:
        model.save(str(model_dir), overwrite=True, save_anndata=False)
        record["model_dir"] = str(model_dir)
        logger.info("saved scVI model to %s", model_dir)
    adata.uns["integration"] = record
    _log_scvi_done(record, seconds)
    return record


def _scvi_obs_keys(batch_key: str | None, p: ScviParams) -> list[str]:
    """``obs`` columns the model sees: the batch (first) and the covariates."""
    keys = list(p.categorical_covariates) + list(p.continuous_covariates)
    if batch_key is not None:
        keys = [batch_key] + keys
    return keys


def _scvi_batch_key(adata: ad.AnnData, batch_key: str | None) -> tuple[str | None, dict]:
    """The batch key scVI is set up with and the record's one-batch entries.

    A batch key with one level gives ``None`` (the same model without a batch covariate)
    and ``batch_key_requested``, ``n_batches``, ``batch_corrected: False`` and a ``note``.
    """
    if batch_key is None:
        return None, {}
    return _one_level_batch(
        adata,
        batch_key,
        "no batch correction; scVI trained without a batch covariate",
        "batch key %r has one level (%r): training scVI without a batch covariate "
        "(setup_anndata batch_key=None); no batch correction is done",
        {"batch_corrected": False},
    )


def _scvi_input(adata: ad.AnnData, hvg: np.ndarray, keys: list[str], layer: str) -> ad.AnnData:
    """The model's AnnData: raw HVG counts (CSR float32, never densified) and ``obs[keys]``.

    Needs at least 10 cells; cells without HVG counts are logged.
    """
    counts = adata.layers[layer]
    counts = counts[:, np.flatnonzero(hvg)]
    if sp.issparse(counts):
        counts = sp.csr_matrix(counts, dtype=np.float32)
    sub = ad.AnnData(
        X=counts,
        obs=adata.obs[keys].copy(),
        var=pd.DataFrame(index=adata.var_names[hvg]),
    )
    if sub.n_obs < 10:
        raise ValueError(f"scVI needs at least 10 cells, got {sub.n_obs}")
    empty = np.asarray(sub.X.sum(axis=1)).ravel() == 0
    if empty.any():
        logger.warning("%d cells have no counts in the HVGs", int(empty.sum()))
    return sub


def _scvi_max_epochs(p: ScviParams, n_train: int) -> int:
    """``p.max_epochs``, or :func:`default_max_epochs` for ``n_train`` cells; at least 1."""
    max_epochs = p.max_epochs
    if max_epochs is None:
        max_epochs = default_max_epochs(n_train, batch_size=p.batch_size)
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    return max_epochs


def _train_scvi(
    sub: ad.AnnData,
    p: ScviParams,
    *,
    batch_key: str | None,
    device: str,
    max_epochs: int,
    n_train: int,
    seed: int,
    threads: int | None,
) -> tuple[Any, np.ndarray, int, float]:
    """Seed, set up and train the model on ``sub``; (model, latent, threads, seconds).

    ``scvi.settings.seed`` is set right before the model is built, so nothing else draws
    from the seeded generators in between.
    """
    import scvi

    use_validation = p.train_size < 1
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(
        sub,
        batch_key=batch_key,
        categorical_covariate_keys=list(p.categorical_covariates) or None,
        continuous_covariate_keys=list(p.continuous_covariates) or None,
    )
    model = scvi.model.SCVI(
        sub,
        n_latent=p.n_latent,
        n_layers=p.n_layers,
        n_hidden=p.n_hidden,
        gene_likelihood=p.gene_likelihood,
    )
    # a last minibatch of 1-2 cells breaks BatchNorm: drop it (a different remainder each epoch)
    drop_last = 0 < n_train % p.batch_size < 3
    callbacks = [_epoch_logger(max_epochs)]
    if p.early_stopping and use_validation:
        callbacks.append(
            plateau_stopping(p.early_stopping_patience, p.early_stopping_min_improvement)
        )
    t0 = time.perf_counter()
    with _torch_threads(threads) as n_threads:
        logger.info(
            "training scVI on %s (%d threads): %d cells x %d HVGs, batch_key=%s, max_epochs=%d, "
            "batch_size=%d, early_stopping=%s",
            device,
            n_threads,
            sub.n_obs,
            sub.n_vars,
            batch_key,
            max_epochs,
            p.batch_size,
            p.early_stopping,
        )
        model.train(
            max_epochs=max_epochs,
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            train_size=p.train_size,
            batch_size=p.batch_size,
            early_stopping=False,  # replaced by plateau_stopping (callbacks)
            check_val_every_n_epoch=1 if use_validation else None,
            datasplitter_kwargs={"drop_last": True} if drop_last else None,
            enable_progress_bar=False,
            callbacks=callbacks,
        )
        latent = model.get_latent_representation()
    return model, latent, n_threads, time.perf_counter() - t0


def _history_last(history: Mapping[str, pd.DataFrame], name: str) -> float | None:
    """Last value of a training-history metric, ``None`` when it was not logged."""
    if name in history and len(history[name]):
        return float(history[name].iloc[-1, 0])
    return None


def _scvi_record(
    adata: ad.AnnData,
    p: ScviParams,
    history: Mapping[str, pd.DataFrame],
    *,
    key_added: str,
    device: str,
    n_threads: int,
    max_epochs: int,
    seed: int,
    batch_key: str | None,
    n_hvg: int,
    seconds: float,
    one_batch: Mapping[str, Any],
) -> dict[str, Any]:
    """The integration record of a scVI run (``uns["integration"]``)."""
    import scvi

    epochs_trained = int(len(history["elbo_train"]))
    use_validation = p.train_size < 1
    return {
        "method": "scvi",
        "embedding": key_added,
        "device": device,
        "threads": n_threads,
        "epochs_trained": epochs_trained,
        "max_epochs": int(max_epochs),
        "early_stopped": bool(p.early_stopping and use_validation and epochs_trained < max_epochs),
        "seed": int(seed),
        "batch_key": batch_key,
        "categorical_covariates": list(p.categorical_covariates),
        "continuous_covariates": list(p.continuous_covariates),
        "n_hvg": n_hvg,
        "n_cells": int(adata.n_obs),
        "n_latent": int(p.n_latent),
        "n_layers": int(p.n_layers),
        "n_hidden": int(p.n_hidden),
        "gene_likelihood": p.gene_likelihood,
        "batch_size": int(p.batch_size),
        "elbo_train_final": _history_last(history, "elbo_train"),
        "elbo_validation_final": _history_last(history, "elbo_validation"),
        "seconds": round(seconds, 2),
        "seconds_per_epoch": round(seconds / max(epochs_trained, 1), 3),
        "scvi_version": scvi.__version__,
        **one_batch,
    }


def _log_scvi_done(record: Mapping[str, Any], seconds: float) -> None:
    """One log line: device, epochs, early stop, time and validation ELBO."""
    logger.info(
        "scVI done on %s: %d/%d epochs (%s), %.1f s (%.2f s/epoch), validation ELBO %s",
        record["device"],
        record["epochs_trained"],
        record["max_epochs"],
        "early stopped" if record["early_stopped"] else "no early stop",
        seconds,
        record["seconds_per_epoch"],
        record["elbo_validation_final"],
    )


# --------------------------------------------------------------------------------------
# PCA and Harmony
# --------------------------------------------------------------------------------------
def _scaled_hvg_matrix(adata: ad.AnnData, hvg: np.ndarray, max_value: float) -> sp.csr_matrix:
    """HVG columns of log-normalised X scaled to unit variance, still sparse.

    Centring is left to the PCA (scanpy centres sparse input implicitly), so the matrix keeps
    its zeros. Clipping ``(x - mean) / sd`` at ``max_value`` is applied exactly as the clip
    of ``x / sd`` at ``max_value + mean / sd``; the lower clip at ``-max_value`` only matters
    for genes with ``mean / sd > max_value`` (expressed in nearly every cell) and is skipped.
    """
    x = adata.X[:, np.flatnonzero(hvg)]
    x = sp.csr_matrix(x, dtype=np.float32) if sp.issparse(x) else sp.csr_matrix(np.asarray(x))
    mean = np.asarray(x.mean(axis=0)).ravel()
    sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    n = x.shape[0]
    var = (sq - mean**2) * n / max(n - 1, 1)
    sd = np.sqrt(np.clip(var, 0, None))
    sd[sd == 0] = 1.0
    x = sp.csr_matrix(x.multiply(1.0 / sd[None, :]), dtype=np.float32)
    if max_value is not None:
        ceiling = (max_value + mean / sd).astype(np.float32)
        cols = x.indices
        np.minimum(x.data, ceiling[cols], out=x.data)
    return x


def run_pca(
    adata: ad.AnnData,
    *,
    n_pcs: int = 50,
    seed: int = 0,
    max_value: float | None = 10.0,
    key_added: str = "X_pca",
) -> None:
    """PCA of the scaled, log-normalised HVGs (the unintegrated baseline).

    ``X`` restricted to ``var["highly_variable"]`` is scaled to unit variance per gene and
    clipped at ``max_value`` SDs, keeping the matrix sparse (centring is implicit in the
    sparse PCA), so memory stays ~ the size of the HVG matrix.

    Parameters
    ----------
    adata
        AnnData with log-normalised ``X`` and ``var["highly_variable"]``.
    n_pcs
        Number of components (clamped to ``min(n_obs, n_hvg) - 1``).
    seed
        Seed of the ARPACK start vector.
    max_value
        Clip scaled values at this many SDs (``None``: no clip).
    key_added
        ``obsm`` key.

    Returns
    -------
    None. Writes ``obsm[key_added]`` (n_obs x n_pcs), ``varm["PCs"]`` (zero for non-HVGs)
    and ``uns["pca"]`` (``variance``, ``variance_ratio``, ``params``).
    """
    hvg = _require_hvgs(adata)
    x = adata.X
    vals = np.asarray(x.data[:100_000] if sp.issparse(x) else np.asarray(x).ravel()[:100_000])
    if vals.size and np.allclose(vals, np.round(vals)) and vals.max() > 30:
        raise ValueError(
            "X looks like raw counts (integers > 30); run_pca expects log-normalised X "
            "(sc.pp.normalize_total(adata, target_sum=1e4); sc.pp.log1p(adata))."
        )
    n_comp = min(n_pcs, adata.n_obs - 1, int(hvg.sum()) - 1)
    if n_comp < 1:
        raise ValueError(f"too few cells ({adata.n_obs}) or HVGs ({int(hvg.sum())}) for PCA")
    if n_comp < n_pcs:
        logger.warning("n_pcs=%d reduced to %d (cells/HVGs available)", n_pcs, n_comp)
    tmp = ad.AnnData(X=_scaled_hvg_matrix(adata, hvg, max_value))
    sc.pp.pca(tmp, n_comps=n_comp, zero_center=True, svd_solver="arpack", random_state=seed)
    adata.obsm[key_added] = np.asarray(tmp.obsm["X_pca"], dtype=np.float32)
    pcs = np.zeros((adata.n_vars, n_comp), dtype=np.float32)
    pcs[hvg] = tmp.varm["PCs"]
    adata.varm["PCs"] = pcs
    adata.uns["pca"] = {
        "variance": np.asarray(tmp.uns["pca"]["variance"]),
        "variance_ratio": np.asarray(tmp.uns["pca"]["variance_ratio"]),
        "params": {"n_comps": int(n_comp), "max_value": max_value, "use_highly_variable": True},
    }
    logger.info(
        "PCA: %d components on %d HVGs explain %.1f%% of their variance",
        n_comp,
        hvg.sum(),
        100 * float(np.sum(tmp.uns["pca"]["variance_ratio"])),
    )


def _harmony_record(
    adata: ad.AnnData,
    key_added: str,
    epochs: int | None,
    max_iter_harmony: int,
    seed: int,
    batch_key: Any,
    keys: list[str],
    n_pcs: int,
    theta: Any,
    seconds: float,
) -> dict[str, Any]:
    """``uns["integration"]`` of a Harmony run (also of the one-batch PCA copy)."""
    return {
        "method": "harmony",
        "embedding": key_added,
        "device": "cpu",
        "epochs_trained": epochs,
        "max_epochs": int(max_iter_harmony),
        "seed": int(seed),
        "batch_key": batch_key if isinstance(batch_key, str) else keys,
        "n_hvg": int(adata.var["highly_variable"].sum()),
        "n_cells": int(adata.n_obs),
        "n_pcs": int(n_pcs),
        "theta": theta,
        "seconds": round(seconds, 2),
    }


def run_harmony(
    adata: ad.AnnData,
    *,
    batch_key: str | Sequence[str] = "batch",
    n_pcs: int = 50,
    seed: int = 0,
    theta: float | Sequence[float] = 2.0,
    max_iter_harmony: int = 20,
    threads: int | None = None,
    key_added: str = "X_harmony",
) -> None:
    """Harmony (Korsunsky et al. 2019) on the PCA embedding.

    Uses ``obsm["X_pca"]`` (computed with :func:`run_pca` when absent or too short). When the
    batch key has one level there is nothing to correct (harmonypy would return the PCs
    unchanged): Harmony is not run, ``obsm[key_added]`` is a copy of the first ``n_pcs`` PCs,
    a warning is logged and ``uns["integration"]`` records ``batch_corrected: False`` and a
    ``note``.

    Parameters
    ----------
    adata
        AnnData with HVGs flagged (and optionally ``obsm["X_pca"]``).
    batch_key
        ``obs`` column(s) to integrate over.
    n_pcs
        Number of PCs corrected.
    seed
        Harmony's random state (k-means initialisation).
    theta
        Diversity penalty (higher = stronger mixing).
    max_iter_harmony
        Maximum Harmony iterations.
    threads
        Threads for harmonypy (``None``: one per physical core).
    key_added
        ``obsm`` key.

    Returns
    -------
    None. Writes ``obsm[key_added]`` (n_obs x n_pcs) and ``uns["integration"]``.
    """
    keys = [batch_key] if isinstance(batch_key, str) else list(batch_key)
    _require_obs(adata, keys, "Harmony batch key")
    levels = _batch_levels(adata, keys)
    t0 = time.perf_counter()
    if "X_pca" not in adata.obsm or adata.obsm["X_pca"].shape[1] < n_pcs:
        run_pca(adata, n_pcs=n_pcs, seed=seed)
    if len(levels) < 2:  # nothing to correct: harmonypy returns the PCs unchanged
        pcs = np.asarray(adata.obsm["X_pca"][:, :n_pcs], dtype=np.float32)
        adata.obsm[key_added] = pcs.copy()
        adata.uns["integration"] = {
            **_harmony_record(
                adata,
                key_added,
                0,
                max_iter_harmony,
                seed,
                batch_key,
                keys,
                pcs.shape[1],
                theta,
                time.perf_counter() - t0,
            ),
            **_harmony_one_batch(keys, levels, key_added, pcs.shape[1]),
        }
        return
    pcs = np.asarray(adata.obsm["X_pca"][:, :n_pcs], dtype=np.float64)
    z, epochs = _harmonypy(
        pcs,
        adata.obs[keys],
        keys,
        theta=theta,
        max_iter_harmony=max_iter_harmony,
        seed=seed,
        threads=threads,
    )
    adata.obsm[key_added] = z.astype(np.float32)
    seconds = time.perf_counter() - t0
    adata.uns["integration"] = _harmony_record(
        adata,
        key_added,
        epochs,
        max_iter_harmony,
        seed,
        batch_key,
        keys,
        pcs.shape[1],
        theta,
        seconds,
    )
    logger.info("Harmony on %d PCs over %s: %.1f s", pcs.shape[1], keys, seconds)


def _harmony_one_batch(
    keys: list[str], levels: list[str], key_added: str, n_pcs: int
) -> dict[str, Any]:
    """Record entries (and the warning) for Harmony with one batch level: the PCs copied."""
    note = _one_batch_note(
        keys,
        levels,
        f"no batch correction; Harmony not run, obsm[{key_added!r}] is the PCA embedding",
        prefix="one batch level",
    )
    logger.warning(
        "Harmony: batch key %s has one level (%r), so there is nothing to correct; "
        "obsm[%r] is a copy of the first %d PCs (no batch correction)",
        keys,
        levels[0] if levels else None,
        key_added,
        n_pcs,
    )
    return {"n_batches": len(levels), "batch_corrected": False, "note": note}


def _harmonypy(
    pcs: np.ndarray,
    obs: pd.DataFrame,
    keys: list[str],
    *,
    theta: float | Sequence[float],
    max_iter_harmony: int,
    seed: int,
    threads: int | None,
) -> tuple[np.ndarray, int | None]:
    """harmonypy on the PCs: (corrected embedding, cells x PCs; iterations run or None)."""
    import harmonypy

    meta = obs[keys].astype(str).reset_index(drop=True)
    ho = harmonypy.run_harmony(
        pcs,
        meta,
        keys,
        theta=theta,
        max_iter_harmony=max_iter_harmony,
        random_state=seed,
        verbose=False,
        ncores=threads or 0,
    )
    z = np.asarray(ho.Z_corr)
    if z.shape[0] != pcs.shape[0]:  # harmonypy < 2 returns PCs x cells
        z = z.T
    epochs = len(ho.objective_harmony) if hasattr(ho, "objective_harmony") else None
    return z, epochs


def integrate(
    adata: ad.AnnData,
    *,
    method: Literal["scvi", "harmony", "pca"] = "scvi",
    batch_key: str | None = "batch",
    n_hvg: int = 2000,
    n_pcs: int = 50,
    seed: int = 0,
    comparison: bool = False,
    **kwargs: Any,
) -> str | None:
    """Compute one latent space: selects HVGs if needed, then runs the method.

    Parameters
    ----------
    adata
        Merged, QC-filtered AnnData (``layers["counts"]``, log-normalised ``X``).
    method
        ``"scvi"`` (:func:`run_scvi`), ``"harmony"`` (:func:`run_harmony`) or ``"pca"``
        (:func:`run_pca`, no batch correction).
    batch_key
        ``obs`` column with the batch.
    n_hvg
        HVGs to select when ``var["highly_variable"]`` is absent.
    n_pcs
        PCs for ``pca``/``harmony``.
    seed
        Random seed.
    comparison
        The embedding is computed only to be compared in the integration metrics (not used
        downstream). A batch-correction method with nothing to correct is then skipped rather
        than run: Harmony when ``obs[batch_key]`` has one level (it would equal PCA, which is
        compared anyway). Downstream (``False``), Harmony with one level writes the PCA
        embedding under ``X_harmony`` with a warning (see :func:`run_harmony`).
    **kwargs
        Passed on to the method's function (e.g. ``max_epochs``, ``accelerator``).

    Returns
    -------
    The ``obsm`` key of the embedding (``X_scVI``, ``X_harmony`` or ``X_pca``), or ``None``
    when a comparison method was skipped (``uns["integration"]`` then records
    ``skipped: True`` and a ``note``). For ``pca``, ``uns["integration"]`` records
    ``method="pca"``.
    """
    if method not in EMBEDDING_KEYS:
        raise ValueError(
            f"unknown integration method {method!r}; choose one of {sorted(EMBEDDING_KEYS)} "
            "(config key integration.method)."
        )
    if "highly_variable" not in adata.var:
        select_hvgs(adata, n_top_genes=n_hvg, batch_key=batch_key)
    if method == "scvi":
        run_scvi(adata, batch_key=batch_key, seed=seed, **kwargs)
    elif method == "harmony":
        if batch_key is None:
            raise ValueError("method='harmony' needs a batch_key")
        _require_obs(adata, [batch_key], "Harmony batch key")
        levels = _batch_levels(adata, [batch_key])
        if comparison and len(levels) < 2:
            adata.uns["integration"] = _skipped_harmony_record(batch_key, levels)
            return None
        run_harmony(adata, batch_key=batch_key, n_pcs=n_pcs, seed=seed, **kwargs)
    else:
        t0 = time.perf_counter()
        run_pca(adata, n_pcs=n_pcs, seed=seed, **kwargs)
        adata.uns["integration"] = _pca_record(adata, batch_key, seed, time.perf_counter() - t0)
    return EMBEDDING_KEYS[method]


def _skipped_harmony_record(batch_key: str, levels: list[str]) -> dict[str, Any]:
    """Record (and log line) of Harmony skipped as a comparison: one batch level."""
    note = _one_batch_note(
        [batch_key],
        levels,
        "Harmony not run as a comparison (nothing to correct; it equals PCA)",
    )
    logger.info(
        "batch key %r has one level (%r): Harmony skipped as a comparison method "
        "(nothing to correct; it would equal PCA)",
        batch_key,
        levels[0] if levels else None,
    )
    return {
        "method": "harmony",
        "embedding": None,
        "skipped": True,
        "batch_key": batch_key,
        "n_batches": len(levels),
        "batch_corrected": False,
        "note": note,
    }


def _pca_record(
    adata: ad.AnnData, batch_key: str | None, seed: int, seconds: float
) -> dict[str, Any]:
    """``uns["integration"]`` of the plain PCA embedding."""
    return {
        "method": "pca",
        "embedding": "X_pca",
        "device": "cpu",
        "epochs_trained": None,
        "max_epochs": None,
        "seed": int(seed),
        "batch_key": batch_key,
        "n_hvg": int(adata.var["highly_variable"].sum()),
        "n_cells": int(adata.n_obs),
        "n_pcs": int(adata.obsm["X_pca"].shape[1]),
        "seconds": round(seconds, 2),
    }


# --------------------------------------------------------------------------------------
# metrics (scib definitions)
# --------------------------------------------------------------------------------------
def _knn(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of each row (self excluded): (distances, indices), n x k."""
    n = x.shape[0]
    k = min(k, n - 1)
    if n <= 50_000:
        from sklearn.neighbors import NearestNeighbors

        dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    else:
        from pynndescent import NNDescent

        index = NNDescent(x, n_neighbors=k + 1, random_state=seed, n_jobs=1)
        idx, dist = index.neighbor_graph
    rows = np.arange(n)[:, None]
    is_self = idx == rows
    # drop self where found, else the farthest neighbour, keeping k per row
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(n), drop] = False
    return dist[keep].reshape(n, k), idx[keep].reshape(n, k)


def lisi(
    distances: np.ndarray,
    indices: np.ndarray,
    labels: np.ndarray,
    *,
    perplexity: float | None = None,
    tol: float = 1e-5,
    n_iter: int = 50,
) -> np.ndarray:
    """Local inverse Simpson's index of each cell (Korsunsky et al. 2019).

    For each cell, Gaussian weights over its k neighbours are calibrated (binary search on the
    precision) to the given perplexity, as in t-SNE; LISI = 1 / sum_c p_c^2 where p_c is the
    weight of label c. It ranges from 1 (all neighbours share one label) to the number of
    labels (perfect mixing). Same computation as scib / scib-metrics (``perplexity`` defaults
    to k / 3); distances are shifted by their row minimum for numerical stability (the
    calibrated weights are unchanged by the shift).

    Parameters
    ----------
    distances, indices
        n x k neighbour distances and indices (self excluded).
    labels
        Label of each cell (length n).
    perplexity
        Effective number of neighbours (default ``floor(k / 3)``).
    tol, n_iter
        Binary-search tolerance on the entropy and maximum steps.

    Returns
    -------
    LISI per cell (NaN where the weights could not be calibrated).
    """
    codes, _ = pd.factorize(np.asarray(labels))
    n_cat = int(codes.max()) + 1
    d = np.asarray(distances, dtype=np.float64)
    d = d - d.min(axis=1, keepdims=True)
    k = d.shape[1]
    if perplexity is None:
        perplexity = float(np.floor(k / 3))
    log_u = np.log(perplexity)
    n = d.shape[0]
    beta = np.ones(n)
    beta_min = np.full(n, -np.inf)
    beta_max = np.full(n, np.inf)

    def h_beta(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = np.exp(-d * b[:, None])
        sum_p = p.sum(axis=1)
        ok = sum_p > 0
        h = np.zeros(n)
        h[ok] = np.log(sum_p[ok]) + b[ok] * (d[ok] * p[ok]).sum(axis=1) / sum_p[ok]
        p[ok] /= sum_p[ok, None]
        p[~ok] = 0
        return h, p

    h, p = h_beta(beta)
    for _ in range(n_iter):
        diff = h - log_u
        active = np.abs(diff) >= tol
        if not active.any():
            break
        up = active & (diff > 0)
        down = active & (diff <= 0)
        beta_min[up] = beta[up]
        beta[up] = np.where(np.isinf(beta_max[up]), beta[up] * 2, (beta[up] + beta_max[up]) / 2)
        beta_max[down] = beta[down]
        beta[down] = np.where(
            np.isinf(beta_min[down]), beta[down] / 2, (beta[down] + beta_min[down]) / 2
        )
        h, p = h_beta(beta)
    label_of = codes[np.asarray(indices)]
    simpson = np.zeros(n)
    for c in range(n_cat):
        pc = (p * (label_of == c)).sum(axis=1)
        simpson += pc**2
    out = np.full(n, np.nan)
    ok = (h != 0) & (simpson > 0)
    out[ok] = 1.0 / simpson[ok]
    return out


def _silhouette_subsample(n: int, max_cells: int, seed: int) -> np.ndarray:
    if n <= max_cells:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_cells, replace=False))


def _batch_asw(x: np.ndarray, batches: np.ndarray, labels: np.ndarray | None) -> float:
    from sklearn.metrics import silhouette_samples

    groups = np.zeros(len(batches), dtype=int) if labels is None else pd.factorize(labels)[0]
    per_label = []
    for g in np.unique(groups):
        m = groups == g
        b = batches[m]
        nb = len(np.unique(b))
        if nb < 2 or nb >= m.sum():
            continue
        s = silhouette_samples(x[m], b)
        per_label.append(float(np.mean(1 - np.abs(s))))
    return float(np.mean(per_label)) if per_label else np.nan


def _graph_connectivity(conn: sp.spmatrix, labels: np.ndarray) -> float:
    from scipy.sparse.csgraph import connected_components

    conn = sp.csr_matrix(conn)
    fractions = []
    for lab in pd.unique(labels):
        idx = np.flatnonzero(labels == lab)
        _, comp = connected_components(conn[idx][:, idx], directed=False)
        fractions.append(np.bincount(comp).max() / len(idx))
    return float(np.mean(fractions))


def _best_leiden_nmi_ari(
    tmp: ad.AnnData, labels: np.ndarray, resolutions: Sequence[float], seed: int
) -> tuple[float, float, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    best = (-1.0, np.nan, np.nan)
    for res in resolutions:
        sc.tl.leiden(
            tmp,
            resolution=res,
            key_added="_leiden",
            random_state=seed,
            flavor="igraph",
            n_iterations=2,
            directed=False,
        )
        clusters = tmp.obs["_leiden"].to_numpy()
        nmi = normalized_mutual_info_score(labels, clusters)
        if nmi > best[0]:
            best = (nmi, adjusted_rand_score(labels, clusters), res)
    return best


def integration_metrics(
    adata: ad.AnnData,
    *,
    embed_keys: Sequence[str],
    batch_key: str,
    label_key: str | None = None,
    cluster_key: str | Mapping[str, str] | None = None,
    n_neighbors: int = 15,
    n_neighbors_lisi: int = 90,
    max_cells_silhouette: int = 20_000,
    leiden_resolutions: Sequence[float] = tuple(round(0.2 * i, 1) for i in range(1, 11)),
    seed: int = 0,
    skipped: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Score embeddings for batch removal and, with labels, conservation of biology.

    Definitions (scib; Luecken et al. 2022), all in [0, 1], higher = better:

    - ``ilisi``: (median LISI over batches - 1) / (n_batches - 1), on ``n_neighbors_lisi``
      neighbours with perplexity ``n_neighbors_lisi / 3``.
    - ``batch_asw``: within each label, silhouette of cells by batch, turned into
      ``1 - |s|`` per cell and averaged; then averaged over labels (labels present in one
      batch only are skipped). Without ``label_key`` all cells form one group, which mixes
      biology into the score: prefer giving labels.
    - ``clisi``: (n_labels - median LISI over labels) / (n_labels - 1).
    - ``label_asw``: (silhouette of cells by label + 1) / 2.
    - ``graph_connectivity``: per label, the fraction of its cells in the largest connected
      component of the kNN graph (``n_neighbors``, scanpy connectivities) restricted to the
      label; averaged over labels.
    - ``nmi``, ``ari``: Leiden clusters vs labels. Without ``cluster_key``, Leiden is run on
      each embedding's kNN graph at ``leiden_resolutions`` and the clustering with the best
      NMI is kept (scib's optimised clustering); ``leiden_resolution`` reports which.
    - ``batch_correction``: mean of ilisi, batch_asw, graph_connectivity (available ones);
      ``bio_conservation``: mean of clisi, label_asw, nmi, ari; ``overall``: 0.4 x batch +
      0.6 x bio (scib's weighting, over this subset of its metrics).

    Silhouettes use a seeded random subsample of ``max_cells_silhouette`` cells when there
    are more cells; kNN search is exact up to 50,000 cells (pynndescent above).

    With one level of ``obs[batch_key]`` (one sequencing run; ``sample_id`` with one sample)
    there is no batch to mix: the batch-removal terms (``ilisi``, ``batch_asw``,
    ``graph_connectivity``, hence ``batch_correction`` and ``overall``) are NaN, the
    biology-conservation terms are computed when labels are given, and a ``note`` column says
    ``"skipped: one batch level ..."``. With two or more levels the table has no ``note``
    column (unless ``skipped`` is given) and is unchanged.

    Parameters
    ----------
    adata
        AnnData with the embeddings in ``obsm``.
    embed_keys
        ``obsm`` keys to score (e.g. ``["X_pca", "X_harmony", "X_scVI"]``).
    batch_key
        ``obs`` column with the batch.
    label_key
        ``obs`` column with known cell labels (e.g. simulated truth); ``None`` leaves the
        label metrics NaN.
    cluster_key
        ``obs`` column (or mapping embedding -> column) with clusters to use for NMI/ARI
        instead of the optimised Leiden.
    n_neighbors, n_neighbors_lisi
        Neighbours for the graph metrics and for LISI.
    max_cells_silhouette
        Subsample size for silhouettes.
    leiden_resolutions
        Resolutions tried for NMI/ARI.
    seed
        Seed for subsampling, neighbours and Leiden.
    skipped
        Embeddings that were not computed, mapped to why (e.g. Harmony skipped as a
        comparison with one batch, see :func:`integrate`): each gets a row with NaN metrics
        and the reason in ``note``, after the scored rows.

    Returns
    -------
    One row per embedding: ``embedding``, ``n_cells``, ``n_batches``, ``n_labels``, the
    metrics above, ``leiden_resolution`` (and ``note`` when batch terms or embeddings were
    skipped).
    """
    if not embed_keys:
        raise ValueError("embed_keys is empty; give at least one obsm key")
    cells = _MetricCells.from_obs(adata, batch_key, label_key, max_cells_silhouette, seed)
    rows = []
    for key in embed_keys:
        x = _embedding(adata, key)
        t0 = time.perf_counter()
        row: dict[str, Any] = {
            "embedding": key,
            "n_cells": adata.n_obs,
            "n_batches": cells.n_batches,
            "n_labels": cells.n_labels,
        }
        dist, idx = _batch_terms(row, x, cells, n_neighbors_lisi=n_neighbors_lisi, seed=seed)
        ckey = cluster_key.get(key) if isinstance(cluster_key, Mapping) else cluster_key
        row.update(
            _label_terms(
                adata,
                x,
                dist,
                idx,
                cells,
                cluster_key=ckey,
                n_neighbors=n_neighbors,
                leiden_resolutions=leiden_resolutions,
                seed=seed,
            )
        )
        _summary_scores(row, cells)
        rows.append(row)
        _log_metrics(row, time.perf_counter() - t0)
    rows += _skipped_rows(skipped or {}, adata.n_obs, cells)
    return _metrics_table(rows)


#: columns of the integration-metrics table, in order (``note`` is added when present)
_METRIC_COLUMNS = (
    "embedding",
    "n_cells",
    "n_batches",
    "n_labels",
    "ilisi",
    "batch_asw",
    "graph_connectivity",
    "clisi",
    "label_asw",
    "nmi",
    "ari",
    "batch_correction",
    "bio_conservation",
    "overall",
    "leiden_resolution",
)


@dataclass(frozen=True)
class _MetricCells:
    """What every embedding's metrics share: batches, labels, the silhouette subsample."""

    batches: np.ndarray
    n_batches: int
    batch_note: str | None  # set when there is one batch level (no batch-removal terms)
    labels: np.ndarray | None
    n_labels: int
    sub: np.ndarray  # silhouette subsample (cell indices)

    @property
    def one_batch(self) -> bool:
        return self.n_batches < 2

    @classmethod
    def from_obs(
        cls,
        adata: ad.AnnData,
        batch_key: str,
        label_key: str | None,
        max_cells_silhouette: int,
        seed: int,
    ) -> _MetricCells:
        """Check the keys, read batches and labels, note (and log) a single batch level."""
        _require_obs(adata, [batch_key], "batch key for metrics")
        if label_key is not None:
            _require_obs(adata, [label_key], "label key for metrics")
        batches = adata.obs[batch_key].astype(str).to_numpy()
        n_batches = len(np.unique(batches))
        batch_note = None
        if n_batches < 2:
            batch_note = _one_batch_note(
                [batch_key],
                list(np.unique(batches)),
                "batch-removal terms (iLISI, batch ASW, graph connectivity) not computed",
            )
            logger.info(
                "batch key %r has one level (%r): batch-removal metrics skipped; "
                "biology-conservation metrics %s",
                batch_key,
                batches[0] if len(batches) else None,
                "computed" if label_key is not None else "need labels (none given)",
            )
        labels = None if label_key is None else adata.obs[label_key].astype(str).to_numpy()
        return cls(
            batches=batches,
            n_batches=n_batches,
            batch_note=batch_note,
            labels=labels,
            n_labels=0 if labels is None else len(np.unique(labels)),
            sub=_silhouette_subsample(adata.n_obs, max_cells_silhouette, seed),
        )


def _embedding(adata: ad.AnnData, key: str) -> np.ndarray:
    """``obsm[key]`` as float32; it must exist and be finite."""
    if key not in adata.obsm:
        raise KeyError(f"obsm[{key!r}] not found; available: {list(adata.obsm)}")
    x = np.asarray(adata.obsm[key], dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"obsm[{key!r}] has non-finite values")
    return x


def _batch_terms(
    row: dict[str, Any], x: np.ndarray, cells: _MetricCells, *, n_neighbors_lisi: int, seed: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """iLISI and batch ASW into ``row`` (NaN with one batch level).

    Returns the LISI neighbours (distances, indices), also needed by cLISI; ``(None, None)``
    when neither needs them (one batch level, no labels).
    """
    dist = idx = None
    if cells.one_batch:
        row["ilisi"] = row["batch_asw"] = np.nan
        if cells.labels is not None:
            dist, idx = _knn(x, n_neighbors_lisi, seed)
        return dist, idx
    dist, idx = _knn(x, n_neighbors_lisi, seed)
    row["ilisi"] = (np.nanmedian(lisi(dist, idx, cells.batches)) - 1) / (cells.n_batches - 1)
    sub = cells.sub
    row["batch_asw"] = _batch_asw(
        x[sub], cells.batches[sub], None if cells.labels is None else cells.labels[sub]
    )
    return dist, idx


def _label_terms(
    adata: ad.AnnData,
    x: np.ndarray,
    dist: np.ndarray | None,
    idx: np.ndarray | None,
    cells: _MetricCells,
    *,
    cluster_key: str | None,
    n_neighbors: int,
    leiden_resolutions: Sequence[float],
    seed: int,
) -> dict[str, float]:
    """cLISI, label ASW, graph connectivity, NMI/ARI (and the Leiden resolution used) on
    the embedding's kNN graph; all NaN without labels."""
    from sklearn.metrics import silhouette_score

    labels, n_labels, sub = cells.labels, cells.n_labels, cells.sub
    if labels is None:
        return dict(
            clisi=np.nan,
            label_asw=np.nan,
            graph_connectivity=np.nan,
            nmi=np.nan,
            ari=np.nan,
            leiden_resolution=np.nan,
        )
    tmp = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names), obsm={"X_emb": x})
    sc.pp.neighbors(tmp, n_neighbors=n_neighbors, use_rep="X_emb", random_state=seed)
    out = {
        "clisi": (
            (n_labels - np.nanmedian(lisi(dist, idx, labels))) / (n_labels - 1)
            if n_labels > 1
            else np.nan
        ),
        "label_asw": (silhouette_score(x[sub], labels[sub]) + 1) / 2 if n_labels > 1 else np.nan,
        "graph_connectivity": (
            np.nan if cells.one_batch else _graph_connectivity(tmp.obsp["connectivities"], labels)
        ),
    }
    out.update(_cluster_agreement(adata, tmp, labels, cluster_key, leiden_resolutions, seed))
    return out


def _cluster_agreement(
    adata: ad.AnnData,
    tmp: ad.AnnData,
    labels: np.ndarray,
    cluster_key: str | None,
    leiden_resolutions: Sequence[float],
    seed: int,
) -> dict[str, float]:
    """NMI and ARI of clusters vs labels: the given ``obs[cluster_key]``, else the Leiden
    resolution with the best NMI on ``tmp``'s graph (``leiden_resolution`` says which)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    if cluster_key is None:
        nmi, ari, res = _best_leiden_nmi_ari(tmp, labels, leiden_resolutions, seed)
        return {"nmi": nmi, "ari": ari, "leiden_resolution": res}
    _require_obs(adata, [cluster_key], "cluster key for NMI/ARI")
    clusters = adata.obs[cluster_key].astype(str).to_numpy()
    return {
        "nmi": normalized_mutual_info_score(labels, clusters),
        "ari": adjusted_rand_score(labels, clusters),
        "leiden_resolution": np.nan,
    }


def _summary_scores(row: dict[str, Any], cells: _MetricCells) -> None:
    """``batch_correction``, ``bio_conservation`` (means of the available terms),
    ``overall`` (0.4 x batch + 0.6 x bio) and the one-batch ``note`` into ``row``."""
    batch_part = [row["ilisi"], row["batch_asw"], row["graph_connectivity"]]
    bio_part = [row["clisi"], row["label_asw"], row["nmi"], row["ari"]]
    row["batch_correction"] = np.nan if cells.one_batch else float(np.nanmean(batch_part))
    if cells.batch_note is not None:
        row["note"] = cells.batch_note
    row["bio_conservation"] = (
        float(np.nanmean(bio_part)) if not np.all(np.isnan(bio_part)) else np.nan
    )
    row["overall"] = 0.4 * row["batch_correction"] + 0.6 * row["bio_conservation"]


def _log_metrics(row: Mapping[str, Any], seconds: float) -> None:
    """One log line per scored embedding."""
    logger.info(
        "metrics for %s (%.1f s): iLISI %.3f, batch ASW %.3f, cLISI %s, ARI %s",
        row["embedding"],
        seconds,
        row["ilisi"],
        row["batch_asw"],
        f"{row['clisi']:.3f}",
        f"{row['ari']:.3f}",
    )


def _skipped_rows(
    skipped: Mapping[str, str], n_cells: int, cells: _MetricCells
) -> list[dict[str, Any]]:
    """Rows (NaN metrics, the reason in ``note``) for embeddings that were not computed."""
    rows = []
    for key, why in skipped.items():
        rows.append(
            {
                "embedding": key,
                "n_cells": n_cells,
                "n_batches": cells.n_batches,
                "n_labels": cells.n_labels,
                "note": why,
            }
        )
        logger.info("metrics for %s skipped: %s", key, why)
    return rows


def _metrics_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The rows in :data:`_METRIC_COLUMNS` order, plus ``note`` when any row has one."""
    cols = list(_METRIC_COLUMNS)
    if any("note" in row for row in rows):
        cols.append("note")
    return pd.DataFrame(rows).reindex(columns=cols)
