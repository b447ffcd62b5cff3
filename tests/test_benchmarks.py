"""The benchmark scripts run end to end at a tiny size (a smoke test, never a timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scaling_benchmark_runs_pipeline_and_reference(tmp_path):
    work = tmp_path / "bench"
    size = 1600
    try:
        subprocess.run(
            [
                sys.executable,
                str(REPO / "benchmarks/scaling.py"),
                "--sizes",
                str(size),
                "--cells-per-sample",
                "400",
                "--epochs",
                "2",
                "--workdir",
                str(work),
                "--no-report",
            ],
            check=True,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as err:  # pragma: no cover - shown on failure
        pytest.fail(f"scaling.py failed:\n{err.stdout[-3000:]}\n{err.stderr[-3000:]}")
    finally:
        subprocess.run(["rm", "-rf", str(REPO / "results" / f"bench_{size}")], check=False)
    res = pd.read_csv(work / "scaling.tsv", sep="\t")
    assert set(res["tool"]) == {"pipeline", "reference"}
    assert res["date"].str.fullmatch(r"\d{4}-\d{2}-\d{2}").all()  # when each row was measured
    assert (res["wall_s"] > 0).all() and (res["peak_rss_gb"] > 0.05).all()
    # both analysed (nearly) the same cells: the same QC rule on the same files
    after = res.set_index("tool")["cells_after_qc"]
    assert abs(after["pipeline"] - after["reference"]) < 0.1 * after["reference"]
    # the reference runs the pipeline's pseudobulk DE too (2 vs 2 samples here: none tested)
    rec = json.loads((work / f"reference_{size}.json").read_text())
    assert "de" in rec["steps"] and rec["de_fits"] == 0
    stages = pd.read_csv(work / "stages.tsv", sep="\t")
    assert {"qc", "integrate", "cluster", "annotate", "score"} <= set(stages["stage"])
    assert (stages.loc[stages["stage"] == "qc", "jobs"] == 4).all()

    docs = tmp_path / "docs"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/report.py"),
            "--workdir",
            str(work),
            "--docs",
            str(docs),
        ],
        check=True,
        cwd=REPO,
    )
    text = (docs / "benchmarks.md").read_text()
    assert "time ratio" in text and "| 1600 |" in text
    assert "| de labels tested | 0 |" in text
    assert (docs / "img" / "benchmark_scaling.png").stat().st_size > 10_000


@pytest.mark.slow
def test_scvi_cpu_benchmark_reports_throughput_and_quality(tmp_path):
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/scvi_cpu.py"),
            "--samples",
            "4",
            "--cells",
            "300",
            "--skip-default",
            "--variants",
            "tiny:bs=256,epochs=3,layers=1,lr=0.002",
            "--cap-epochs",
            "5",
            "--out",
            str(tmp_path),
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    table = pd.read_csv(tmp_path / "scvi_cpu.tsv", sep="\t")
    assert list(table["setting"]) == ["sepsis-sc default", "tiny"]
    assert table.loc[1, "epochs_run"] <= 3
    assert (table.loc[1, "batch_size"], table.loc[1, "layers/latent"]) == (256, "1/30")
    assert table.loc[1, "lr"] == 0.002
    assert (table["cells_x_epochs_per_s"] > 0).all()
    assert table[["elbo_validation", "ilisi", "ari"]].notna().all().all()
    # another training seed of the default setting is added to the saved rows
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/scvi_cpu.py"),
            "--samples",
            "4",
            "--cells",
            "300",
            "--skip-default",
            "--cap-epochs",
            "2",
            "--train-seeds",
            "1",
            "--append",
            "--out",
            str(tmp_path),
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    table = pd.read_csv(tmp_path / "scvi_cpu.tsv", sep="\t")
    assert list(zip(table["setting"], table["seed"])) == [
        ("sepsis-sc default", 0),
        ("tiny", 0),
        ("sepsis-sc default", 1),
    ]


def test_design_calibration_benchmark_runs(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/design_calibration.py"),
            "--cohorts",
            "2",
            "--variants",
            "plain unweighted (before),none (default)",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    table = pd.read_csv(tmp_path / "design_calibration.tsv", sep="\t")
    # per design x variant: 12 + 3 labels (composition) and 10 states
    assert len(table) == 4 * 2 * (12 + 3 + 10) and table["p_below_0.05"].between(0, 1).all()
    power = pd.read_csv(tmp_path / "design_power.tsv", sep="\t")
    assert len(power) == 4 * 2 * 2 and power["found_at_fdr_0.05"].between(0, 1).all()
    assert (tmp_path / "img" / "design_calibration.png").stat().st_size > 5000


def test_stage_memory_fit_covers_every_measured_peak():
    """report.fit_stage_memory: the (MB, MB per 10k cells) line of each stage lies on or above
    every measured peak, so a request from it (x 1.3) never asks for less than was used."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from report import fit_stage_memory

    st = pd.DataFrame(
        {
            "stage": ["annotate"] * 3 + ["stats"] * 2,
            "cells": [50_000, 100_000, 200_000, 50_000, 200_000],
            "max_rss_gb": [0.9, 1.6, 3.5, 0.3, 0.31],
        }
    )
    fit = fit_stage_memory(st).set_index("stage")
    for row in st.itertuples():
        fixed, slope = fit.loc[row.stage, ["fixed_mb", "mb_per_10k_cells"]]
        assert fixed + slope * row.cells / 1e4 >= row.max_rss_gb * 1024 - 1, row
    assert fit.loc["stats", "mb_per_10k_cells"] < 1.0  # flat stages stay flat


