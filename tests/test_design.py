"""The design engine (sepsis_sc.design) on real cohort designs.

Repeated samples of one patient, covariates confounded with condition, within-patient
contrasts and bad designs. The calibration tests simulate sample-level data directly (cheap,
so hundreds of null cohorts fit in seconds) with donor effects and within-donor noise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sepsis_sc import stats
from sepsis_sc.design import (
    COEF,
    Contrast,
    DesignError,
    check_designs,
    linear_test,
    parse_contrasts,
    resolve_design,
    sample_meta,
)
from sepsis_sc.sim import (
    LABELS,
    patient_level_truth,
    repeated_sheet,
    simulate_cells,
    simulate_state_table,
)

SEPSIS = Contrast("sepsis_vs_control", "condition", "sepsis", "control")
PRIMARY = {f"s{j}": "fraction" for j in range(8)}


# --------------------------------------------------------------------------------------
# units and pairing
# --------------------------------------------------------------------------------------
def test_repeated_samples_are_one_unit_per_donor_and_level():
    sheet = repeated_sheet()
    d = resolve_design(sheet, SEPSIS)
    assert (d.n_case, d.n_control) == (5, 3) and not d.paired
    assert d.sample_unit["P0_T0"] == d.sample_unit["P0_T6"]
    assert "aggregated into one unit" in d.notes[0]
    assert list(d.matrix.columns) == ["Intercept", COEF]


def test_within_patient_contrast_is_paired_and_matches_paired_t():
    from scipy import stats as ss

    sheet = repeated_sheet()
    c = Contrast("T6_vs_T0", "timepoint", "T6", "T0")
    d = resolve_design(sheet, c, "~ condition")  # condition is constant here: dropped, noted
    assert d.paired and d.n_pairs == 5 and (d.n_case, d.n_control) == (5, 5)
    assert set(sheet.index[sheet["timepoint"] == "none"]).isdisjoint(d.sample_unit.index)
    rng = np.random.default_rng(0)
    y = pd.Series(rng.normal(size=len(sheet)), index=sheet.index)
    fit = linear_test(d, pd.DataFrame({"y": d.aggregate_mean(y)}), moderation="none").loc["y"]
    t0 = y[[f"P{p}_T0" for p in range(5)]].to_numpy()
    t6 = y[[f"P{p}_T6" for p in range(5)]].to_numpy()
    ref = ss.ttest_rel(t6, t0)
    assert fit["pvalue"] == pytest.approx(ref.pvalue)
    assert fit["effect"] == pytest.approx((t6 - t0).mean())


def test_parse_contrasts_shorthand_list_and_null():
    one = parse_contrasts(
        {"contrast": {"column": "condition", "case": "sepsis", "control": "control"}}
    )
    assert one == [Contrast("sepsis_vs_control", "condition", "sepsis", "control")]
    many = parse_contrasts(
        {
            "contrasts": [
                {"column": "condition", "case": "sepsis", "control": "control"},
                {"name": "late", "column": "timepoint", "case": "T6", "control": "T0"},
            ]
        }
    )
    assert [c.name for c in many] == ["sepsis_vs_control", "late"]
    assert parse_contrasts({"contrast": None}) == []
    with pytest.raises(DesignError, match="used twice"):
        parse_contrasts(
            {"contrasts": [{"case": "a", "control": "b"}, {"case": "a", "control": "b"}]}
        )


# --------------------------------------------------------------------------------------
# the GSE167363-shaped design: right sign, right size, calibrated
# --------------------------------------------------------------------------------------
def test_composition_with_repeated_patients_recovers_patient_level_truth():
    sheet = repeated_sheet()
    worst = 0.0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        effect = np.array([-0.2, 0.6, 0.0, -0.5, -0.8, 0.7])
        adata, truth_p = simulate_cells(rng, sheet, effect, cells=(3000, 8000))
        comp = stats.composition_test(adata, contrast=SEPSIS, level="lineage").set_index("label")
        truth = patient_level_truth(truth_p, sheet)
        err = (comp.loc[LABELS, "effect"] - truth[LABELS]).abs()
        # DCs fall to 1-2 % of cells in these septic donors (30-100 cells per sample): their
        # count noise alone is ~0.15 on the logit scale, so they get a looser bound
        worst = max(worst, float(err.drop("DC").max()))
        assert err["DC"] <= 0.3, err["DC"]
        big = truth[LABELS].abs() > 0.3
        assert (np.sign(comp.loc[LABELS, "effect"][big]) == np.sign(truth[LABELS][big])).all()
        assert (comp["n_case"] == 5).all() and (comp["n_control"] == 3).all()
    assert worst <= 0.15, worst


def test_state_effects_with_repeated_patients_recover_patient_level_truth():
    sheet = repeated_sheet()
    worst_f = worst_s = 0.0
    for seed in range(5):
        tab, truth = simulate_state_table(
            np.random.default_rng(100 + seed), sheet, effect=0.5, n_cells=2000
        )
        eff = stats.condition_effects(tab, contrast=SEPSIS, meta=sheet, primary=PRIMARY)
        e = eff.set_index(["state", "metric"])
        assert (eff["n_case"] == 5).all() and (eff["n_control"] == 3).all()
        for s, (tf, ts) in truth.items():
            worst_f = max(worst_f, abs(e.loc[(s, "fraction"), "effect"] - tf))
            worst_s = max(worst_s, abs(e.loc[(s, "mean_score"), "effect"] - ts))
    assert worst_f <= 0.15, worst_f
    assert worst_s <= 0.15 * 0.05, worst_s  # scores are on a 20x smaller scale


def test_null_calibration_repeated_patient_design():
    """>= 200 null cohorts of 5 patients x 2 time points vs 3 controls: p < 0.05 in <= 8 %."""
    sheet = repeated_sheet()
    comp_p, state_p, prim_p = [], [], []
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        adata, _ = simulate_cells(rng, sheet, cells=(300, 900))
        comp = stats.composition_test(adata, contrast=SEPSIS, level="lineage")
        comp_p += comp["pvalue"].tolist()
        tab, _ = simulate_state_table(rng, sheet, n_states=4)
        eff = stats.condition_effects(tab, contrast=SEPSIS, meta=sheet, primary=PRIMARY)
        state_p += eff["pvalue"].tolist()
        prim_p += eff.loc[eff["role"] == "primary", "pvalue"].tolist()
    comp_fpr = np.mean(np.asarray(comp_p) < 0.05)
    state_fpr = np.mean(np.asarray(state_p) < 0.05)
    assert len(comp_p) == 200 * len(LABELS) and len(state_p) == 200 * 8
    assert comp_fpr <= 0.08, comp_fpr
    assert state_fpr <= 0.08, state_fpr
    assert np.mean(np.asarray(prim_p) < 0.05) <= 0.08
    # not so conservative that it could never find anything
    assert comp_fpr >= 0.01 and state_fpr >= 0.01, (comp_fpr, state_fpr)


# --------------------------------------------------------------------------------------
# covariates
# --------------------------------------------------------------------------------------
def _age_confounded_table(seed: int = 3):
    rng = np.random.default_rng(seed)
    rows, meta = [], []
    ages = {"sepsis": [58, 63, 67, 71, 76, 80], "control": [35, 41, 47, 52, 60, 66]}
    for cond, aa in ages.items():
        for i, age in enumerate(aa):
            sid = f"{cond[0]}{i}"
            meta.append({"sample_id": sid, "condition": cond, "donor": sid, "age": str(age)})
            for j in range(6):
                score = 0.1 + 0.004 * age + rng.normal(0, 0.02)  # age drives it; sepsis does not
                rows.append(
                    {
                        "sample_id": sid,
                        "condition": cond,
                        "donor": sid,
                        "state": f"s{j}",
                        "label": f"s{j}",
                        "population": "p",
                        "metric": "mean_score",
                        "value": score,
                        "n_cells": 100,
                        "n_called": np.nan,
                        "reason": "",
                    }
                )
    return pd.DataFrame(rows), pd.DataFrame(meta).set_index("sample_id")


def test_age_confounded_with_condition_is_removed_by_adjusting():
    tab, meta = _age_confounded_table()
    kw = {"case": "sepsis", "control": "control", "meta": meta, "moderation": "plain"}
    plain = stats.condition_effects(tab, **kw)
    adj = stats.condition_effects(tab, design="~ age + condition", **kw)
    assert (plain["fdr"] < 0.05).all()  # unadjusted: age shows up as a sepsis effect
    assert (adj["pvalue"] > 0.05).all()  # adjusted: no effect of sepsis itself
    assert adj["design"].str.contains("age").all()


def test_bad_designs_fail_with_the_columns_named():
    sheet = repeated_sheet()
    sheet["site"] = np.where(sheet["condition"] == "sepsis", "icu", "clinic")
    with pytest.raises(DesignError, match="confounded with site"):
        resolve_design(sheet, SEPSIS, "~ site + condition")
    with pytest.raises(DesignError, match=r"column\(s\) \['age'\]"):
        resolve_design(sheet, SEPSIS, "~ age + condition")
    with pytest.raises(DesignError, match="differs between the samples of donor 'P0'"):
        resolve_design(sheet, SEPSIS, "~ timepoint + condition")
    with pytest.raises(DesignError, match="interactions"):
        resolve_design(sheet.assign(sex="F"), SEPSIS, "~ sex * condition")
    sheet["a"] = [str(v) for v in range(len(sheet))]
    sheet["b"] = [str(2 * v) for v in range(len(sheet))]
    sheet["donor"] = sheet.index  # each sample its own donor
    with pytest.raises(DesignError, match="'b' is collinear"):
        resolve_design(sheet, SEPSIS, "~ a + b + condition")
    with pytest.raises(DesignError, match="must start with"):
        resolve_design(sheet, SEPSIS, "a + condition")


def test_check_designs_one_condition_is_not_tested_and_typo_is_an_error():
    sheet = repeated_sheet(n_controls=0)
    out = check_designs(sheet, [SEPSIS], "~ condition")
    assert isinstance(out["sepsis_vs_control"], str)
    assert out["sepsis_vs_control"].startswith("not tested: one condition")
    two = repeated_sheet()
    with pytest.raises(DesignError, match="values present: control, sepsis"):
        check_designs(two, [Contrast("x", "condition", "sepsis", "healthy")], "~ condition")
    res = check_designs(two, [SEPSIS], "~ condition")
    assert res["sepsis_vs_control"].n_case == 5


def test_sample_meta_recovers_the_sheet_from_obs():
    sheet = repeated_sheet()
    adata, _ = simulate_cells(np.random.default_rng(0), sheet, cells=(50, 60))
    meta = sample_meta(adata)
    assert set(meta.index) == set(sheet.index)
    assert meta.loc["P1_T6", "timepoint"] == "T6" and "lineage" not in meta.columns


def test_shipped_gse167363_design_aggregates_and_pairs_its_patients():
    """The shipped GSE167363 cohort (5 patients at T0 and T6, 2 healthy donors)."""
    from pathlib import Path

    from sepsis_sc.config import load_config, load_samples, validate_samples

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "config" / "cohorts" / "GSE167363" / "config.yaml")
    sheet = validate_samples(load_samples(repo / cfg["samples"]), cfg)
    designs = check_designs(sheet, parse_contrasts(cfg), cfg["stats"]["design"])
    sep = designs["sepsis_vs_healthy"]
    assert (sep.n_case, sep.n_control, sep.paired) == (5, 2, False)
    late = designs["T6_vs_T0"]
    assert late.paired and late.n_pairs == 5 and late.testable
    surv = designs["nonsurvivor_vs_survivor"]
    assert (surv.n_case, surv.n_control) == (2, 3)


# --------------------------------------------------------------------------------------
# steps of resolve_design / linear_test, the metadata builder and the settings
# --------------------------------------------------------------------------------------
def _obs_adata(obs: dict) -> object:
    import anndata as ad

    df = pd.DataFrame(obs)
    df.index = [f"c{i}" for i in range(len(df))]
    return ad.AnnData(obs=df)


def test_sample_meta_with_columns_adds_donor_and_keeps_obs_order():
    a = _obs_adata(
        {
            "sample_id": ["b", "a", "b", "c"],
            "condition": ["x", "y", "x", "y"],
            "donor": ["D2", "D1", "D2", "D1"],
            "score": [0.1, 0.2, 0.3, 0.4],
        }
    )
    sheet = sample_meta(a)  # every constant text column, sorted by sample
    assert list(sheet.index) == ["a", "b", "c"] and list(sheet.columns) == ["condition", "donor"]
    m = sample_meta(a, columns=["condition", "condition"], obs_order=True)
    assert list(m.index) == ["b", "a", "c"] and m.index.name == "sample_id"
    assert list(m.columns) == ["donor", "condition"]
    assert m.loc["c", "donor"] == "D1"
    alone = sample_meta(a, columns=["condition"], donor_key=None)
    assert list(alone["donor"]) == ["a", "b", "c"]  # each sample its own donor
    a.obs.loc["c2", "condition"] = "y"  # sample b now has two conditions
    with pytest.raises(ValueError, match=r"\['condition'\] vary within a sample"):
        sample_meta(a, columns=["condition"])
    assert "condition" not in sample_meta(a).columns  # the sheet leaves it out silently


def test_paired_mode_and_covariate_terms():
    from sepsis_sc.design.model import _covariate_terms, _paired_mode

    assert _paired_mode(SEPSIS, None) == "auto"
    assert _paired_mode(SEPSIS, True) == "yes" and _paired_mode(SEPSIS, False) == "no"
    assert _paired_mode(Contrast("n", "condition", "a", "b", paired="no"), None) == "no"
    with pytest.raises(DesignError, match="paired must be"):
        _paired_mode(SEPSIS, "maybe")
    assert _covariate_terms("~ age + C(sex) + condition", "condition") == ["age", "C(sex)"]
    with pytest.raises(DesignError, match="interactions"):
        _covariate_terms("~ age:condition", "condition")


def test_informative_covariates_drop_constant_and_refuse_collinear():
    from sepsis_sc.design.model import _base_columns, _informative_covariates

    units = pd.DataFrame({"donor": list("abcd"), "level": ["s", "s", "c", "c"]}, index=list("abcd"))
    base = _base_columns(units, use_paired=False)
    cov = pd.DataFrame({"const": [2.0] * 4, "age": [1.0, 2.0, 3.0, 5.0]}, index=units.index)
    notes: list[str] = []
    kept = _informative_covariates(base, cov, False, SEPSIS, "~ const + age", notes)
    assert kept == ["age"] and "'const' dropped (constant" in notes[0]
    cov["age2"] = cov["age"] * 2
    with pytest.raises(DesignError, match="'age2' is collinear with age"):
        _informative_covariates(base, cov, False, SEPSIS, "~ age + age2", [])


def test_estimability_reasons():
    from sepsis_sc.design.model import _estimability

    one_group = pd.DataFrame({"Intercept": [1.0, 1.0], COEF: [1.0, 1.0]})
    ok, why = _estimability(one_group, [], SEPSIS, "~ condition", False)
    assert not ok and why.startswith("one group has no unit")
    no_df = pd.DataFrame({"Intercept": [1.0, 1.0], COEF: [1.0, 0.0]})
    ok, why = _estimability(no_df, [], SEPSIS, "~ condition", False)
    assert not ok and why.startswith("no residual degree of freedom")
    confounded = pd.DataFrame({"Intercept": [1.0] * 3, "x": [1.0, 0, 0], COEF: [1.0, 0, 0]})
    with pytest.raises(DesignError, match="confounded with x"):
        _estimability(confounded, ["x"], SEPSIS, "~ x + condition", False)


def test_fit_feature_without_residual_df_gives_effect_only():
    from sepsis_sc.design.limma import _fit_feature

    meta = repeated_sheet(1, 1, ("T0",))
    design = resolve_design(meta, SEPSIS)
    assert list(design.units["level"]) == ["control", "sepsis"]
    row, fit = _fit_feature(design, "f", np.array([3.0, 1.0]))
    assert fit is None and row["effect"] == pytest.approx(-2.0)
    assert row["df_resid"] == 0 and "no residual degree of freedom" in row["note"]


def _schema_defaults(section: str) -> dict:
    from sepsis_sc.config import load_schema

    props = load_schema("config")["properties"][section]["properties"]
    return {k: v["default"] for k, v in props.items() if "default" in v}


def _check_settings_defaults(cls, section: str, functions=()) -> None:
    """Each field default equals the schema's, and so do same-named keyword defaults."""
    import dataclasses
    import inspect

    schema = _schema_defaults(section)
    for f in dataclasses.fields(cls):
        want = tuple(schema[f.name]) if isinstance(schema[f.name], list) else schema[f.name]
        assert f.default == want, (cls.__name__, f.name)
    for fn in functions:
        for name, p in inspect.signature(fn).parameters.items():
            if name in schema and p.default is not inspect.Parameter.empty:
                want = tuple(schema[name]) if isinstance(schema[name], list) else schema[name]
                got = tuple(p.default) if isinstance(p.default, list | tuple) else p.default
                assert got == want, (fn.__name__, name)


