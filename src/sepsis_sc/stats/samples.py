"""Per-sample values of every state: :func:`sample_table`.

Per sample x state: the fraction of the discrete state in its call population, the mean
per-cell score in the parent population, and two pseudobulk values of the parent cells'
summed counts (its UCell score and the log2-CPM expression score of the up minus the down
genes). The counts are read through a :class:`~sepsis_sc.store.CountSource` (in memory or
streamed from the workflow's file) and summed by :func:`sepsis_sc.data.pseudobulk`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sepsis_sc import store
from sepsis_sc.config import ScoringSettings, StatsSettings
from sepsis_sc.data import NoRawCountsError, log2cpm, pseudobulk
from sepsis_sc.design import sample_meta
from sepsis_sc.score import ucell_scores

logger = logging.getLogger(__name__)


def sample_table(
    adata: ad.AnnData,
    settings: StatsSettings | None = None,
    *,
    sample_key: str = "sample_id",
    condition_key: str = "condition",
    donor_key: str = "donor",
    states: Sequence[str] | None = None,
    pseudobulk: bool = True,
    counts: store.CountSource | None = None,
    layer: str | None = "counts",
    max_rank: int | None = None,
    w_neg: float | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Aggregate per-cell state scores and calls to one value per sample.

    Parameters
    ----------
    adata
        AnnData scored by :func:`sepsis_sc.score.score_states`.
    settings
        The config's ``stats`` section (:class:`~sepsis_sc.config.StatsSettings`; default:
        the schema's defaults), its fields overridden by keyword (``**overrides``). Used
        here: ``min_cells``, the fewest cells of the state's population in a sample; below
        it the value is NA and ``reason`` says why (pre-specified, as recommended for donor
        x cell-type tables).
    sample_key, condition_key, donor_key
        obs columns of the sample sheet (donor optional: without it each sample is a donor).
    states
        States to aggregate (default: every scored state in ``uns["state_rules"]``).
    pseudobulk
        Also compute ``pseudobulk_score`` and ``pseudobulk_expression`` (mean log2 CPM of the
        up genes minus the down genes in the summed counts; tracks a few-fold loss of highly
        expressed genes such as MHC class II, which rank scores barely register): the parent
        cells' raw counts are summed per sample
        and the summed profile is UCell-scored with the same genes (needs raw counts).
    counts
        The raw counts summed (:class:`~sepsis_sc.store.CountSource`, e.g. the workflow's
        ``store.FileCounts.matching(path, layer, adata)``: ``adata`` then needs no matrix);
        None: ``adata``'s ``layer`` (``X`` when ``layer`` is None, or an integer-valued
        ``X`` when the layer is absent). Every state is summed in one pass over them.
    layer
        Count layer read when ``counts`` is None.
    max_rank, w_neg
        UCell settings for the pseudobulk score (default: those recorded in
        ``uns["state_rules_params"]``, else config ``scoring.max_rank`` / 1).

    Returns
    -------
    pandas.DataFrame
        Long format, one row per sample x state x metric: ``sample_id``, ``condition``,
        ``donor``, ``state``, ``label``, ``metric`` (``fraction`` of called cells within the
        call population, ``mean_score`` = mean per-cell score in the parent,
        ``pseudobulk_score``, ``pseudobulk_expression``), ``value``, ``n_cells`` (cells of the population in that
        sample), ``n_called``, ``reason`` (empty when the value is valid). Nothing is written
        to ``adata``.
    """
    settings = (settings or StatsSettings()).with_overrides(overrides)
    min_cells = settings.min_cells
    if min_cells < 1:
        raise ValueError(f"min_cells must be >= 1, got {min_cells}")
    meta = condition_meta(adata, sample_key, condition_key, donor_key)
    info = _state_info(adata, states)
    max_rank, w_neg = _ucell_settings(adata, max_rank, w_neg)
    samples = adata.obs[sample_key].astype(str).to_numpy()
    sums = (
        _parent_sums(adata, info, samples, meta.index.to_numpy(), min_cells, counts, layer)
        if pseudobulk
        else None
    )
    rows: list[dict[str, Any]] = []
    for state, si in info.items():
        rows += _state_rows(
            adata,
            state,
            si,
            meta,
            samples,
            sums=sums,
            min_cells=min_cells,
            max_rank=max_rank,
            w_neg=w_neg,
        )
    out = pd.DataFrame(rows)
    n_na = int((out["reason"] != "").sum()) if len(out) else 0
    logger.info("sample table: %d rows, %d NA (too few cells)", len(out), n_na)
    return out


