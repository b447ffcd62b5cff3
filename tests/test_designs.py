"""The simulator's honesty and the real cohort designs it can produce (issue #18).

Fast tests: the simulator reads no marker or signature file, planted programmes overlap the
scored signatures only partly, fold changes are realistic, sex and age act, and each design
(one batch, one condition, time points, 10 vs 3, covariates, targeted panel) simulates and
gives the oracle a result. Slow tests (``-m slow``) run the workflow end to end from the
sheet on two designs and compare the pipeline with the oracle (true labels).
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from sepsis_sc import score, sim

REPO = Path(__file__).resolve().parents[1]
N_GENES = 2500
FORBIDDEN = ("markers", "signatures", "therapy_targets.yaml", "cell_types.yaml")


def _sheet(n_case=3, n_control=3, times=("T0",), batches=1, sex=True, age=True):
    rows = []
    for i in range(n_case):
        for t in times:
            rows.append(
                {
                    "sample_id": f"P{i}_{t}",
                    "condition": "sepsis",
                    "donor": f"P{i}",
                    "timepoint": t,
                    "batch": f"b{i % batches}",
                }
            )
    for i in range(n_control):
        rows.append(
            {
                "sample_id": f"H{i}",
                "condition": "control",
                "donor": f"H{i}",
                "timepoint": "none",
                "batch": f"b{i % batches}",
            }
        )
    sheet = pd.DataFrame(rows)
    if sex:
        sheet["sex"] = np.where(np.arange(len(sheet)) % 2, "M", "F")
    if age:
        sheet["age"] = 40 + (np.arange(len(sheet)) * 7) % 40
    return sheet


# ----------------------------------------------------------------------------------------
# the simulator does not contain its own answers
# ----------------------------------------------------------------------------------------
def test_simulator_opens_no_marker_or_signature_file(tmp_path):
    opened: list[str] = []
    active = [True]

    def hook(event, args):
        if active[0] and event == "open" and args and isinstance(args[0], str | Path):
            opened.append(str(args[0]))

    sys.addaudithook(hook)  # audit hooks cannot be removed: switched off below
    try:
        sim.simulate_cohort(_sheet(1, 1), cells_per_sample=60, n_genes=N_GENES, seed=1)
        sim.write_demo_cohort(
            _sheet(1, 1), tmp_path / "w", cells_per_sample=60, n_genes=N_GENES, gene_panel=400
        )
    finally:
        active[0] = False
    res = [p for p in opened if "resources" in p]
    assert any("profiles.tsv.gz" in p for p in res)  # the hook saw the simulator's reads
    bad = [p for p in res if any(f in Path(p).parts or Path(p).name == f for f in FORBIDDEN)]
    assert not bad, bad


def test_simulator_works_without_marker_and_signature_files(tmp_path, monkeypatch):
    res = tmp_path / "resources"
    for sub in ("genes", "simulator"):
        shutil.copytree(REPO / "resources" / sub, res / sub)
    monkeypatch.setenv("SEPSIS_SC_RESOURCES", str(res))
    adatas, truth = sim.simulate_cohort(_sheet(1, 1), cells_per_sample=60, n_genes=N_GENES, seed=2)
    assert len(adatas) == 2 and len(truth) == 120


def test_simulator_source_names_no_marker_or_signature_resource():
    trees = [ast.parse(p.read_text()) for p in (REPO / "src" / "sepsis_sc" / "sim").glob("*.py")]
    firsts = [
        node.args[0].value
        for tree in trees
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", getattr(node.func, "attr", "")) == "resource_path"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ]
    assert firsts and set(firsts) <= {"genes", "simulator"}, firsts


def test_planted_programmes_overlap_the_signatures_only_partly():
    sigs = score.load_signatures("human")
    table = sim.planted_vs_scored(sigs)
    assert set(table["state"]) == set(sim.STATES) - set(sim.UNNAMED_STATES)
    # the unnamed programme shares no gene with any signature: only DA can find it
    scored = {g for s in sigs for g in [*(s.get("up") or []), *(s.get("down") or [])]}
    prog = sim.planted_programmes()
    for state in sim.UNNAMED_STATES:
        assert not scored & set(prog.loc[prog["state"] == state, "gene"]), state
    # every signature is partly planted, never wholly; programmes are mostly unscored
    assert table["signature_planted"].between(0.5, 0.9).all(), table
    assert (table["programme_scored"] < 0.6).all(), table
    states = table[table["state"] != "trem2_high"]
    assert (states["n_programme"] >= 50).all(), table
    assert (table["scored_not_planted"].str.len() > 0).all()


def test_fold_changes_are_realistic():
    for cell_type, folds in sim.profiles.TYPE_FOLDS.items():
        # platelets start from the monocyte column as a stand-in (anucleate, no PBMC
        # population of their own): its monocyte genes go down further
        low = 1 / 40 if cell_type == "Platelet" else 1 / 8
        assert all(low <= f <= 8 for f in folds.values()), cell_type
    # absolute identity levels only for populations the fitted PBMC data lack
    assert set(sim.profiles.TYPE_LEVELS) <= {
        "Platelet",
        "Mature neutrophil",
        "Immature neutrophil",
        "Plasmablast",
    }
    for prog in sim.profiles.STATE_PROGRAMMES.values():
        assert all(1 / 3 <= f <= 6 for f in prog.values())
    # effector CD8 T carry part of the exhaustion programme at baseline
    eff = sim.profiles.TYPE_FOLDS["CD8 effector/memory T"]
    assert {"TIGIT", "PDCD1", "TOX"} <= {g for g, f in eff.items() if f > 1}


def test_subset_genes_are_not_the_annotators_lists():
    markers = yaml.safe_load((REPO / "resources" / "markers" / "human.yaml").read_text())
    sets = markers if isinstance(markers, list) else markers.get("sets", markers)
    ups = {}
    for entry in sets if isinstance(sets, list) else []:
        if isinstance(entry, dict) and "name" in entry:
            ups[entry["name"]] = set(entry.get("up") or [])
    shared = [t for t in sim.profiles.TYPE_FOLDS if t in ups]
    for t in shared:
        mine = {g for g, f in sim.profiles.TYPE_FOLDS[t].items() if f > 1}
        if mine and ups[t]:
            assert mine != ups[t], t  # a separate source: overlap is partial


def test_sex_and_age_act():
    sheet = pd.DataFrame(
        {
            "sample_id": ["f_old", "m_young"],
            "condition": ["control"] * 2,
            "donor": ["d1", "d2"],
            "batch": "b1",
            "sex": ["female", "M"],
            "age": [85, 25],
        }
    )
    adatas, truth = sim.simulate_cohort(
        sheet, cells_per_sample=3000, n_genes=N_GENES, effects=False, seed=4
    )
    f, m = adatas["f_old"], adatas["m_young"]
    assert f[:, ["RPS4Y1", "DDX3Y"]].X.sum() == 0 and f[:, "XIST"].X.sum() > 0
    assert m[:, "XIST"].X.sum() == 0 and m[:, "RPS4Y1"].X.sum() > 100
    frac = truth.groupby("sample_id")["cell_type"].apply(lambda s: (s == "CD8 naive T").mean())
    assert frac["f_old"] < frac["m_young"]


# ----------------------------------------------------------------------------------------
# designs: each simulates and the oracle (true labels) gives a result
# ----------------------------------------------------------------------------------------
DESIGNS = {
    "one_batch": _sheet(3, 3, batches=1),
    "one_condition": _sheet(4, 0, batches=2),
    "time_points": _sheet(3, 3, times=("T0", "T6"), batches=1),
    "unbalanced_10_vs_3": _sheet(10, 3, batches=2),
    "no_covariates": _sheet(3, 3, batches=2, sex=False, age=False),
}


@pytest.mark.parametrize("name", list(DESIGNS))
def test_design_simulates_and_the_oracle_reads_it(name):
    sheet = DESIGNS[name]
    adatas, truth = sim.simulate_cohort(sheet, cells_per_sample=300, n_genes=N_GENES, seed=5)
    assert set(adatas) == set(sheet["sample_id"])
    for col in ("donor", "batch", "timepoint"):
        assert col in next(iter(adatas.values())).obs
    if name == "one_condition":
        # no control reference: the oracle's composition test refuses, as the pipeline's
        # contrast says "not tested" (tests/test_workflow_designs.py)
        with pytest.raises(ValueError, match="not in the table"):
            sim.oracle_tests(truth)
    else:
        oracle = sim.oracle_tests(truth)
        assert len(oracle) == len(sim.PLANTED_EFFECTS)
        t_row = [s["effect"] for s in sim.PLANTED_EFFECTS].index("fewer T cells")
        assert oracle.loc[t_row, "oracle_effect"] < 0  # the planted direction


def test_targeted_panel_measures_only_its_genes():
    panel = sim.targeted_panel(1300)
    assert len(panel) == 1300 and not any(g.startswith("MT-") for g in panel)
    adatas, truth = sim.simulate_cohort(
        _sheet(1, 1), cells_per_sample=200, n_genes=6000, gene_panel=1300, seed=6
    )
    a = next(iter(adatas.values()))
    assert set(a.var_names) <= set(panel) and 300 < a.n_vars <= 1300
    full, _ = sim.simulate_cohort(_sheet(1, 1), cells_per_sample=200, n_genes=6000, seed=6)
    assert truth["total_counts"].median() < 0.5 * np.median(
        np.asarray(next(iter(full.values())).X.sum(1)).ravel()
    )
    with pytest.raises(ValueError, match="gene_panel keeps"):
        sim.simulate_cohort(_sheet(1, 1), cells_per_sample=50, n_genes=N_GENES, gene_panel=["CD3E"])


# ----------------------------------------------------------------------------------------
# workflow level: end to end from the sheet, pipeline against the oracle
# ----------------------------------------------------------------------------------------
WF_CONFIG = {
    "samples": "samples.tsv",
    "integration": {"max_epochs": 3, "n_hvg": 800, "compare": ["pca"]},
    "clustering": {"resolutions": [1.0], "resolution": 1.0},
    "annotation": {"resolution": 1.0},
    "stats": {"min_cells": 5},
    "de": {"min_samples_per_group": 2, "levels": ["lineage"]},
}


def _run_workflow(tmp: Path, sheet: pd.DataFrame, cfg: dict) -> Path:
    from test_workflow import run_workflow

    return run_workflow(tmp, sheet, cfg)[0]


def _demo_config(run_name: str, cells_per_sample: int) -> dict:
    """WF_CONFIG with the demo simulator writing the sheet's samples into ``demo/``."""
    return {
        **WF_CONFIG,
        "run_name": run_name,
        "demo": {
            "simulate": True,
            "dir": "demo",
            "cells_per_sample": cells_per_sample,
            "n_genes": 3000,
        },
    }


