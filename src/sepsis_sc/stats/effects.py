"""Case vs control effect of every state x metric, donors as the units: :func:`condition_effects`.

Sample values are averaged per unit of the design (:mod:`sepsis_sc.design`), fitted with the
design's linear model and tested with the moderated t (or a rank test); BH-FDR over the
primary tests. :func:`bh_fdr`, :func:`welch_test` and :func:`direction` are shared with the
composition test and the simulator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from sepsis_sc.config import StatsSettings
from sepsis_sc.design import COEF, Contrast, ContrastArgs, SampleDesign, linear_test, unit_weights
from sepsis_sc.stats.metrics import EFFECT_TYPE, METRIC_UNIT, primary_metrics


def condition_effects(
    table: pd.DataFrame,
    settings: StatsSettings | None = None,
    *,
    case: str | None = None,
    control: str | None = None,
    contrast: Contrast | None = None,
    meta: pd.DataFrame | None = None,
    metrics: Sequence[str] | None = None,
    primary: Mapping[str, str] | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Case vs control effect of every state x metric, with donors as the units.

    The design comes from :mod:`sepsis_sc.design`, the same rule as composition and pseudobulk
    DE: samples are put on the test scale (scores as they are; fractions as
    ``log2((n_called + 0.5) / (n_cells + 1))``), **averaged per donor x contrast level** (a
    patient sampled at T0 and T6 is one septic unit), and fitted with a linear model
    (``design``, default ``~ condition``; donor blocks when donors are seen at both levels,
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
    settings
        The config's ``stats`` section (:class:`~sepsis_sc.config.StatsSettings`; default:
        the schema's defaults), its fields overridden by keyword (``**overrides``):
        ``alpha``, the FDR level for ``significant``, ``direction`` and the wording of
        ``meaning``; ``test``, ``"t"`` (moderated t) or ``"rank"``; ``moderation``, how the
        variances of a metric's states are moderated (``"none"``: an ordinary t from each
        state alone; see :func:`sepsis_sc.design.linear_test`); ``design``, the model
        formula over sheet columns (e.g. ``"~ age + condition"``) or an already resolved
        :class:`~sepsis_sc.design.SampleDesign`; ``paired``, ``"auto"``, ``"yes"`` /
        True or ``"no"`` / False.
    case, control, contrast, meta
        The contrast (:class:`~sepsis_sc.design.ContrastArgs`): ``case`` vs ``control``
        values of ``obs["condition"]``, or a ``contrast``; ``meta`` (per-sample sheet)
        defaults to the table's ``condition`` and ``donor``.
    metrics
        Metrics to test (default all in the table).
    primary
        ``{state: metric}`` (default :func:`primary_metrics` from the packaged resource).
    Returns
    -------
    pandas.DataFrame
        One row per state x metric: ``contrast``, ``state``, ``label``, ``metric``, ``role``
        (primary / secondary), ``population``, ``unit`` and ``effect_type`` (scale of the
        effect), ``mean_case``, ``mean_control`` (raw scale, mean of the units), ``effect``,
        ``ci_low``, ``ci_high``, ``pvalue``, ``fdr`` (within the role's family),
        ``significant``, ``df`` (of the t: residual + prior), ``prior_df`` and ``prior_var``
        (the empirical-Bayes prior the state's variance was shrunk towards: how much of the
        p-value came from the other states), ``residual_var`` (the state's own), ``test``,
        ``design``, ``n_case``, ``n_control`` (units), ``n_pairs``, ``direction``,
        ``meaning``, ``note``.
    """
    settings, args = contrast_args(
        settings, overrides, case=case, control=control, contrast=contrast, meta=meta
    )
    alpha, test = settings.alpha, settings.test
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
        results += _metric_effects(
            mdf,
            metric,
            design,
            info,
            primary,
            test=test,
            moderation=settings.moderation,
            weighted=settings.unit_weights,
        )
    return _effects_table(results, design.contrast, alpha)


def contrast_args(
    settings: StatsSettings | None, overrides: Mapping[str, Any], **contrast: Any
) -> tuple[StatsSettings, ContrastArgs]:
    """The settings of a sample-level test with its keyword overrides, and its contrast.

    ``contrast`` holds the test's ``case``, ``control``, ``contrast`` and ``meta``; the
    settings give the formula (``design``) and ``paired``. A resolved
    :class:`~sepsis_sc.design.SampleDesign` given as ``design=`` is the design itself, not
    a formula.
    """
    overrides = dict(overrides)
    resolved = None
    if isinstance(overrides.get("design"), SampleDesign):
        resolved = overrides.pop("design")
    settings = (settings or StatsSettings()).with_overrides(overrides)
    formula = settings.design if resolved is None else None
    args = ContrastArgs(**contrast, design=resolved, formula=formula, paired=settings.paired)
    return settings, args


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


