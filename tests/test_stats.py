"""Tests for sepsis_sc.stats: sample-level tables, condition effects, composition, targets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_score import make_cohort

from sepsis_sc import stats
from sepsis_sc.pl import stats as pl_stats
from sepsis_sc.score import score_states
from sepsis_sc.stats import composition as st_composition
from sepsis_sc.stats import effects as st_effects
from sepsis_sc.stats import samples as st_samples
from sepsis_sc.stats import targets as st_targets

CASE, CONTROL = "sepsis", "control"


@pytest.fixture(scope="module")
def scored():
    adata = make_cohort(n_case=4, n_control=4, cells_per_type=50, seed=3)
    score_states(adata, organism="human", control=CONTROL)
    return adata


@pytest.fixture(scope="module")
def table(scored):
    return stats.sample_table(scored, min_cells=20)


def test_bh_fdr_matches_reference():
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.2])
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.2), "BH") = 0.04 0.0533 0.0533 0.2
    np.testing.assert_allclose(stats.bh_fdr(p)[[0, 1, 2, 4]], [0.04, 0.16 / 3, 0.16 / 3, 0.2])
    assert np.isnan(stats.bh_fdr(p)[3])


def test_sample_table_values(scored, table):
    assert set(table["metric"]) == {
        "fraction",
        "mean_score",
        "pseudobulk_score",
        "pseudobulk_expression",
    }
    row = table[(table["state"] == "mono_hladr_low") & (table["metric"] == "mean_score")]
    assert len(row) == 8  # one per sample
    obs = scored.obs
    s0 = obs[(obs["sample_id"] == "C0") & (obs["lineage"] == "Monocyte")]
    r = row.set_index("sample_id").loc["C0"]
    assert r["value"] == pytest.approx(s0["mono_hladr_low_score"].mean())
    assert r["n_cells"] == len(s0)
    frac = table[(table["state"] == "t_exhaustion") & (table["metric"] == "fraction")]
    cd8 = obs[(obs["sample_id"] == "S1") & (obs["cell_type"] == "CD8 effector/memory T")]
    f = frac.set_index("sample_id").loc["S1"]
    assert f["n_cells"] == len(cd8)  # call population, not all T
    assert f["value"] == pytest.approx(cd8["t_exhaustion"].astype(bool).mean())
    assert (table["reason"] == "").all()
    # states without a discrete call have no fraction rows
    assert not ((table["state"] == "ifn_response.t") & (table["metric"] == "fraction")).any()


def test_too_few_cells_gives_na_with_reason(scored):
    small = scored[
        ~((scored.obs["sample_id"] == "S0") & (scored.obs["lineage"] == "Monocyte"))
        | (np.arange(scored.n_obs) % 10 == 0)
    ].copy()
    tab = stats.sample_table(small, min_cells=20, states=["mono_hladr_low"])
    s0 = tab[tab["sample_id"] == "S0"]
    assert s0["value"].isna().all()
    assert s0["reason"].str.contains("< min_cells=20").all()
    eff = stats.condition_effects(tab, case=CASE, control=CONTROL)
    assert (eff["n_case"] == 3).all()
    assert eff["note"].str.contains("1 sample").all()
    none = stats.sample_table(small, min_cells=10_000, states=["mono_hladr_low"])
    assert none["value"].isna().all()
    e2 = stats.condition_effects(none, case=CASE, control=CONTROL)
    assert e2["pvalue"].isna().all() and e2["note"].str.contains("no sample with enough").all()


def test_planted_effects_detected_in_right_direction(table):
    # 4 v 4 samples: the moderated t (limma's squeezeVar) borrows the df this fixture lacks
    eff = stats.condition_effects(table, case=CASE, control=CONTROL, moderation="plain")
    e = eff.set_index(["state", "metric"])
    for state in ("mono_hladr_low", "t_exhaustion", "trem2_high_macrophage"):
        r = e.loc[(state, "fraction")]
        assert r["fdr"] <= 0.05 and r["effect"] > 0 and r["ci_low"] > 0, state
        assert r["test"] == "moderated t" and r["n_case"] == 4 and r["n_control"] == 4
        assert r["mean_case"] > r["mean_control"]
        assert "more frequent in sepsis" in r["meaning"]
    for lin in ("t", "monocyte", "neutrophil"):  # ifn_response: one row per lineage
        r = e.loc[(f"ifn_response.{lin}", "mean_score")]
        assert r["fdr"] <= 0.05 and r["direction"] == "higher in sepsis", lin
    # states without a planted effect are not called
    assert e.loc[("neutrophil_immature", "mean_score"), "fdr"] > 0.05
    assert e.loc[("dc_tolerogenic.cdc2", "mean_score"), "fdr"] > 0.05
    # BH within each family (primary / secondary): fdr >= p and monotone in p
    assert (eff["fdr"] >= eff["pvalue"] - 1e-15).all()
    for _, fam in eff.groupby("role"):
        order = np.argsort(fam["pvalue"].to_numpy())
        assert np.all(np.diff(fam["fdr"].to_numpy()[order]) >= -1e-12)
    # one pre-specified primary metric per state; HLA-DR-low monocytes: pseudobulk expression
    prim = eff[eff["role"] == "primary"].set_index("state")["metric"]
    assert prim.index.is_unique and prim["mono_hladr_low"] == "pseudobulk_expression"
    assert prim["t_exhaustion"] == "fraction" and prim["ifn_response.t"] == "mean_score"


def test_linear_model_ci_and_p_match_scipy(table):
    from scipy import stats as ss

    plain = stats.condition_effects(
        table, case=CASE, control=CONTROL, metrics=["mean_score"], moderation="none"
    )
    r = plain.set_index("state").loc["ms1_monocyte"]
    d = table[(table["state"] == "ms1_monocyte") & (table["metric"] == "mean_score")]
    a = d.loc[d["condition"] == CASE, "value"]
    b = d.loc[d["condition"] == CONTROL, "value"]
    ref = ss.ttest_ind(a, b, equal_var=True)  # ~ condition without moderation = pooled t-test
    assert r["pvalue"] == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval()
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high))
    # moderated: same effect, a CI from the moderated t that still contains it
    eff = stats.condition_effects(
        table, case=CASE, control=CONTROL, metrics=["mean_score"], moderation="plain"
    )
    m = eff.set_index("state").loc["ms1_monocyte"]
    assert m["effect"] == pytest.approx(r["effect"]) and m["ci_low"] < m["effect"] < m["ci_high"]
    assert m["test"] == "moderated t" and r["test"] == "t"
    rank = stats.condition_effects(
        table, case=CASE, control=CONTROL, test="rank", metrics=["mean_score"]
    )
    rr = rank.set_index("state").loc["ms1_monocyte"]
    assert rr["pvalue"] == pytest.approx(ss.mannwhitneyu(a, b).pvalue)
    assert rr["effect"] == pytest.approx(r["effect"])


def test_paired_design_uses_paired_test():
    adata = make_cohort(n_case=4, paired=True, cells_per_type=40, seed=2)
    score_states(adata, control=CONTROL, states=["mono_hladr_low", "ifn_response"])
    tab = stats.sample_table(adata)
    eff = stats.condition_effects(tab, case=CASE, control=CONTROL, moderation="plain")
    assert (eff["test"] == "paired moderated t").all() and (eff["n_pairs"] == 4).all()
    plain = stats.condition_effects(tab, case=CASE, control=CONTROL)  # default: no moderation
    assert (plain["test"] == "paired t").all()
    r = plain.set_index(["state", "metric"]).loc[("ifn_response.monocyte", "mean_score")]
    d = tab[(tab["state"] == "ifn_response.monocyte") & (tab["metric"] == "mean_score")]
    piv = d.pivot(index="donor", columns="condition", values="value")
    from scipy import stats as ss

    assert r["pvalue"] == pytest.approx(ss.ttest_rel(piv[CASE], piv[CONTROL]).pvalue)
    unpaired = stats.condition_effects(tab, case=CASE, control=CONTROL, paired=False)
    assert (unpaired["test"] == "t").all()
    assert unpaired["note"].str.contains("treated as independent").all()


def test_fewer_than_two_samples_gives_effect_without_p(scored):
    keep = scored.obs["sample_id"].isin(["C0", "C1", "C2", "S0"]).to_numpy()
    tab = stats.sample_table(scored[keep].copy())
    eff = stats.condition_effects(tab, case=CASE, control=CONTROL)
    assert eff["pvalue"].isna().all() and eff["fdr"].isna().all()
    assert eff["effect"].notna().all()
    assert eff["note"].str.contains("fewer than 2 units in sepsis").all()
    assert eff["meaning"].str.contains("not tested").all()
    assert (eff["direction"] == "").all()  # direction only where a test is significant
    with pytest.raises(ValueError, match="conditions present"):
        stats.condition_effects(tab, case="sepsis", control="healthy")


def _null_table(rng, n=4, donor_sd=0.3, cells=60, n_states=1):
    """Sample-level values from a null model with donor variation and cell-level noise."""
    rows = []
    for cond, st in [(c, f"s{j}") for j in range(n_states) for c in (CASE, CONTROL)]:
        for i in range(n):
            p = 1 / (1 + np.exp(-(-2.0 + rng.normal(0, donor_sd))))
            k = rng.binomial(cells, p)
            base = dict(
                sample_id=f"{cond}{i}",
                condition=cond,
                donor=f"{cond}{i}",
                label="x",
                population="p",
                n_cells=cells,
                reason="",
            )
            rows.append(
                {**base, "state": st, "metric": "fraction", "value": k / cells, "n_called": k}
            )
            score = rng.normal(0.2, 0.05) + rng.normal(0, 0.1, cells).mean()
            rows.append(
                {**base, "state": st, "metric": "mean_score", "value": score, "n_called": np.nan}
            )
    return pd.DataFrame(rows)


def test_null_false_positive_rate_near_alpha():
    rng = np.random.default_rng(7)
    eff = stats.condition_effects(_null_table(rng, n_states=200), case=CASE, control=CONTROL)
    assert len(eff) == 400
    fpr = np.mean(eff["pvalue"].to_numpy() < 0.05)
    assert 0.01 < fpr < 0.08, fpr  # 400 tests; Welch on 4 vs 4 is slightly conservative (0.03)


def test_null_cohort_end_to_end_few_false_positives():
    hits = tests = 0
    for seed in range(3):
        adata = make_cohort(n_case=4, n_control=4, cells_per_type=40, effects=False, seed=10 + seed)
        score_states(adata, control=CONTROL)
        eff = stats.condition_effects(stats.sample_table(adata), case=CASE, control=CONTROL)
        hits += int((eff["pvalue"] < 0.05).sum())
        tests += int(eff["pvalue"].notna().sum())
        assert not eff.loc[eff["role"] == "primary", "significant"].any()
    assert tests >= 60 and hits / tests <= 0.1, (hits, tests)


def test_composition_test_planted_and_null():
    adata = make_cohort(n_case=4, n_control=4, cells_per_type=50, seed=3)
    comp = stats.composition_test(adata, case=CASE, control=CONTROL, level="lineage")
    t = comp.set_index("label").loc["T"]
    assert t["significant"] and t["effect"] < 0 and t["log2_prop_ratio"] < -0.5
    assert "smaller in sepsis" in t["meaning"]
    assert comp["design"].iloc[0].startswith("~ condition (columns: case_vs_control); 4 vs 4")
    fp = 0
    for seed in range(5):
        null = make_cohort(n_case=4, n_control=4, cells_per_type=50, effects=False, seed=20 + seed)
        c = stats.composition_test(null, case=CASE, control=CONTROL, level="cell_type")
        fp += int((c["pvalue"] < 0.05).sum())
    assert fp <= 3  # 30 null tests
    asin = stats.composition_test(adata, case=CASE, control=CONTROL, transform="asin")
    assert asin.set_index("label").loc["T", "significant"]


def test_composition_paired_and_unreplicated():
    adata = make_cohort(n_case=4, paired=True, cells_per_type=40, seed=4)
    comp = stats.composition_test(adata, case=CASE, control=CONTROL)
    assert "donor blocks" in comp["design"].iloc[0] and "4 vs 4 paired" in comp["design"].iloc[0]
    assert comp.set_index("label").loc["T", "significant"]
    one = adata[adata.obs["donor"] == "D0"].copy()
    c1 = stats.composition_test(one, case=CASE, control=CONTROL)
    assert c1["pvalue"].isna().all() and c1["note"].str.contains("no residual").all()


def test_therapy_targets_ranking(table):
    eff = stats.condition_effects(table, case=CASE, control=CONTROL, moderation="plain")
    tt = stats.therapy_targets(eff)
    t = tt.set_index("state")
    assert t.loc["mono_hladr_low", "evidence"] == "supported"
    assert t.loc["t_exhaustion", "evidence"] == "supported"
    assert "PD-1" in t.loc["t_exhaustion", "therapy"]
    assert t.loc["trem2_high_macrophage", "evidence"] == "opposite"  # more, not fewer
    assert t.loc["neutrophil_immature", "evidence"] == "not significant"
    assert tt["rank"].tolist() == list(range(1, len(tt) + 1))
    ev = tt["evidence"].tolist()
    assert ev.index("supported") == 0 and ev[-1] in ("not significant", "not tested")


def test_figures_render(scored, table, tmp_path):
    from sepsis_sc.pl.style import savefig

    rng = np.random.default_rng(0)
    scored.obsm["X_umap"] = (
        rng.normal(size=(scored.n_obs, 2)) + pd.factorize(scored.obs["cell_type"])[0][:, None] * 3
    )
    eff = stats.condition_effects(table, case=CASE, control=CONTROL)
    tt = stats.therapy_targets(eff)
    # a DA neighbourhood no state explains adds an "unnamed change" row: it must draw too
    nhoods = pd.DataFrame(
        {
            "unexplained": [True, True, False],
            "direction": ["expanded", "expanded", "depleted"],
            "cell_type": ["CD4 memory T", "CD4 memory T", "NK"],
            "log2fc": [1.2, 1.5, -1.0],
            "spatial_fdr": [0.01, 0.03, 0.02],
        }
    )
    tt_da = stats.therapy_targets(eff, nhoods=nhoods)
    assert (tt_da["evidence"] == "unnamed change").sum() == 1
    figs = {
        "forest": pl_stats.forest(eff, case=CASE, control=CONTROL),
        "forest_primary": pl_stats.forest(eff, case=CASE, control=CONTROL, primary_only=True),
        "points": pl_stats.sample_values(table, case=CASE, control=CONTROL, metric="fraction"),
        "umap": pl_stats.score_umaps(scored, ["mono_hladr_low", "t_exhaustion", "ifn_response.t"]),
        "composition": pl_stats.composition(scored, case=CASE, control=CONTROL),
        "targets": pl_stats.therapy_targets(tt),
        "targets_da": pl_stats.therapy_targets(tt_da),
    }
    n_rows = {
        name: sum(len(ax.get_yticks()) for ax in figs[name].axes)
        for name in ("forest", "forest_primary")
    }
    assert n_rows["forest_primary"] == (eff["role"] == "primary").sum() < n_rows["forest"]
    for name, fig in figs.items():
        assert fig.axes, name
        path = savefig(fig, tmp_path / f"{name}.png")
        assert path.stat().st_size > 5000
    with pytest.raises(KeyError, match="UMAP"):
        pl_stats.score_umaps(scored[:, :].copy().__class__(scored.X[:5]))


# --------------------------------------------------------------------------------------
# the project's simulator (planted truth): effects found, null cohort clean
# --------------------------------------------------------------------------------------
def _simulated(effects: bool, seed: int = 0, n: int = 6):
    simulate = pytest.importorskip("sepsis_sc.sim")
    import anndata as ad

    sheet = pd.DataFrame(
        {
            "sample_id": [f"C{i}" for i in range(n)] + [f"S{i}" for i in range(n)],
            "condition": [CONTROL] * n + [CASE] * n,
            "donor": [f"DC{i}" for i in range(n)] + [f"DS{i}" for i in range(n)],
            "batch": ["b1", "b2"] * n,
        }
    )
    ads, truth = simulate.simulate_cohort(
        sheet, cells_per_sample=600, n_genes=3000, effects=effects, seed=seed
    )
    adata = ad.concat(list(ads.values()))
    truth = truth.set_index("cell_id").loc[adata.obs_names]
    keep = ~(truth["is_doublet"] | truth["is_low_quality"]).to_numpy()
    adata, truth = adata[keep].copy(), truth[keep]
    adata.obs["lineage"] = truth["lineage"].to_numpy()  # truth labels stand in for annotate
    adata.obs["cell_type"] = truth["cell_type"].to_numpy()
    # min_genes_fraction=0: the simulator's 3000 genes hold under half of some sets
    rules = score_states(adata, control=CONTROL, min_genes_fraction=0.0).set_index("state")
    return adata, truth, rules


def test_simulator_planted_effects_found_at_fdr_005():
    adata, truth, rules = _simulated(effects=True)
    # genes are chosen by expression in real PBMC, so the IFN set is present: one row per lineage
    ifn = rules[rules["base_state"] == "ifn_response"]
    assert (ifn["status"] == "scored").all() and {"T", "Monocyte"} <= set(ifn["stratum"])
    # calls agree with the planted per-cell truth
    c = adata.obs["mono_hladr_low"].dropna().astype(bool)
    assert truth.loc[c.index[c], "hla_low"].mean() > 0.9
    eff = stats.condition_effects(stats.sample_table(adata), case=CASE, control=CONTROL)
    e = eff.set_index(["state", "metric"])
    for key in [
        ("mono_hladr_low", "fraction"),
        ("mono_hladr_low", "pseudobulk_score"),
        ("ms1_monocyte", "mean_score"),
        ("ms1_monocyte", "pseudobulk_score"),
        ("cytokine_storm.monocyte", "pseudobulk_score"),
    ]:
        assert e.loc[key, "fdr"] <= 0.05 and e.loc[key, "effect"] > 0, key
    comp = stats.composition_test(adata, case=CASE, control=CONTROL, level="cell_type")
    c = comp.set_index("label")
    for label in ("Classical monocyte", "Immature neutrophil", "TREM2-high macrophage"):
        assert c.loc[label, "fdr"] <= 0.05 and c.loc[label, "effect"] > 0, label
    assert c.loc["CD4 naive T", "effect"] < 0


def test_simulator_null_cohort_has_no_findings():
    adata, _, _ = _simulated(effects=False, seed=1)
    eff = stats.condition_effects(stats.sample_table(adata), case=CASE, control=CONTROL)
    comp = stats.composition_test(adata, case=CASE, control=CONTROL, level="cell_type")
    p = np.concatenate([eff["pvalue"].dropna(), comp["pvalue"].dropna()])
    assert len(p) >= 30
    assert np.mean(p < 0.05) <= 0.1  # measured: 1 of 34
    assert not eff["significant"].any() and not comp["significant"].any()


def test_score_umaps_show_only_scored_states():
    """QC's doublet_score (or any other *_score column) is not drawn as a therapy state."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from sepsis_sc.pl.stats import score_umaps

    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {"doublet_score": rng.random(50), "t_exhaustion_score": rng.random(50)},
        index=[f"c{i}" for i in range(50)],
    )
    adata = ad.AnnData(obs=obs)
    adata.obsm["X_umap"] = rng.normal(size=(50, 2))
    adata.uns["state_rules"] = {"t_exhaustion": {"label": "exhausted T"}}
    fig = score_umaps(adata)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["exhausted T"]


