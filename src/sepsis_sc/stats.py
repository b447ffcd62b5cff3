"""Sample-level statistics for therapy-target states and cell-type composition.

The sample (donor) is the unit of replication: per-cell scores and calls from
:func:`sepsis_sc.score.score_states` are first aggregated per sample, and every p-value comes
from a test on those sample values (Squair et al. 2021 Nat Commun,
DOI 10.1038/s41467-021-25960-2). Repeated samples of one donor are averaged within a
condition, and donors seen in both conditions are compared with a paired test.

* :func:`sample_table`: per sample x state, the fraction of the discrete state in its call
  population, the mean per-cell score and a pseudobulk-then-score value (long format).
* :func:`condition_effects`: case vs control per state x metric (effect, 95% CI, Welch or
  paired t-test, BH-FDR, plain-language meaning).
* :func:`composition_test`: propeller-style differential abundance of lineages or subsets
  (Phipson et al. 2022 Bioinformatics, DOI 10.1093/bioinformatics/btac582).
* :func:`therapy_targets`: ranked summary linking states to therapeutic ideas.

Figures of these tables are in :mod:`sepsis_sc.pl.stats`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from sepsis_sc import store
from sepsis_sc.data import NoRawCountsError, get_counts, pseudobulk
from sepsis_sc.design import (
    COEF,
    Contrast,
    ContrastArgs,
    SampleDesign,
    linear_test,
    sample_meta,
)
from sepsis_sc.resources import load_yaml, resource_path
from sepsis_sc.score import base_state, ucell_scores

logger = logging.getLogger(__name__)

__all__ = [
    "sample_table",
    "condition_effects",
    "composition_test",
    "therapy_targets",
    "primary_metrics",
    "primary_rows",
    "load_targets",
    "welch_test",
    "bh_fdr",
    "EFFECT_TYPE",
]

_METRIC_TEXT = {
    "fraction": "fraction within {pop}",
    "mean_score": "mean score",
    "pseudobulk_score": "pseudobulk score",
    "pseudobulk_expression": "pseudobulk expression",
}
_UNIT = {
    "fraction": "log2 ratio",
    "mean_score": "score difference (UCell)",
    "pseudobulk_score": "score difference (UCell)",
    "pseudobulk_expression": "log2 CPM difference",
}
#: what each metric's effect size is, in words (tables and figure axes)
EFFECT_TYPE = {
    "fraction": "log2 ratio of geometric-mean fractions (case/control)",
    "mean_score": "difference in mean score (case - control)",
    "pseudobulk_score": "difference in mean pseudobulk score (case - control)",
    "pseudobulk_expression": "difference in pseudobulk log2 CPM, up - down genes (case - control)",
}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def bh_fdr(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values; NaN entries stay NaN and are not counted."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return out
    pv = p[ok]
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    res = np.empty(m)
    res[order] = np.minimum(ranked, 1.0)
    out[ok] = res
    return out


def _sample_meta(
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


# --------------------------------------------------------------------------------------
# sample table
# --------------------------------------------------------------------------------------
def sample_table(
    adata: ad.AnnData,
    *,
    sample_key: str = "sample_id",
    condition_key: str = "condition",
    donor_key: str = "donor",
    min_cells: int = 20,
    states: Sequence[str] | None = None,
    pseudobulk: bool = True,
    layer: str | None = "counts",
    max_rank: int | None = None,
    w_neg: float | None = None,
    counts_file: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Aggregate per-cell state scores and calls to one value per sample.

    Parameters
    ----------
    adata
        AnnData scored by :func:`sepsis_sc.score.score_states`.
    sample_key, condition_key, donor_key
        obs columns of the sample sheet (donor optional: without it each sample is a donor).
    min_cells
        Minimum cells of the state's population in a sample; below it the value is NA and
        ``reason`` says why (pre-specified, as recommended for donor x cell-type tables).
    states
        States to aggregate (default: every scored state in ``uns["state_rules"]``).
    pseudobulk
        Also compute ``pseudobulk_score`` and ``pseudobulk_expression`` (mean log2 CPM of the
        up genes minus the down genes in the summed counts; tracks a few-fold loss of highly
        expressed genes such as MHC class II, which rank scores barely register): the parent
        cells' raw counts are summed per sample
        and the summed profile is UCell-scored with the same genes (needs ``layer``).
    layer, max_rank, w_neg
        Count layer and UCell settings for the pseudobulk score (default: those recorded in
        ``uns["state_rules_params"]``, else counts / 1500 / 1).
    counts_file
        Sum ``layers[layer]`` of this ``.h5ad`` for every state in one streamed pass instead
        of ``adata``'s matrix (``adata`` then needs no matrix; the same values).

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
    if min_cells < 1:
        raise ValueError(f"min_cells must be >= 1, got {min_cells}")
    meta = _sample_meta(adata, sample_key, condition_key, donor_key)
    info = _state_info(adata, states)
    max_rank, w_neg = _ucell_settings(adata, max_rank, w_neg)
    samples = adata.obs[sample_key].astype(str).to_numpy()
    if pseudobulk and counts_file is not None:
        counts = _streamed_sums(
            adata, info, samples, meta.index.to_numpy(), min_cells, counts_file, layer
        )
    else:
        counts = _count_layer(adata, layer) if pseudobulk else None
    rows: list[dict[str, Any]] = []
    for state, si in info.items():
        rows += _state_rows(
            adata,
            state,
            si,
            meta,
            samples,
            counts=counts,
            min_cells=min_cells,
            max_rank=max_rank,
            w_neg=w_neg,
        )
    out = pd.DataFrame(rows)
    n_na = int((out["reason"] != "").sum()) if len(out) else 0
    logger.info("sample table: %d rows, %d NA (too few cells)", len(out), n_na)
    return out


def _ucell_settings(
    adata: ad.AnnData, max_rank: int | None, w_neg: float | None
) -> tuple[int, float]:
    """UCell ``max_rank`` and ``w_neg``: as given, else as scored (``uns``), else 1500 / 1."""
    params = dict(adata.uns.get("state_rules_params", {}))
    max_rank = int(max_rank or params.get("max_rank", 1500))
    w_neg = float(w_neg if w_neg is not None else params.get("w_neg", 1.0))
    return max_rank, w_neg


def _count_layer(adata: ad.AnnData, layer: str | None) -> Any:
    """The raw counts for pseudobulk values (``X`` when ``layer`` is None): ``layers[layer]``,
    or raw counts in ``X``; None (with a warning) when neither holds them."""
    if layer is None:
        return adata.X
    try:
        return get_counts(adata, layer, check=False)[0]
    except NoRawCountsError as err:
        logger.warning("pseudobulk scores not computed: %s", err)
        return None


def _state_rows(
    adata: ad.AnnData,
    state: str,
    si: Mapping[str, Any],
    meta: pd.DataFrame,
    samples: np.ndarray,
    *,
    counts: Any,
    min_cells: int,
    max_rank: int,
    w_neg: float,
) -> list[dict[str, Any]]:
    """One state's rows, per sample: mean score, pseudobulk values, fraction of called cells.

    Pseudobulk values need ``counts`` (None: not computed) and genes in the state's set;
    the fraction needs the discrete call ``obs[state]``.
    """
    score = adata.obs[f"{state}_score"].to_numpy(dtype=float)
    parent = np.isfinite(score)
    call = adata.obs[state].astype("boolean") if state in adata.obs else None
    pb_scores = pb_expr = None
    if counts is not None and (si["up"] or si["down"]):
        pb_scores, pb_expr = _pseudobulk_scores(
            counts,
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


def _streamed_sums(
    adata: ad.AnnData,
    info: Mapping[str, Mapping[str, Any]],
    samples: np.ndarray,
    sample_ids: np.ndarray,
    min_cells: int,
    counts_file: str | os.PathLike[str],
    layer: str | None,
) -> dict[bytes, np.ndarray]:
    """Every state's per-sample parent sums in one streamed pass over ``counts_file``, keyed
    by the state's code vector (states with the same parent cells share one sum)."""
    from sepsis_sc import store

    wanted: dict[bytes, tuple[np.ndarray, int]] = {}
    for state, si in info.items():
        if not (si["up"] or si["down"]):
            continue
        parent = np.isfinite(adata.obs[f"{state}_score"].to_numpy(dtype=float))
        keep, codes = _parent_codes(samples, parent, sample_ids, min_cells)
        if keep:
            wanted.setdefault(codes.tobytes(), (codes, len(keep)))
    store.FileCounts.matching(counts_file, layer or "X", adata)
    keys = list(wanted)
    sums = pseudobulk(
        store.FileCounts(counts_file, layer or "X"),
        [wanted[k][0] for k in keys],
        [wanted[k][1] for k in keys],
        chunk_rows=10_000,
    )
    return dict(zip(keys, sums, strict=True))


