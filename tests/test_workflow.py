"""The Snakemake workflow: validation before any job, the DAG, and one real end-to-end run.

The end-to-end run uses a tiny demo cohort (4 samples x a few hundred cells, few scVI epochs)
in a temporary working directory and checks the contents of the final outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]

TINY_SHEET = """sample_id\tcondition\tdonor\tbatch\tpath
T1\tsepsis\tD1\tb1\tdemo/T1/filtered_feature_bc_matrix.h5
T2\tcontrol\tD2\tb1\tdemo/T2/filtered_feature_bc_matrix.h5
T3\tsepsis\tD3\tb2\tdemo/T3/filtered_feature_bc_matrix.h5
T4\tcontrol\tD4\tb2\tdemo/T4/filtered_feature_bc_matrix.h5
"""

TINY_CONFIG = {
    "run_name": "tiny",
    "samples": "samples.tsv",
    "demo": {
        "simulate": True,
        "dir": "demo",
        "cells_per_sample": 400,
        "n_genes": 4000,
    },
    "integration": {"max_epochs": 4, "n_hvg": 800, "compare": ["pca"]},
    "clustering": {"resolutions": [0.5, 1.0], "resolution": 1.0},
    "stats": {"min_cells": 5},
}


def _write_workdir(tmp: Path, config: dict | None = None, sheet: str = TINY_SHEET) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "samples.tsv").write_text(sheet)
    cfg = dict(TINY_CONFIG if config is None else config)
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    return tmp


def _snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    return [
        *SNAKEMAKE,
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        *args,
    ]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1")


def _snakemake(workdir: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(
        _snakemake_cmd(workdir, *args), capture_output=True, text=True, timeout=timeout, env=_env()
    )


def _fail_workflow(workdir: Path, output: str) -> None:
    """Fail the test with the tail of the run's output and of every job log."""
    logs = "\n".join(
        f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((workdir / "results").rglob("*.log"))
    )
    pytest.fail(f"workflow failed:\n{output[-5000:]}\n{logs[-8000:]}")


def run_workflow(
    workdir: Path, sheet: pd.DataFrame, config: dict, *args: str
) -> tuple[Path, subprocess.CompletedProcess]:
    """Write ``samples.tsv`` and ``config.yaml`` into ``workdir`` and run the workflow on 2
    cores; fail the test with the stderr and the job logs when it does not finish. Returns
    the run's results folder and the completed process."""
    sheet.to_csv(workdir / "samples.tsv", sep="\t", index=False)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    res = _snakemake(workdir, "--cores", "2", *args)
    if res.returncode != 0:
        _fail_workflow(workdir, res.stderr)
    return workdir / "results" / config["run_name"], res


def test_dry_run_shows_every_stage(tmp_path):
    work = _write_workdir(tmp_path)
    res = _snakemake(work, "-n", "--cores", "1")
    assert res.returncode == 0, res.stderr + res.stdout
    out = res.stdout + res.stderr
    for rule in [
        "simulate_demo",
        "qc_sample",
        "qc_merge",
        "integrate",
        "cluster",
        "annotate",
        "score",
        "stats",
        "target_figures",
        "provenance",
    ]:
        assert rule in out, f"rule {rule} missing from the dry run"
    # one job per sample reads the raw file and does QC: no separate ingest job or h5ad
    qc_job = out.split("\nrule qc_sample:")[1].split("\nrule ")[0]
    assert "demo/T" in qc_job and "filtered_feature_bc_matrix.h5" in qc_job
    assert "rule ingest:" not in out and "/ingest/" not in out
    # qc/merged.h5ad must not be taken for a sample (an input-function error in the log)
    assert "Exception" not in out, out[:3000]


def test_integration_metrics_can_be_switched_off(tmp_path):
    """integration.metrics false drops the metrics job (and its kNN graphs) from the DAG."""
    work = _write_workdir(tmp_path)
    res = _snakemake(work, "-n", "--cores", "1")
    assert "rule integration_metrics:" in res.stdout + res.stderr
    cfg = dict(TINY_CONFIG, integration={**TINY_CONFIG["integration"], "metrics": False})
    work = _write_workdir(tmp_path / "off", cfg)
    res = _snakemake(work, "-n", "--cores", "1")
    assert res.returncode == 0, res.stderr + res.stdout
    out = res.stdout + res.stderr
    assert "rule integration_metrics:" not in out and "rule cluster:" in out


def _fails_before_any_job(work: Path, *expected: str) -> None:
    res = _snakemake(work, "--cores", "1")
    out = res.stdout + res.stderr
    assert res.returncode != 0
    for text in expected:
        assert text in out, f"expected {text!r} in:\n{out[-3000:]}"
    assert not (work / "results").exists(), "a job ran although the input was invalid"
    assert not (work / "demo").exists()


def test_bad_config_value_stops_before_any_job(tmp_path):
    cfg = dict(TINY_CONFIG, clustering={"resolution": -2, "resolutions": [1.0]})
    work = _write_workdir(tmp_path, cfg)
    _fails_before_any_job(work, "clustering.resolution", "-2")