@pytest.mark.slow
def test_workflow_time_points_unbalanced_one_batch_with_covariates(tmp_path):
    """4 patients x 2 time points vs 3 controls, one batch, age and sex: the contrast counts
    donors, and the pipeline agrees in sign with the oracle on the effects the oracle finds."""
    sheet = _sheet(4, 3, times=("T0", "T6"), batches=1)
    sheet["path"] = [f"demo/{s}/filtered_feature_bc_matrix.h5" for s in sheet["sample_id"]]
    res = _run_workflow(tmp_path, sheet, _demo_config("design", 350))
    contrasts = pd.read_csv(res / "targets" / "contrasts.tsv", sep="\t")
    assert contrasts.loc[0, "status"] == "tested"
    assert (contrasts.loc[0, "n_case"], contrasts.loc[0, "n_control"]) == (4, 3)
    check = pd.read_csv(res / "targets" / "demo_check.tsv", sep="\t")
    assert {"oracle_fdr", "oracle_detected"} <= set(check.columns)
    found = check[check["oracle_detected"].astype(bool)]
    assert len(found) >= 3
    same = (found["observed_direction"] == found["expected_direction"]).mean()
    assert same >= 0.75, check[["planted_effect", "effect_size", "fdr", "oracle_fdr"]]
    overlap = pd.read_csv(tmp_path / "demo" / "planted_vs_scored_genes.tsv", sep="\t")
    assert set(overlap["state"]) == set(sim.STATES) - set(sim.UNNAMED_STATES)