def _pseudobulk_scores(
    counts: Any,
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
    if isinstance(counts, Mapping):  # summed beforehand in one pass over the file
        pb = counts[codes.tobytes()]
    else:
        pb = pseudobulk(
            store.CountSource(counts), codes, len(keep)
        )  # no copy of the parent cells' rows
    pb_ad = ad.AnnData(sp.csr_matrix(pb))
    pb_ad.var_names = var_names
    res = ucell_scores(
        pb_ad,
        {"s": {"up": si["up"], "down": si["down"]}},
        max_rank=max_rank,
        w_neg=w_neg,
        layer=None,
    )
    # samples x genes is small (dense is fine even for hundreds of samples)
    pb = sp.csr_matrix(pb)
    libsize = np.maximum(np.asarray(pb.sum(axis=1)).ravel(), 1.0)
    logcpm = np.log2(pb.multiply(1e6 / libsize[:, None]).toarray() + 1.0)
    expr = np.zeros(len(keep))
    for genes, sign in ((si["up"], 1.0), (si["down"], -1.0)):
        idx = var_names.get_indexer([g for g in genes if g in var_names])
        idx = idx[idx >= 0]
        if idx.size:
            expr += sign * logcpm[:, idx].mean(axis=1)
    return dict(zip(keep, res["s"].to_numpy())), dict(zip(keep, expr))


# --------------------------------------------------------------------------------------
# condition effects
# --------------------------------------------------------------------------------------
def _test_scale(df: pd.DataFrame, metric: str) -> np.ndarray:
    """Sample values on the test scale: log2 fraction (0.5-cell pseudo-count) or the value."""
    if metric == "fraction":
        return np.log2(
            (df["n_called"].to_numpy(float) + 0.5) / (df["n_cells"].to_numpy(float) + 1.0)
        )
    return df["value"].to_numpy(float)


def welch_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, float]:
    """Welch t-test of two groups of values: (difference a - b, 95 % CI low, CI high, p).
    The unmoderated reference test (the simulator's oracle)."""
    diff = a.mean() - b.mean()
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = np.sqrt(va + vb)
    if se == 0:
        return diff, np.nan, np.nan, np.nan
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    tcrit = stats.t.ppf(0.975, df)
    p = 2 * stats.t.sf(abs(diff / se), df)
    return diff, diff - tcrit * se, diff + tcrit * se, p


