"""Preflight: broken inputs are found at parse time, one line per problem, before any job."""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import yaml

from sepsis_sc.config import SampleSheetError, load_samples, validate_samples
from sepsis_sc.io import PreflightError, check_inputs, preflight, sniff, write_10x_h5

REPO = Path(__file__).resolve().parents[1]

HUMAN = [
    "PTPRC",
    "CD3E",
    "CD3D",
    "CD74",
    "CD14",
    "CD79A",
    "NKG7",
    "ACTB",
    "GAPDH",
    "B2M",
    "MALAT1",
    "TMSB4X",
    "MT-CO1",
    "MT-ND1",
] + [f"GENE{i}" for i in range(46)]
MOUSE = [
    "Ptprc",
    "Cd3e",
    "Cd3d",
    "Cd74",
    "Cd14",
    "Cd79a",
    "Nkg7",
    "Actb",
    "Gapdh",
    "B2m",
    "Malat1",
    "Tmsb4x",
    "mt-Co1",
    "mt-Nd1",
] + [f"Gene{i}" for i in range(46)]


def _counts(n_cells=50, n_genes=60, seed=0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix(rng.poisson(1.0, size=(n_cells, n_genes)).astype(np.float32))


def _h5(path: Path, n_cells=50, genes=HUMAN, ids=None, counts=None) -> Path:
    counts = _counts(n_cells, len(genes)) if counts is None else counts
    ids = [f"ENSG{i:011d}" for i in range(len(genes))] if ids is None else ids
    write_10x_h5(path, counts, [f"BC{i}-1" for i in range(counts.shape[0])], ids, genes)
    return path


def _mtx(folder: Path, n_cells=50, n_barcodes=None, genes=HUMAN) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(_counts(n_cells, len(genes)).T.astype(np.int64)))
    n_barcodes = n_cells if n_barcodes is None else n_barcodes
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.write("".join(f"BC{i}-1\n" for i in range(n_barcodes)))
    with gzip.open(folder / "features.tsv.gz", "wt") as fh:
        fh.write("".join(f"ENSG{i:011d}\t{g}\tGene Expression\n" for i, g in enumerate(genes)))
    return folder


def _h5ad(path: Path, x, genes=HUMAN, var=None) -> Path:
    var = pd.DataFrame(index=pd.Index(genes)) if var is None else var
    obs = pd.DataFrame(index=[f"c{i}" for i in range(x.shape[0])])
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)
    return path


def _sheet(*paths: str) -> pd.DataFrame:
    ids = [f"S{i + 1}" for i in range(len(paths))]
    df = pd.DataFrame({"sample_id": ids, "path": list(paths)})
    return df.set_index("sample_id", drop=False)


def _problems(tmp_path, *paths, organism="human", **kw) -> list[str]:
    rel = [str(Path(p).relative_to(tmp_path)) for p in paths]
    return [str(p) for p in check_inputs(_sheet(*rel), organism, base=tmp_path, **kw)]


# ---- good inputs pass ----------------------------------------------------------------
def test_good_inputs_pass(tmp_path):
    h5 = _h5(tmp_path / "a" / "filtered_feature_bc_matrix.h5")
    mtx = _mtx(tmp_path / "b")
    h5ad = _h5ad(tmp_path / "c.h5ad", _counts())
    assert _problems(tmp_path, h5, mtx, mtx / "matrix.mtx.gz", h5ad, h5.parent) == []
    assert sniff(h5) == "hdf5" and sniff(mtx / "matrix.mtx.gz") == "gzip+mtx"
    preflight(_sheet("a/filtered_feature_bc_matrix.h5"), "human", base=tmp_path)


def test_mouse_data_under_mouse_passes(tmp_path):
    ids = [f"ENSMUSG{i:011d}" for i in range(len(MOUSE))]
    h5 = _h5(tmp_path / "m.h5", genes=MOUSE, ids=ids)
    assert _problems(tmp_path, h5, organism="mouse") == []


