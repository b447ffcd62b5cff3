"""Tests for sepsis_sc.ccc: the therapy axes as data, per-sample axis scores, LIANA+ per
sample, sample-level tests with donors as units (planted axis found, null cohorts clean),
the therapy table grouped per therapy, the figure, and the Kang interferon positive control."""

from __future__ import annotations

import functools

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import kang_pseudo_samples, shared_file

from sepsis_sc import ccc, stats
from sepsis_sc.config import CCCSettings
from sepsis_sc.design import Contrast, resolve_design, sample_meta
from sepsis_sc.sim import cohort_adata, two_arm_sheet

SEPSIS = Contrast("sepsis_vs_control", "condition", "sepsis", "control")


def test_axes_resource_is_complete_and_in_liana_resources():
    """Every axis has its keys; every human / mouse pair is a pair of LIANA's bundled
    consensus / mouseconsensus resource (offline); the issue's axes are all there."""
    import liana as li

    axes = ccc.load_axes()
    assert {"pd1", "il7", "gm_csf", "ifng", "il10", "mhc2_cd4", "apoe_trem2", "il1b", "il6"} < set(
        axes
    )
    assert {"tnf", "cxcl8"} < set(axes)
    targets = stats.load_targets(None)
    for organism, name in (("human", "consensus"), ("mouse", "mouseconsensus")):
        res = li.resource.select_resource(name)
        have = set(zip(res["ligand"], res["receptor"], strict=True))
        for axis_name, a in axes.items():
            for pair in ccc.axis_pairs(a, organism):
                assert pair in have, (axis_name, organism, pair)
            assert a["caveat"] and a["references"] and a["trial"]
            assert any(s in targets for s in a["states"]) or axis_name == "il10"
    with pytest.raises(ValueError, match="lacks"):
        ccc.load_axes({"x": {"label": "x"}})


def _tiny(n_per_type: dict[str, int], expr: dict[str, dict[str, float]], sample: str = "s1"):
    """Cells of the given types (lineage = type) with constant log expression per gene."""
    genes = sorted({g for e in expr.values() for g in e})
    rows, types = [], []
    for t, n in n_per_type.items():
        rows += [[expr.get(t, {}).get(g, 0.0) for g in genes]] * n
        types += [t] * n
    obs = pd.DataFrame({"sample_id": sample, "cell_type": types, "lineage": types})
    obs.index = [f"{sample}_c{i}" for i in range(len(obs))]
    return ad.AnnData(sp.csr_matrix(np.array(rows, float)), obs=obs, var=pd.DataFrame(index=genes))


def test_axis_score_is_lr_means_with_complex_minimum_and_min_cells():
    """value = (ligand mean in source + receptor mean in target) / 2, a complex by its least
    expressed subunit, averaged over the axis's pairs; NA below min_cells."""
    axes = {
        "a": {
            **ccc.load_axes()["il7"],
            "pairs": [["L1", "R1_R2"], ["L2", "R1_R2"]],
            "source": ["Mono"],
            "target": ["T"],
        }
    }
    expr = {"Mono": {"L1": 2.0, "L2": 1.0}, "T": {"R1": 3.0, "R2": 0.5}}
    a = _tiny({"Mono": 12, "T": 12}, expr)
    s = ccc.axis_scores(a, axes=axes).iloc[0]
    assert s["ligand_mean"] == pytest.approx(1.5) and s["receptor_mean"] == pytest.approx(0.5)
    assert s["value"] == pytest.approx(1.0) and s["readout"] == "axis_a"
    small = ccc.axis_scores(_tiny({"Mono": 12, "T": 4}, expr), axes=axes).iloc[0]
    assert np.isnan(small["value"]) and "fewer than 10" in small["note"]
    assert np.isnan(ccc.axis_scores(a, CCCSettings(), axes=axes, min_cells=20)["value"].iloc[0])


@functools.cache
def _cohort(effects: bool, seed: int, n_per: int = 6, repeated: bool = False) -> ad.AnnData:
    """A demo-shaped simulated cohort, log-normalised, truth cell types / lineages in obs."""
    return cohort_adata(
        two_arm_sheet(n_per, repeated="paired" if repeated else None),
        cells_per_sample=700,
        n_genes=3000,
        seed=seed,
        effects=effects,
        doublets=False,
        low_quality_rate=0.0,
    )


def _axes(adata: ad.AnnData, **kw) -> pd.DataFrame:
    scores = ccc.axis_scores(adata)
    meta = sample_meta(adata)
    design = resolve_design(meta, SEPSIS, None, paired=kw.pop("paired", "auto"))
    return ccc.test_axes(scores, meta=meta, design=design, **kw)


