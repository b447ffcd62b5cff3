"""What the user sees at the terminal when the data are wrong in a way only a job can find,
and samples too small for the sample-level statistics (issue #21).

The cohort is simulated (sepsis_sc.sim) and written as per-sample ``.h5ad`` files; the
runs stop at ``qc/merged.h5ad`` so that each test costs a few QC jobs.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from test_workflow import _snakemake

from sepsis_sc.sim import simulate_cohort

pytestmark = pytest.mark.slow

CONFIG = {
    "run_name": "err",
    "samples": "samples.tsv",
    "demo": {"simulate": False},
    "integration": {"max_epochs": 3, "n_hvg": 600, "compare": []},
    "clustering": {"resolutions": [1.0], "resolution": 1.0},
    "stats": {"min_cells": 5},
}


def _cohort(tmp, n_samples=3, cells=300):
    sheet = pd.DataFrame(
        {
            "sample_id": [f"S{i}" for i in range(n_samples)],
            "condition": ["sepsis", "control"] * (n_samples // 2) + ["sepsis"] * (n_samples % 2),
            "donor": [f"D{i}" for i in range(n_samples)],
            "batch": "b1",
        }
    )
    adatas, _ = simulate_cohort(
        sheet.set_index("sample_id", drop=False), cells_per_sample=cells, n_genes=3000, seed=3
    )
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    paths = {}
    for sid, a in adatas.items():
        b = ad.AnnData(sp.csr_matrix(a.layers["counts"] if "counts" in a.layers else a.X))
        b.obs_names, b.var_names = a.obs_names, a.var_names
        paths[sid] = b
    return sheet, paths


def _write(tmp, sheet, adatas, config=None):
    rows = sheet.copy()
    rows["path"] = [f"data/{s}.h5ad" for s in rows["sample_id"]]
    for sid, a in adatas.items():
        a.write_h5ad(tmp / "data" / f"{sid}.h5ad")
    rows.to_csv(tmp / "samples.tsv", sep="\t", index=False)
    cfg = {**CONFIG, **(config or {})}
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_an_error_only_a_job_can_find_is_printed_at_the_terminal(tmp_path):
    """Every cell failing QC (mitochondrial reads everywhere) passes the cheap pre-flight; the
    QC job fails, and the terminal shows the project's message, not only 'message: None'."""
    sheet, adatas = _cohort(tmp_path, 2)
    bad = adatas["S1"]
    x = bad.X.toarray()
    mt = np.flatnonzero(bad.var_names.str.startswith("MT-"))
    assert mt.size
    x[:, mt] += (x.sum(axis=1, keepdims=True) * 3 // mt.size + 1).astype(x.dtype)
    bad.X = sp.csr_matrix(x)
    _write(tmp_path, sheet, adatas)
    res = _snakemake(tmp_path, "--cores", "2", "results/err/qc/merged.h5ad")
    out = res.stdout + res.stderr
    assert res.returncode != 0
    line = "sepsis-sc: qc_sample (sample=S1) failed: QC removed all"
    assert line in out, out[-4000:]
    # printed when the job fails and again in the summary at the end of the run
    tail = out[out.rindex("what went wrong") :]
    assert line in tail and "qc.nmads_counts" in tail
    assert "qc.nmads " not in out, "the hint must name config keys that exist"
    err = tmp_path / "results" / "err" / "logs" / "qc" / "S1.log.error.txt"
    assert err.exists() and "QC removed all" in err.read_text()
    assert not (tmp_path / "results" / "err" / "qc" / "S1.h5ad").exists()


def test_a_tiny_sample_is_flagged_before_any_job_and_left_out_of_the_cohort(tmp_path):
    """A 20-cell sample is reported before any job, left out at qc_merge, and named in the
    composition table instead of entering it at full weight."""
    sheet, adatas = _cohort(tmp_path, 5)
    adatas["S4"] = adatas["S4"][:20].copy()
    _write(tmp_path, sheet, adatas)
    dry = _snakemake(tmp_path, "-n", "--cores", "1")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "sample S4" in dry.stderr and "qc.min_cells_per_sample (50)" in dry.stderr
    target = "results/err/targets/sepsis_vs_control/composition.tsv"
    res = _snakemake(tmp_path, "--cores", "2", target)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "sample S4 left out of the cohort" in res.stderr
    summary = pd.read_csv(tmp_path / "results/err/qc/qc_summary.tsv", sep="\t")
    row = summary.set_index("sample_id").loc["S4"]
    assert not row["included"] and "qc.min_cells_per_sample" in row["excluded_reason"]
    assert summary.set_index("sample_id").loc[["S0", "S1", "S2", "S3"], "included"].all()
    merged = ad.read_h5ad(tmp_path / "results/err/qc/merged.h5ad", backed="r")
    assert set(merged.obs["sample_id"].astype(str)) == {"S0", "S1", "S2", "S3"}
    composition = pd.read_csv(tmp_path / target, sep="\t")
    assert (
        composition["samples_left_out"].str.match(r"^S4 \(\d+ cells after QC < qc.min_cells").all()
    )
    assert (composition["n_case"] == 2).all() and (composition["n_control"] == 2).all()


def test_a_tiny_sample_stops_the_run_before_any_job_when_the_config_says_so(tmp_path):
    sheet, adatas = _cohort(tmp_path, 3)
    adatas["S2"] = adatas["S2"][:20].copy()
    _write(tmp_path, sheet, adatas, {"qc": {"on_small_sample": "stop"}})
    res = _snakemake(tmp_path, "--cores", "1")
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "sample S2" in out and "qc.min_cells_per_sample" in out and "on_small_sample" in out
    assert not (tmp_path / "results").exists(), "a job ran although the run should stop"


@pytest.mark.parametrize(
    "section,value,expected",
    [
        ("integration", {"batch_key": "lane"}, "integration.batch_key"),
        (
            "integration",
            {"categorical_covariates": ["chemistry"]},
            "integration.categorical_covariates",
        ),
        (
            "integration",
            {"continuous_covariates": ["age_years"]},
            "integration.continuous_covariates",
        ),
        ("stats", {"design": "~ age + condition"}, "['age']"),
        ("contrast", {"column": "status", "case": "sepsis", "control": "control"}, "status"),
        (
            "scoring",
            {"reference": {"column": "group", "value": "healthy"}},
            "scoring.reference.column",
        ),
        (
            "scoring",
            {"reference": {"column": "condition", "value": "healthy"}},
            "scoring.reference.value",
        ),
        (
            "patients",
            {"reference_column": "condition", "reference_value": "hc"},
            "patients.reference_value",
        ),
    ],
)
def test_config_keys_naming_sheet_columns_are_checked_before_any_job(
    tmp_path, section, value, expected
):
    """A key that names a sheet column (or one of its values) that does not exist stops the
    run at parse time, naming the key, not in the job that first uses it."""
    from test_workflow import TINY_CONFIG, _fails_before_any_job, _write_workdir

    merged = {**TINY_CONFIG.get(section, {}), **value} if section != "contrast" else value
    work = _write_workdir(tmp_path, {**TINY_CONFIG, section: merged})
    _fails_before_any_job(work, expected)