def _meaning(
    label: str,
    metric: str,
    pop: str,
    case: str,
    control: str,
    effect: float,
    lo: float,
    hi: float,
    fdr: float,
    alpha: float,
    note: str,
    mean_case: float = np.nan,
    mean_control: float = np.nan,
) -> str:
    """One plain-language sentence for a row of :func:`condition_effects`."""
    if metric == "fraction":
        what = f"{label}s (share of {pop or 'their population'})"
        extra = (
            f"{mean_case:.1%} vs {mean_control:.1%} of cells, " if np.isfinite(mean_case) else ""
        )
    else:
        what = {
            "pseudobulk_score": f"the pseudobulk {label} score",
            "pseudobulk_expression": f"the pseudobulk {label} expression (up - down genes)",
        }.get(metric, f"the {label} score")
        extra = ""
    if not np.isfinite(effect):
        return f"{what[0].upper() + what[1:]}: not estimable ({note})."
    ci = f"95% CI {lo:+.3g} to {hi:+.3g}" if np.isfinite(lo) else "no CI"
    scale = "log2 ratio" if metric == "fraction" else "difference"
    stat = f"{extra}{scale} {effect:+.3g}, {ci}"
    if not np.isfinite(fdr):
        return f"{what[0].upper() + what[1:]}: {stat} in {case} vs {control}; not tested ({note})."
    if fdr > alpha:
        verb = "differ" if metric == "fraction" else "differs"
        return (
            f"No evidence that {what} {verb} between {case} and {control} ({stat}, FDR {fdr:.2g})."
        )
    if metric == "fraction":
        word = "are more frequent" if effect > 0 else "are less frequent"
    else:
        word = "is higher" if effect > 0 else "is lower"
    return (
        f"{what[0].upper() + what[1:]} {word} in {case} than in {control} ({stat}, FDR {fdr:.2g})."
    )


def load_targets(targets: Mapping[str, Any] | str | Path | None) -> Mapping[str, Any]:
    """The therapy-target entries: as given, from a YAML path, or the packaged resource."""
    if targets is None or isinstance(targets, str | Path):
        return load_yaml(Path(targets) if targets else resource_path("therapy_targets.yaml"))
    return targets


def primary_metrics(
    states: Sequence[str],
    discrete: Mapping[str, bool] | None = None,
    targets: Mapping[str, Any] | str | Path | None = None,
) -> dict[str, str]:
    """The pre-specified primary sample-level metric of each state.

    From ``primary_metric`` in ``resources/therapy_targets.yaml`` (or ``targets``); a
    stratified state (``cytokine_storm.monocyte``) takes its base state's entry; a state
    without an entry takes ``fraction`` when it has discrete calls, else ``mean_score``. The
    primary metric is fixed before looking at the data: FDR is taken over the primary tests,
    and no other metric replaces it when it is missing (no metric shopping).
    """
    targets = load_targets(targets)
    discrete = discrete or {}
    out = {}
    for s in states:
        t = targets.get(s) or targets.get(base_state(s)) or {}
        out[s] = str(
            t.get("primary_metric") or ("fraction" if discrete.get(s, False) else "mean_score")
        )
    return out


def _meta_for(
    table: pd.DataFrame, meta: pd.DataFrame | None, condition_key: str = "condition"
) -> pd.DataFrame:
    """Per-sample sheet: ``meta`` when given (index sample_id), else from the table's columns."""
    if meta is not None:
        m = meta.copy()
        m.index = m.index.astype(str)
        if "donor" not in m.columns:
            m["donor"] = m.index
        return m
    cols = [c for c in ("sample_id", "condition", "donor") if c in table.columns]
    m = table[cols].astype(str).drop_duplicates("sample_id").set_index("sample_id")
    if condition_key != "condition" and "condition" in m:
        m[condition_key] = m["condition"]
    return m