def test_pseudobulk_expression_is_log_cpm_of_summed_counts(scored, table):
    """pseudobulk_expression = mean log2(CPM+1) of up genes minus down genes in the summed
    counts of the parent population of one sample (checked by hand for one sample)."""
    from sepsis_sc.score import load_signatures

    sig = {s["name"]: s for s in load_signatures("human")}["mono_hladr_low"]
    sample = str(scored.obs["sample_id"].iloc[0])
    cells = (scored.obs["sample_id"].astype(str) == sample).to_numpy() & np.isfinite(
        scored.obs["mono_hladr_low_score"].to_numpy(float)
    )
    summed = np.asarray(scored.layers["counts"][cells].sum(axis=0)).ravel()
    logcpm = pd.Series(np.log2(summed / summed.sum() * 1e6 + 1.0), index=scored.var_names)
    up = [g for g in sig["up"] if g in logcpm.index]
    down = [g for g in sig["down"] if g in logcpm.index]
    expected = logcpm[up].mean() - logcpm[down].mean()
    row = table[
        (table["state"] == "mono_hladr_low")
        & (table["metric"] == "pseudobulk_expression")
        & (table["sample_id"].astype(str) == sample)
    ]
    assert row["value"].iloc[0] == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------
def test_sample_meta_view_keeps_obs_order_and_fills_donor(scored):
    meta = st_samples.condition_meta(scored, "sample_id", "condition", "donor")
    assert list(meta.columns) == ["condition", "donor"]
    assert list(meta.index) == list(dict.fromkeys(scored.obs["sample_id"].astype(str)))
    alone = st_samples.condition_meta(scored, "sample_id", "condition", None)
    assert (alone["donor"] == alone.index).all()
    with pytest.raises(KeyError, match="obs\\['visit'\\] is missing"):
        st_samples.condition_meta(scored, "sample_id", "visit", "donor")