def test_stats_settings_defaults_are_the_schema_defaults():
    from sepsis_sc.config import StatsSettings

    _check_settings_defaults(StatsSettings, "stats", (stats.sample_table,))
    s = StatsSettings.from_config({"alpha": 0.1, "design": "~ age + condition"})
    assert s.alpha == 0.1 and s.design == "~ age + condition" and s.test == "t"
    with pytest.raises(ValueError, match="'stats.other' is not a known option"):
        StatsSettings.from_config({"other": 1})  # validated as the workflow does
    with pytest.raises(AttributeError):
        s.alpha = 0.2  # type: ignore[misc]


# ---- the limma port: squeeze_var against limma's values on fixed inputs ----------------
def test_squeeze_var_matches_limma():
    """Values computed with R limma's squeezeVar (as published in inmoose's test suite,
    which checks its port against R): plain prior, and a trend in a covariate."""
    from sepsis_sc.design import squeeze_var

    r = squeeze_var(np.array([0.5, 1.3, 7.8]), 3)
    assert r.df_prior == pytest.approx(2.830777, abs=1e-6)
    assert r.var_prior == pytest.approx(1.676927, abs=1e-6)
    np.testing.assert_allclose(r.var_post, [1.071385, 1.482994, 4.827317], atol=1e-6)
    r = squeeze_var(
        np.array([0.5, 0.5, 1.3, 1.3, 7.8, 7.8]), 20, covariate=np.arange(1, 7, dtype=float)
    )
    assert r.df_prior == pytest.approx(15.44626, abs=1e-5)
    np.testing.assert_allclose(
        r.var_prior, [0.4322342, 0.6426360, 1.0331707, 1.9359150, 4.2277336, 9.9836662], atol=1e-6
    )
    np.testing.assert_allclose(
        r.var_post, [0.4704700, 0.5621558, 1.1837250, 1.5771098, 6.2433295, 8.7515664], atol=1e-6
    )


