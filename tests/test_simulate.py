"""Tests for sepsis_sc.sim: determinism, truth, calibration, planted effects, writing."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import shared_file

from sepsis_sc import data, io, sim

N_GENES = 10_000


def _sheet(n_per_group: int = 2, case: str = "sepsis", control: str = "control") -> pd.DataFrame:
    n = 2 * n_per_group
    return pd.DataFrame(
        {
            "sample_id": [f"S{i + 1}" for i in range(n)],
            "condition": [case] * n_per_group + [control] * n_per_group,
            "donor": [f"D{i + 1}" for i in range(n)],
            "batch": ["b1", "b2"] * n_per_group,
            "age": [60 + i for i in range(n)],
        }
    )


@pytest.fixture(scope="module")
def cohort():
    """4 sepsis vs 4 control samples, 400 cells each (about 2 s)."""
    return sim.simulate_cohort(_sheet(4), cells_per_sample=400, n_genes=N_GENES, seed=7)


def _fraction(truth: pd.DataFrame, mask: pd.Series, within: pd.Series | None = None) -> pd.Series:
    """Per-sample fraction of cells with `mask` among cells in `within` (default all)."""
    within = pd.Series(True, index=truth.index) if within is None else within
    t = truth[within]
    return mask[within].groupby(t["sample_id"]).mean()


def _by_condition(values: pd.Series, truth: pd.DataFrame) -> pd.Series:
    cond = truth.drop_duplicates("sample_id").set_index("sample_id")["condition"]
    return values.groupby(cond).mean()


def test_deterministic_from_seed():
    sheet = _sheet(1)
    a1, t1 = sim.simulate_cohort(sheet, cells_per_sample=120, n_genes=N_GENES, seed=3)
    a2, t2 = sim.simulate_cohort(sheet, cells_per_sample=120, n_genes=N_GENES, seed=3)
    a3, _ = sim.simulate_cohort(sheet, cells_per_sample=120, n_genes=N_GENES, seed=4)
    pd.testing.assert_frame_equal(t1, t2)
    for sid in a1:
        assert (a1[sid].X != a2[sid].X).nnz == 0
        assert list(a1[sid].obs_names) == list(a2[sid].obs_names)
    assert (a1["S1"].X != a3["S1"].X).nnz > 0


def test_anndata_contract_and_truth_join(cohort):
    adatas, truth = cohort
    assert set(adatas) == {f"S{i}" for i in range(1, 9)}
    a = adatas["S1"]
    assert a.n_vars >= 10_000
    assert sum(a.var_names.str.startswith("MT-")) == 13
    assert a.var_names.is_unique and {"gene_ids", "gene_symbols"} <= set(a.var.columns)
    assert isinstance(a.X, sp.csr_matrix) and a.X.dtype == np.float32
    np.testing.assert_array_equal(a.X.data, np.round(a.X.data))
    assert (a.layers["counts"] != a.X).nnz == 0
    assert a.obs_names[0].startswith("S1_") and a.obs_names[0].endswith("-1")
    assert len(a.obs["barcode"].iloc[0]) == 18  # 16 nt + "-1"
    assert a.obs["condition"].iloc[0] == "sepsis" and a.obs["age"].iloc[0] == "60"
    # one truth row per cell, joined on cell_id
    assert truth["cell_id"].is_unique
    obs_names = np.concatenate([ad_.obs_names for ad_ in adatas.values()])
    assert set(obs_names) == set(truth["cell_id"])
    t = truth.set_index("cell_id").loc[a.obs_names]
    np.testing.assert_array_equal(t["total_counts"], np.asarray(a.X.sum(1)).ravel())
    vocab = set(sim.cell_type_table()["cell_type"])
    assert set(truth["cell_type"]) <= vocab
    assert {"Immature neutrophil", "Classical monocyte", "CD4 naive T"} <= set(truth["cell_type"])
    for col in ("lineage", "is_doublet", "is_low_quality", *sim.STATES):
        assert col in truth.columns


def test_nuisance_rates(cohort):
    adatas, truth = cohort
    assert 0.03 <= truth["is_doublet"].mean() <= 0.07
    assert 0.03 <= truth["is_low_quality"].mean() <= 0.08
    dbl = truth[truth["is_doublet"]]
    assert (dbl["doublet_partner_type"] != dbl["cell_type"]).all()  # heterotypic
    a = adatas["S1"]
    t = truth.set_index("cell_id").loc[a.obs_names]
    lib = np.asarray(a.X.sum(1)).ravel()
    mt = np.asarray(a.X[:, a.var_names.str.startswith("MT-")].sum(1)).ravel() / lib
    lowq = t["is_low_quality"].to_numpy()
    assert 0.15 <= np.median(mt[lowq]) <= 0.6
    assert np.median(mt[~lowq]) < 0.06
    assert np.median(lib[lowq]) < 0.6 * np.median(lib[~lowq])
    singlet = ~(lowq | t["is_doublet"].to_numpy())
    assert np.median(lib[t["is_doublet"].to_numpy()]) > 1.3 * np.median(lib[singlet])


def test_calibration_ranges(cohort):
    """Real 10x PBMC (soupx_pbmc4k): median 3,897 UMIs, 1,236 genes, zero fraction 0.91."""
    adatas, truth = cohort
    a = adatas["S5"]  # a control sample
    t = truth.set_index("cell_id").loc[a.obs_names]
    clean = ~(t["is_doublet"] | t["is_low_quality"]).to_numpy()
    x = a.X[clean]
    lib = np.asarray(x.sum(1)).ravel()
    genes = np.diff(x.indptr)
    assert 3000 <= np.median(lib) <= 5500
    assert 800 <= np.median(genes) <= 1700
    assert 0.85 <= 1 - x.nnz / np.prod(x.shape) <= 0.95
    # low-density neutrophils: low RNA but clear identity
    neut = (t["lineage"] == "Neutrophil").to_numpy()
    all_neut = truth["lineage"].eq("Neutrophil") & ~truth["is_doublet"] & ~truth["is_low_quality"]
    nlib = truth.loc[all_neut, "total_counts"]
    assert 500 <= nlib.median() <= 1500
    assert neut.sum() > 0
    fcgr3b = np.asarray(a[:, "FCGR3B"].X.todense()).ravel()
    assert fcgr3b[neut & clean].mean() > 20 * fcgr3b[(t["lineage"] == "T").to_numpy()].mean()


def test_calibration_against_real_pbmc(cohort):
    import anndata as ad

    real = ad.read_h5ad(shared_file("soupx_pbmc4k.h5ad"))
    adatas, truth = cohort
    a = adatas["S6"]
    t = truth.set_index("cell_id").loc[a.obs_names]
    real_lib = np.asarray(real.X.sum(1)).ravel()
    real_genes = np.diff(real.X.tocsr().indptr)
    for real_label, sim_types in [
        ("T_CD4", ["CD4 naive T", "CD4 memory T"]),
        ("B", ["naive B", "memory B"]),
        ("NK", ["NK CD56dim"]),
    ]:
        rm = (real.obs["Annotation"] == real_label).to_numpy()
        sm = (t["cell_type"].isin(sim_types) & ~t["is_doublet"] & ~t["is_low_quality"]).to_numpy()
        sim_lib = np.asarray(a.X[sm].sum(1)).ravel()
        ratio = np.median(sim_lib) / np.median(real_lib[rm])
        assert 0.7 <= ratio <= 1.4, (real_label, ratio)
        gratio = np.median(np.diff(a.X[sm].indptr)) / np.median(real_genes[rm])
        assert 0.7 <= gratio <= 1.4, (real_label, gratio)


def test_planted_sample_level_effects(cohort):
    adatas, truth = cohort
    cmono = truth["cell_type"] == "Classical monocyte"
    ms1 = _by_condition(_fraction(truth, truth["ms1_like"], cmono), truth)
    assert ms1["sepsis"] > 1.8 * ms1["control"]
    mono_dc = truth["lineage"].isin(["Monocyte", "DC"])
    hla = _by_condition(_fraction(truth, truth["hla_low"], mono_dc), truth)
    assert hla["sepsis"] > 1.8 * hla["control"]
    tcell = truth["lineage"] == "T"
    exh = _by_condition(_fraction(truth, truth["exhausted"], tcell), truth)
    assert exh["sepsis"] > 1.8 * exh["control"]
    lymph = _by_condition(_fraction(truth, truth["lineage"].isin(["T", "NK", "B"])), truth)
    assert lymph["sepsis"] < 0.8 * lymph["control"]
    imm = _by_condition(_fraction(truth, truth["cell_type"] == "Immature neutrophil"), truth)
    assert imm["sepsis"] > 2 * imm["control"]
    trem2 = _by_condition(_fraction(truth, truth["trem2_high"]), truth)
    assert trem2["sepsis"] > 1.5 * trem2["control"]
    # not trivially perfect: donor variation makes samples within a condition differ
    per_sample = _fraction(truth, truth["ms1_like"], cmono)
    assert (
        per_sample.groupby(truth.drop_duplicates("sample_id").set_index("sample_id")["condition"])
        .std()
        .min()
        > 0.005
    )


def test_state_flags_match_expression(cohort):
    adatas, truth = cohort
    a = adatas["S1"]
    t = truth.set_index("cell_id").loc[a.obs_names]
    cp10k = sp.diags(1e4 / np.asarray(a.X.sum(1)).ravel()) @ a.X

    def mean(gene: str, mask: np.ndarray) -> float:
        return float(cp10k[mask][:, a.var_names.get_loc(gene)].mean())

    ok = ~(t["is_doublet"] | t["is_low_quality"]).to_numpy()
    cm = ok & (t["cell_type"] == "Classical monocyte").to_numpy()
    ms1 = t["ms1_like"].to_numpy()
    assert mean("RETN", cm & ms1) > 3 * mean("RETN", cm & ~ms1)
    assert mean("IL1R2", cm & ms1) > 3 * mean("IL1R2", cm & ~ms1)
    hla = t["hla_low"].to_numpy()
    assert mean("HLA-DRA", cm & hla) < 0.6 * mean("HLA-DRA", cm & ~hla)
    # exhausted T cells: all samples pooled (one sample holds as few as 2 of them)
    a = ad.concat(list(adatas.values()))
    t = truth.set_index("cell_id").loc[a.obs_names]
    cp10k = sp.diags(1e4 / np.asarray(a.X.sum(1)).ravel()) @ a.X
    ok = ~(t["is_doublet"] | t["is_low_quality"]).to_numpy()
    tc = ok & (t["lineage"] == "T").to_numpy()
    exh = t["exhausted"].to_numpy()
    assert mean("PDCD1", tc & exh) > 3 * mean("PDCD1", tc & ~exh)
    assert mean("IL7R", tc & exh) < 0.6 * mean("IL7R", tc & ~exh)
    tr = ok & t["trem2_high"].to_numpy()
    cm = ok & (t["cell_type"] == "Classical monocyte").to_numpy()
    if tr.any():
        assert mean("TREM2", tr) > 10 * mean("TREM2", cm)


def test_no_condition_effect_without_effects():
    """effects=False: the condition label does not enter the model at all."""
    sheet = _sheet(1)
    swapped = sheet.assign(
        condition=sheet["condition"].map({"sepsis": "control", "control": "sepsis"})
    )
    kw = dict(cells_per_sample=150, n_genes=N_GENES, seed=11)
    a1, t1 = sim.simulate_cohort(sheet, effects=False, **kw)
    a2, t2 = sim.simulate_cohort(swapped, effects=False, **kw)
    for sid in a1:
        assert (a1[sid].X != a2[sid].X).nnz == 0
    cols = ["cell_type", *sim.STATES]
    pd.testing.assert_frame_equal(t1[cols], t2[cols])
    # ... whereas with effects the same swap changes the cells
    e1, _ = sim.simulate_cohort(sheet, effects=True, **kw)
    e2, _ = sim.simulate_cohort(swapped, effects=True, **kw)
    assert (e1["S1"].X != e2["S1"].X).nnz > 0


def test_batch_effect_and_ambient():
    sheet = pd.DataFrame(
        {
            "sample_id": ["A", "B", "C"],
            "condition": "control",
            "donor": ["D1", "D1", "D1"],
            "batch": ["b1", "b1", "b2"],
        }
    )
    kw = dict(cells_per_sample=600, n_genes=N_GENES, seed=5)
    adatas, truth = sim.simulate_cohort(sheet, batch_effect=0.5, **kw)

    def logmean(a):
        m = np.asarray(a.X.mean(0)).ravel()
        return np.log(m + 0.05), m > 0.2

    (la, ma), (lb, mb), (lc, mc) = (logmean(adatas[s]) for s in "ABC")
    keep = ma & mb & mc
    same = np.std((la - lb)[keep])
    across = np.std((la - lc)[keep])
    assert across > 1.5 * same
    # ambient: monocyte transcripts leak into T cells
    no_amb, t0 = sim.simulate_cohort(sheet.iloc[:1], ambient=0.0, **kw)
    hi_amb, t1 = sim.simulate_cohort(sheet.iloc[:1], ambient=0.15, **kw)

    def lyz_in_t(adatas, truth):
        a = adatas["A"]
        t = truth.set_index("cell_id").loc[a.obs_names]
        m = ((t["lineage"] == "T") & ~t["is_doublet"]).to_numpy()
        x = a[:, "LYZ"].X[m]
        return float(x.sum() / a.X[m].sum())

    # measured 3.0x: the fitted T profile already carries soupx_pbmc4k's own ambient LYZ
    assert lyz_in_t(hi_amb, t1) > 2 * lyz_in_t(no_amb, t0)


def test_write_10x_h5_reads_back(tmp_path):
    sheet = _sheet(1)
    sheet["path"] = [
        str(tmp_path / "data" / s / "filtered_feature_bc_matrix.h5") for s in sheet.sample_id
    ]
    out = sim.write_demo_cohort(
        sheet, truth_dir=tmp_path / "truth", cells_per_sample=100, n_genes=N_GENES, seed=2
    )
    truth = pd.read_csv(tmp_path / "truth" / "truth.tsv.gz", sep="\t")
    assert (tmp_path / "truth" / "samples.tsv").exists()
    adatas, _ = sim.simulate_cohort(
        sheet.drop(columns="path"), cells_per_sample=100, n_genes=N_GENES, seed=2
    )
    for row in out.itertuples():
        back = io.read_counts(row.path)
        ref = adatas[row.sample_id]
        assert back.n_vars >= 10_000 and "MT-CO1" in back.var_names
        assert (back.X != ref.layers["counts"]).nnz == 0
        ing = io.ingest_sample(row.path, row._asdict(), organism="human")
        assert set(ing.obs_names) == set(truth.loc[truth.sample_id == row.sample_id, "cell_id"])


def test_write_mtx(tmp_path):
    sheet = _sheet(1)
    out = sim.write_demo_cohort(
        sheet, tmp_path, fmt="mtx", cells_per_sample=80, n_genes=N_GENES, seed=2
    )
    back = io.read_counts(out["path"].iloc[0])
    assert back.n_obs == 80 and back.n_vars >= 10_000
    assert (tmp_path / "truth.tsv.gz").exists()


def test_mouse_variant_and_custom_labels():
    sheet = _sheet(1, case="CLP", control="sham")
    adatas, truth = sim.simulate_cohort(
        sheet,
        cells_per_sample=100,
        n_genes=N_GENES,
        seed=1,
        organism="mouse",
        case="CLP",
        control="sham",
    )
    a = adatas["S1"]
    assert {"mt-Co1", "Ptprc", "Cd3e", "Lyz2", "Ly6g", "H2-Ab1"} <= set(a.var_names)
    assert not any(a.var_names.str.startswith("MT-"))
    assert data.detect_organism(a.var_names) == "mouse"
    assert set(truth["condition"]) == {"CLP", "sham"}
    with pytest.raises(ValueError, match="neither case"):
        sim.simulate_cohort(sheet, cells_per_sample=50, n_genes=N_GENES)


def test_bad_input_messages():
    with pytest.raises(ValueError, match="lacks column"):
        sim.simulate_cohort(pd.DataFrame({"sample_id": ["a"]}))
    with pytest.raises(ValueError, match="n_genes=100"):
        sim.simulate_cohort(_sheet(1), n_genes=100)


def test_check_planted_effects_scores_direction_and_fdr():
    """The demo self-check marks an effect detected only at FDR <= alpha in its planted
    direction, and a missing row (not tested) as not detected."""
    import pandas as pd

    from sepsis_sc.sim import PLANTED_EFFECTS, check_planted_effects, null_calibration

    comp_rows, eff_rows = [], []
    for spec in PLANTED_EFFECTS:
        sign = 1.0 if spec["direction"] == "up" else -1.0
        if spec["table"] == "composition":
            comp_rows.append(
                {
                    "level": spec["level"],
                    "label": spec["label"],
                    "effect": sign,
                    "pvalue": 0.001,
                    "fdr": 0.01,
                }
            )
        else:
            eff_rows.append(
                {
                    "state": spec["level"],
                    "metric": "fraction",
                    "role": "primary",
                    "effect": sign,
                    "pvalue": 0.001,
                    "fdr": 0.01,
                }
            )
    effects, composition = pd.DataFrame(eff_rows), pd.DataFrame(comp_rows)
    assert check_planted_effects(effects, composition)["detected"].all()

    flipped = effects.assign(effect=-effects["effect"])
    res = check_planted_effects(flipped, composition)
    assert not res.loc[res["tested_as"].str.startswith("state"), "detected"].any()

    weak = composition.assign(fdr=0.2)
    res = check_planted_effects(effects, weak)
    assert not res.loc[res["tested_as"].str.startswith("composition"), "detected"].any()

    res = check_planted_effects(effects.iloc[1:], composition)
    assert res["observed_direction"].eq("not tested").sum() == 1

    summary = null_calibration(effects, composition)
    assert summary["n_tests"] == len(PLANTED_EFFECTS)
    assert summary["n_p_below_alpha"] == len(PLANTED_EFFECTS)


def test_demo_check_and_therapy_targets_read_the_same_row_of_a_state():
    """One readout per state: the demo check takes the state's primary row, as the therapy
    table does (TREM2-high macrophages: share within macrophages, not share of all cells)."""
    from sepsis_sc.sim import check_planted_effects
    from sepsis_sc.stats import therapy_targets

    effects = pd.DataFrame(
        [
            {
                "state": "trem2_high_macrophage",
                "label": "TREM2-high",
                "metric": "fraction",
                "role": "primary",
                "effect": 0.4,
                "ci_low": -0.1,
                "ci_high": 0.9,
                "pvalue": 0.2,
                "fdr": 0.3,
                "direction": "",
                "meaning": "",
            },
            {
                "state": "trem2_high_macrophage",
                "label": "TREM2-high",
                "metric": "mean_score",
                "role": "secondary",
                "effect": 0.2,
                "ci_low": 0.1,
                "ci_high": 0.3,
                "pvalue": 1e-4,
                "fdr": 1e-3,
                "direction": "up",
                "meaning": "",
            },
        ]
    )
    composition = pd.DataFrame(
        [
            {
                "level": "cell_type",
                "label": "TREM2-high macrophage",
                "effect": 1.5,
                "pvalue": 1e-6,
                "fdr": 1e-5,
            }
        ]
    )
    check = check_planted_effects(effects, composition).set_index("planted_effect")
    row = check.loc["more TREM2-high macrophages"]
    assert row["tested_as"] == "state trem2_high_macrophage (fraction, primary)"
    assert not row["detected"] and row["fdr"] == 0.3
    targets = therapy_targets(effects).set_index("state")
    assert targets.loc["trem2_high_macrophage", "fdr"] == row["fdr"]
    assert targets.loc["trem2_high_macrophage", "evidence"] == "not significant"


def test_oracle_tests_find_planted_effects_and_not_null_ones():
    """The oracle (planted effects tested on the true labels) detects the planted effects of
    a demo-sized design and finds (almost) nothing when no effects were planted; septic DCs
    lose HLA class II more often than monocytes (per-type rate)."""
    from sepsis_sc.sim import PLANTED_EFFECTS, oracle_tests

    sheet = _sheet(6)
    _, truth = sim.simulate_cohort(sheet, cells_per_sample=1500, n_genes=800, seed=3)
    oracle = oracle_tests(truth)
    assert len(oracle) == len(PLANTED_EFFECTS)
    signs = np.array([1 if s["direction"] == "up" else -1 for s in PLANTED_EFFECTS])
    assert (np.sign(oracle["oracle_effect"]) == signs).all()
    assert (oracle["oracle_fdr"] <= 0.05).mean() >= 0.9
    sepsis = truth[(truth["condition"] == "sepsis") & ~truth["is_doublet"]]
    dc = sepsis[sepsis["lineage"] == "DC"]["hla_low"].mean()
    mono = sepsis[sepsis["cell_type"] == "Non-classical monocyte"]["hla_low"].mean()
    assert dc > 0.45 and mono < 0.45

    _, null_truth = sim.simulate_cohort(
        sheet, cells_per_sample=600, n_genes=800, seed=3, effects=False
    )
    null = oracle_tests(null_truth)
    assert (null["oracle_fdr"] > 0.05).all()


def test_check_planted_effects_adds_oracle_columns():
    from sepsis_sc.sim import PLANTED_EFFECTS, check_planted_effects, null_calibration

    sheet = _sheet(3)
    _, truth = sim.simulate_cohort(sheet, cells_per_sample=800, n_genes=800, seed=1)
    comp = pd.DataFrame(
        [
            {"level": s["level"], "label": s["label"], "effect": 1.0, "pvalue": 0.5, "fdr": 0.5}
            for s in PLANTED_EFFECTS
            if s["table"] == "composition"
        ]
    )
    eff = pd.DataFrame(
        [
            {
                "state": s["level"],
                "metric": "fraction",
                "role": "primary",
                "effect": 1.0,
                "pvalue": 0.5,
                "fdr": 0.5,
            }
            for s in PLANTED_EFFECTS
            if s["table"] == "effects"
        ]
    )
    res = check_planted_effects(eff, comp, truth=truth)
    assert {"oracle_fdr", "oracle_detected"} <= set(res.columns)
    assert not res["detected"].any()  # FDR 0.5 everywhere
    assert res["oracle_detected"].dtype == bool
    summary = null_calibration(eff, comp, truth=truth)
    assert summary["n_oracle_tests"] == len(PLANTED_EFFECTS)
    assert isinstance(summary["oracle_p_below_alpha"], str)


# --------------------------------------------------------------------------------------
# steps of the per-sample simulation
# --------------------------------------------------------------------------------------


def test_cohort_model_is_drawn_from_the_seed():
    sheet = _sheet(2)
    m1 = sim.cohort.cohort_model(sheet, n_genes=N_GENES, batch_effect=0.4, seed=1)
    m2 = sim.cohort.cohort_model(sheet, n_genes=N_GENES, batch_effect=0.4, seed=1)
    assert np.array_equal(m1.sample_seeds, m2.sample_seeds) and len(m1.sample_seeds) == 4
    assert set(m1.batch_gene) == {"b1", "b2"} and set(m1.donor_frac) == {"D1", "D2", "D3", "D4"}
    flat = sim.cohort.cohort_model(sheet, n_genes=N_GENES, batch_effect=0.0, seed=1)
    assert all(np.all(v == 1) for v in flat.batch_gene.values())
    assert flat.batch_lib == {"b1": 0.0, "b2": 0.0}
    assert m1.shape.dtype == np.float32 and m1.shape.shape == m1.profiles.shape


def test_add_doublets_pairs_cells_of_different_types():
    model = sim.cohort.cohort_model(_sheet(1), n_genes=N_GENES, batch_effect=0.0, seed=2)
    rng = np.random.default_rng(0)
    ctype = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    low_q = np.array([False] * 7 + [True])
    counts = sp.csr_matrix(np.eye(8, 5, dtype=np.float32))
    out, is_dbl, partner, drop = sim.counts._add_doublets(model, rng, counts, ctype, low_q, 2)
    assert is_dbl.sum() == 2 and drop.sum() == 2 and not (is_dbl & drop).any()
    assert not (is_dbl | drop)[7]  # low-quality cells take no part
    for i in np.flatnonzero(is_dbl):
        assert partner[i] != model.types[ctype[i]]
    assert out.sum() == counts.sum() + counts[drop].sum()
    none = sim.counts._add_doublets(model, rng, counts, ctype, low_q, 0)
    assert none[0] is counts and not none[1].any() and not none[3].any()


def test_sheet_with_paths_fills_missing_paths(tmp_path):
    sheet = _sheet(1).assign(path=["given.h5", None])
    out = sim.cohort._sheet_with_paths(sheet, tmp_path, "10x_h5")
    assert out["path"].tolist() == [
        "given.h5",
        str(tmp_path / "S2" / "filtered_feature_bc_matrix.h5"),
    ]
    with pytest.raises(ValueError, match="give outdir"):
        sim.cohort._sheet_with_paths(_sheet(1), None, "mtx")