def test_unknown_config_key_stops_before_any_job(tmp_path):
    cfg = dict(TINY_CONFIG, qc={"nmads_count": 4})
    work = _write_workdir(tmp_path, cfg)
    _fails_before_any_job(work, "qc.nmads_count")


def test_duplicate_sample_id_stops_before_any_job(tmp_path):
    sheet = TINY_SHEET + "T1\tsepsis\tD9\tb2\tdemo/T9/filtered_feature_bc_matrix.h5\n"
    work = _write_workdir(tmp_path, sheet=sheet)
    _fails_before_any_job(work, "duplicate sample_id", "T1")


def test_missing_input_file_stops_before_any_job(tmp_path):
    cfg = dict(TINY_CONFIG, demo={"simulate": False})
    work = _write_workdir(tmp_path, cfg)
    _fails_before_any_job(work, "do not exist", "demo/T1/filtered_feature_bc_matrix.h5")


def test_cli_overrides_run_name_and_samples(tmp_path):
    work = _write_workdir(tmp_path)
    other = work / "other.tsv"
    other.write_text(TINY_SHEET.replace("T4\t", "T5\t").replace("/T4/", "/T5/"))
    res = _snakemake(work, "-n", "--cores", "1", "--config", "run_name=cohort2", f"samples={other}")
    assert res.returncode == 0, res.stderr
    assert "results/cohort2/qc/T5.h5ad" in res.stdout
    assert "results/tiny" not in res.stdout