def condition_effects(
    table: pd.DataFrame,
    *,
    alpha: float = 0.05,
    test: str = "t",
    metrics: Sequence[str] | None = None,
    primary: Mapping[str, str] | None = None,
    moderate: bool = True,
    **contrast_args: Any,
) -> pd.DataFrame:
    """Case vs control effect of every state x metric, with donors as the units.

    The design comes from :mod:`sepsis_sc.design`, the same rule as composition and pseudobulk
    DE: samples are put on the test scale (scores as they are; fractions as
    ``log2((n_called + 0.5) / (n_cells + 1))``), **averaged per donor x contrast level** (a
    patient sampled at T0 and T6 is one septic unit), and fitted with a linear model
    (``formula``, default ``~ condition``; donor blocks when donors are seen at both levels,
    i.e. the paired t-test). Residual variances are moderated across the states of each
    metric (limma eBayes, Smyth 2004; a metric's states share its scale) and the case
    coefficient is tested with the moderated t, which also gives the 95% CI.
    ``test="rank"`` replaces the p-value with Mann-Whitney U (Wilcoxon signed-rank when
    paired) on the unit values; only for designs without covariates.

    Benjamini-Hochberg FDR is taken over the **primary** tests (one pre-specified metric per
    state, :func:`primary_metrics`); the other metrics are ``role == "secondary"`` with an FDR
    of their own family, reported for context. A group with fewer than two units gets an
    effect but no p-value, and ``note`` says why; ``direction`` is filled only where the test
    is significant.

    Parameters
    ----------
    table
        Output of :func:`sample_table`.
    case, control, contrast, design, meta, formula, paired
        The contrast keywords (:class:`~sepsis_sc.design.ContrastArgs`): ``case`` vs
        ``control`` values of ``obs["condition"]``, or a ``contrast`` / resolved ``design``;
        ``meta`` defaults to the table's ``condition`` and ``donor``.
    alpha
        FDR level for ``significant``, ``direction`` and the wording of ``meaning``.
    test
        ``"t"`` (moderated t, default) or ``"rank"``.
    metrics
        Metrics to test (default all in the table).
    primary
        ``{state: metric}`` (default :func:`primary_metrics` from the packaged resource).
    moderate
        Empirical-Bayes variance moderation (False: ordinary t from each state alone).

    Returns
    -------
    pandas.DataFrame
        One row per state x metric: ``contrast``, ``state``, ``label``, ``metric``, ``role``
        (primary / secondary), ``population``, ``unit`` and ``effect_type`` (scale of the
        effect), ``mean_case``, ``mean_control`` (raw scale, mean of the units), ``effect``,
        ``ci_low``, ``ci_high``, ``pvalue``, ``fdr`` (within the role's family),
        ``significant``, ``test``, ``design``, ``n_case``, ``n_control`` (units), ``n_pairs``,
        ``direction``, ``meaning``, ``note``.
    """
    args = ContrastArgs(**contrast_args)
    _check_effects_input(table, test)
    design = args.resolve(_meta_for(table, args.meta))
    _check_rank_test(design, test)
    tab = _design_rows(table, design, metrics)
    if tab.empty:
        return pd.DataFrame()
    primary = _primary_of(tab, primary)
    info = tab.drop_duplicates(["state", "metric"]).set_index(["state", "metric"])
    results = []
    for metric, mdf in tab.groupby("metric", sort=False):
        results += _metric_effects(mdf, metric, design, info, primary, test=test, moderate=moderate)
    return _effects_table(results, design.contrast, alpha)


def _check_effects_input(table: pd.DataFrame, test: str) -> None:
    """The table must be a :func:`sample_table` output and ``test`` a known test."""
    need = {"sample_id", "condition", "donor", "state", "metric", "value", "n_cells", "n_called"}
    missing = need - set(table.columns)
    if missing:
        raise ValueError(
            f"table lacks column(s) {sorted(missing)}; pass the output of sample_table()"
        )
    if test not in ("t", "rank"):
        raise ValueError(f"test must be 't' or 'rank', got {test!r}")


def _check_rank_test(design: SampleDesign, test: str) -> None:
    """Rank tests cannot adjust for covariates."""
    n_cov = design.matrix.shape[1] - (design.n_pairs if design.paired else 1) - 1
    if test == "rank" and n_cov > 0:
        raise ValueError(
            "test='rank' cannot adjust for covariates; use test='t' with this design "
            f"({design.formula})"
        )


def _design_rows(
    table: pd.DataFrame, design: SampleDesign, metrics: Sequence[str] | None
) -> pd.DataFrame:
    """Rows of the samples in the design (sample IDs as text), of the chosen metrics."""
    tab = table[table["sample_id"].astype(str).isin(design.sample_unit.index)].copy()
    tab["sample_id"] = tab["sample_id"].astype(str)
    if metrics is not None:
        tab = tab[tab["metric"].isin(metrics)]
    return tab


def _primary_of(tab: pd.DataFrame, primary: Mapping[str, str] | None) -> dict[str, str]:
    """``{state: primary metric}``: as given, else :func:`primary_metrics` of the table's states."""
    states = list(dict.fromkeys(tab["state"]))
    discrete = {s: bool((tab[(tab["state"] == s)]["metric"] == "fraction").any()) for s in states}
    return dict(primary) if primary is not None else primary_metrics(states, discrete)