def test_good_10x_h5_of_10k_cells_is_cheap(tmp_path):
    rng = np.random.default_rng(1)
    genes = HUMAN + [f"G{i}" for i in range(20000)]
    counts = sp.random(10_000, len(genes), density=0.05, format="csr", random_state=rng)
    counts.data = np.ceil(counts.data * 5)
    h5 = _h5(tmp_path / "big.h5", genes=genes, counts=counts)
    start = time.perf_counter()
    assert _problems(tmp_path, h5) == []
    assert time.perf_counter() - start < 2.0  # ~0.2 s measured; generous for shared CI


# ---- broken files ----------------------------------------------------------------------
def test_truncated_h5(tmp_path):
    h5 = _h5(tmp_path / "t.h5")
    data = h5.read_bytes()
    h5.write_bytes(data[: len(data) // 2])
    (msg,) = _problems(tmp_path, h5)
    assert "sample S1 (t.h5)" in msg and "truncated" in msg and "download it again" in msg
    assert "file signature not found" not in msg


def test_html_saved_as_h5(tmp_path):
    page = tmp_path / "p.h5"
    page.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n")
    (msg,) = _problems(tmp_path, page)
    assert "is an HTML page" in msg and "download it again" in msg
    assert "file signature not found" not in msg


def test_hdf5_that_is_not_10x(tmp_path):
    with h5py.File(tmp_path / "o.h5", "w") as f:
        f.create_dataset("counts", data=np.zeros((3, 3)))
    (msg,) = _problems(tmp_path, tmp_path / "o.h5")
    assert "is HDF5 but not a 10x matrix (top-level keys: counts)" in msg


def test_h5ad_saved_as_h5_and_empty_file(tmp_path):
    wrong = _h5ad(tmp_path / "x.h5ad", _counts())
    wrong.rename(tmp_path / "x.h5")
    empty = tmp_path / "e.h5"
    empty.write_bytes(b"")
    msgs = _problems(tmp_path, tmp_path / "x.h5", empty)
    assert "AnnData (.h5ad) file named .h5" in msgs[0] and "rename it to .h5ad" in msgs[0]
    assert "empty file" in msgs[1]


def test_mtx_with_mismatched_barcodes(tmp_path):
    mtx = _mtx(tmp_path / "m", n_cells=50, n_barcodes=49)
    (msg,) = _problems(tmp_path, mtx)
    assert "do not belong together" in msg and "50 cells" in msg and "49 barcodes" in msg


def test_truncated_mtx_gz(tmp_path):
    mtx = _mtx(tmp_path / "m", n_cells=2000)
    f = mtx / "matrix.mtx.gz"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])
    (msg,) = _problems(tmp_path, mtx)
    assert "matrix.mtx.gz is truncated" in msg


