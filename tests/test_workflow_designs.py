"""The workflow on real data with the cohort shapes that broke it: one batch, one condition.

Both sheets are built from ``../shared/data/soupx_pbmc4k.h5ad`` (one real 10x PBMC sample)
split at random into per-sample ``.h5ad`` files, so every stage meets real counts. The
conditions are labels only (no biology differs between them): the runs check that every stage
completes and that the statistics say what they did, not what they found.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import shared_file
from test_workflow import run_workflow

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

CONFIG = {
    "samples": "samples.tsv",
    "demo": {"simulate": False},
    "integration": {"max_epochs": 3, "n_hvg": 800, "compare": ["pca", "harmony"]},
    "clustering": {"resolutions": [0.5, 1.0], "resolution": 1.0},
    "annotation": {"resolution": 1.0},
    "stats": {"min_cells": 5},
    "de": {"min_samples_per_group": 2, "levels": ["lineage"]},
}


def _split(tmp, n_samples, seed=0):
    src = ad.read_h5ad(shared_file("soupx_pbmc4k.h5ad"))
    adata = ad.AnnData(src.X.copy(), var=pd.DataFrame(index=src.var_names))
    adata.obs_names = src.obs_names
    part = np.random.default_rng(seed).integers(0, n_samples, adata.n_obs)
    paths = []
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    for i in range(n_samples):
        path = tmp / "data" / f"s{i}.h5ad"
        adata[part == i].copy().write_h5ad(path)
        paths.append(f"data/s{i}.h5ad")
    return paths


def _run(tmp, rows, run_name, extra=None):
    cfg = {**CONFIG, "run_name": run_name, **(extra or {})}
    return run_workflow(tmp, pd.DataFrame(rows), cfg)


def test_one_batch_sheet_with_a_donor_sampled_twice_runs_end_to_end(tmp_path):
    paths = _split(tmp_path, 6)
    donors = ["P1", "P1", "P2", "H1", "H2", "H3"]  # P1 sampled twice (e.g. T0 and T6)
    conds = ["sepsis"] * 3 + ["control"] * 3
    rows = [
        {
            "sample_id": f"s{i}",
            "condition": conds[i],
            "donor": donors[i],
            "batch": "run1",
            "path": paths[i],
        }
        for i in range(6)
    ]
    res, out = _run(tmp_path, rows, "onebatch")
    assert "one level of 'batch' in the sheet" in out.stderr
    metrics = pd.read_csv(res / "integrate" / "metrics.tsv", sep="\t")
    assert metrics["note"].str.contains("one batch level").all()
    contrasts = pd.read_csv(res / "targets" / "contrasts.tsv", sep="\t")
    assert contrasts.loc[0, "status"] == "tested"
    assert (contrasts.loc[0, "n_case"], contrasts.loc[0, "n_control"]) == (2, 3)
    eff = pd.read_csv(res / "targets" / "sepsis_vs_control" / "condition_effects.tsv", sep="\t")
    assert (eff["n_case"] <= 2).all() and (eff["n_control"] <= 3).all()  # donors, not samples
    comp = pd.read_csv(res / "targets" / "sepsis_vs_control" / "composition.tsv", sep="\t")
    assert (comp["n_case"] == 2).all() and comp["note"].str.contains(
        "aggregated into one unit"
    ).all()
    summary = pd.read_csv(res / "de" / "sepsis_vs_control" / "summary.tsv", sep="\t")
    assert (summary["status"] == "tested").any()
    for png in res.rglob("*.png"):
        assert png.stat().st_size > 5000, png


def test_one_condition_sheet_runs_and_says_not_tested(tmp_path):
    paths = _split(tmp_path, 4, seed=1)
    rows = [
        {
            "sample_id": f"s{i}",
            "condition": "sepsis",
            "donor": f"P{i}",
            "batch": f"b{i % 2}",
            "path": paths[i],
        }
        for i in range(4)
    ]
    res, out = _run(tmp_path, rows, "onecond")
    assert "not tested: one condition" in out.stderr
    contrasts = pd.read_csv(res / "targets" / "contrasts.tsv", sep="\t")
    assert contrasts.loc[0, "status"].startswith("not tested: one condition ('sepsis')")
    table = pd.read_csv(res / "targets" / "sample_table.tsv", sep="\t")
    assert set(table["sample_id"]) == {"s0", "s1", "s2", "s3"}
    assert "fraction" not in set(table["metric"])  # no control reference: no discrete calls
    rules = pd.read_csv(res / "targets" / "state_rules.tsv", sep="\t")
    assert (
        rules.loc[rules["discrete"] & (rules["status"] == "scored"), "reason"]
        .str.contains("no control reference")
        .all()
    )
    assert not (res / "targets" / "sepsis_vs_control").exists()
    assert (res / "targets" / "figures" / "umap_scores.png").stat().st_size > 5000
    assert (res / "annotate" / "figures" / "umap_cell_types.png").exists()