def _unit_values(
    mdf: pd.DataFrame, metric: str, design: SampleDesign, feats: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Units x states of one metric on the test scale and on the raw scale, and NA counts.

    A unit's value is the mean of its samples' values; NA samples (too few cells) are skipped.
    """
    y_cols, raw_cols, n_na = {}, {}, {}
    for state in feats:
        d = mdf[mdf["state"] == state].set_index("sample_id")
        valid = d["value"].notna()
        n_na[state] = int((~valid).sum())
        ys = pd.Series(_test_scale(d, metric), index=d.index).where(valid)
        y_cols[state] = design.aggregate_mean(ys)
        raw_cols[state] = design.aggregate_mean(d["value"].where(valid))
    y = pd.DataFrame(y_cols, index=design.units.index)
    raw = pd.DataFrame(raw_cols, index=design.units.index)
    return y, raw, n_na


def _metric_effects(
    mdf: pd.DataFrame,
    metric: str,
    design: SampleDesign,
    info: pd.DataFrame,
    primary: Mapping[str, str],
    *,
    test: str,
    moderate: bool,
) -> list[dict[str, Any]]:
    """One metric: its states fitted together (shared variance prior), one result row each."""
    feats = list(dict.fromkeys(mdf["state"]))
    y, raw, n_na = _unit_values(mdf, metric, design, feats)
    fit = linear_test(design, y, moderate=moderate)
    return [
        _effect_row(
            state,
            metric,
            design,
            fit.loc[state],
            y,
            raw,
            n_na[state],
            info.loc[(state, metric)],
            primary,
            test=test,
            moderate=moderate,
        )
        for state in feats
    ]


def _effect_notes(design: SampleDesign, r: pd.Series, n_na: int) -> tuple[list[str], float]:
    """Notes of one state x metric and its p-value (NaN when a group has < 2 units)."""
    con = design.contrast
    notes = [design.reason] if not design.testable and design.reason else []
    notes += list(design.notes)
    if n_na:
        notes.append(f"{n_na} sample(s) NA (too few cells)")
    if r["note"]:
        notes.append(str(r["note"]))
    p = float(r["pvalue"])
    small = [
        f"{lab} (n={n})"
        for lab, n in ((con.case, r["n_case"]), (con.control, r["n_control"]))
        if n < 2
    ]
    if r["n_case"] == 0 or r["n_control"] == 0:
        notes.append("no sample with enough cells in one condition")
    elif small and not design.paired:
        notes.append(f"fewer than 2 units in {', '.join(small)}: effect size only, no p-value")
        p = np.nan
    return notes, p


def _test_name(design: SampleDesign, test: str, moderate: bool) -> str:
    """E.g. ``paired moderated t`` or ``Mann-Whitney U``."""
    ptype = "moderated t" if moderate else "t"
    return ("paired " if design.paired else "") + (
        ptype if test == "t" else ("Wilcoxon signed-rank" if design.paired else "Mann-Whitney U")
    )


def _effect_row(
    state: str,
    metric: str,
    design: SampleDesign,
    r: pd.Series,
    y: pd.DataFrame,
    raw: pd.DataFrame,
    n_na: int,
    row: pd.Series,
    primary: Mapping[str, str],
    *,
    test: str,
    moderate: bool,
) -> dict[str, Any]:
    """One result row of :func:`condition_effects` (FDR, direction and meaning come later)."""
    con = design.contrast
    is_case = design.matrix[COEF] == 1
    ok = y[state].notna()
    notes, p = _effect_notes(design, r, n_na)
    if test == "rank" and np.isfinite(p):
        p = _rank_p(design, y[state])
    return {
        "contrast": con.name,
        "state": state,
        "label": str(row.get("label", state)),
        "metric": metric,
        "role": "primary" if primary.get(state) == metric else "secondary",
        "population": str(row.get("population", "")),
        "effect_type": EFFECT_TYPE.get(metric, "difference in means"),
        "unit": _UNIT.get(metric, ""),
        "mean_case": float(raw.loc[ok & is_case, state].mean()),
        "mean_control": float(raw.loc[ok & ~is_case, state].mean()),
        "effect": float(r["effect"]),
        "ci_low": float(r["ci_low"]) if np.isfinite(p) else np.nan,
        "ci_high": float(r["ci_high"]) if np.isfinite(p) else np.nan,
        "pvalue": p,
        "test": _test_name(design, test, moderate),
        "design": design.description(),
        "n_case": int(r["n_case"]),
        "n_control": int(r["n_control"]),
        "n_pairs": int(r["n_case"]) if design.paired else 0,
        "note": "; ".join(dict.fromkeys(n for n in notes if n)),
    }


def _direction(res: pd.DataFrame, case: str) -> np.ndarray:
    """``higher in <case>`` / ``lower in <case>`` where significant, else empty."""
    return np.where(
        ~res["significant"],
        "",
        np.where(res["effect"] > 0, f"higher in {case}", f"lower in {case}"),
    )


def _effects_table(results: list[dict[str, Any]], con: Contrast, alpha: float) -> pd.DataFrame:
    """Result rows -> the table: BH-FDR within each role, direction, meaning, primary first."""
    res = pd.DataFrame(results)
    res["fdr"] = np.nan
    for role in ("primary", "secondary"):
        m = (res["role"] == role).to_numpy()
        if m.any():
            res.loc[m, "fdr"] = bh_fdr(res.loc[m, "pvalue"].to_numpy())
    res["significant"] = res["fdr"] <= alpha
    res["direction"] = _direction(res, con.case)
    res["meaning"] = [
        _meaning(
            r.label,
            r.metric,
            r.population,
            con.case,
            con.control,
            r.effect,
            r.ci_low,
            r.ci_high,
            r.fdr,
            alpha,
            r.note,
            r.mean_case,
            r.mean_control,
        )
        for r in res.itertuples()
    ]
    cols = [
        "contrast",
        "state",
        "label",
        "metric",
        "role",
        "population",
        "effect_type",
        "unit",
        "mean_case",
        "mean_control",
        "effect",
        "ci_low",
        "ci_high",
        "pvalue",
        "fdr",
        "significant",
        "test",
        "design",
        "n_case",
        "n_control",
        "n_pairs",
        "direction",
        "meaning",
        "note",
    ]
    order = {"primary": 0, "secondary": 1}
    res = res.assign(_r=res["role"].map(order)).sort_values(["_r"], kind="stable")
    return res[cols].reset_index(drop=True)


def _rank_p(design: SampleDesign, y: pd.Series) -> float:
    """Mann-Whitney U on unit values, or Wilcoxon signed-rank on within-donor differences."""
    ok = y.notna()
    u = design.units[ok]
    v = y[ok]
    if design.paired:
        piv = pd.DataFrame({"donor": u["donor"], "level": u["level"], "v": v}).pivot(
            index="donor", columns="level", values="v"
        )
        piv = piv.dropna()
        if len(piv) < 2:
            return np.nan
        return float(
            stats.wilcoxon(piv[design.contrast.case] - piv[design.contrast.control]).pvalue
        )
    a = v[u["level"] == design.contrast.case].to_numpy()
    b = v[u["level"] == design.contrast.control].to_numpy()
    if a.size < 2 or b.size < 2:
        return np.nan
    return float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)


# --------------------------------------------------------------------------------------
# composition (propeller-style)
# --------------------------------------------------------------------------------------
def composition_test(
    adata: ad.AnnData,
    *,
    level: str = "lineage",
    sample_key: str = "sample_id",
    condition_key: str = "condition",
    donor_key: str | None = "donor",
    transform: str = "logit",
    exclude: Sequence[str] = ("Unassigned",),
    alpha: float = 0.05,
    **contrast_args: Any,
) -> pd.DataFrame:
    """Differential abundance of lineages or subsets, propeller style, donors as units.

    Per sample, label counts become proportions with 0.5 pseudo-counts (speckle's
    ``getTransformedProps``), logit- (default) or arcsine-sqrt-transformed; the values are
    averaged per unit of the design (:mod:`sepsis_sc.design`: a donor's samples at one
    contrast level are one unit, so a patient sampled at T0 and T6 counts once; donors seen at
    both levels are paired with donor blocks), and each label is fitted with the design's
    linear model (covariates from ``formula``). Residual variances are
    moderated with limma's empirical-Bayes prior across labels (Smyth 2004) and tested with
    the moderated t (Phipson et al. 2022, DOI 10.1093/bioinformatics/btac582); BH-FDR over
    labels. All cells of the units form the denominators; labels in ``exclude`` are not tested.

    Parameters
    ----------
    adata
        Annotated AnnData (``obs[level]``, sample sheet columns).
    case, control, contrast, design, meta, formula, paired
        The contrast keywords (:class:`~sepsis_sc.design.ContrastArgs`), as in
        :func:`condition_effects`: ``case`` and ``control`` are values of
        ``obs[condition_key]`` (effect = case vs control); ``meta`` defaults to the sheet
        columns in ``obs``.
    level
        ``"lineage"`` or ``"cell_type"`` (any obs column of labels works).
    sample_key, condition_key, donor_key
        Sample sheet columns (donor optional: without it each sample is its own donor).
    transform
        ``"logit"`` or ``"asin"`` (arcsine square root).
    exclude
        Labels counted in the totals but not tested.
    alpha
        FDR level for ``significant``.

    Returns
    -------
    pandas.DataFrame
        One row per label: ``contrast``, ``level``, ``label``, ``mean_prop_case``,
        ``mean_prop_control`` (mean over units), ``prop_ratio``, ``log2_prop_ratio``,
        ``effect`` (difference on the transformed scale) with ``ci_low`` / ``ci_high``, ``unit``,
        ``t``, ``df``, ``pvalue``, ``fdr``, ``significant``, ``n_case``, ``n_control`` (units),
        ``design``, ``transform``, ``direction`` (only where significant), ``meaning``,
        ``note``. Nothing is written to ``adata``.
    """
    args = ContrastArgs(**contrast_args)
    if level not in adata.obs:
        raise KeyError(f"obs[{level!r}] missing; run sepsis_sc.annotate.annotate first")
    if transform not in ("logit", "asin"):
        raise ValueError(f"transform must be 'logit' or 'asin', got {transform!r}")
    meta = args.meta
    if meta is None:
        meta, contrast = _composition_meta(adata, args, sample_key, condition_key, donor_key)
        args = replace(args, contrast=contrast)
    design = args.resolve(meta)
    con = design.contrast
    counts = _label_counts(adata, design, sample_key, level)
    y, props = _unit_proportions(counts, design, transform)
    labels = [c for c in counts.columns if c not in set(exclude)]
    res = _proportion_summary(props, labels, design)
    fit, note = _composition_fit(design, y[labels], labels)
    res = _composition_columns(res, fit, design, note, transform, alpha)
    res["meaning"] = [_composition_meaning(r, con.case, con.control) for r in res.itertuples()]
    res.insert(0, "level", level)
    res.insert(0, "contrast", con.name)
    return res.sort_values("pvalue", na_position="last").reset_index(drop=True)


def _composition_meta(
    adata: ad.AnnData,
    args: ContrastArgs,
    sample_key: str,
    condition_key: str,
    donor_key: str | None,
) -> tuple[pd.DataFrame, Contrast | None]:
    """The sheet from ``obs``: condition and donor, plus every sheet column when the formula
    or the contrast needs more; and the contrast (``case`` vs ``control`` when not given)."""
    meta = _sample_meta(adata, sample_key, condition_key, donor_key)
    if condition_key != "condition":
        meta[condition_key] = meta["condition"]
    contrast, design = args.contrast, args.design
    if contrast is None and design is None:
        contrast = args.shorthand()
    col = (design.contrast if design is not None else contrast).column
    extra = sample_meta(adata, sample_key) if (args.formula or col not in meta) else None
    if extra is not None:
        meta = meta.join(extra.drop(columns=[c for c in extra.columns if c in meta]))
    return meta, contrast


def _label_counts(
    adata: ad.AnnData, design: SampleDesign, sample_key: str, level: str
) -> pd.DataFrame:
    """Samples of the design x labels: cell counts (zeros included)."""
    obs = adata.obs[[sample_key, level]].astype(str)
    obs = obs[obs[sample_key].isin(design.sample_unit.index)]
    return pd.crosstab(obs[sample_key], obs[level]).reindex(design.sample_unit.index, fill_value=0)


def _unit_proportions(
    counts: pd.DataFrame, design: SampleDesign, transform: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Units x labels: transformed proportions (test scale) and raw proportions.

    Logit of proportions with 0.5 pseudo-counts (speckle's ``getTransformedProps``) or the
    arcsine square root; a unit's value is the mean of its samples (each patient counts once).
    """
    totals = counts.sum(axis=1)
    sprops = counts.div(totals.where(totals > 0), axis=0)
    pseudo = (counts + 0.5).div((counts + 0.5).sum(axis=1), axis=0)
    sy = np.log(pseudo / (1 - pseudo)) if transform == "logit" else np.arcsin(np.sqrt(sprops))
    y = pd.DataFrame({c: design.aggregate_mean(sy[c]) for c in sy.columns})
    props = pd.DataFrame({c: design.aggregate_mean(sprops[c]) for c in sprops.columns})
    return y, props


def _proportion_summary(
    props: pd.DataFrame, labels: Sequence[str], design: SampleDesign
) -> pd.DataFrame:
    """Per label: mean proportion over case and control units, and their ratio."""
    is_case = (design.matrix[COEF] == 1).to_numpy()
    res = pd.DataFrame({"label": labels})
    res["mean_prop_case"] = props.loc[is_case, labels].mean().to_numpy()
    res["mean_prop_control"] = props.loc[~is_case, labels].mean().to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        res["prop_ratio"] = res["mean_prop_case"] / res["mean_prop_control"]
        res["log2_prop_ratio"] = np.log2(res["prop_ratio"])
    return res


def _composition_fit(
    design: SampleDesign, y: pd.DataFrame, labels: Sequence[str]
) -> tuple[pd.DataFrame, str]:
    """Moderated linear model per label (no p-values without residual df) and the note."""
    fit = linear_test(design, y, moderate=len(labels) >= 3).reindex(labels)
    note = "; ".join(n for n in [design.reason, *design.notes] if n)
    if not design.testable or design.df_resid < 1:
        fit[["ci_low", "ci_high", "t", "df", "pvalue"]] = np.nan
        note = note or "no residual degree of freedom: effect size only, no p-value"
        note += "; propeller needs replicates"
    return fit, note


def _composition_columns(
    res: pd.DataFrame,
    fit: pd.DataFrame,
    design: SampleDesign,
    note: str,
    transform: str,
    alpha: float,
) -> pd.DataFrame:
    """Add the fit, BH-FDR, significance, design, note, unit and direction columns."""
    for c in ("effect", "ci_low", "ci_high", "t", "df", "pvalue"):
        res[c] = fit[c].to_numpy(float)
    res["fdr"] = bh_fdr(res["pvalue"].to_numpy())
    res["significant"] = res["fdr"] <= alpha
    res["n_case"], res["n_control"] = design.n_case, design.n_control
    res["design"], res["note"] = design.description(), note
    res["transform"] = transform
    res["unit"] = (
        "logit proportion difference"
        if transform == "logit"
        else "arcsine-sqrt proportion difference"
    )
    res["direction"] = _direction(res, design.contrast.case)
    return res


def _composition_meaning(r: Any, case: str, control: str) -> str:
    """One plain-language sentence for a row of :func:`composition_test`."""
    if r.significant:
        return (
            f"The {r.label} share of cells is {'larger' if r.effect > 0 else 'smaller'} in "
            f"{case} than in {control} ({r.mean_prop_case:.1%} vs {r.mean_prop_control:.1%}, FDR {r.fdr:.2g})."
        )
    if np.isfinite(r.fdr):
        return (
            f"No evidence that the {r.label} share differs ({r.mean_prop_case:.1%} vs "
            f"{r.mean_prop_control:.1%}, FDR {r.fdr:.2g})."
        )
    return f"The {r.label} share: {r.mean_prop_case:.1%} vs {r.mean_prop_control:.1%}; not tested."


# --------------------------------------------------------------------------------------
# therapy targets
# --------------------------------------------------------------------------------------
def primary_rows(sub: pd.DataFrame, t: Mapping[str, Any]) -> pd.DataFrame:
    """One state's pre-specified primary row(s) of ``effects``: ``role == "primary"``, or
    (tables without roles) the metric its therapy-target entry ``t`` names. The one
    definition of a state's readout, shared by :func:`therapy_targets` and the demo check."""
    if "role" in sub:
        return sub[sub["role"] == "primary"]
    return sub[sub["metric"] == (t.get("primary_metric") or t.get("metric", "mean_score"))]


def _primary_effect(sub: pd.DataFrame, t: Mapping[str, Any]) -> pd.Series:
    """The state's primary row of ``effects``, or an untested stand-in when it is missing."""
    pref = primary_rows(sub, t)
    if not pref.empty:
        return pref.iloc[0]
    metric = str(t.get("primary_metric") or t.get("metric", ""))
    return pd.Series(
        {
            "label": sub["label"].iloc[0],
            "metric": metric,
            "effect": np.nan,
            "ci_low": np.nan,
            "ci_high": np.nan,
            "fdr": np.nan,
            "direction": "",
            "unit": _UNIT.get(metric, ""),
            "meaning": f"primary metric {metric!r} not computed for this state",
        }
    )


def _evidence(r: pd.Series, want: str, alpha: float) -> str:
    """``supported``, ``opposite``, ``not significant`` or ``not tested``."""
    if not np.isfinite(r["fdr"]):
        return "not tested"
    if r["fdr"] > alpha:
        return "not significant"
    if (r["effect"] > 0) == (want == "up"):
        return "supported"
    return "opposite"


def _target_row(
    state: str, t: Mapping[str, Any], sub: pd.DataFrame, alpha: float
) -> dict[str, Any]:
    """One therapy-target row: the state's primary effect classified against the target."""
    r = _primary_effect(sub, t)
    want = str(t.get("target_direction", "up"))
    width = (r["ci_high"] - r["ci_low"]) if np.isfinite(r["ci_high"]) else np.nan
    return {
        "state": state,
        "label": r["label"],
        "therapy": t.get("therapy", ""),
        "evidence": _evidence(r, want, alpha),
        "metric": r["metric"],
        "unit": r.get("unit", _UNIT.get(str(r["metric"]), "")),
        "effect": r["effect"],
        "ci_low": r["ci_low"],
        "ci_high": r["ci_high"],
        "fdr": r["fdr"],
        "direction": r["direction"],
        "target_direction": want,
        "rationale": t.get("rationale", ""),
        "caveat": t.get("caveat", ""),
        "references": t.get("references", ""),
        "meaning": r["meaning"],
        "_strength": abs(r["effect"]) / width if width and np.isfinite(width) else 0.0,
    }


def therapy_targets(
    effects: pd.DataFrame,
    *,
    targets: Mapping[str, Any] | str | Path | None = None,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Rank the therapeutic ideas behind each state by the evidence in ``effects``.

    For each state with an entry in ``resources/therapy_targets.yaml`` (or ``targets``; a
    stratified state such as ``cytokine_storm.monocyte`` uses its base state's entry and gets
    one row per stratum), the state's **primary** row of ``effects`` (``role == "primary"``: the metric fixed in advance
    by ``primary_metric``, see :func:`primary_metrics`) is classified as ``supported``
    (FDR <= alpha in the target direction), ``opposite`` (FDR <= alpha, other direction),
    ``not significant`` or ``not tested``; when the primary metric could not be computed the
    row says ``not tested`` and no other metric stands in for it. Rows are ranked: supported
    first, then by FDR, then by the size of the effect relative to its CI width.

    Parameters
    ----------
    effects
        Output of :func:`condition_effects`.
    targets
        Mapping ``state -> {target_direction, primary_metric, therapy, rationale, caveat,
        references}``, a YAML path, or None for the packaged resource.
    alpha
        FDR level.

    Returns
    -------
    pandas.DataFrame
        ``rank``, ``state``, ``label``, ``therapy``, ``evidence``, ``metric``, ``unit``,
        ``effect``, ``ci_low``, ``ci_high``, ``fdr``, ``direction``, ``target_direction``,
        ``rationale``, ``caveat`` (what a blood readout cannot say), ``references``,
        ``meaning``. Hypotheses for follow-up, not treatment advice.
    """
    targets = load_targets(targets)
    rows = []
    bases = effects["state"].map(base_state)
    for base, t in targets.items():
        # a stratified state gives one row per stratum (cytokine_storm.monocyte, ...)
        for state, sub in effects[bases == base].groupby("state", sort=False):
            rows.append(_target_row(str(state), t, sub, alpha))
    out = pd.DataFrame(rows)
    if out.empty:
        logger.warning("no state in effects has a therapy-target entry")
        return out
    order = {"supported": 0, "opposite": 1, "not significant": 2, "not tested": 3}
    out["_ev"] = out["evidence"].map(order)
    out["_fdr"] = out["fdr"].fillna(2.0)
    out = out.sort_values(["_ev", "_fdr", "_strength"], ascending=[True, True, False])
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out.drop(columns=["_ev", "_fdr", "_strength"]).reset_index(drop=True)