def test_fraction_row_counts_the_call_population():
    meta = pd.DataFrame({"condition": ["sepsis"], "donor": ["D"]}, index=["S"])
    si = {"label": "x", "call_population": "CD8", "parent": "T"}
    call = pd.Series([True, False, pd.NA, True], dtype="boolean")
    in_s = np.array([True, True, True, False])
    row = st_samples._fraction_row(meta, "S", "x", si, call, in_s, min_cells=1)
    assert (row["n_cells"], row["n_called"], row["value"], row["population"]) == (2, 1, 0.5, "CD8")
    short = st_samples._fraction_row(meta, "S", "x", si, call, in_s, min_cells=3)
    assert np.isnan(short["value"]) and "2 cells of the call population (CD8)" in short["reason"]


def test_effect_notes_drop_p_with_fewer_than_two_units():
    from sepsis_sc.design import Contrast, resolve_design
    from sepsis_sc.sim import repeated_sheet

    design = resolve_design(
        repeated_sheet(1, 3, ("T0",)), Contrast("c", "condition", "sepsis", "control")
    )
    r = pd.Series({"note": "", "pvalue": 0.01, "n_case": 1, "n_control": 3})
    notes, p = st_effects._effect_notes(design, r, n_na=2)
    assert (
        np.isnan(p)
        and "2 sample(s) NA" in notes[0]
        and "fewer than 2 units in sepsis (n=1)" in notes[1]
    )
    r0 = pd.Series({"note": "", "pvalue": np.nan, "n_case": 0, "n_control": 3})
    assert st_effects._effect_notes(design, r0, 0)[0] == [
        "no sample with enough cells in one condition"
    ]
    assert st_effects._test_name(design, "rank", "plain") == "Mann-Whitney U"
    assert st_effects._test_name(design, "t", "none") == "t"