def condition_meta(
    adata: ad.AnnData, sample_key: str, condition_key: str, donor_key: str | None
) -> pd.DataFrame:
    """Per-sample ``condition`` and ``donor`` in order of appearance (index = sample IDs).

    The view of :func:`sepsis_sc.design.sample_meta` that the sample table needs; without a
    donor column each sample is its own donor.
    """
    for key in (sample_key, condition_key):
        if key not in adata.obs:
            raise KeyError(f"obs[{key!r}] is missing; it comes from the sample sheet")
    if donor_key and donor_key not in adata.obs:
        logger.info("obs[%r] missing: each sample is treated as its own donor", donor_key)
    meta = sample_meta(
        adata, sample_key, columns=[condition_key], donor_key=donor_key or None, obs_order=True
    )
    return meta.rename(columns={condition_key: "condition"})[["condition", "donor"]]


def _state_info(adata: ad.AnnData, states: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    rules = adata.uns.get("state_rules", {})
    if states is None:
        if rules:
            states = [s for s, r in rules.items() if r.get("status", "scored") == "scored"]
        else:
            states = [c[: -len("_score")] for c in adata.obs.columns if c.endswith("_score")]
    info = {}
    for s in states:
        if f"{s}_score" not in adata.obs:
            raise KeyError(f"obs['{s}_score'] missing; run sepsis_sc.score.score_states first")
        r = dict(rules.get(s, {}))
        info[s] = {
            "label": r.get("label", s),
            "discrete": s in adata.obs,
            "up": [g for g in str(r.get("genes_up", "")).split(";") if g],
            "down": [g for g in str(r.get("genes_down", "")).split(";") if g],
            "call_population": r.get("call_population", "") or r.get("parent", ""),
            "parent": r.get("parent", ""),
        }
    return info


def _ucell_settings(
    adata: ad.AnnData, max_rank: int | None, w_neg: float | None
) -> tuple[int, float]:
    """UCell ``max_rank`` and ``w_neg``: as given, else as scored (``uns``), else the
    defaults (config ``scoring.max_rank``, 1)."""
    params = dict(adata.uns.get("state_rules_params", {}))
    max_rank = int(max_rank or params.get("max_rank", ScoringSettings().max_rank))
    w_neg = float(w_neg if w_neg is not None else params.get("w_neg", 1.0))
    return max_rank, w_neg


def _state_rows(
    adata: ad.AnnData,
    state: str,
    si: Mapping[str, Any],
    meta: pd.DataFrame,
    samples: np.ndarray,
    *,
    sums: Mapping[bytes, np.ndarray] | None,
    min_cells: int,
    max_rank: int,
    w_neg: float,
) -> list[dict[str, Any]]:
    """One state's rows, per sample: mean score, pseudobulk values, fraction of called cells.

    Pseudobulk values need the parent sums (``sums`` from :func:`_parent_sums`; None: not
    computed) and genes in the state's set; the fraction needs the discrete call
    ``obs[state]``.
    """
    score = adata.obs[f"{state}_score"].to_numpy(dtype=float)
    parent = np.isfinite(score)
    call = adata.obs[state].astype("boolean") if state in adata.obs else None
    pb_scores = pb_expr = None
    if sums is not None and (si["up"] or si["down"]):
        pb_scores, pb_expr = _pseudobulk_scores(
            sums,
            adata.var_names,
            samples,
            parent,
            meta.index.to_numpy(),
            si,
            min_cells,
            max_rank,
            w_neg,
        )
    rows = []
    for sid in meta.index.to_numpy():
        in_s = samples == sid
        n_par = int((parent & in_s).sum())
        reason = (
            f"{n_par} cells of {si['parent'] or 'the parent'} in this sample "
            f"(< min_cells={min_cells})"
            if n_par < min_cells
            else ""
        )
        mean = float(np.mean(score[parent & in_s])) if n_par else np.nan
        rows.append(_row(meta, sid, state, si, "mean_score", mean, n_par, np.nan, reason))
        if pb_scores is not None:
            for metric, values in (
                ("pseudobulk_score", pb_scores),
                ("pseudobulk_expression", pb_expr),
            ):
                value = float(values.get(sid, np.nan))
                rows.append(_row(meta, sid, state, si, metric, value, n_par, np.nan, reason))
        if call is not None:
            rows.append(_fraction_row(meta, sid, state, si, call, in_s, min_cells))
    return rows


def _fraction_row(
    meta: pd.DataFrame,
    sid: str,
    state: str,
    si: Mapping[str, Any],
    call: pd.Series,
    in_s: np.ndarray,
    min_cells: int,
) -> dict[str, Any]:
    """The ``fraction`` row of one sample: called cells / cells of the call population."""
    pop = (~call.isna()).to_numpy() & in_s
    n_pop = int(pop.sum())
    n_called = int(call[pop].astype(bool).sum()) if n_pop else 0
    reason = (
        f"{n_pop} cells of the call population ({si['call_population']}) in this "
        f"sample (< min_cells={min_cells})"
        if n_pop < min_cells
        else ""
    )
    value = n_called / n_pop if n_pop else np.nan
    return _row(meta, sid, state, si, "fraction", value, n_pop, n_called, reason)


def _row(
    meta: pd.DataFrame,
    sample: str,
    state: str,
    si: Mapping[str, Any],
    metric: str,
    value: float,
    n: int,
    called: float,
    reason: str,
) -> dict[str, Any]:
    """One row of the sample table (``value`` is NaN when ``reason`` says it is not valid)."""
    pop = si["call_population"] if metric == "fraction" else si["parent"]
    return {
        "sample_id": sample,
        "condition": meta.loc[sample, "condition"],
        "donor": meta.loc[sample, "donor"],
        "state": state,
        "label": si["label"],
        "metric": metric,
        "population": pop,
        "value": value if not reason else np.nan,
        "n_cells": n,
        "n_called": called,
        "reason": reason,
    }


def _parent_codes(
    samples: np.ndarray, parent: np.ndarray, sample_ids: np.ndarray, min_cells: int
) -> tuple[list[str], np.ndarray]:
    """Samples with at least ``min_cells`` parent cells, and each cell's position among them
    (-1: not a parent cell, or its sample has too few)."""
    keep = [s for s in sample_ids if int((parent & (samples == s)).sum()) >= min_cells]
    codes = pd.Categorical(samples, categories=keep).codes
    return keep, np.where(parent & (codes >= 0), codes, -1).astype(np.int64)


def _parent_sums(
    adata: ad.AnnData,
    info: Mapping[str, Mapping[str, Any]],
    samples: np.ndarray,
    sample_ids: np.ndarray,
    min_cells: int,
    counts: store.CountSource | None,
    layer: str | None,
) -> dict[bytes, np.ndarray] | None:
    """Every state's per-sample parent sums in one pass over the counts, keyed by the
    state's code vector (states with the same parent cells share one sum); None (with a
    warning) when ``adata`` holds no raw counts."""
    try:
        source = store.count_source(adata, counts, layer, check=False)
    except NoRawCountsError as err:
        logger.warning("pseudobulk scores not computed: %s", err)
        return None
    wanted: dict[bytes, tuple[np.ndarray, int]] = {}
    for state, si in info.items():
        if not (si["up"] or si["down"]):
            continue
        parent = np.isfinite(adata.obs[f"{state}_score"].to_numpy(dtype=float))
        keep, codes = _parent_codes(samples, parent, sample_ids, min_cells)
        if keep:
            wanted.setdefault(codes.tobytes(), (codes, len(keep)))
    keys = list(wanted)
    sums = pseudobulk(source, [wanted[k][0] for k in keys], [wanted[k][1] for k in keys])
    return dict(zip(keys, sums, strict=True))


def _pseudobulk_scores(
    sums: Mapping[bytes, np.ndarray],
    var_names: pd.Index,
    samples: np.ndarray,
    parent: np.ndarray,
    sample_ids: np.ndarray,
    si: Mapping[str, Any],
    min_cells: int,
    max_rank: int,
    w_neg: float,
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-sample pseudobulk of the parent cells: (UCell score, expression score).

    The expression score is mean log2(CPM + 1) of the set's up genes minus that of its down
    genes in the summed counts. Unlike rank scores it moves when very highly expressed genes
    (MHC class II in monocytes and DCs) drop a few-fold, which is what flow mHLA-DR measures.
    """
    keep, codes = _parent_codes(samples, parent, sample_ids, min_cells)
    if not keep:
        return {}, {}
    pb = sums[codes.tobytes()]
    pb_ad = ad.AnnData(sp.csr_matrix(pb))
    pb_ad.var_names = var_names
    res = ucell_scores(
        pb_ad,
        {"s": {"up": si["up"], "down": si["down"]}},
        max_rank=max_rank,
        w_neg=w_neg,
        layer=None,
    )
    logcpm = log2cpm(pb)  # samples x genes is small: dense even for hundreds of samples
    expr = np.zeros(len(keep))
    for genes, sign in ((si["up"], 1.0), (si["down"], -1.0)):
        idx = var_names.get_indexer([g for g in genes if g in var_names])
        idx = idx[idx >= 0]
        if idx.size:
            expr += sign * logcpm[:, idx].mean(axis=1)
    return dict(zip(keep, res["s"].to_numpy())), dict(zip(keep, expr))