#: 30 variances on 3 df with two outliers (features 5 and 18)
_ROBUST_S2 = np.array(
    [2.658308, 0.170988, 0.039134, 0.889653, 20.855245, 0.064332, 0.077006, 1.98612,
     0.718102, 0.036187, 0.216153, 2.706271, 0.236224, 0.035369, 0.660972, 2.075969,
     0.082713, 1.208483, 1.644356, 0.960798, 0.040549, 0.156884, 2.623076, 0.328096,
     0.033528, 0.482487, 2.374937, 0.10945, 0.04914, 1.310661]
)  # fmt: skip


def test_robust_squeeze_var_matches_an_independent_port_of_limma():
    """limma's fitFDistRobustly (robust=TRUE): the values of edgePython 0.5.0's port of the
    same published algorithm (whose robust prior matches R's) on the same fixed input; the
    outlying variances get a smaller prior df of their own and keep more of their value."""
    from sepsis_sc.design import squeeze_var

    r = squeeze_var(_ROBUST_S2, 3, robust=True)
    assert r.df2 == pytest.approx(1.721682, abs=1e-6)
    assert r.var_prior == pytest.approx(0.275950, abs=1e-6)
    a, b = 1.44687, 1.721682
    want_df = [a, b, b, a, a, b, b, a, a, b, b, a, b, b, a, a, b, a, a, a, b, b, a, 1.686184,
               b, 1.484693, a, b, b, a]  # fmt: skip
    np.testing.assert_allclose(r.df_prior, want_df, atol=1e-6)
    np.testing.assert_allclose(
        r.var_post[[0, 4, 17, 23, 25]],
        [1.883165, 14.159397, 0.905066, 0.309333, 0.414111],
        atol=1e-6,
    )
    # the plain prior gives every feature the same df
    plain = squeeze_var(_ROBUST_S2, 3)
    assert np.ndim(plain.df_prior) == 0 and plain.df_prior == pytest.approx(r.df2)