@pytest.mark.slow
def test_workflow_targeted_panel_runs_end_to_end(tmp_path):
    """A ~1,300-gene targeted panel (no MT genes, most marker sets partly present)."""
    sheet = _sheet(2, 2, batches=1)
    sheet["path"] = [f"data/{s}" for s in sheet["sample_id"]]
    out = sim.write_demo_cohort(
        sheet,
        truth_dir=tmp_path / "truth",
        fmt="mtx",
        cells_per_sample=350,
        n_genes=6000,
        gene_panel=1300,
        seed=3,
    )
    for p in out["path"]:
        shutil.move(
            p, tmp_path / Path(p).relative_to(Path(p).parents[1]).parent / Path(p).name
        ) if not (tmp_path / p).exists() else None
    cfg = {**WF_CONFIG, "run_name": "panel", "demo": {"simulate": False}}
    res = _run_workflow(tmp_path, sheet, cfg)
    cells = pd.read_csv(res / "annotate" / "cell_types.tsv", sep="\t")
    assert len(cells)
    assert (res / "targets" / "sample_table.tsv").exists()


@pytest.mark.slow
def test_workflow_whole_blood_with_raw_droplets(tmp_path):
    """Whole blood (neutrophils 50 % in controls, 80 % in sepsis) with raw droplet matrices
    in the sheet (raw_path): SoupX contamination per sample, corrected counts used
    downstream, and the neutrophil / T-cell shifts found in the planted direction."""
    from sepsis_sc.sim import simulate_blood_cohort

    sheet = _sheet(3, 3, batches=1)
    adatas, truth, raws = simulate_blood_cohort(
        sheet, cells_per_sample=600, n_genes=3000, contamination=(0.05, 0.15), seed=2
    )
    (tmp_path / "data").mkdir()
    paths, raw_paths = [], []
    for sid in sheet["sample_id"]:
        a = ad.AnnData(
            adatas[sid].layers["counts"], obs=adatas[sid].obs[[]], var=adatas[sid].var[[]]
        )
        a.write_h5ad(tmp_path / "data" / f"{sid}.h5ad")
        r = raws[sid]
        ad.AnnData(
            r.layers["counts"] if "counts" in r.layers else r.X, obs=r.obs[[]], var=r.var[[]]
        ).write_h5ad(tmp_path / "data" / f"{sid}_raw.h5ad")
        paths.append(f"data/{sid}.h5ad")
        raw_paths.append(f"data/{sid}_raw.h5ad")
    sheet = sheet.assign(path=paths, raw_path=raw_paths)
    cfg = {**WF_CONFIG, "run_name": "blood", "demo": {"simulate": False}}
    res = _run_workflow(tmp_path, sheet, cfg)
    qc_sum = pd.read_csv(res / "qc" / "qc_summary.tsv", sep="\t").set_index("sample_id")
    assert (qc_sum["contamination_source"] == "raw").all() and qc_sum["ambient_corrected"].all()
    rho = truth.groupby("sample_id")["sample_contamination"].first()
    assert np.allclose(qc_sum.loc[rho.index, "contamination"], rho, atol=0.03), (qc_sum, rho)
    annotated = ad.read_h5ad(res / "annotated.h5ad", backed="r")
    assert "soupx_counts" in annotated.layers
    assert annotated.uns["normalization"]["layer"] == "soupx_counts"
    comp = pd.read_csv(res / "targets" / "sepsis_vs_control" / "composition.tsv", sep="\t")
    lin = comp[comp["level"] == "lineage"].set_index("label")
    assert lin.loc["Neutrophil", "effect"] > 0 and lin.loc["T", "effect"] < 0


@pytest.mark.slow
def test_workflow_unbalanced_10_vs_3(tmp_path):
    """10 sepsis vs 3 controls, two batches: the contrast counts 10 and 3 donors and the
    strongest planted shifts come out in the oracle's direction."""
    sheet = _sheet(10, 3, batches=2)
    sheet["path"] = [f"demo/{s}/filtered_feature_bc_matrix.h5" for s in sheet["sample_id"]]
    res = _run_workflow(tmp_path, sheet, _demo_config("unbalanced", 250))
    contrasts = pd.read_csv(res / "targets" / "contrasts.tsv", sep="\t")
    assert contrasts.loc[0, "status"] == "tested"
    assert (contrasts.loc[0, "n_case"], contrasts.loc[0, "n_control"]) == (10, 3)
    check = pd.read_csv(res / "targets" / "demo_check.tsv", sep="\t")
    comp = check[check["tested_as"].str.startswith("composition")]
    found = comp[comp["oracle_detected"].astype(bool)]
    assert len(found) >= 3
    assert (found["observed_direction"] == found["expected_direction"]).mean() >= 0.75, check