def test_planted_pd1_axis_is_found_and_null_cohorts_stay_clean():
    """The demo simulator plants CD274 in HLA-DR-low monocytes (up in sepsis) and PDCD1 in
    exhausted T cells (up in sepsis): the PD-L1 -> PD-1 axis is found at FDR <= 0.05 and
    supports its therapy; on 10 null cohorts no axis reaches FDR 0.05 in >= 9 of 10 seeds."""
    res = _axes(_cohort(True, 0)).set_index("axis")
    assert res.loc["pd1", "fdr"] <= 0.05 and res.loc["pd1", "effect"] > 0
    assert res.loc["pd1", "evidence"] == "supported"
    assert res.loc["mhc2_cd4", "effect"] < 0  # HLA class II lost with the hla_low state
    assert res["test"].eq("t").all() and res.loc["pd1", "n_case"] == 6
    clean = 0
    for seed in range(10):
        null = _axes(_cohort(False, seed))
        clean += int(not (null["fdr"] <= 0.05).any())
    assert clean >= 9


def test_paired_design_and_moderation_reach_the_axis_test():
    """Donors seen in both conditions are compared pairwise (donor blocks); the stats
    section's moderation is used when asked for by name."""
    a = _cohort(True, 1, n_per=3, repeated=True)
    res = _axes(a, moderation="robust")
    assert res["test"].str.startswith("paired moderated t").all()
    assert res["n_pairs"].max() == 6
    assert res.set_index("axis").loc["pd1", "effect"] > 0


def test_liana_by_sample_ranks_the_axis_pairs():
    """LIANA+'s rank aggregate runs per sample on its bundled resource; the rows of the axis
    pairs in the axis populations are kept and their best rank joins the scores."""
    a = _cohort(True, 0)
    a = a[a.obs["sample_id"].isin(["S0", "S1"])].copy()
    settings = CCCSettings().with_overrides(n_perms=10)
    lr = ccc.liana_by_sample(a, settings)
    assert set(lr["sample_id"]) == {"S0", "S1"}
    pd1 = lr[lr["axis"] == "pd1"]
    assert not pd1.empty and set(pd1["ligand_complex"]) == {"CD274"}
    assert pd1["target"].isin(a.obs.loc[a.obs["lineage"] == "T", "cell_type"]).all()
    merged = ccc.add_liana_ranks(ccc.axis_scores(a), lr)
    row = merged[(merged["axis"] == "pd1") & (merged["sample_id"] == "S0")].iloc[0]
    assert 0 <= row["magnitude_rank"] <= 1 and " -> " in row["best_pair"]


def _effects_row(state: str, label: str, fdr: float, effect: float, metric="mean_score"):
    return {
        "state": state,
        "label": label,
        "metric": metric,
        "role": "primary",
        "effect": effect,
        "ci_low": effect - 0.1,
        "ci_high": effect + 0.1,
        "fdr": fdr,
        "direction": "",
        "meaning": "",
    }


def test_therapy_table_groups_strata_and_axes_per_therapy(tmp_path):
    """Strata sit under their base state, axes under their first state, groups ordered by
    their best row, tested rows first in each group; the figure draws each therapy once
    and names untested rows on one line instead of empty bars."""
    from sepsis_sc.pl.stats import therapy_targets as draw
    from sepsis_sc.pl.style import savefig

    effects = pd.DataFrame(
        [
            _effects_row("ifn_response.t", "type I interferon response (T)", 0.5, 0.1),
            _effects_row("ifn_response.b", "type I interferon response (B)", np.nan, np.nan),
            _effects_row("ifn_response.nk", "type I interferon response (NK)", 0.04, -0.3),
            _effects_row("t_exhaustion", "exhausted T", 0.01, 0.5, "fraction"),
            _effects_row("treg_suppressive", "suppressive Treg", np.nan, np.nan),
        ]
    )
    scores = ccc.axis_scores(_cohort(True, 0))
    meta = sample_meta(_cohort(True, 0))
    axes = ccc.test_axes(scores, meta=meta, contrast=SEPSIS)
    tt = stats.therapy_targets(effects, axes=axes)
    assert tt["rank"].tolist() == list(range(1, len(tt) + 1))
    g = tt.set_index("state")
    assert g.loc["axis:pd1", "group"] == "t_exhaustion" and g.loc["axis:pd1", "kind"] == "axis"
    assert "t_exhaustion: supported" in g.loc["axis:pd1", "context"]
    assert g.loc["ifn_response.b", "group"] == "ifn_response"
    for _, rows in tt.groupby("group", sort=False):  # contiguous, tested rows first
        assert rows["rank"].diff().dropna().eq(1).all()
        tested = rows["fdr"].notna().to_numpy()
        assert not (np.diff(tested.astype(int)) > 0).any()
    assert tt["evidence"].iloc[0] == "supported"
    assert g.loc["axis:mhc2_cd4", "group"] == "axis:mhc2_cd4"  # none of its states tested here
    fig = draw(tt, alpha=0.05)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert sum("type I interferon response is" in t.replace("\n", " ") for t in texts) == 1
    ticks = [t.get_text().replace("\n", " ") for t in fig.axes[0].get_yticklabels()]
    assert any(t.startswith("not tested: type I interferon response in B") for t in ticks)
    savefig(fig, tmp_path / "targets.png")