def test_robust_prior_lets_outliers_keep_their_variance():
    """With variances that are no more spread than chance (df2 = inf) the robust prior
    pools every ordinary feature completely but leaves an outlier almost its own value."""
    from sepsis_sc.design import squeeze_var

    s2 = np.array([0.21, 0.35, 0.18, 0.52, 0.29, 0.44, 0.26, 0.31, 0.39, 0.23, 0.48, 0.33,
                   0.27, 0.36, 0.41, 0.19, 0.30, 0.25, 4.8, 6.5])  # fmt: skip
    r = squeeze_var(s2, 4.0, robust=True)
    assert np.isinf(r.df_prior[:18]).all() and (r.df_prior[18:] < 1e-3).all()
    np.testing.assert_allclose(r.var_post[:18], 0.4331368726, atol=1e-9)
    np.testing.assert_allclose(r.var_post[18:], [4.7999936131, 6.4999999861], atol=1e-6)
    plain = squeeze_var(s2, 4.0)
    assert plain.var_post[19] < 0.5 * 6.5  # the plain prior pulls the outlier far down


def test_unit_weights_follow_the_samples_each_unit_averages():
    """Units of one sample weigh 1 (no weights at all); a patient unit averaging two samples
    weighs more than a control of one, by 1 / (rho + (1 - rho) / m) with the intra-donor
    correlation estimated from the repeated samples."""
    from sepsis_sc.design import Contrast, resolve_design, unit_weights
    from sepsis_sc.sim import repeated_sheet

    contrast = Contrast("sepsis_vs_control", "condition", "sepsis", "control")
    single = repeated_sheet(4, 4, ("T0",))
    d1 = resolve_design(single, contrast, None)
    rng = np.random.default_rng(0)
    vals = pd.DataFrame(rng.normal(size=(len(single), 5)), index=single.index)
    assert unit_weights(d1, vals) is None
    sheet = repeated_sheet(5, 3)
    d2 = resolve_design(sheet, contrast, None)
    donor = {d: rng.normal(0, 1.0, 8) for d in sheet["donor"].unique()}
    vals = pd.DataFrame(
        [donor[d] + rng.normal(0, 1.0, 8) for d in sheet["donor"]], index=sheet.index
    )  # rho about 0.5
    w = unit_weights(d2, vals)
    m = d2.sample_unit.value_counts().reindex(d2.units.index)
    assert w.mean() == pytest.approx(1.0)
    assert (w[m == 2] > w[m == 1].max()).all()
    ratio = float(w[m == 2].iloc[0] / w[m == 1].iloc[0])
    assert 1.1 < ratio < 2.0  # 1 / (rho + (1 - rho) / 2) for rho in (0, 1)