def test_report_says_when_each_row_was_measured():
    """The machine's speed varies between days: the table gives each size's date(s), and the
    page says when the ratio of a row compares runs from different days."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from report import _dates_note, _measured_on

    res = pd.DataFrame(
        {
            "cells": [100_000, 100_000, 200_000, 1_000_000],
            "tool": ["pipeline", "reference", "pipeline", "pipeline"],
            "date": ["2026-12-02", "2026-12-02", "2026-12-01", "2026-12-01"],
        }
    )
    assert _measured_on(res).to_dict() == {
        100_000: "2026-12-02",
        200_000: "2026-12-01",
        1_000_000: "2026-12-01",
    }
    note = " ".join(_dates_note(res))
    assert "2 different days" in note and "compare the two tools measured on the same day" in note

    res.loc[1, "date"] = "2026-11-30"
    assert _measured_on(res)[100_000] == "2026-12-02 / 2026-11-30"  # pipeline / reference
    assert "ratio compares runs from different days" in " ".join(_dates_note(res))

    assert _measured_on(res.drop(columns="date")) is None  # tables from before dates
    assert _dates_note(res.assign(date="2026-12-02")) == []  # one day: nothing to say


def test_report_reads_only_reference_records(tmp_path):
    """reference_<cells>.json files are records; a saved copy beside them is not one."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from report import _reference_records

    (tmp_path / "reference_100000.json").write_text(json.dumps({"steps": {"de": 1.0}}))
    (tmp_path / "reference_2000.json").write_text(json.dumps({"steps": {"de": 2.0}}))
    (tmp_path / "reference_100000_old.json").write_text(json.dumps({"steps": {}}))
    records = _reference_records(tmp_path)
    assert list(records) == [2000, 100_000] and records[100_000]["steps"] == {"de": 1.0}


def test_compare_runs_tells_results_from_timings(tmp_path):
    """benchmarks/compare_runs.py: identical tables pass, a time column is reported as such,
    a changed value, a changed obs column or obsm matrix and a missing file fail."""
    import anndata as ad
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import compare_runs
    finally:
        sys.path.pop(0)
    before, after = tmp_path / "a", tmp_path / "b"
    for d in (before, after):
        (d / "de").mkdir(parents=True)
        (d / "logs").mkdir()
    t = pd.DataFrame({"label": ["x", "y"], "p": [0.1, 0.2], "seconds": [1.5, 2.0]})
    t.to_csv(before / "de" / "summary.tsv", sep="\t", index=False)
    t.assign(seconds=[9.0, 9.0]).to_csv(after / "de" / "summary.tsv", sep="\t", index=False)
    t.to_csv(before / "same.tsv", sep="\t", index=False)
    t.to_csv(after / "same.tsv", sep="\t", index=False)
    (before / "logs" / "x.tsv").write_text("a\n1\n")  # logs are never compared
    obs = pd.DataFrame({"cell_type": pd.Categorical(["T", "B"])}, index=["c1", "c2"])
    a = ad.AnnData(obs=obs, obsm={"X_umap": np.zeros((2, 2))})
    a.write_h5ad(before / "annotated.h5ad")
    a.write_h5ad(after / "annotated.h5ad")
    assert compare_runs.compare_table(
        before / "de/summary.tsv", after / "de/summary.tsv"
    ).startswith("time columns only")
    assert compare_runs.main([str(before), str(after)]) == 0
    t.assign(p=[0.1, 0.3]).to_csv(after / "same.tsv", sep="\t", index=False)
    assert "DIFFERS" in compare_runs.compare_table(before / "same.tsv", after / "same.tsv")
    assert compare_runs.main([str(before), str(after)]) == 1
    t.to_csv(after / "same.tsv", sep="\t", index=False)
    b = a.copy()
    b.obsm["X_umap"][0, 0] = 1e-12
    b.write_h5ad(after / "annotated.h5ad")
    assert "obsm" in compare_runs.compare_h5ad(before / "annotated.h5ad", after / "annotated.h5ad")
    b = a.copy()
    b.obs["cell_type"] = pd.Categorical(["T", "T"])
    b.write_h5ad(after / "annotated.h5ad")
    assert "obs" in compare_runs.compare_h5ad(before / "annotated.h5ad", after / "annotated.h5ad")
    (after / "annotated.h5ad").unlink()
    assert compare_runs.main([str(before), str(after)]) == 1