def test_axes_heatmap_z_against_controls(tmp_path):
    """Axes x samples z vs the controls (controls leave-one-out); the figure renders."""
    from sepsis_sc.pl.ccc import axes_heatmap
    from sepsis_sc.pl.style import savefig

    a = _cohort(True, 0)
    scores = ccc.axis_scores(a)
    meta = sample_meta(a)
    controls = meta.index[meta["condition"] == "control"]
    z = ccc.axis_z(scores, controls)
    assert z.loc["pd1", [s for s in z.columns if s not in controls]].mean() > 1
    assert abs(z.loc["pd1", list(controls)].mean()) < 1
    axes = ccc.test_axes(scores, meta=meta, contrast=SEPSIS)
    fig = axes_heatmap(
        scores, axes, groups=meta["condition"], case="sepsis", control="control", alpha=0.05
    )
    assert len(fig.axes[0].get_yticklabels()) == len(axes)
    savefig(fig, tmp_path / "axes.png")


# --------------------------------------------------------------------------------------
# real data: Kang et al. 2018 PBMC, ctrl vs IFN-beta stim
# --------------------------------------------------------------------------------------
#: interferon-induced chemokine axes: CXCL10 / CXCL11 from monocytes to CXCR3 on T cells
IFN_AXES = {
    "cxcl10": {
        **ccc.load_axes()["pd1"],
        "label": "CXCL10 -> CXCR3",
        "pairs": [["CXCL10", "CXCR3"]],
        "mouse_pairs": [["Cxcl10", "Cxcr3"]],
        "source": ["Monocyte"],
        "target": ["T"],
    },
    "cxcl11": {
        **ccc.load_axes()["pd1"],
        "label": "CXCL11 -> CXCR3",
        "pairs": [["CXCL11", "CXCR3"]],
        "mouse_pairs": [["Cxcl11", "Cxcr3"]],
        "source": ["Monocyte"],
        "target": ["T"],
    },
}


def _kang(split: str, seed: int = 0) -> ad.AnnData:
    """Kang PBMC, log-normalised, monocytes and T cells gated on markers (LYZ / CD14 vs
    CD3E), split into 3 random pseudo-samples per group as in tests/test_de.py
    (``split="null"``: control cells only, 6 pseudo-samples called a / b)."""
    import scanpy as sc

    a = ad.read_h5ad(shared_file("kang_ifnb_harmony.h5ad"))
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)

    def expr(g):
        return np.asarray(a[:, g].X.todense()).ravel() if sp.issparse(a.X) else a[:, g].X.ravel()

    mono = (expr("LYZ") > 2) & (expr("CD14") + expr("FCGR3A") > 0) & (expr("CD3E") == 0)
    t = (expr("CD3E") > 0) & (expr("LYZ") < 1)
    a.obs["lineage"] = np.where(mono, "Monocyte", np.where(t, "T", "other"))
    a = kang_pseudo_samples(a, split, seed)
    a.obs["donor"] = a.obs["sample_id"]
    return a


@pytest.mark.realdata
def test_kang_interferon_axes_rise_in_stimulated_cells():
    """IFN-beta stimulation induces CXCL10 / CXCL11 in monocytes: the CXCL10 -> CXCR3 and
    CXCL11 -> CXCR3 axes rise in stim at FDR <= 0.05; a null split of controls finds none."""
    a = _kang("stim")
    scores = ccc.axis_scores(a, axes=IFN_AXES, label_keys=("lineage",))
    assert scores["n_source"].min() >= 20 and scores["n_target"].min() >= 20
    res = ccc.test_axes(
        scores, axes=IFN_AXES, meta=sample_meta(a), case="stim", control="ctrl"
    ).set_index("axis")
    for axis in IFN_AXES:
        assert res.loc[axis, "effect"] > 0 and res.loc[axis, "fdr"] <= 0.05, axis
    n = _kang("null", seed=1)
    null = ccc.test_axes(
        ccc.axis_scores(n, axes=IFN_AXES, label_keys=("lineage",)),
        axes=IFN_AXES,
        meta=sample_meta(n),
        case="b",
        control="a",
    )
    assert not (null["fdr"] <= 0.05).any()