def test_weighted_fit_equals_weighted_least_squares():
    from sepsis_sc.design import Contrast, linear_test, resolve_design
    from sepsis_sc.sim import repeated_sheet

    d = resolve_design(repeated_sheet(5, 3), Contrast("c", "condition", "sepsis", "control"), None)
    rng = np.random.default_rng(1)
    y = pd.DataFrame({"a": rng.normal(size=len(d.units))}, index=d.units.index)
    w = pd.Series(rng.uniform(0.5, 2.0, len(d.units)), index=d.units.index)
    fit = linear_test(d, y, moderation="none", weights=w).loc["a"]
    x = d.matrix.to_numpy(float)
    sw = np.sqrt(w.to_numpy())
    beta, rss, *_ = np.linalg.lstsq(x * sw[:, None], y["a"].to_numpy() * sw, rcond=None)
    j = list(d.matrix.columns).index("case_vs_control")
    assert fit["effect"] == pytest.approx(beta[j])
    s2 = float(rss[0]) / (x.shape[0] - x.shape[1])
    se = np.sqrt(s2 * np.linalg.inv((x * w.to_numpy()[:, None]).T @ x)[j, j])
    assert fit["se"] == pytest.approx(se)
    assert fit["s2"] == pytest.approx(s2) and fit["d0"] == 0