def test_direction_and_composition_meaning():
    res = pd.DataFrame({"significant": [True, True, False], "effect": [1.0, -1.0, 2.0]})
    assert list(st_effects.direction(res, "sepsis")) == ["higher in sepsis", "lower in sepsis", ""]
    r = pd.Series(
        {
            "label": "Monocyte",
            "effect": 0.5,
            "significant": False,
            "fdr": np.nan,
            "mean_prop_case": 0.2,
            "mean_prop_control": 0.1,
        }
    )
    assert st_composition._composition_meaning(r, "sepsis", "control").endswith(
        "20.0% vs 10.0%; not tested."
    )
    r["significant"], r["fdr"] = True, 0.01
    assert "share of cells is larger in sepsis" in st_composition._composition_meaning(
        r, "sepsis", "control"
    )


def test_therapy_target_evidence_and_missing_primary():
    r = pd.Series({"fdr": 0.01, "effect": -1.0})
    assert st_targets._evidence(r, "down", 0.05) == "supported"
    assert st_targets._evidence(r, "up", 0.05) == "opposite"
    assert (
        st_targets._evidence(pd.Series({"fdr": 0.2, "effect": 1.0}), "up", 0.05)
        == "not significant"
    )
    assert (
        st_targets._evidence(pd.Series({"fdr": np.nan, "effect": 1.0}), "up", 0.05) == "not tested"
    )
    sub = pd.DataFrame(
        {"state": ["s"], "label": ["S"], "metric": ["mean_score"], "role": ["secondary"]}
    )
    stand_in = st_targets._primary_effect(sub, {"primary_metric": "fraction"})
    assert stand_in["metric"] == "fraction" and "not computed" in stand_in["meaning"]