def test_plain_mtx_truncated_and_misnamed(tmp_path):
    mtx = _mtx(tmp_path / "m")
    plain = tmp_path / "p"
    plain.mkdir()
    text = gzip.decompress((mtx / "matrix.mtx.gz").read_bytes())
    (plain / "matrix.mtx").write_bytes(text[: len(text) // 2])
    for name in ("barcodes.tsv.gz", "features.tsv.gz"):
        (plain / name).write_bytes((mtx / name).read_bytes())
    (msg,) = _problems(tmp_path, plain)
    assert "truncated: its header announces" in msg
    (mtx / "matrix.mtx.gz").write_bytes(text)  # plain text under a .gz name
    (msg,) = _problems(tmp_path, mtx)
    assert "named .gz but is not compressed" in msg


def test_tables(tmp_path):
    x = _counts(20).toarray().T  # genes x cells
    cells = [f"c{i}" for i in range(20)]
    good = pd.DataFrame(x.astype(int), index=HUMAN, columns=cells)
    good.to_csv(tmp_path / "good.txt.gz", sep="\t")
    (np.log1p(good)).to_csv(tmp_path / "log.csv", sep=",")
    ok, (msg,) = (
        _problems(tmp_path, tmp_path / "good.txt.gz"),
        _problems(tmp_path, tmp_path / "log.csv"),
    )
    assert ok == [] and "non-integer values" in msg


def test_log_normalised_counts(tmp_path):
    x = _counts()
    x.data = np.log1p(x.data)
    (msg,) = _problems(tmp_path, _h5ad(tmp_path / "l.h5ad", x))
    assert "non-integer values" in msg and "log-normalised" in msg and "raw UMI counts" in msg


def test_h5ad_with_counts_layer_is_fine(tmp_path):
    x = _counts()
    a = ad.AnnData(X=x.copy(), var=pd.DataFrame(index=HUMAN))
    a.layers["counts"] = x.copy()
    a.X.data = np.log1p(a.X.data)
    a.write_h5ad(tmp_path / "ok.h5ad")
    assert _problems(tmp_path, tmp_path / "ok.h5ad") == []


def test_nan_values(tmp_path):
    x = _counts().toarray()
    x[3, 4] = np.nan
    (msg,) = _problems(tmp_path, _h5ad(tmp_path / "n.h5ad", x))
    assert "non-finite values" in msg and "nan" in msg


def test_zero_cells(tmp_path):
    h5 = _h5(tmp_path / "z.h5", counts=sp.csr_matrix((0, len(HUMAN)), dtype=np.float32))
    (msg,) = _problems(tmp_path, h5)
    assert "has 0 cells" in msg and "remove the sample" in msg


def test_mouse_genes_under_human(tmp_path):
    h5 = _h5(tmp_path / "m.h5", genes=MOUSE)
    (msg,) = _problems(tmp_path, h5)
    assert "organism: human" in msg and "genes are mouse" in msg and "organism: mouse" in msg


def test_ensembl_only_ids(tmp_path):
    ids = [f"ENSG{i:011d}" for i in range(60)]
    (msg,) = _problems(tmp_path, _h5(tmp_path / "e.h5", genes=ids, ids=ids))
    assert "Ensembl IDs only" in msg and "gene-symbol column" in msg
    # an h5ad with Ensembl var_names and a symbol column is fine (io switches to symbols)
    var = pd.DataFrame({"feature_name": HUMAN}, index=ids)
    assert _problems(tmp_path, _h5ad(tmp_path / "s.h5ad", _counts(), var=var)) == []


def test_every_problem_listed_and_skip(tmp_path):
    bad1 = tmp_path / "a.h5"
    bad1.write_text("<html></html>")
    bad2 = _mtx(tmp_path / "m", n_barcodes=3)
    sheet = _sheet("a.h5", "m", "demo/not_yet.h5")
    with pytest.raises(PreflightError) as err:
        preflight(sheet, "human", base=tmp_path, skip=["demo/not_yet.h5"])
    lines = [ln for ln in str(err.value).splitlines() if ln.startswith("  - ")]
    assert len(lines) == 2 and "sample S1 (a.h5)" in lines[0] and "sample S2" in lines[1]
    assert "Fix:" in lines[0] and bad2.exists()
    # a download that is not fetched yet is skipped
    sheet = _sheet("data/downloads/x.h5").assign(url="https://example.org/x.h5")
    assert check_inputs(sheet, "human", base=tmp_path) == []


def test_cache_skips_files_that_passed_until_they_change(tmp_path, monkeypatch):
    import sepsis_sc.io.checks as pf

    h5 = _h5(tmp_path / "a.h5")
    calls = []
    real = pf._check_one
    monkeypatch.setattr(pf, "_check_one", lambda *a: calls.append(a) or real(*a))
    for _ in range(2):
        assert check_inputs(_sheet("a.h5"), "human", base=tmp_path, cache="c/pf.json") == []
    assert len(calls) == 1 and (tmp_path / "c" / "pf.json").exists()
    h5.write_text("<html></html>")  # the file changes: checked again, and fails
    assert len(check_inputs(_sheet("a.h5"), "human", base=tmp_path, cache="c/pf.json")) == 1
    assert len(check_inputs(_sheet("a.h5"), "mouse", base=tmp_path, cache="c/pf.json")) == 1
    assert len(calls) == 3


# ---- the sample sheet --------------------------------------------------------------------
SHEET_ROWS = [
    ["sample_id", "condition", "donor", "batch", "path"],
    ["P1", "sepsis", "P1", "run1", "data/P1.h5"],
    ["HC1", "control", "HC1", "run1", "data/HC1.h5"],
]


@pytest.mark.parametrize("sep,word", [("   ", "spaces"), (",", "commas")])
def test_sheet_not_tab_separated(tmp_path, sep, word):
    path = tmp_path / "samples.tsv"
    path.write_text("".join(sep.join(r) + "\n" for r in SHEET_ROWS))
    with pytest.raises(SampleSheetError, match="this sheet is not tab-separated") as err:
        load_samples(path)
    assert word in str(err.value) and "missing required" not in str(err.value)


def test_duplicate_paths(tmp_path):
    rows = SHEET_ROWS + [["P2", "sepsis", "P2", "run1", "./data/P1.h5"]]
    path = tmp_path / "samples.tsv"
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    with pytest.raises(SampleSheetError, match="same input file") as err:
        validate_samples(load_samples(path), {})
    assert "P1, P2" in str(err.value)


def test_readme_sheet_example_is_tab_separated(tmp_path):
    text = (REPO / "README.md").read_text()
    section = text.split("## Run your own cohort", 1)[1]
    block = re.search(r"```[a-z]*\n(sample_id.*?)```", section, flags=re.S).group(1)
    assert "\t" in block
    path = tmp_path / "samples.tsv"
    path.write_text(block)
    sheet = validate_samples(load_samples(path), {})
    assert list(sheet.columns[:5]) == ["sample_id", "condition", "donor", "batch", "path"]
    assert len(sheet) >= 2


# ---- the workflow --------------------------------------------------------------------
def test_workflow_stops_before_any_job(tmp_path):
    page = tmp_path / "data" / "P1.h5"
    page.parent.mkdir()
    page.write_text("<!doctype html><html><body>Not found</body></html>")
    _h5(tmp_path / "data" / "HC1.h5")
    (tmp_path / "samples.tsv").write_text("".join("\t".join(r) + "\n" for r in SHEET_ROWS))
    cfg = {"run_name": "pf", "samples": "samples.tsv", "demo": {"simulate": False}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(tmp_path / "config.yaml"),
        "-n",
        "--cores",
        "1",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "preflight found 1 problem" in out and "sample P1 (data/P1.h5)" in out, out[-3000:]
    assert "HTML page" in out and "rule qc_sample" not in out
    assert not (tmp_path / "results").exists()


def test_missing_raw_path_is_named_before_any_job(tmp_path):
    h5 = _h5(tmp_path / "a" / "filtered_feature_bc_matrix.h5")
    raw = _h5(tmp_path / "a" / "raw_feature_bc_matrix.h5")
    sheet = _sheet(str(h5.relative_to(tmp_path)), str(h5.relative_to(tmp_path)))
    sheet["raw_path"] = [str(raw.relative_to(tmp_path)), "a/raw_typo.h5"]
    problems = [str(p) for p in check_inputs(sheet, "human", base=tmp_path)]
    assert len(problems) == 1
    assert "S2" in problems[0] and "raw_typo.h5" in problems[0] and "raw_path" in problems[0]
    sheet["raw_path"] = ["", ""]  # optional: empty is fine
    assert check_inputs(sheet, "human", base=tmp_path) == []
