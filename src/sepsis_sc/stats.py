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
* ``plot_*``: forest plot, per-sample values, score UMAPs, composition bars, target summary.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import special, stats

from sepsis_sc.plotting import cell_type_palette, condition_palette, lineage_palette, set_style
from sepsis_sc.resources import load_yaml, resource_path
from sepsis_sc.score import ucell_scores

logger = logging.getLogger(__name__)

__all__ = [
    "sample_table",
    "condition_effects",
    "composition_test",
    "therapy_targets",
    "bh_fdr",
    "plot_forest",
    "plot_sample_values",
    "plot_score_umaps",
    "plot_composition",
    "plot_therapy_targets",
]

_METRIC_TEXT = {
    "fraction": "fraction within {pop}",
    "mean_score": "mean score",
    "pseudobulk_score": "pseudobulk score",
    "pseudobulk_expression": "pseudobulk expression",
}
_EFFECT_TYPE = {
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
    for key in (sample_key, condition_key):
        if key not in adata.obs:
            raise KeyError(f"obs[{key!r}] is missing; it comes from the sample sheet")
    cols = [sample_key, condition_key] + (
        [donor_key] if donor_key and donor_key in adata.obs else []
    )
    obs = adata.obs[cols].astype(str)
    nun = obs.groupby(sample_key, observed=True).nunique()
    bad = nun.columns[(nun > 1).any()].tolist()
    if bad:
        raise ValueError(
            f"obs column(s) {bad} vary within a sample; condition and donor must be constant "
            f"per {sample_key} (fix the sample sheet)"
        )
    meta = obs.drop_duplicates(sample_key).set_index(sample_key)
    if donor_key is None or donor_key not in adata.obs:
        if donor_key:
            logger.info("obs[%r] missing: each sample is treated as its own donor", donor_key)
        meta["donor"] = meta.index
    else:
        meta = meta.rename(columns={donor_key: "donor"})
    return meta.rename(columns={condition_key: "condition"})


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
    params = dict(adata.uns.get("state_rules_params", {}))
    max_rank = int(max_rank or params.get("max_rank", 1500))
    w_neg = float(w_neg if w_neg is not None else params.get("w_neg", 1.0))
    samples = adata.obs[sample_key].astype(str).to_numpy()
    sample_ids = meta.index.to_numpy()
    rows: list[dict[str, Any]] = []

    counts = None
    if pseudobulk:
        if layer is not None and layer not in adata.layers:
            logger.warning("layer %r missing: pseudobulk scores not computed", layer)
            pseudobulk = False
        else:
            counts = adata.layers[layer] if layer is not None else adata.X

    def add(sample: str, state: str, metric: str, value: float, n: int, called: float, reason: str):
        pop = info[state]["call_population"] if metric == "fraction" else info[state]["parent"]
        rows.append(
            {
                "sample_id": sample,
                "condition": meta.loc[sample, "condition"],
                "donor": meta.loc[sample, "donor"],
                "state": state,
                "label": info[state]["label"],
                "metric": metric,
                "population": pop,
                "value": value if not reason else np.nan,
                "n_cells": n,
                "n_called": called,
                "reason": reason,
            }
        )

    for state, si in info.items():
        score = adata.obs[f"{state}_score"].to_numpy(dtype=float)
        parent = np.isfinite(score)
        call = None
        if state in adata.obs:
            call = adata.obs[state].astype("boolean")
        pb_scores = pb_expr = None
        if pseudobulk and (si["up"] or si["down"]):
            pb_scores, pb_expr = _pseudobulk_scores(
                counts, adata.var_names, samples, parent, sample_ids, si, min_cells, max_rank, w_neg
            )
        for sid in sample_ids:
            in_s = samples == sid
            n_par = int((parent & in_s).sum())
            short = f"{n_par} cells of {si['parent'] or 'the parent'} in this sample (< min_cells={min_cells})"
            reason = short if n_par < min_cells else ""
            add(
                sid,
                state,
                "mean_score",
                float(np.mean(score[parent & in_s])) if n_par else np.nan,
                n_par,
                np.nan,
                reason,
            )
            if pb_scores is not None:
                add(
                    sid,
                    state,
                    "pseudobulk_score",
                    float(pb_scores.get(sid, np.nan)),
                    n_par,
                    np.nan,
                    reason,
                )
                add(
                    sid,
                    state,
                    "pseudobulk_expression",
                    float(pb_expr.get(sid, np.nan)),
                    n_par,
                    np.nan,
                    reason,
                )
            if call is not None:
                pop = (~call.isna()).to_numpy() & in_s
                n_pop = int(pop.sum())
                n_called = int(call[pop].astype(bool).sum()) if n_pop else 0
                r2 = (
                    f"{n_pop} cells of the call population ({si['call_population']}) in this "
                    f"sample (< min_cells={min_cells})"
                    if n_pop < min_cells
                    else ""
                )
                add(
                    sid,
                    state,
                    "fraction",
                    n_called / n_pop if n_pop else np.nan,
                    n_pop,
                    n_called,
                    r2,
                )
    out = pd.DataFrame(rows)
    n_na = int((out["reason"] != "").sum()) if len(out) else 0
    logger.info("sample table: %d rows, %d NA (too few cells)", len(out), n_na)
    return out


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
    keep = [s for s in sample_ids if int((parent & (samples == s)).sum()) >= min_cells]
    if not keep:
        return {}, {}
    codes = pd.Categorical(samples, categories=keep).codes
    sel = np.flatnonzero(parent & (codes >= 0))
    indicator = sp.csr_matrix(
        (np.ones(sel.size), (codes[sel], np.arange(sel.size))), shape=(len(keep), sel.size)
    )
    sub = counts[sel]
    pb = indicator @ (sub if sp.issparse(sub) else sp.csr_matrix(sub))
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
def _donor_values(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Sample values on the test scale, averaged per donor x condition."""
    if df.empty:
        return pd.DataFrame(columns=["donor", "condition", "y", "raw", "n_samples"])
    if metric == "fraction":
        y = np.log2((df["n_called"].to_numpy(float) + 0.5) / (df["n_cells"].to_numpy(float) + 1.0))
    else:
        y = df["value"].to_numpy(float)
    raw = df["value"].to_numpy(float)
    donor = df["donor"].astype(str).to_numpy()
    cond = df["condition"].astype(str).to_numpy()
    codes, uniq = pd.MultiIndex.from_arrays([donor, cond]).factorize()
    n = np.bincount(codes, minlength=len(uniq))
    parts = list(uniq)
    return pd.DataFrame(
        {
            "donor": [q[0] for q in parts],
            "condition": [q[1] for q in parts],
            "y": np.bincount(codes, weights=y, minlength=len(uniq)) / n,
            "raw": np.bincount(codes, weights=raw, minlength=len(uniq)) / n,
            "n_samples": n,
        }
    )


def _welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, float]:
    diff = a.mean() - b.mean()
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = np.sqrt(va + vb)
    if se == 0:
        return diff, np.nan, np.nan, np.nan
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    tcrit = stats.t.ppf(0.975, df)
    p = 2 * stats.t.sf(abs(diff / se), df)
    return diff, diff - tcrit * se, diff + tcrit * se, p


def _paired(d: np.ndarray) -> tuple[float, float, float, float]:
    mean = d.mean()
    se = d.std(ddof=1) / np.sqrt(d.size)
    if se == 0:
        return mean, np.nan, np.nan, np.nan
    tcrit = stats.t.ppf(0.975, d.size - 1)
    p = 2 * stats.t.sf(abs(mean / se), d.size - 1)
    return mean, mean - tcrit * se, mean + tcrit * se, p


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
        return f"{what}: not estimable ({note})"
    ci = f"95% CI {lo:+.3g} to {hi:+.3g}" if np.isfinite(lo) else "no CI"
    scale = "log2 ratio" if metric == "fraction" else "difference"
    stat = f"{extra}{scale} {effect:+.3g}, {ci}"
    if not np.isfinite(fdr):
        return f"{what[0].upper() + what[1:]}: {stat} in {case} vs {control}; no test ({note})."
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


def condition_effects(
    table: pd.DataFrame,
    *,
    case: str,
    control: str,
    paired: bool | str = "auto",
    alpha: float = 0.05,
    test: str = "t",
    metrics: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Case vs control effect of every state x metric, with samples as replicates.

    Sample values are put on the test scale (scores: as they are; fractions:
    ``log2((n_called + 0.5) / (n_cells + 1))``), averaged per donor within a condition, and
    compared:

    * unpaired (no donor in both conditions): Welch t-test; effect = difference of group
      means (scores) or of mean log2 fractions, i.e. the log2 ratio of geometric-mean
      fractions; 95% CI from the Welch-Satterthwaite t distribution;
    * paired (donors in both conditions): paired t-test on the per-donor differences of the
      donors seen in both conditions; the note says how many unpaired donors were left out;
    * ``test="rank"``: p-value from the Mann-Whitney U test (Wilcoxon signed-rank when
      paired) instead; effect and CI stay those of the t model.

    Benjamini-Hochberg FDR is taken over all tests of the table. A group with fewer than two
    donors gets an effect size but no p-value, and a ``note`` says why.

    Parameters
    ----------
    table
        Output of :func:`sample_table` (columns ``sample_id``, ``condition``, ``donor``,
        ``state``, ``metric``, ``value``, ``n_cells``, ``n_called``).
    case, control
        Condition labels to compare (effect = case vs control).
    paired
        ``"auto"`` (paired when at least two donors appear in both conditions), True, False.
    alpha
        FDR level for ``significant`` and the wording of ``meaning``.
    test
        ``"t"`` (default) or ``"rank"``.
    metrics
        Metrics to test (default all in the table).

    Returns
    -------
    pandas.DataFrame
        One row per state x metric: ``state``, ``label``, ``metric``, ``effect_type``,
        ``mean_case``, ``mean_control`` (raw scale), ``effect``, ``ci_low``, ``ci_high``,
        ``pvalue``, ``fdr``, ``significant``, ``test``, ``n_case``, ``n_control``
        (donors), ``n_pairs``, ``direction``, ``meaning``, ``note``.
    """
    need = {"sample_id", "condition", "donor", "state", "metric", "value", "n_cells", "n_called"}
    missing = need - set(table.columns)
    if missing:
        raise ValueError(
            f"table lacks column(s) {sorted(missing)}; pass the output of sample_table()"
        )
    if test not in ("t", "rank"):
        raise ValueError(f"test must be 't' or 'rank', got {test!r}")
    if paired not in ("auto", True, False):
        raise ValueError(f"paired must be 'auto', True or False, got {paired!r}")
    conds = set(table["condition"].astype(str))
    for c in (case, control):
        if c not in conds:
            raise ValueError(
                f"condition {c!r} not in the table; conditions present: {sorted(conds)}"
            )
    tab = table[table["condition"].astype(str).isin([case, control])].copy()
    tab["condition"] = tab["condition"].astype(str)
    if metrics is not None:
        tab = tab[tab["metric"].isin(metrics)]
    rows = []
    for (state, metric), df in tab.groupby(["state", "metric"], sort=False):
        label = str(df["label"].iloc[0]) if "label" in df else str(state)
        pop = str(df["population"].iloc[0]) if "population" in df else ""
        valid = df[df["value"].notna()]
        dv = _donor_values(valid, metric)
        a_df = dv[dv["condition"] == case].set_index("donor")
        b_df = dv[dv["condition"] == control].set_index("donor")
        both = a_df.index.intersection(b_df.index)
        use_paired = (len(both) >= 2) if paired == "auto" else bool(paired)
        notes = []
        n_dropped = int((df["value"].isna()).sum())
        if n_dropped:
            notes.append(f"{n_dropped} sample(s) NA (too few cells)")
        effect = lo = hi = p = np.nan
        n_pairs = len(both)
        if use_paired:
            d = (a_df.loc[both, "y"] - b_df.loc[both, "y"]).to_numpy()
            left_out = len(a_df) + len(b_df) - 2 * len(both)
            if left_out:
                notes.append(f"paired on {len(both)} donors; {left_out} unpaired donor(s) left out")
            if d.size >= 2:
                effect, lo, hi, p = _paired(d)
                if test == "rank" and np.isfinite(p):
                    p = stats.wilcoxon(d).pvalue
            else:
                effect = float(d.mean()) if d.size else np.nan
                notes.append(
                    f"fewer than 2 paired donors (n={d.size}): effect size only, no p-value"
                )
            test_name = "paired t-test" if test == "t" else "Wilcoxon signed-rank"
        else:
            if len(both) and paired is False:
                notes.append(f"{len(both)} donor(s) in both conditions treated as independent")
            a, b = a_df["y"].to_numpy(), b_df["y"].to_numpy()
            if a.size and b.size:
                effect = float(a.mean() - b.mean())
            small = [f"{c} (n={x.size})" for c, x in ((case, a), (control, b)) if x.size < 2]
            if small:
                notes.append(
                    f"fewer than 2 samples in {', '.join(small)}: effect size only, no p-value"
                )
            else:
                effect, lo, hi, p = _welch(a, b)
                if test == "rank" and np.isfinite(p):
                    p = stats.mannwhitneyu(a, b, alternative="two-sided").pvalue
            test_name = "Welch t-test" if test == "t" else "Mann-Whitney U"
        if not len(a_df) or not len(b_df):
            notes.append("no sample with enough cells in one condition")
        if not np.isfinite(p) and not notes:
            notes.append("no between-donor variance: no p-value")
        rows.append(
            {
                "state": state,
                "label": label,
                "metric": metric,
                "effect_type": _EFFECT_TYPE.get(metric, "difference in means"),
                "mean_case": float(a_df["raw"].mean()) if len(a_df) else np.nan,
                "mean_control": float(b_df["raw"].mean()) if len(b_df) else np.nan,
                "effect": effect,
                "ci_low": lo,
                "ci_high": hi,
                "pvalue": p,
                "test": test_name,
                "n_case": len(a_df),
                "n_control": len(b_df),
                "n_pairs": n_pairs if use_paired else 0,
                "note": "; ".join(notes),
                "population": pop,
            }
        )
    res = pd.DataFrame(rows)
    if res.empty:
        return res
    res["fdr"] = bh_fdr(res["pvalue"].to_numpy())
    res["significant"] = res["fdr"] <= alpha
    res["direction"] = np.where(
        ~np.isfinite(res["effect"]),
        "NA",
        np.where(res["effect"] > 0, f"higher in {case}", f"lower in {case}"),
    )
    res["meaning"] = [
        _meaning(
            r.label,
            r.metric,
            r.population,
            case,
            control,
            r.effect,
            r.ci_low,
            r.ci_high,
            r.fdr,
            alpha,
            r.note,
        )
        for r in res.itertuples()
    ]
    cols = [
        "state", "label", "metric", "population", "effect_type", "mean_case", "mean_control", "effect",
        "ci_low", "ci_high", "pvalue", "fdr", "significant", "test", "n_case", "n_control",
        "n_pairs", "direction", "meaning", "note",
    ]  # fmt: skip
    return res[cols]


# --------------------------------------------------------------------------------------
# composition (propeller-style)
# --------------------------------------------------------------------------------------
def _trigamma_inverse(x: np.ndarray | float) -> float:
    """Solve trigamma(y) = x by Newton's method (limma's trigammaInverse)."""
    x = float(x)
    if x > 1e7:
        return 1 / np.sqrt(x)
    if x < 1e-6:
        return 1 / x
    y = 0.5 + 1 / x
    for _ in range(50):
        tri = special.polygamma(1, y)
        dif = tri * (1 - tri / x) / special.polygamma(2, y)
        y += dif
        if -dif / y < 1e-8:
            break
    return y


def _squeeze_var(s2: np.ndarray, df: float) -> tuple[np.ndarray, float]:
    """Empirical-Bayes moderated variances (Smyth 2004, limma squeezeVar without covariate)."""
    s2 = np.maximum(s2, 1e-12)
    n = s2.size
    z = np.log(s2)
    e = z - special.digamma(df / 2) + np.log(df / 2)
    emean = e.mean()
    evar = np.sum((e - emean) ** 2) / (n - 1) - special.polygamma(1, df / 2) if n > 1 else -1
    if evar > 0:
        d0 = 2 * _trigamma_inverse(evar)
        s0 = np.exp(emean + special.digamma(d0 / 2) - np.log(d0 / 2))
        post = (d0 * s0 + df * s2) / (d0 + df)
    else:
        d0 = np.inf
        post = np.full_like(s2, np.exp(emean))
    return post, d0


def composition_test(
    adata: ad.AnnData,
    *,
    case: str,
    control: str,
    level: str = "lineage",
    sample_key: str = "sample_id",
    condition_key: str = "condition",
    donor_key: str | None = "donor",
    transform: str = "logit",
    exclude: Sequence[str] = ("Unassigned",),
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Differential abundance of lineages or subsets, propeller style.

    Per sample, label counts become proportions (with 0.5 pseudo-counts, as speckle's
    ``getTransformedProps``), logit- (default) or arcsine-sqrt-transformed, and each label
    is fitted with a linear model ``~ condition`` (plus donor blocks when donors appear more
    than once, i.e. a paired design). Residual variances are moderated with limma's
    empirical-Bayes prior (Smyth 2004) and tested with the moderated t; BH-FDR over labels.
    All cells of the two conditions form the denominators; labels in ``exclude`` are not
    tested.

    Parameters
    ----------
    adata
        Annotated AnnData (``obs[level]``, sample sheet columns).
    case, control
        Condition labels (effect = case vs control).
    level
        ``"lineage"`` or ``"cell_type"`` (any obs column of labels works).
    sample_key, condition_key, donor_key
        Sample sheet columns (donor optional).
    transform
        ``"logit"`` or ``"asin"`` (arcsine square root).
    exclude
        Labels counted in the totals but not tested.
    alpha
        FDR level for ``significant``.

    Returns
    -------
    pandas.DataFrame
        One row per label: ``label``, ``mean_prop_case``, ``mean_prop_control``,
        ``prop_ratio`` and ``log2_prop_ratio`` (case/control mean proportions), ``effect``
        (difference on the transformed scale) with ``ci_low``/``ci_high``, ``t``, ``df``,
        ``pvalue``, ``fdr``, ``significant``, ``n_case``, ``n_control``, ``design``,
        ``direction``, ``meaning``, ``note``. Nothing is written to ``adata``.
    """
    if level not in adata.obs:
        raise KeyError(f"obs[{level!r}] missing; run sepsis_sc.annotate.annotate first")
    if transform not in ("logit", "asin"):
        raise ValueError(f"transform must be 'logit' or 'asin', got {transform!r}")
    meta = _sample_meta(adata, sample_key, condition_key, donor_key)
    meta = meta[meta["condition"].isin([case, control])]
    for c in (case, control):
        if not (meta["condition"] == c).any():
            raise ValueError(f"no samples with {condition_key} == {c!r}")
    obs = adata.obs[[sample_key, level]].astype(str)
    obs = obs[obs[sample_key].isin(meta.index)]
    counts = pd.crosstab(obs[sample_key], obs[level]).reindex(meta.index, fill_value=0)
    totals = counts.sum(axis=1)
    props = counts.div(totals, axis=0)
    pseudo = (counts + 0.5).div((counts + 0.5).sum(axis=1), axis=0)
    y = np.log(pseudo / (1 - pseudo)) if transform == "logit" else np.arcsin(np.sqrt(props))
    is_case = (meta["condition"] == case).to_numpy(float)
    X = [np.ones(len(meta)), is_case]
    donors = meta["donor"].to_numpy()
    uniq, cnt = np.unique(donors, return_counts=True)
    repeated = uniq[cnt > 1]
    for dnr in repeated:
        X.append((donors == dnr).astype(float))
    X = np.column_stack(X)
    # drop columns that make the design rank deficient (keep intercept and condition)
    keep = [0, 1]
    for j in range(2, X.shape[1]):
        if np.linalg.matrix_rank(X[:, keep + [j]]) == len(keep) + 1:
            keep.append(j)
    X = X[:, keep]
    design = "~ condition" + (f" + donor ({len(keep) - 2} blocks)" if len(keep) > 2 else "")
    n_case, n_ctrl = int(is_case.sum()), int(len(is_case) - is_case.sum())
    df_res = len(meta) - X.shape[1]
    if np.linalg.matrix_rank(X) < X.shape[1]:
        df_res = 0
    labels = [c for c in counts.columns if c not in set(exclude)]
    Y = y[labels].to_numpy()
    res = pd.DataFrame({"label": labels})
    res["mean_prop_case"] = props.loc[is_case == 1, labels].mean().to_numpy()
    res["mean_prop_control"] = props.loc[is_case == 0, labels].mean().to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        res["prop_ratio"] = res["mean_prop_case"] / res["mean_prop_control"]
        res["log2_prop_ratio"] = np.log2(res["prop_ratio"])
    note = ""
    if df_res >= 1 and n_case >= 1 and n_ctrl >= 1 and len(labels) >= 1:
        xtx_inv = np.linalg.pinv(X.T @ X)
        beta = xtx_inv @ X.T @ Y
        resid = Y - X @ beta
        s2 = (resid**2).sum(axis=0) / df_res
        if len(labels) >= 3:
            post, d0 = _squeeze_var(s2, df_res)
        else:
            post, d0 = s2, 0.0
        df_tot = df_res + d0 if np.isfinite(d0) else 1e6
        se = np.sqrt(post * xtx_inv[1, 1])
        t = beta[1] / se
        tcrit = stats.t.ppf(0.975, df_tot)
        res["effect"] = beta[1]
        res["ci_low"] = beta[1] - tcrit * se
        res["ci_high"] = beta[1] + tcrit * se
        res["t"] = t
        res["df"] = df_tot
        res["pvalue"] = 2 * stats.t.sf(np.abs(t), df_tot)
    else:
        eff = Y[is_case == 1].mean(axis=0) - Y[is_case == 0].mean(axis=0)
        res["effect"] = eff
        for c in ("ci_low", "ci_high", "t", "df", "pvalue"):
            res[c] = np.nan
        note = (
            f"no residual degrees of freedom (n_case={n_case}, n_control={n_ctrl}, design "
            f"{design}): effect size only, no p-value; propeller needs replicates"
        )
    res["fdr"] = bh_fdr(res["pvalue"].to_numpy())
    res["significant"] = res["fdr"] <= alpha
    res["n_case"], res["n_control"], res["design"], res["note"] = n_case, n_ctrl, design, note
    res["transform"] = transform
    res["direction"] = np.where(res["effect"] > 0, f"higher in {case}", f"lower in {case}")
    res["meaning"] = [
        (
            f"The {r.label} share of cells is {'larger' if r.effect > 0 else 'smaller'} in "
            f"{case} than in {control} ({r.mean_prop_case:.1%} vs {r.mean_prop_control:.1%}, FDR {r.fdr:.2g})."
            if r.significant
            else f"No evidence that the {r.label} share differs ({r.mean_prop_case:.1%} vs "
            f"{r.mean_prop_control:.1%}"
            + (f", FDR {r.fdr:.2g})." if np.isfinite(r.fdr) else "; not tested).")
        )
        for r in res.itertuples()
    ]
    res.insert(0, "level", level)
    return res.sort_values("pvalue", na_position="last").reset_index(drop=True)


# --------------------------------------------------------------------------------------
# therapy targets
# --------------------------------------------------------------------------------------
def therapy_targets(
    effects: pd.DataFrame,
    *,
    targets: Mapping[str, Any] | str | Path | None = None,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Rank the therapeutic ideas behind each state by the evidence in ``effects``.

    For each state with an entry in ``resources/therapy_targets.yaml`` (or ``targets``), the
    row of ``effects`` for the entry's ``metric`` (fraction for discrete states, else mean
    score; falls back to any tested metric) is classified as ``supported`` (FDR <= alpha in
    the target direction), ``opposite`` (FDR <= alpha, other direction), ``not significant``
    or ``not tested``, and rows are ranked: supported first, then by FDR, then by the size of
    the effect relative to its CI width.

    Parameters
    ----------
    effects
        Output of :func:`condition_effects`.
    targets
        Mapping ``state -> {target_direction, metric, therapy, rationale, references}``, a
        YAML path, or None for the packaged resource.
    alpha
        FDR level.

    Returns
    -------
    pandas.DataFrame
        ``rank``, ``state``, ``label``, ``therapy``, ``evidence``, ``metric``, ``effect``,
        ``ci_low``, ``ci_high``, ``fdr``, ``direction``, ``target_direction``, ``rationale``,
        ``references``, ``meaning``. Hypotheses for follow-up, not treatment advice.
    """
    if targets is None or isinstance(targets, str | Path):
        targets = load_yaml(Path(targets) if targets else resource_path("therapy_targets.yaml"))
    rows = []
    for state, t in targets.items():
        sub = effects[effects["state"] == state]
        if sub.empty:
            continue
        pref = sub[sub["metric"] == t.get("metric", "mean_score")]
        if pref.empty or not np.isfinite(pref["effect"].iloc[0]):
            pref = sub.sort_values("fdr", na_position="last")
        r = pref.iloc[0]
        want = str(t.get("target_direction", "up"))
        if not np.isfinite(r["fdr"]):
            evidence = "not tested"
        elif r["fdr"] > alpha:
            evidence = "not significant"
        elif (r["effect"] > 0) == (want == "up"):
            evidence = "supported"
        else:
            evidence = "opposite"
        width = (r["ci_high"] - r["ci_low"]) if np.isfinite(r["ci_high"]) else np.nan
        rows.append(
            {
                "state": state,
                "label": r["label"],
                "therapy": t.get("therapy", ""),
                "evidence": evidence,
                "metric": r["metric"],
                "effect": r["effect"],
                "ci_low": r["ci_low"],
                "ci_high": r["ci_high"],
                "fdr": r["fdr"],
                "direction": r["direction"],
                "target_direction": want,
                "rationale": t.get("rationale", ""),
                "references": t.get("references", ""),
                "meaning": r["meaning"],
                "_strength": abs(r["effect"]) / width if width and np.isfinite(width) else 0.0,
            }
        )
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


# --------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------
def _plt():
    import matplotlib.pyplot as plt

    set_style()
    return plt


def plot_forest(effects: pd.DataFrame, *, case: str, control: str, alpha: float = 0.05):
    """Forest plot: effect and 95% CI per state, one panel per metric scale.

    Significant effects (FDR <= alpha) are drawn in the case colour, others in grey.
    Returns the matplotlib Figure (save with :func:`sepsis_sc.plotting.savefig`).
    """
    plt = _plt()
    metrics = [
        m
        for m in ("fraction", "mean_score", "pseudobulk_score", "pseudobulk_expression")
        if m in set(effects["metric"])
    ]
    heights = [max(1, (effects["metric"] == m).sum()) for m in metrics]
    fig, axes = plt.subplots(
        len(metrics), 1, figsize=(7, 1.0 + 0.38 * sum(heights) + 0.6 * len(metrics)),
        gridspec_kw={"height_ratios": heights}, squeeze=False,
    )  # fmt: skip
    col = condition_palette(case, control)[case]
    for ax, m in zip(axes[:, 0], metrics):
        sub = effects[effects["metric"] == m].iloc[::-1]
        yy = np.arange(len(sub))
        sig = sub["significant"].fillna(False).to_numpy(bool)
        colours = np.where(sig, col, "#7f7f7f")
        ok = np.isfinite(sub["ci_low"].to_numpy(float))
        for y, r, c, has_ci in zip(yy, sub.itertuples(), colours, ok):
            if has_ci:
                ax.plot([r.ci_low, r.ci_high], [y, y], color=c, lw=2)
            ax.plot(r.effect, y, "o", color=c, ms=6, mfc=c if has_ci else "white")
        ax.axvline(0, color="black", lw=0.8, ls="--")
        ax.set_yticks(yy, sub["label"])
        ax.set_xlabel(
            _EFFECT_TYPE[m]
            .replace("(case - control)", f"({case} - {control})")
            .replace("(case/control)", f"({case}/{control})")
        )
        ax.set_title(
            {
                "fraction": "State frequency",
                "mean_score": "Mean state score",
                "pseudobulk_score": "Pseudobulk state score",
                "pseudobulk_expression": "Pseudobulk expression of the state genes",
            }[m],
            loc="left",
        )
    fig.suptitle(
        f"{case} vs {control}: effect and 95% CI (coloured: FDR \u2264 {alpha})", x=0.01, ha="left"
    )
    fig.tight_layout()
    return fig


def plot_sample_values(
    table: pd.DataFrame, *, case: str, control: str, metric: str = "mean_score", ncols: int = 4
):
    """Small multiples: one panel per state, one point per sample, by condition.

    Lines join the samples of a donor seen in both conditions; the bar marks the group mean.
    Returns the Figure.
    """
    plt = _plt()
    sub = table[(table["metric"] == metric) & table["condition"].isin([case, control])]
    states = list(dict.fromkeys(sub["state"]))
    if not states:
        raise ValueError(f"no rows with metric {metric!r} for {case!r}/{control!r} in the table")
    ncols = min(ncols, len(states))
    nrows = int(np.ceil(len(states) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.5 * nrows), squeeze=False)
    pal = condition_palette(case, control)
    rng = np.random.default_rng(0)
    for ax, st in zip(axes.flat, states):
        d = sub[sub["state"] == st]
        for i, c in enumerate((control, case)):
            v = d[d["condition"] == c]
            x = i + rng.uniform(-0.12, 0.12, len(v))
            ax.scatter(x, v["value"], color=pal[c], s=22, alpha=0.85, edgecolor="white", lw=0.4)
            if v["value"].notna().any():
                ax.hlines(v["value"].mean(), i - 0.25, i + 0.25, color="black", lw=1.5)
        piv = d.pivot_table(index="donor", columns="condition", values="value", aggfunc="mean")
        if case in piv and control in piv:
            for _, r in piv.dropna().iterrows():
                ax.plot([0, 1], [r[control], r[case]], color="#9e9e9e", lw=0.6, zorder=0)
        ax.set_xticks([0, 1], [control, case])
        ax.set_xlim(-0.5, 1.5)
        lab = str(d["label"].iloc[0])
        ax.set_title(lab if len(lab) < 32 else lab[:30] + "\u2026", fontsize=9)
    for ax in list(axes.flat)[len(states) :]:
        ax.axis("off")
    ylabel = {
        "fraction": "fraction of population",
        "mean_score": "mean score",
        "pseudobulk_score": "pseudobulk score",
        "pseudobulk_expression": "pseudobulk log2 CPM (up - down)",
    }[metric]
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    fig.suptitle(f"Per-sample {ylabel} (one point per sample)", x=0.01, ha="left")
    fig.tight_layout()
    return fig


def plot_score_umaps(adata: ad.AnnData, states: Sequence[str] | None = None, *, ncols: int = 3,
                     basis: str = "X_umap"):  # fmt: skip
    """UMAP small multiples coloured by state scores (grey: outside the parent population).

    Needs ``obsm[basis]``. Returns the Figure.
    """
    plt = _plt()
    if basis not in adata.obsm:
        raise KeyError(f"obsm[{basis!r}] missing; compute a UMAP (sepsis_sc.cluster) first")
    if states is None:
        # the states score_states recorded (not other *_score columns such as doublet_score)
        rules = adata.uns.get("state_rules", {})
        states = [
            c[:-6]
            for c in adata.obs.columns
            if c.endswith("_score") and (c[:-6] in rules if len(rules) else c != "doublet_score")
        ]
    if not states:
        raise ValueError("no <state>_score columns in obs; run sepsis_sc.score.score_states first")
    xy = np.asarray(adata.obsm[basis])[:, :2]
    ncols = min(ncols, len(states))
    nrows = int(np.ceil(len(states) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.1 * nrows), squeeze=False)
    labels = adata.uns.get("state_rules", {})
    order = np.random.default_rng(0).permutation(adata.n_obs)
    size = max(0.5, min(8.0, 12000 / max(adata.n_obs, 1)))
    for ax, st in zip(axes.flat, states):
        v = adata.obs[f"{st}_score"].to_numpy(float)[order]
        p = xy[order]
        na = ~np.isfinite(v)
        ax.scatter(p[na, 0], p[na, 1], c="#e0e0e0", s=size, lw=0, rasterized=True)
        sc = ax.scatter(
            p[~na, 0], p[~na, 1], c=v[~na], cmap="viridis", s=size, lw=0, rasterized=True
        )
        fig.colorbar(sc, ax=ax, shrink=0.7)
        lab = str(labels.get(st, {}).get("label", st))
        ax.set_title(lab if len(lab) < 36 else lab[:34] + "\u2026", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(states) :]:
        ax.axis("off")
    fig.suptitle(
        "State scores (grey: cells outside the state's parent population)", x=0.01, ha="left"
    )
    fig.tight_layout()
    return fig


def plot_composition(
    adata: ad.AnnData,
    *,
    case: str,
    control: str,
    level: str = "lineage",
    sample_key: str = "sample_id",
    condition_key: str = "condition",
):
    """Stacked bars of label proportions per sample, samples grouped by condition.

    Colours come from the shared lineage / cell-type palettes. Returns the Figure.
    """
    plt = _plt()
    obs = adata.obs[[sample_key, condition_key, level]].astype(str)
    obs = obs[obs[condition_key].isin([case, control])]
    props = pd.crosstab(obs[sample_key], obs[level], normalize="index")
    cond = obs.drop_duplicates(sample_key).set_index(sample_key)[condition_key]
    order = sorted(props.index, key=lambda s: (cond[s] != control, s))
    props = props.loc[order]
    pal = lineage_palette(props.columns) if level == "lineage" else cell_type_palette(props.columns)
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(order) + 3), 4))
    bottom = np.zeros(len(order))
    for lab in props.columns:
        ax.bar(
            np.arange(len(order)), props[lab], bottom=bottom, color=pal[lab], label=lab, width=0.85
        )
        bottom += props[lab].to_numpy()
    cpal = condition_palette(case, control)
    n_ctrl = int((cond[order] == control).sum())
    ax.axvline(n_ctrl - 0.5, color="black", lw=1)
    for x0, x1, c in ((0, n_ctrl, control), (n_ctrl, len(order), case)):
        if x1 > x0:
            ax.text(
                (x0 + x1 - 1) / 2,
                1.02,
                c,
                ha="center",
                va="bottom",
                color=cpal[c],
                fontweight="bold",
            )
    ax.set_xticks(np.arange(len(order)), order, rotation=90, fontsize=7)
    ax.set_ylabel(f"fraction of cells ({level})")
    ax.set_ylim(0, 1.08)
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False, fontsize=8)
    ax.set_title(
        f"{level.replace('_', ' ').capitalize()} composition per sample", loc="left", pad=16
    )
    fig.tight_layout()
    return fig


