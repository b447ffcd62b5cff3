"""Tests for sepsis_sc.de (pseudobulk DE with PyDESeq2) and sepsis_sc.pl.de (figures).

Simulated cohorts: cells whose counts are Poisson around a per-sample negative-binomial
pseudobulk (donor effects, sample noise, planted genes), so the pseudobulk sums follow the
model DESeq2 assumes. Real data: Kang et al. 2018 PBMC (ctrl vs IFN-beta stim), split into
pseudo-samples, as positive control (interferon genes up in monocytes) and negative control
(ctrl split against itself).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import kang_pseudo_samples, shared_file

from sepsis_sc import de
from sepsis_sc.design import COEF, Contrast, resolve_design, sample_meta
from sepsis_sc.pl import de as pl_de
from sepsis_sc.pl.style import savefig

N_GENES = 300


def _cohort(
    samples: pd.DataFrame,
    *,
    rng: np.random.Generator,
    n_genes: int = N_GENES,
    log2fc: np.ndarray | None = None,
    case_col: str = "condition",
    case: str = "sepsis",
    donor_sd: float = 0.3,
    dispersion: float = 0.05,
    cells: dict[str, int] | Callable[[str], dict[str, int]] | None = None,
    depth: float = 200.0,
) -> ad.AnnData:
    """Cells x genes AnnData of a cohort: one row of ``samples`` per sample (index = IDs).

    Per sample and label, the pseudobulk mean is ``base * donor effect * 2**log2fc`` (case
    samples), drawn NB (gamma-Poisson, ``dispersion``) and spread over the label's cells as
    Poisson counts (so the cell sums keep that distribution).
    """
    cells = cells or {"Mono": 20}
    base = np.exp(rng.normal(np.log(depth), 1.0, n_genes))
    donors = samples["donor"].unique()
    d_eff = dict(zip(donors, np.exp(rng.normal(0, donor_sd, (len(donors), n_genes)))))
    blocks, obs = [], []
    for sid, row in samples.iterrows():
        for label, n in (cells if isinstance(cells, dict) else cells(sid)).items():
            if n == 0:
                continue
            mu = base * d_eff[row["donor"]] * n / 20
            if log2fc is not None and row[case_col] == case:
                mu = mu * 2.0**log2fc
            lam = mu * rng.gamma(1 / dispersion, dispersion, n_genes)
            blocks.append(sp.csr_matrix(rng.poisson(lam / n, size=(n, n_genes)).astype(np.float32)))
            obs.append(
                pd.DataFrame(
                    {"sample_id": sid, "cell_type": label, **{c: row[c] for c in samples.columns}},
                    index=range(n),
                )
            )
    obs = pd.concat(obs, ignore_index=True)
    obs.index = [f"c{i}" for i in range(len(obs))]
    a = ad.AnnData(sp.vstack(blocks).tocsr(), obs=obs)
    a.var_names = [f"g{i}" for i in range(n_genes)]
    a.layers["counts"] = a.X.copy()
    a.obs["lineage"] = a.obs["cell_type"].map(lambda x: "L_" + x)
    return a


def _sheet(n_case: int, n_control: int, reps: int = 1) -> pd.DataFrame:
    rows = []
    for i in range(n_case):
        for r in range(reps):
            rows.append({"sample_id": f"P{i}_{r}", "condition": "sepsis", "donor": f"P{i}"})
    for i in range(n_control):
        rows.append({"sample_id": f"H{i}", "condition": "control", "donor": f"H{i}"})
    return pd.DataFrame(rows).set_index("sample_id")


SEPSIS = Contrast("sepsis_vs_control", "condition", "sepsis", "control")


def _design(a, contrast=SEPSIS, formula="~ condition", paired="auto"):
    return resolve_design(sample_meta(a), contrast, formula, paired=paired)


# --------------------------------------------------------------------------------------
# pseudobulk
# --------------------------------------------------------------------------------------
def test_pseudobulk_sums_match_groupby_and_errors():
    rng = np.random.default_rng(0)
    a = _cohort(_sheet(2, 2), rng=rng, n_genes=30, cells={"Mono": 7, "T": 3})
    counts, n_cells = de.label_pseudobulk(a, label_key="cell_type")
    dense = pd.DataFrame(a.layers["counts"].toarray(), index=a.obs_names, columns=a.var_names)
    ref = dense.groupby([a.obs["sample_id"], a.obs["cell_type"]]).sum()
    for label, table in counts.items():
        exp = ref.xs(label, level="cell_type").loc[table.index]
        np.testing.assert_array_equal(table.to_numpy(), exp.to_numpy())
        assert table.dtypes.unique().tolist() == [np.int64]
    assert n_cells.loc["P0_0", "Mono"] == 7 and n_cells.loc["H1", "T"] == 3
    # X fallback when the layer is absent, and clear errors
    b = a.copy()
    del b.layers["counts"]
    assert de.label_pseudobulk(b, label_key="cell_type")[0]["T"].equals(counts["T"])
    b.X = b.X * 0.37
    with pytest.raises(
        ValueError,
        match=r'layers\["counts"\] is absent and X does not hold raw counts.*non-integer',
    ):
        de.label_pseudobulk(b, label_key="cell_type")
    b.layers["counts"] = b.X.copy()
    with pytest.raises(ValueError, match=r'layers\["counts"\] does not hold raw integer counts'):
        de.label_pseudobulk(b, label_key="cell_type")
    with pytest.raises(KeyError, match="subset"):
        de.label_pseudobulk(a, label_key="subset")
    with pytest.raises(KeyError, match="label column"):
        de.pseudobulk_de(a, _design(a), levels=("subset",))


# --------------------------------------------------------------------------------------
# DE on simulated cohorts
# --------------------------------------------------------------------------------------
def test_planted_genes_found_with_correct_sign():
    rng = np.random.default_rng(1)
    lfc = np.zeros(N_GENES)
    lfc[:15], lfc[15:30] = 2.0, -2.0
    a = _cohort(_sheet(6, 6), rng=rng, log2fc=lfc)
    res, summ = de.pseudobulk_de(a, _design(a), levels=("cell_type",))
    assert list(res.columns) == de.RESULT_COLUMNS and list(summ.columns) == de.SUMMARY_COLUMNS
    row = summ.iloc[0]
    assert (row["status"], row["n_case"], row["n_control"]) == ("tested", 6, 6)
    res = res.set_index("gene")
    sig = res["padj"] < 0.05
    up, down = [f"g{i}" for i in range(15)], [f"g{i}" for i in range(15, 30)]
    assert (sig[up] & (res.loc[up, "log2fc"] > 0)).mean() >= 0.8
    assert (sig[down] & (res.loc[down, "log2fc"] < 0)).mean() >= 0.8
    assert sig.drop(up + down).mean() <= 0.03
    assert row["n_up"] >= 12 and row["n_down"] >= 12
    assert set(row["top_up"].split(", ")) <= set(up) and len(row["top_up"].split(", ")) == 5
    # apeGLM shrinks towards 0, never flips a clear sign
    clear = res.loc[up + down]
    assert (np.sign(clear["log2fc_shrunk"]) == np.sign(clear["log2fc"])).all()
    assert (res["log2fc_shrunk"].abs() <= res["log2fc"].abs() + 1e-6).mean() > 0.95


def test_gating_min_cells_min_samples_and_exclude():
    rng = np.random.default_rng(2)
    sheet = _sheet(4, 4)

    def cells(sid):
        # B: only 2 sepsis samples with >= 10 cells; Mono: one control sample below 10
        n_b = 15 if sid in ("P0_0", "P1_0") else 4
        return {"Mono": 5 if sid == "H0" else 20, "B": n_b, "Unassigned": 12}

    a = _cohort(sheet, rng=rng, cells=cells, n_genes=100)
    res, summ = de.pseudobulk_de(a, _design(a), levels=("cell_type",), min_cells=10)
    s = summ.set_index("label")
    assert s.loc["Mono", "status"] == "tested"
    assert (s.loc["Mono", "n_case"], s.loc["Mono", "n_control"]) == (4, 3)
    assert "1 sample(s) with < 10 cells left out" in s.loc["Mono", "reason"]
    assert s.loc["Mono", "n_cells"] == 7 * 20
    assert s.loc["B", "status"] == "not tested"
    assert "fewer than 3 units per group" in s.loc["B", "reason"]
    assert "sepsis: 2, control: 0" in s.loc["B", "reason"]
    assert (
        s.loc["Unassigned", "status"] == "not tested"
        and "excluded" in s.loc["Unassigned", "reason"]
    )
    assert set(res["label"]) == {"Mono"}
    # genes below min_total_count are not tested
    res2, summ2 = de.pseudobulk_de(a, _design(a), levels=("cell_type",), min_total_count=10**6)
    assert res2.empty and summ2.set_index("label").loc["Mono", "reason"].startswith("no gene")
    # nothing testable is a summary, not an error
    res3, summ3 = de.pseudobulk_de(a, _design(a), levels=("cell_type",), min_samples_per_group=5)
    assert res3.empty and list(res3.columns) == de.RESULT_COLUMNS
    assert (summ3["status"] == "not tested").all()


def test_repeated_donor_samples_are_summed_per_donor():
    rng = np.random.default_rng(3)
    a = _cohort(_sheet(5, 3, reps=2), rng=rng, n_genes=80)
    design = _design(a)
    assert (design.n_case, design.n_control, design.paired) == (5, 3, False)
    res, summ = de.pseudobulk_de(a, design, levels=("lineage",))
    row = summ.iloc[0]
    assert (row["label"], row["status"], row["n_case"], row["n_control"]) == (
        "L_Mono",
        "tested",
        5,
        3,
    )
    counts, n_cells = de.label_pseudobulk(a, label_key="lineage")
    units, matrix, _ = de.label_units(counts["L_Mono"], n_cells["L_Mono"], design)
    np.testing.assert_array_equal(
        units.loc["P2|sepsis"].to_numpy(),
        (counts["L_Mono"].loc["P2_0"] + counts["L_Mono"].loc["P2_1"]).to_numpy(),
    )
    assert list(matrix.columns) == ["Intercept", COEF] and len(matrix) == 8


def test_paired_design_uses_donor_blocks():
    rng = np.random.default_rng(4)
    rows = [
        {"sample_id": f"P{i}_{t}", "timepoint": t, "donor": f"P{i}", "condition": "sepsis"}
        for i in range(6)
        for t in ("T0", "T6")
    ]
    sheet = pd.DataFrame(rows).set_index("sample_id")
    lfc = np.zeros(N_GENES)
    lfc[:10] = 2.0  # 6 pairs: t on 5 residual df (use_t) finds a 4-fold change
    a = _cohort(sheet, rng=rng, log2fc=lfc, case_col="timepoint", case="T6", donor_sd=0.8)
    contrast = Contrast("T6_vs_T0", "timepoint", "T6", "T0")
    design = _design(a, contrast, "~ timepoint")
    assert design.paired and design.n_case == 6
    res, summ = de.pseudobulk_de(a, design, levels=("cell_type",), shrink=False)
    row = summ.iloc[0]
    assert (row["status"], row["n_case"], row["n_control"]) == ("tested", 6, 6)
    assert res["log2fc_shrunk"].isna().all()
    res = res.set_index("gene")
    planted = [f"g{i}" for i in range(10)]
    assert ((res.loc[planted, "padj"] < 0.05) & (res.loc[planted, "log2fc"] > 0)).mean() >= 0.7
    assert (res.drop(planted)["padj"] < 0.05).mean() <= 0.03


def test_failed_label_is_reported_not_raised(monkeypatch):
    rng = np.random.default_rng(5)
    a = _cohort(_sheet(3, 3), rng=rng, n_genes=60, cells={"Mono": 20, "T": 20})
    real, calls = de.fit_deseq, []

    def flaky(counts, matrix, **kw):  # labels run in order: Mono, then T fails
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(counts, matrix, **kw)

    monkeypatch.setattr(de.fit, "fit_deseq", flaky)
    res, summ = de.pseudobulk_de(a, _design(a), levels=("cell_type",), shrink=False)
    s = summ.set_index("label")
    assert s.loc["T", "status"] == "failed" and "RuntimeError: boom" in s.loc["T", "reason"]
    assert s.loc["Mono", "status"] == "tested" and set(res["label"]) == {"Mono"}


def test_null_calibration_repeated_donors():
    """20 null cohorts, 5 patients x 2 time points vs 3 controls: p < 0.05 in <= 8 %."""
    fractions = []
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        a = _cohort(_sheet(5, 3, reps=2), rng=rng, donor_sd=0.4, dispersion=0.05)
        res, summ = de.pseudobulk_de(a, _design(a), levels=("cell_type",), shrink=False)
        assert summ.iloc[0]["n_case"] == 5
        fractions.append(float((res["pvalue"].dropna() < 0.05).mean()))
    frac = float(np.mean(fractions))
    print(f"null calibration: {frac:.3f} of p < 0.05 over 20 cohorts x {N_GENES} genes")
    assert frac <= 0.08  # measured 0.028 with use_t (0.078 with PyDESeq2's normal Wald p)


# --------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------
def test_figures_on_small_result(tmp_path):
    rng = np.random.default_rng(6)
    lfc = np.zeros(120)
    lfc[:8], lfc[8:16] = 2.5, -2.5
    a = _cohort(_sheet(4, 4), rng=rng, n_genes=120, log2fc=lfc, cells={"Mono": 20, "T": 20})
    design = _design(a)
    res, summ = de.pseudobulk_de(a, design, levels=("cell_type",))
    fig = pl_de.volcano(res, summ, case="sepsis", control="control")
    assert len([ax for ax in fig.axes if ax.axison]) == 2
    assert savefig(fig, tmp_path / "volcano.png").stat().st_size > 10_000
    counts, n_cells = de.label_pseudobulk(a, label_key="cell_type")
    pb = {
        ("cell_type", lab): de.label_units(counts[lab], n_cells[lab], design)[0]
        for lab in ("Mono", "T")
    }
    fig = pl_de.top_genes_heatmap(res, pb, design.units, case="sepsis", control="control")
    assert savefig(fig, tmp_path / "heatmap.png").stat().st_size > 10_000
    # nothing tested / nothing significant: a figure that says so
    empty = de.pseudobulk_de(a, design, levels=("cell_type",), min_samples_per_group=9)
    assert savefig(pl_de.volcano(*empty, case="sepsis", control="control"), tmp_path / "v0.png")
    assert savefig(
        pl_de.top_genes_heatmap(empty[0], {}, design.units, case="sepsis", control="control"),
        tmp_path / "h0.png",
    )


# --------------------------------------------------------------------------------------
# real data: Kang et al. 2018 PBMC, ctrl vs IFN-beta stim
# --------------------------------------------------------------------------------------
def kang_monocytes(split: str = "stim", seed: int = 0) -> ad.AnnData:
    """Kang PBMC, monocytes as the pipeline annotates them, 3 random pseudo-samples per group.

    ``split="stim"``: ctrl vs stim (positive control). ``split="null"``: ctrl cells only,
    split at random into 6 pseudo-samples, 3 called "a" and 3 "b" (negative control).
    Monocytes: ``sepsis_sc.annotate.annotate`` lineage "Monocyte" (counts kept in
    ``layers["counts"]``). The file has no donor for most cells, so pseudo-samples are
    the replicates: a positive/negative control of the machinery, not biology.
    """
    a = _kang_annotated().copy()
    mono = (a.obs["lineage"] == "Monocyte").to_numpy()
    a.obs["cell_type"] = pd.Categorical(np.where(mono, "Monocyte", "Unassigned"))
    a = kang_pseudo_samples(a, split, seed)
    a.obs = a.obs.drop(columns=["barcode", "muscat_cluster_id_partial", "muscat_sample_id_partial"])
    return a


def test_pseudobulk_and_de_stream_counts_from_the_file(tmp_path):
    """label_pseudobulk / pseudobulk_de(counts=FileCounts) sum the counts streamed from the
    .h5ad (adata holds no matrix; the workflow's DE at atlas scale) and give the in-memory
    results."""
    from sepsis_sc import store
    from sepsis_sc.utils import write_h5ad

    rng = np.random.default_rng(3)
    a = _cohort(_sheet(4, 4), rng=rng, n_genes=60, cells={"Mono": 30, "T": 20})
    path = tmp_path / "cells.h5ad"
    write_h5ad(a, path)
    light = store.read(path)
    assert light.X is None and not light.layers
    want, n_want = de.label_pseudobulk(a, label_key="cell_type")
    counts = store.FileCounts.matching(path, "counts", light)
    got, n_got = de.label_pseudobulk(light, label_key="cell_type", counts=counts)
    pd.testing.assert_frame_equal(n_got, n_want)
    for label in want:
        pd.testing.assert_frame_equal(got[label], want[label])
    design = _design(a)
    r1, s1 = de.pseudobulk_de(a, design, levels=["cell_type"])
    r2, s2 = de.pseudobulk_de(light, design, levels=["cell_type"], counts=counts)
    pd.testing.assert_frame_equal(r1, r2)
    pd.testing.assert_frame_equal(
        s1.drop(columns="seconds", errors="ignore"), s2.drop(columns="seconds", errors="ignore")
    )


@functools.cache
def _kang_annotated() -> ad.AnnData:
    """Kang PBMC with the pipeline's own annotation (monocytes = lineage 'Monocyte')."""
    import scanpy as sc

    from sepsis_sc.annotate import annotate

    a = ad.read_h5ad(shared_file("kang_ifnb_harmony.h5ad"))
    a.layers["counts"] = a.X.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    annotate(a, organism="human")
    return a


@pytest.fixture(scope="module")
def kang_stim():
    a = kang_monocytes("stim")
    design = _design(a, Contrast("stim_vs_ctrl", "condition", "stim", "ctrl"))
    res, summ = de.pseudobulk_de(a, design, levels=("cell_type",), n_cpus=2)
    return a, design, res, summ


@pytest.mark.realdata
def test_kang_interferon_genes_up_in_stimulated_monocytes(kang_stim):
    _, design, res, summ = kang_stim
    row = summ.set_index("label").loc["Monocyte"]
    assert (row["status"], row["n_case"], row["n_control"]) == ("tested", 3, 3)
    up = res[(res["padj"] < 0.05) & (res["log2fc"] > 0)].sort_values("padj")
    top = set(up["gene"].head(50))
    strong = set(up.loc[up["log2fc"] > 1, "gene"])
    # each interferon-stimulated gene is significantly up at least twofold; 3 of the 4 are
    # among the top 50 by padj (with 3 vs 3 pseudo-samples ~90 genes share padj ~0.03, so
    # one rank moves with a handful of cells: IFI6 ranked 47 or 57 as 4 cells changed label)
    groups = (["ISG15"], ["IFI6"], ["IFIT1", "IFIT3"], ["MX1"])
    for genes in groups:
        assert strong & set(genes), f"{genes} not significantly up twofold: {sorted(strong)[:20]}"
    assert sum(bool(top & set(g)) for g in groups) >= 3, sorted(top)[:20]
    print(
        f"Kang monocytes: {row['n_genes_tested']} genes, {row['n_up']} up, "
        f"{row['n_down']} down in {row['seconds']} s; top up {row['top_up']}"
    )


@pytest.mark.realdata
def test_kang_null_split_of_controls():
    a = kang_monocytes("null", seed=1)
    design = _design(a, Contrast("a_vs_b", "condition", "a", "b"))
    res, summ = de.pseudobulk_de(a, design, levels=("cell_type",), shrink=False, n_cpus=2)
    assert summ.set_index("label").loc["Monocyte", "status"] == "tested"
    frac = float((res["padj"] < 0.05).sum() / len(res))
    print(f"Kang ctrl 3 vs 3 random split: {frac:.4f} of {len(res)} genes at padj < 0.05")
    assert frac <= 0.01


# --------------------------------------------------------------------------------------
# settings and the gating steps
# --------------------------------------------------------------------------------------
def test_de_settings_defaults_are_the_schema_defaults():
    from test_design import _check_settings_defaults

    _check_settings_defaults(de.DESettings, "de", (de.pseudobulk_de,))
    s = de.DESettings.from_config({"enabled": True, "levels": ["lineage"], "min_count": 2})
    assert s.levels == ("lineage",) and s.min_count == 2 and s.min_cells == 10


def test_testable_genes_follow_the_smaller_group():
    counts = pd.DataFrame(
        {"g1": [5, 5, 0, 0, 0], "g2": [1, 1, 1, 1, 1], "g3": [0, 0, 0, 9, 9]}, index=list("abcde")
    )
    matrix = pd.DataFrame({"Intercept": 1.0, COEF: [1.0, 1.0, 0.0, 0.0, 0.0]}, index=list("abcde"))
    genes, why = de.run._testable_genes(
        counts, matrix, de.DESettings(min_total_count=10, min_count=5)
    )
    assert list(genes) == ["g1", "g3"] and why == ""  # 2 units of the smaller group suffice
    genes, why = de.run._testable_genes(counts, matrix, de.DESettings(min_total_count=50))
    assert len(genes) == 0 and why.startswith("no gene with >= 50 counts")


def test_label_and_unit_gates_say_why():
    a = _cohort(_sheet(3, 3), rng=np.random.default_rng(0), n_genes=50)
    design = _design(a)
    assert de.run._label_gate("Unassigned", {}, design, ("Unassigned",)).startswith("excluded")
    assert de.run._label_gate("X", {}, design, ()) == "no cells"
    row = {"n_case": 2, "n_control": 3}
    why = de.run._unit_gate(row, design.matrix, "", design, de.DESettings(min_samples_per_group=3))
    assert why.startswith("fewer than 3 units per group")
    row = {"n_case": 3, "n_control": 3}
    assert (
        de.run._unit_gate(row, None, "", design, de.DESettings())
        == "contrast not estimable on the units left"
    )
    assert de.run._unit_gate(row, design.matrix, "", design, de.DESettings()) == ""