def _test_scale(df: pd.DataFrame, metric: str) -> np.ndarray:
    """Sample values on the test scale: log2 fraction (0.5-cell pseudo-count) or the value."""
    if metric == "fraction":
        return np.log2(
            (df["n_called"].to_numpy(float) + 0.5) / (df["n_cells"].to_numpy(float) + 1.0)
        )
    return df["value"].to_numpy(float)


def _unit_values(
    mdf: pd.DataFrame, metric: str, design: SampleDesign, feats: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int], pd.DataFrame]:
    """Units x states of one metric on the test scale and on the raw scale, NA counts, and
    the samples' test-scale values (for the unit weights).

    A unit's value is the mean of its samples' values; NA samples (too few cells) are skipped.
    """
    y_cols, raw_cols, n_na, s_cols = {}, {}, {}, {}
    for state in feats:
        d = mdf[mdf["state"] == state].set_index("sample_id")
        valid = d["value"].notna()
        n_na[state] = int((~valid).sum())
        ys = pd.Series(_test_scale(d, metric), index=d.index).where(valid)
        s_cols[state] = ys
        y_cols[state] = design.aggregate_mean(ys)
        raw_cols[state] = design.aggregate_mean(d["value"].where(valid))
    y = pd.DataFrame(y_cols, index=design.units.index)
    raw = pd.DataFrame(raw_cols, index=design.units.index)
    return y, raw, n_na, pd.DataFrame(s_cols)


def _metric_effects(
    mdf: pd.DataFrame,
    metric: str,
    design: SampleDesign,
    info: pd.DataFrame,
    primary: Mapping[str, str],
    *,
    test: str,
    moderation: str,
    weighted: bool,
) -> list[dict[str, Any]]:
    """One metric: its states fitted together (shared variance prior), one result row each."""
    feats = list(dict.fromkeys(mdf["state"]))
    y, raw, n_na, sample_y = _unit_values(mdf, metric, design, feats)
    weights = unit_weights(design, sample_y) if weighted else None
    fit = linear_test(design, y, moderation=moderation, weights=weights)
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
            moderation=moderation,
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


def _test_name(design: SampleDesign, test: str, moderation: str) -> str:
    """E.g. ``paired moderated t, robust + trend`` or ``Mann-Whitney U``."""
    ptype = {"none": "t", "plain": "moderated t"}.get(
        moderation, "moderated t, " + moderation.replace("_", " + ")
    )
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
    moderation: str,
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
        "unit": METRIC_UNIT.get(metric, ""),
        "mean_case": float(raw.loc[ok & is_case, state].mean()),
        "mean_control": float(raw.loc[ok & ~is_case, state].mean()),
        "effect": float(r["effect"]),
        "ci_low": float(r["ci_low"]) if np.isfinite(p) else np.nan,
        "ci_high": float(r["ci_high"]) if np.isfinite(p) else np.nan,
        "pvalue": p,
        "df": float(r["df"]) if np.isfinite(p) else np.nan,
        "prior_df": float(r["d0"]) if np.isfinite(p) else np.nan,
        "prior_var": float(r["s2_prior"]) if np.isfinite(p) else np.nan,
        "residual_var": float(r["s2"]) if np.isfinite(p) else np.nan,
        "test": _test_name(design, test, moderation),
        "design": design.description(),
        "n_case": int(r["n_case"]),
        "n_control": int(r["n_control"]),
        "n_pairs": int(r["n_case"]) if design.paired else 0,
        "note": "; ".join(dict.fromkeys(n for n in notes if n)),
    }


def _effects_table(results: list[dict[str, Any]], con: Contrast, alpha: float) -> pd.DataFrame:
    """Result rows -> the table: BH-FDR within each role, direction, meaning, primary first."""
    res = pd.DataFrame(results)
    res["fdr"] = np.nan
    for role in ("primary", "secondary"):
        m = (res["role"] == role).to_numpy()
        if m.any():
            res.loc[m, "fdr"] = bh_fdr(res.loc[m, "pvalue"].to_numpy())
    res["significant"] = res["fdr"] <= alpha
    res["direction"] = direction(res, con.case)
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


def direction(res: pd.DataFrame, case: str) -> np.ndarray:
    """``higher in <case>`` / ``lower in <case>`` where significant, else empty."""
    return np.where(
        ~res["significant"],
        "",
        np.where(res["effect"] > 0, f"higher in {case}", f"lower in {case}"),
    )


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