def test_score_umaps_draw_one_panel_per_stratified_state():
    """ifn_response scored per lineage is one panel (its strata's cells do not overlap)."""
    import anndata as ad

    from sepsis_sc.pl.stats import _score_panels

    obs = pd.DataFrame(
        {
            "ifn_response.t_score": [0.1, np.nan, np.nan],
            "ifn_response.b_score": [np.nan, 0.2, np.nan],
            "t_exhaustion_score": [0.5, np.nan, np.nan],
        }
    )
    a = ad.AnnData(obs=obs)
    a.uns["state_rules"] = {
        "ifn_response.t": {"label": "IFN (T)", "stratum": "T"},
        "ifn_response.b": {"label": "IFN (B)", "stratum": "B"},
        "t_exhaustion": {"label": "exhausted T", "stratum": ""},
    }
    panels = _score_panels(a, ["ifn_response.t", "ifn_response.b", "t_exhaustion"])
    assert list(panels) == ["IFN (per stratum)", "exhausted T"]
    np.testing.assert_allclose(panels["IFN (per stratum)"], [0.1, 0.2, np.nan])


def test_sample_table_streams_counts_from_the_file(scored, tmp_path):
    """sample_table(counts=FileCounts) sums every state's parent cells in one pass over the
    .h5ad (adata holds no matrix; the workflow's rule at atlas scale) and gives the same table."""
    from sepsis_sc import store
    from sepsis_sc.utils import write_h5ad

    path = tmp_path / "scored.h5ad"
    write_h5ad(scored, path)
    light = store.read(path)
    assert light.X is None and not light.layers
    want = stats.sample_table(scored, min_cells=20)
    counts = store.FileCounts.matching(path, "counts", light)
    got = stats.sample_table(light, min_cells=20, counts=counts)
    assert (want["metric"] == "pseudobulk_expression").any()
    key = ["state", "sample_id", "metric"]  # uns read back from HDF5 lists the states sorted
    pd.testing.assert_frame_equal(
        got.sort_values(key).reset_index(drop=True), want.sort_values(key).reset_index(drop=True)
    )
