"""After per-sample QC: keep the passing cells, choose the samples, merge and normalise.

* :func:`filter_cells_qc`: a copy of a sample holding the cells that passed;
* :func:`select_samples`: which samples enter the cohort (``qc.min_cells_per_sample``);
* :func:`merge_samples`: outer join of the filtered samples (absent genes are zero), gene
  filter on the merged object; :func:`merge_samples_to_file` does the same and
  :func:`normalize`, streamed from per-sample files to the output;
* :func:`normalize`: ``X = log1p(CP10k)`` from ``layers["counts"]`` (or the
  ambient-corrected ``layers["soupx_counts"]``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from sepsis_sc.config import QCSettings
from sepsis_sc.data import get_counts, log_normalise
from sepsis_sc.qc.metrics import flag_genes

logger = logging.getLogger(__name__)

__all__ = [
    "filter_cells_qc",
    "select_samples",
    "merge_samples",
    "merge_samples_to_file",
    "normalize",
]


def filter_cells_qc(adata: ad.AnnData, *, min_cells_per_gene: int = 0) -> ad.AnnData:
    """Return a copy holding only the cells that passed QC (``obs["qc_outlier"] == False``).

    Parameters
    ----------
    adata
        AnnData annotated by :func:`run_qc`.
    min_cells_per_gene
        Also drop genes detected in fewer cells of the copy (0 keeps all genes; gene
        filtering is best done once on the merged object, see :func:`merge_samples`).

    Returns
    -------
    A new AnnData (counts stay sparse in ``layers["counts"]``).
    """
    if "qc_outlier" not in adata.obs:
        raise ValueError("obs has no 'qc_outlier'; run sepsis_sc.qc.run_qc first.")
    keep = ~adata.obs["qc_outlier"].to_numpy(dtype=bool)
    out = adata[keep].copy()
    if min_cells_per_gene > 0:
        detected = np.asarray((get_counts(out, check=False)[0] > 0).sum(axis=0)).ravel()
        out = out[:, detected >= min_cells_per_gene].copy()
    logger.info("kept %d of %d cells after QC", out.n_obs, adata.n_obs)
    return out


def select_samples(
    summary: pd.DataFrame, settings: QCSettings | None = None, **overrides: Any
) -> pd.DataFrame:
    """Decide which samples enter the cohort: those with at least ``min_cells_per_sample``
    cells after QC.

    A sample with a handful of cells left would enter the sample-level statistics at full
    weight (its 3 cells set its cell-type fractions), so it is left out of the merged cohort
    (``on_small_sample="drop"``, the default) or stops the run (``"stop"``). Samples with no
    cells at all were already handled by :func:`run_qc` (``qc.on_empty``).

    Parameters
    ----------
    summary
        Per-sample QC summary (``run_qc`` output, concatenated): ``sample_id``, ``cells_out``.
    settings
        QC settings (:class:`~sepsis_sc.config.QCSettings`; ``None``: the schema defaults).
        Used here: ``min_cells_per_sample`` (0 keeps every sample with at least one cell)
        and ``on_small_sample``.
    **overrides
        Any :class:`~sepsis_sc.config.QCSettings` field by name (e.g.
        ``min_cells_per_sample=20``).

    Returns
    -------
    A copy of ``summary`` with ``included`` (bool) and ``excluded_reason`` ("" when included).

    Raises
    ------
    ValueError
        With ``on_small_sample="stop"``, naming the small samples and the config keys.
    """
    settings = (settings or QCSettings()).with_overrides(overrides)
    min_cells, on_small = settings.min_cells_per_sample, settings.on_small_sample
    if on_small not in ("drop", "stop"):
        raise ValueError(f"on_small must be 'drop' or 'stop', not {on_small!r}.")
    out = summary.copy()
    n = out["cells_out"].astype(int)
    empty = n == 0
    small = (n > 0) & (n < int(min_cells))
    out["included"] = ~(empty | small)
    out["excluded_reason"] = ""
    out.loc[empty, "excluded_reason"] = "no cells after QC"
    out.loc[small, "excluded_reason"] = [
        f"{k} cells after QC < qc.min_cells_per_sample ({int(min_cells)})" for k in n[small]
    ]
    if small.any() and on_small == "stop":
        names = ", ".join(f"{s} ({k} cells)" for s, k in zip(out.loc[small, "sample_id"], n[small]))
        raise ValueError(
            f"sample(s) with fewer than qc.min_cells_per_sample ({int(min_cells)}) cells after "
            f"QC: {names}. Remove them from the sheet, loosen QC for them, lower "
            "qc.min_cells_per_sample, or set qc.on_small_sample: drop to leave them out."
        )
    if small.any():
        logger.warning(
            "left out of the cohort (too few cells after QC): %s",
            ", ".join(out.loc[small, "sample_id"].astype(str)),
        )
    return out


def merge_samples(
    adatas: Iterable[ad.AnnData] | Mapping[str, ad.AnnData],
    settings: QCSettings | None = None,
    *,
    batch_key: str = "sample_id",
    drop_outliers: bool = True,
    organism: str = "auto",
    **overrides: Any,
) -> ad.AnnData:
    """Concatenate per-sample AnnData objects into one (outer join on genes, zeros filled).

    Each object is reduced to its raw counts, ``obs`` and gene identifiers as it arrives, so
    a generator that reads the samples one at a time (as the workflow's ``qc_merge`` does)
    keeps peak memory near three copies of the merged count matrix, not one per layer and
    per intermediate object.

    Parameters
    ----------
    adatas
        Filtered per-sample objects: a list, any iterable (e.g. a generator of
        ``anndata.read_h5ad`` calls) or a mapping ``{sample_id: adata}`` (the key fills
        ``obs[batch_key]`` when that column is missing). Only ``layers["counts"]`` (or ``X``
        when there is no such layer), ``obs`` and ``var["gene_ids"/"gene_symbols"]`` are used.
    settings
        QC settings (:class:`~sepsis_sc.config.QCSettings`; ``None``: the schema defaults).
        Used here: ``min_cells_per_gene``: drop genes detected in fewer cells of the merged
        object (Heumos et al. 2023 suggest about 20 for large data; 3 is permissive for
        small cohorts). 0 keeps all.
    batch_key
        ``obs`` column naming the sample.
    drop_outliers
        Remove cells still marked ``qc_outlier`` (when an unfiltered object is passed).
    organism
        For re-flagging ``mt``/``ribo``/``hb`` on the merged gene list.
    **overrides
        Any :class:`~sepsis_sc.config.QCSettings` field by name (e.g.
        ``min_cells_per_gene=0``).

    Returns
    -------
    The merged AnnData: ``X`` and ``layers["counts"]`` hold the raw counts (CSR, separate
    matrices), ``var`` keeps ``gene_ids``/``gene_symbols`` (first non-missing value) and the
    gene flags, ``obs_names`` are unique. Call :func:`normalize` next.
    """
    min_cells_per_gene = (settings or QCSettings()).with_overrides(overrides).min_cells_per_gene
    items = adatas.items() if isinstance(adatas, Mapping) else ((None, a) for a in adatas)
    parts = []
    n_seen = 0
    for i, (key, a) in enumerate(items):
        n_seen += 1
        part = _slim_sample(a, key, i, batch_key=batch_key, drop_outliers=drop_outliers)
        if part is not None:
            parts.append(part)
        del a, part  # the sample's other layers can be freed now
    if n_seen == 0:
        raise ValueError("merge_samples got no AnnData objects.")
    if not parts:
        raise ValueError("every sample passed to merge_samples is empty; nothing to merge.")
    n_parts = len(parts)
    if any("soupx_counts" in p.layers for p in parts):  # samples QC'd without it: raw
        for part in parts:
            part.layers.setdefault("soupx_counts", part.X.copy())
    merged = ad.concat(parts, join="outer", fill_value=0, merge="first", index_unique=None)
    del parts
    _tidy_merged_obs(merged, batch_key)
    merged.X = sparse.csr_matrix(merged.X)
    merged = _drop_rare_genes(merged, min_cells_per_gene)
    merged.layers["counts"] = merged.X.copy()
    flag_genes(merged, organism)
    logger.info("merged %d samples: %d cells x %d genes", n_parts, *merged.shape)
    return merged


def _slim_sample(
    a: ad.AnnData, key: str | None, i: int, *, batch_key: str, drop_outliers: bool
) -> ad.AnnData | None:
    """One sample reduced to its raw counts (CSR), ``obs`` and gene identifiers.

    ``None`` for an empty sample (logged). The mapping key fills a missing
    ``obs[batch_key]``; cells marked ``qc_outlier`` are dropped with ``drop_outliers``.
    """
    if a.n_obs == 0:
        logger.warning("skipping empty sample %s", key if key is not None else i)
        return None
    obs = a.obs.copy()
    if batch_key not in obs:
        if key is None:
            raise ValueError(
                f"object {i} has no obs[{batch_key!r}]; pass a dict {{sample_id: adata}} "
                "or set the column."
            )
        obs[batch_key] = str(key)
    if "counts" in a.layers:
        counts = a.layers["counts"]
    else:
        counts, _ = get_counts(a, max_values=None)
    counts = sparse.csr_matrix(counts)  # no copy when already CSR
    if drop_outliers and "qc_outlier" in obs and obs["qc_outlier"].any():
        keep = ~obs["qc_outlier"].to_numpy(dtype=bool)
        logger.info("sample %s: dropping %d cells marked qc_outlier", key or i, (~keep).sum())
        counts, obs = counts[keep], obs.loc[keep]
    keep_var = [c for c in ("gene_ids", "gene_symbols") if c in a.var]
    corrected = a.layers.get("soupx_counts")
    if corrected is not None:
        corrected = sparse.csr_matrix(corrected)
        if drop_outliers and "qc_outlier" in a.obs and a.obs["qc_outlier"].any():
            corrected = corrected[~a.obs["qc_outlier"].to_numpy(dtype=bool)]
    out = ad.AnnData(X=counts, obs=obs, var=a.var[keep_var].copy())
    if corrected is not None:
        out.layers["soupx_counts"] = corrected
    return out


def _tidy_merged_obs(merged: ad.AnnData, batch_key: str) -> None:
    """Require unique cell names; object columns become ``str`` and the batch categorical."""
    if not merged.obs_names.is_unique:
        raise ValueError(
            "cell names repeat across samples; name cells '{sample_id}_{barcode}' at ingest "
            "(sepsis_sc.io.ingest_sample does) or call adata.obs_names_make_unique()."
        )
    for col in merged.obs.columns:
        if merged.obs[col].dtype == object:
            merged.obs[col] = merged.obs[col].astype(str)
    merged.obs[batch_key] = pd.Categorical(merged.obs[batch_key].astype(str))


def _drop_rare_genes(merged: ad.AnnData, min_cells_per_gene: int) -> ad.AnnData:
    """Genes detected in at least ``min_cells_per_gene`` cells (0 keeps all; CSR ``X``)."""
    if min_cells_per_gene > 0:
        x = merged.X
        detected = np.bincount(x.indices[x.data > 0], minlength=merged.n_vars)
        n_drop = int((detected < min_cells_per_gene).sum())
        if n_drop:
            merged = merged[:, detected >= min_cells_per_gene].copy()
        logger.info("dropped %d genes detected in < %d cells", n_drop, min_cells_per_gene)
    return merged


def merge_samples_to_file(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    settings: QCSettings | None = None,
    *,
    batch_key: str = "sample_id",
    drop_outliers: bool = True,
    organism: str = "auto",
    target_sum: float = 1e4,
    uns: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> tuple[int, int]:
    """:func:`merge_samples` then :func:`normalize`, streamed from per-sample files to ``out``.

    The same result as ``merged = merge_samples((read(p) for p in paths), settings)`` and
    ``normalize(merged, layer=settings.downstream_layer)`` written with :func:`sepsis_sc.utils.write_h5ad`, but the merged matrices are never in
    memory: a first pass over the samples collects ``obs``, the gene union and how many
    cells detect each gene; a second pass reads each sample again and appends its rows of
    ``layers["counts"]`` (and ``layers["soupx_counts"]`` when any sample has it), and of
    ``X``, log-normalised per cell from the ``downstream_layer`` of ``settings`` exactly as
    :func:`normalize` does, to the output (:class:`sepsis_sc.store.MatrixWriter`). Peak
    memory is one sample plus the merged ``obs``; the output is written atomically.

    Parameters
    ----------
    paths
        Per-sample QC files (``.h5ad``), in cohort order.
    out
        The merged ``.h5ad`` to write.
    settings
        QC settings (:class:`~sepsis_sc.config.QCSettings`; ``None``: the schema defaults).
        Used here: ``min_cells_per_gene`` (as in :func:`merge_samples`) and
        ``downstream_layer``, the counts ``X`` is normalised from (``soupx_counts`` falls
        back to the raw counts when no sample has that layer; logged).
    batch_key, drop_outliers, organism
        As in :func:`merge_samples`.
    target_sum
        Counts per cell after scaling (as in :func:`normalize`).
    uns
        Entries stored in ``uns`` of the output.
    **overrides
        Any :class:`~sepsis_sc.config.QCSettings` field by name (e.g.
        ``downstream_layer="counts"``).

    Returns
    -------
    (cells, genes) of the merged file. ``uns`` entries given are stored with the
    normalisation record.
    """
    from sepsis_sc import store
    from sepsis_sc.utils import atomic_path

    settings = (settings or QCSettings()).with_overrides(overrides)
    min_cells_per_gene, normalize_layer = settings.min_cells_per_gene, settings.downstream_layer
    if not paths:
        raise ValueError("merge_samples_to_file got no sample files.")
    obs_parts, var_parts, detected, any_soupx = [], [], [], False
    for i, path in enumerate(paths):  # pass 1: obs, genes, detection
        part = _slim_sample(
            _read_sample(path), None, i, batch_key=batch_key, drop_outliers=drop_outliers
        )
        if part is None:
            continue
        obs_parts.append((i, part.obs))
        var_parts.append(part.var)
        x = part.X
        detected.append(np.bincount(x.indices[x.data > 0], minlength=part.n_vars))
        any_soupx |= "soupx_counts" in part.layers
        del part, x
    if not obs_parts:
        raise ValueError("every sample passed to merge_samples is empty; nothing to merge.")
    genes = functools.reduce(lambda a, b: a.union(b), (v.index for v in var_parts))
    n_detected = np.zeros(len(genes), dtype=np.int64)
    for v, d in zip(var_parts, detected, strict=True):
        n_detected[genes.get_indexer(v.index)] += d
    keep = n_detected >= min_cells_per_gene if min_cells_per_gene > 0 else np.ones(len(genes), bool)
    logger.info("dropped %d genes detected in < %d cells", int((~keep).sum()), min_cells_per_gene)
    var = _first_values(var_parts, genes)[keep]
    light = ad.AnnData(obs=pd.concat([o for _, o in obs_parts], join="outer"), var=var)
    _tidy_merged_obs(light, batch_key)
    flag_genes(light, organism)
    if not any_soupx and normalize_layer == "soupx_counts":
        logger.warning("no layers[%r]: X is normalised from the raw counts", normalize_layer)
        normalize_layer = "counts"
    light.uns.update(dict(uns or {}))
    light.uns["log1p"] = {"base": None}
    light.uns["normalization"] = {
        "method": "log1p_cp",
        "target_sum": float(target_sum),
        "layer": normalize_layer,
    }
    keys = ["X", "layers/counts"] + (["layers/soupx_counts"] if any_soupx else [])
    final = pd.Index(light.var_names)
    with atomic_path(out) as tmp:
        light.write_h5ad(tmp)
        with store.MatrixWriter(tmp, keys, n_vars=light.n_vars, n_obs=light.n_obs) as w:
            for i, _ in obs_parts:  # pass 2: rows, sample by sample
                part = _slim_sample(
                    _read_sample(paths[i]),
                    None,
                    i,
                    batch_key=batch_key,
                    drop_outliers=drop_outliers,
                )
                cols = final.get_indexer(part.var_names)
                mats = {"counts": part.X, "soupx_counts": part.layers.get("soupx_counts", part.X)}
                for name, m in mats.items():
                    if name == "counts" or any_soupx:
                        mats[name] = _reindex_columns(sparse.csr_matrix(m), cols, light.n_vars)
                        w.append(f"layers/{name}", mats[name])
                chunk = ad.AnnData(
                    X=sparse.csr_matrix(mats[normalize_layer], dtype=np.float32, copy=True)
                )
                log_normalise(
                    chunk, target_sum=target_sum
                )  # per cell: chunks give normalize's floats
                w.append("X", chunk.X)
                del part, mats, chunk
    logger.info("merged %d samples: %d cells x %d genes", len(obs_parts), light.n_obs, light.n_vars)
    return light.n_obs, light.n_vars


def _first_values(var_parts: Sequence[pd.DataFrame], genes: pd.Index) -> pd.DataFrame:
    """Gene identifier columns over the union ``genes``: each gene's first non-missing value
    (as ``anndata.concat(merge="first")``)."""
    cols = list(dict.fromkeys(c for v in var_parts for c in v.columns))
    out = pd.DataFrame(index=genes, columns=cols, dtype=object)
    for v in var_parts:
        for c in v.columns:
            fill = out[c].isna() & out.index.isin(v.index)
            if fill.any():
                out.loc[fill, c] = v[c].reindex(out.index[fill]).to_numpy()
    return out


def _reindex_columns(m: sparse.csr_matrix, cols: np.ndarray, n_vars: int) -> sparse.csr_matrix:
    """``m``'s columns moved to positions ``cols`` of ``n_vars`` (-1: dropped)."""
    if m.shape[1] == n_vars and np.array_equal(cols, np.arange(n_vars)):
        return m
    new = cols[m.indices]
    ok = new >= 0
    indptr = np.concatenate(
        [[0], np.cumsum(np.add.reduceat(ok, m.indptr[:-1]) * (np.diff(m.indptr) > 0))]
    )
    out = sparse.csr_matrix(
        (m.data[ok], new[ok].astype(m.indices.dtype), indptr), shape=(m.shape[0], n_vars)
    )
    out.has_sorted_indices = False
    out.sort_indices()
    return out


def _read_sample(path: str | os.PathLike[str]) -> ad.AnnData:
    """A per-sample QC file with only the matrices the merge uses (its count layers)."""
    from sepsis_sc import store

    wanted = [k for k in ("counts", "soupx_counts") if k in store.layer_names(path)]
    return store.read(path, X=not wanted, layers=wanted, obsm=False, obsp=False, uns=False)


def normalize(adata: ad.AnnData, *, target_sum: float = 1e4, layer: str = "counts") -> None:
    """Log-normalise: ``X = log1p(counts / total * target_sum)`` from ``layers[layer]``.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``layers["counts"]`` (created from ``X`` when missing).
    target_sum
        Counts per cell after scaling (1e4: CP10k).
    layer
        Counts ``X`` is computed from: ``"counts"`` (raw) or ``"soupx_counts"``
        (ambient-corrected, config ``qc.downstream_layer``); a missing ``soupx_counts``
        falls back to the raw counts (logged). Recorded in ``uns["normalization"]``.

    Returns
    -------
    None. Writes ``X`` (sparse CSR, float32) and ``uns["log1p"]``; ``layers["counts"]``
    is untouched. Running it twice gives the same result.
    """
    counts, _ = get_counts(adata, max_values=None)
    if "counts" not in adata.layers:
        adata.layers["counts"] = (
            counts.copy() if sparse.issparse(counts) else sparse.csr_matrix(counts)
        )
    if layer not in adata.layers:
        logger.warning("no layers[%r]: X is normalised from the raw counts", layer)
        layer = "counts"
    adata.X = sparse.csr_matrix(adata.layers[layer], dtype=np.float32, copy=True)
    adata.uns.pop("log1p", None)
    log_normalise(adata, target_sum=target_sum)
    adata.uns["normalization"] = {
        "method": "log1p_cp",
        "target_sum": float(target_sum),
        "layer": layer,
    }