def plot_therapy_targets(targets: pd.DataFrame, *, alpha: float = 0.05):
    """Therapy-target summary: signed -log10 FDR per state, coloured by evidence.

    Bars point right when the state is higher in cases, left when lower; the dotted lines
    mark FDR = alpha. Each bar is labelled with the therapeutic idea. Returns the Figure.
    """
    plt = _plt()
    if targets.empty:
        raise ValueError("empty therapy-target table")
    d = targets.iloc[::-1]
    sign = np.sign(d["effect"].fillna(0).to_numpy(float))
    val = sign * -np.log10(d["fdr"].fillna(1.0).clip(lower=1e-12).to_numpy(float))
    colours = {
        "supported": "#2ca02c",
        "opposite": "#9467bd",
        "not significant": "#bdbdbd",
        "not tested": "#e0e0e0",
    }
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(d) + 1.4))
    yy = np.arange(len(d))
    ax.barh(yy, val, color=[colours[e] for e in d["evidence"]], height=0.6)
    lim = max(2.0, np.abs(val).max() * 1.1)
    ax.set_xlim(-lim, lim)
    for x in (-np.log10(alpha), np.log10(alpha)):
        ax.axvline(x, color="black", lw=0.6, ls=":")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(yy, d["label"])
    for y, r in zip(yy, d.itertuples()):
        ax.text(lim * 1.02, y, r.therapy if len(r.therapy) < 60 else r.therapy[:58] + "\u2026",
                va="center", fontsize=8)  # fmt: skip
    ax.set_xlabel("signed -log10 FDR (right: higher in cases, left: lower)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(
        handles,
        list(colours),
        loc="lower left",
        bbox_to_anchor=(0, 1.0),
        ncol=4,
        frameon=False,
        fontsize=8,
    )
    ax.set_title("Therapy targets: evidence per state", loc="left", pad=22)
    fig.tight_layout()
    return fig