def test_stage_can_be_switched_off(tmp_path):
    """ccc.enabled false drops the therapy-axis jobs (and the therapy table's axes input)
    from the workflow's DAG; on, they are in it."""
    from test_workflow import TINY_CONFIG, _snakemake, _write_workdir

    on = _snakemake(_write_workdir(tmp_path / "on"), "-n", "--cores", "1")
    assert on.returncode == 0, on.stderr[-3000:]
    out = on.stdout + on.stderr
    assert "rule ccc_scores:" in out and "rule ccc:" in out and "rule ccc_figures:" in out
    cfg = dict(TINY_CONFIG, ccc={"enabled": False})
    off = _snakemake(_write_workdir(tmp_path / "off", cfg), "-n", "--cores", "1")
    assert off.returncode == 0, off.stderr[-3000:]
    out = off.stdout + off.stderr
    assert "rule ccc" not in out and "/ccc/" not in out and "rule targets:" in out


def test_axes_are_patient_readouts_against_the_control_range():
    """Every axis is an external readout of the patient profiles (readout axis_<name>, group
    "cell-cell axes", on the immune card): the per-sample table feeds it as it is."""
    from sepsis_sc.patients import READOUTS
    from sepsis_sc.patients.readouts import sample_readouts

    ours = [r for r in READOUTS if r.name.startswith(ccc.READOUT_PREFIX)]
    assert {r.name for r in ours} == {ccc.READOUT_PREFIX + a for a in ccc.load_axes()}
    assert {r.kind for r in ours} == {"external"} and {r.group for r in ours} == {"cell-cell axes"}
    a = _cohort(True, 0)
    scores = ccc.axis_scores(a)
    light = ad.AnnData(obs=a.obs[["sample_id", "cell_type", "lineage"]].copy())
    values, detail = sample_readouts(
        light, pd.DataFrame(columns=["sample_id"]), readouts=ours, external=scores
    )
    assert values.shape == (12, len(ours))
    pd1 = scores[scores["axis"] == "pd1"].set_index("sample_id")["value"]
    assert np.allclose(values.loc[pd1.index, "axis_pd1"], pd1)
    assert (detail.loc[detail["value"].isna(), "reason"] != "").all()


def test_calibration_benchmark_runs(tmp_path):
    """benchmarks/ccc_calibration.py: a null seed, and the scale part (a
    synthetic file measured in a fresh process), on small inputs."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ccc_calibration.py"
    args = ["--null-seeds", "1", "--cells", "400", "--genes", "3000"]
    args += ["--scale", "600", "--liana-samples", "1", "--n-perms", "10"]
    res = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "null seeds without any axis at FDR <= 0.05" in out
    assert "LIANA on 1 samples" in out and "peak memory" in out


def test_axis_trajectories_of_a_donor_sampled_twice():
    """Passed to the patient profiles, the axis scores get a z against the controls and a
    trajectory for a donor sampled at two time points."""
    from test_score import make_cohort

    from sepsis_sc import patients
    from sepsis_sc.score import score_states

    a = make_cohort(n_case=4, n_control=6, cells_per_type=100, effects=False, seed=3, n_filler=200)
    a.obs["donor"] = a.obs["donor"].astype(str).replace({"DS3": "DS2"})
    a.obs["timepoint"] = np.where(a.obs["sample_id"] == "S3", "T6", "T0")
    score_states(a, organism="human", control="control")
    scores = ccc.axis_scores(a)
    res = patients.profile(
        a,
        reference_value="control",
        min_cells=10,
        external=scores,
        endotypes=False,
        timepoint_column="timepoint",
    )
    pd1 = res.profiles[res.profiles["readout"] == "axis_pd1"].set_index("sample_id")
    assert pd1["z"].notna().all() and set(pd1["flag"]) <= {"within", "above", "below"}
    t = res.trajectories[res.trajectories["readout"] == "axis_pd1"].sort_values("order")
    assert t["sample_id"].tolist() == ["S2", "S3"] and t["timepoint"].tolist() == ["T0", "T6"]
    assert t["delta"].iloc[1] == pytest.approx(t["value"].iloc[1] - t["value"].iloc[0])