class TinyRun:
    """The whole DAG on the tiny demo in ``work``, run in the background from construction:
    the session fixtures ``tiny_run_started`` / ``tiny_run`` of ``conftest.py`` share one run
    between the end-to-end checks here and the SLURM run's local twin (``test_slurm.py``
    starts it first and runs SLURM beside it, whose jobs mostly wait on the scheduler)."""

    def __init__(self, work: Path) -> None:
        self.work = _write_workdir(work)
        self._proc = subprocess.Popen(
            _snakemake_cmd(self.work, "--cores", "2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
        )
        self._out: str | None = None

    def wait(self, timeout: int = 1500) -> Path:
        """The working directory once the run is done; fails the test with the log tails."""
        if self._out is None:
            self._out, _ = self._proc.communicate(timeout=timeout)
        if self._proc.returncode != 0:
            _fail_workflow(self.work, self._out)
        return self.work


@pytest.mark.slow
def test_end_to_end_outputs(tiny_run):
    res = tiny_run / "results" / "tiny"
    adata = ad.read_h5ad(res / "annotated.h5ad")
    # output contract
    for col in [
        "sample_id",
        "condition",
        "donor",
        "batch",
        "lineage",
        "cell_type",
        "cell_type_ontology_term_id",
        "annotation_confidence",
        "leiden",
    ]:
        assert col in adata.obs, col
    assert "counts" in adata.layers
    counts = adata.layers["counts"]
    assert float((counts.data % 1 != 0).sum() if hasattr(counts, "data") else 0) == 0
    assert "X_scVI" in adata.obsm and "X_umap" in adata.obsm
    assert adata.obs["sample_id"].nunique() == 4
    assert adata.obs_names.is_unique
    assert adata.obs["annotation_confidence"].between(0, 1).all()
    assert adata.obs["cell_type_ontology_term_id"].str.match(r"^(CL:\d{7}|unknown)$").all()
    # the annotation found the major lineages of the demo
    found = set(adata.obs["lineage"])
    assert {"T", "Monocyte", "B", "NK"} <= found, found

    table = pd.read_csv(res / "targets" / "sample_table.tsv", sep="\t")
    assert set(table["sample_id"]) == {"T1", "T2", "T3", "T4"}
    effects = pd.read_csv(res / "targets" / "sepsis_vs_control" / "condition_effects.tsv", sep="\t")
    for col in [
        "state",
        "effect",
        "unit",
        "ci_low",
        "ci_high",
        "pvalue",
        "fdr",
        "role",
        "n_case",
        "n_control",
    ]:
        assert col in effects.columns, col
    assert (effects["n_case"] <= 2).all()  # sample-level: never more units than samples
    contrasts = pd.read_csv(res / "targets" / "contrasts.tsv", sep="\t")
    assert contrasts["name"].tolist() == ["sepsis_vs_control"]
    de = pd.read_csv(res / "de" / "sepsis_vs_control" / "summary.tsv", sep="\t")
    assert {"level", "label", "status", "reason"} <= set(de.columns)
    assert (de["status"] == "not tested").all()  # 2 vs 2 donors < de.min_samples_per_group 3
    qc = pd.read_csv(res / "qc" / "qc_summary.tsv", sep="\t")
    assert len(qc) == 4 and (qc["cells_out"] > 0).all()
    for png in (res).rglob("*.png"):
        assert png.stat().st_size > 5000, png
    prov = yaml.safe_load((res / "provenance.yaml").read_text())
    assert prov["integration"]["device"] == "cpu"
    assert prov["config"]["seed"] == 0
    assert "scanpy" in prov["packages"]


@pytest.mark.slow
def test_rerun_is_a_no_op_and_resolution_change_reruns_from_clustering(tiny_run):
    res = _snakemake(tiny_run, "-n", "--cores", "1")
    assert res.returncode == 0
    assert "Nothing to be done" in res.stdout + res.stderr
    res = _snakemake(
        tiny_run,
        "-n",
        "--cores",
        "1",
        "--config",
        "clustering={'resolution': 0.5, 'resolutions': [0.5, 1.0]}",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "cluster" in out and "annotate" in out
    for upstream in ["qc_sample", "qc_merge", "integrate"]:
        assert (
            f"rule {upstream}:" not in out and f"\n{upstream} " not in out.split("Job stats")[-1]
        ), upstream


@pytest.mark.parametrize(
    "cohort", sorted(p.name for p in (REPO / "config" / "cohorts").iterdir() if p.is_dir())
)
def test_real_cohort_configs_resolve_their_dag(cohort, tmp_path):
    """`snakemake -n` on every shipped public-cohort config: the DAG resolves from download
    to the final outputs (nothing is fetched in a dry run)."""
    cfg = REPO / "config" / "cohorts" / cohort / "config.yaml"
    res = subprocess.run(
        [*SNAKEMAKE, "-n", "--cores", "1", "--configfile", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    for rule in ("download", "qc_sample", "integrate", "annotate", "stats"):
        assert rule in out, f"{cohort}: rule {rule} missing from the dry run"
    assert "simulate_demo" not in out


def test_slurm_profile_dry_run_shows_rule_resources(tmp_path):
    """The SLURM profile parses; scVI asks for a GPU (resources.gpu) and its threads/runtime,
    QC jobs for their own memory and runtime."""
    cfg = dict(TINY_CONFIG, resources={"gpu": True})
    work = _write_workdir(tmp_path, cfg)
    res = _snakemake(
        work, "-n", "--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm")
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    jobs = {block.split(":", 1)[0].strip(): block for block in out.split("\nrule ")[1:]}
    integrate = jobs["integrate"]
    assert "gpu=1" in integrate and "runtime=360" in integrate and "threads: 8" in integrate
    qc = jobs["qc_sample"]
    assert "mem_mb=" in qc and "runtime=60" in qc and "gpu" not in qc
    # without resources.gpu no GPU is requested
    work2 = _write_workdir(tmp_path / "nogpu")
    res = _snakemake(
        work2, "-n", "--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm")
    )
    integrate = res.stdout.split("\nrule integrate:")[1].split("\nrule ")[0]
    assert "gpu=" not in integrate.replace("gpu=0", "")


@pytest.mark.slow
def test_report_contains_every_figure(tiny_run):
    """`snakemake --report` yields one self-contained HTML file with every figure of the run."""
    report = tiny_run / "report.html"
    res = _snakemake(tiny_run, "--report", str(report))
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    html = report.read_text(errors="replace")
    figures = sorted((tiny_run / "results" / "tiny").rglob("*.png"))
    assert len(figures) >= 13
    for png in figures:
        assert png.name in html, f"{png.name} missing from the report"
    assert "provenance.yaml" in html and "condition_effects.tsv" in html
    # the landing page says what the data are; every table is a titled page inside the report
    assert "SIMULATED DATA" in html
    for title in (
        "Therapy targets (evidence per state)",
        "Condition effects (sample level)",
        "QC summary per sample",
        "UMAP of annotated cell types",
    ):
        assert f'"title": "{title}"' in html, f"report entry {title!r} missing"
    tables = sorted((tiny_run / "results" / "tiny" / "report").rglob("*.html"))
    assert len(tables) >= 12
    page = next(p for p in tables if p.name == "Therapy targets (evidence per state).html")
    text = page.read_text()
    assert "<table>" in text and "therapy_targets.tsv" in text


def test_scvi_as_comparison_method_keeps_its_model(tmp_path):
    """With Harmony downstream and scVI only compared, the scVI model is saved and the
    model folder does not claim that no model was trained."""
    cfg = dict(
        TINY_CONFIG,
        demo=dict(TINY_CONFIG["demo"], cells_per_sample=150, n_genes=3000),
        integration={"method": "harmony", "compare": ["scvi"], "max_epochs": 2, "n_hvg": 500},
    )
    work = _write_workdir(tmp_path, cfg)
    res = _snakemake(work, "--cores", "2", "results/tiny/integrate/integration.yaml")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    model = work / "results" / "tiny" / "integrate" / "scvi_model"
    assert (model / "model.pt").exists()
    assert not (model / "NOT_TRAINED.txt").exists()
    record = yaml.safe_load(
        (work / "results" / "tiny" / "integrate" / "integration.yaml").read_text()
    )
    assert record["method"] == "harmony" and "scvi" in record["runs"]
