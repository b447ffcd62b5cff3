"""Tests for sepsis_sc.io: every input format, and the ingest checks."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from sepsis_sc import io

GENES = ["CD3E", "PTPRC", "LYZ", "MT-CO1", "MT-ND1", "RPL13", "CD74", "ACTB", "GAPDH", "B2M"]
IDS = [f"ENSG{idx:011d}" for idx in range(1, len(GENES) + 1)]
BARCODES = [f"AAACCTGAGAAACC{i:02d}-1" for i in range(6)]


def _counts(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(2.0, size=(len(BARCODES), len(GENES))).astype(np.float32)
    dense[0, 0] = 0
    dense[1, 2] = 7
    return sp.csr_matrix(dense)


def _gz(path: Path) -> Path:
    out = path.with_name(path.name + ".gz")
    with open(path, "rb") as src, gzip.open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()
    return out


def _write_mtx(folder: Path, prefix: str = "", counts: sp.spmatrix | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    counts = _counts() if counts is None else counts
    mtx = folder / f"{prefix}matrix.mtx"
    scipy.io.mmwrite(str(mtx), sp.coo_matrix(counts.T.astype(np.int64)), field="integer")
    pd.DataFrame({"id": IDS, "name": GENES, "type": "Gene Expression"}).to_csv(
        folder / f"{prefix}features.tsv", sep="\t", header=False, index=False
    )
    pd.Series(BARCODES).to_csv(folder / f"{prefix}barcodes.tsv", header=False, index=False)
    for name in (f"{prefix}features.tsv", f"{prefix}barcodes.tsv"):
        _gz(folder / name)
    return _gz(mtx)


def _assert_same(adata: ad.AnnData, counts: sp.spmatrix | None = None) -> None:
    counts = _counts() if counts is None else counts
    assert sp.isspmatrix_csr(adata.X) or isinstance(adata.X, sp.csr_array)
    assert adata.X.dtype == np.float32
    assert list(adata.obs_names) == BARCODES
    assert list(adata.var_names) == GENES
    np.testing.assert_array_equal(adata.X.toarray(), counts.toarray())
    assert list(adata.var["gene_symbols"]) == GENES


def test_read_10x_h5_roundtrip(tmp_path):
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    io.write_10x_h5(path, _counts(), BARCODES, IDS, GENES)
    adata = io.read_counts(path)
    _assert_same(adata)
    assert list(adata.var["gene_ids"]) == IDS
    assert adata.uns["ingest_format"] == "10x_h5"
    # the folder also works
    assert io.read_counts(tmp_path).n_obs == len(BARCODES)


def test_read_mtx_dir_and_geo_prefix(tmp_path):
    _write_mtx(tmp_path / "plain")
    adata = io.read_counts(tmp_path / "plain")
    _assert_same(adata)
    assert list(adata.var["gene_ids"]) == IDS

    matrix = _write_mtx(tmp_path / "geo", prefix="GSM123_sample1_")
    # as the matrix path and as the folder
    _assert_same(io.read_counts(matrix))
    _assert_same(io.read_counts(tmp_path / "geo"))


def test_read_mtx_folder_with_two_samples_is_an_error(tmp_path):
    _write_mtx(tmp_path, prefix="GSM1_a_")
    _write_mtx(tmp_path, prefix="GSM2_b_")
    with pytest.raises(ValueError, match="several matrices"):
        io.read_counts(tmp_path)


def test_read_h5ad_prefers_counts_layer(tmp_path):
    counts = _counts()
    adata = ad.AnnData(
        X=sp.csr_matrix(np.log1p(counts.toarray())),
        obs=pd.DataFrame(index=BARCODES),
        var=pd.DataFrame({"gene_ids": IDS}, index=GENES),
    )
    adata.layers["counts"] = counts
    adata.write_h5ad(tmp_path / "s.h5ad")
    back = io.read_counts(tmp_path / "s.h5ad")
    _assert_same(back)
    assert list(back.var["gene_ids"]) == IDS


@pytest.mark.parametrize("suffix,sep", [(".txt.gz", "\t"), (".csv", ","), (".tsv", "\t")])
def test_read_dense_table(tmp_path, suffix, sep):
    counts = _counts()
    table = pd.DataFrame(counts.toarray().T.astype(int), index=GENES, columns=BARCODES)
    path = tmp_path / f"GSE1_processed_UMI{suffix}"
    table.to_csv(path, sep=sep)
    # chunk_values small so several chunks are read
    adata = io.text.read_table(path, chunk_values=len(BARCODES) * 3)
    _assert_same(adata)
    assert io.read_counts(path).uns["ingest_format"] == "table"


def test_read_table_r_style_header(tmp_path):
    counts = _counts()
    lines = ["\t".join(BARCODES)]
    for g, row in zip(GENES, counts.toarray().T.astype(int)):
        lines.append("\t".join([g, *map(str, row)]))
    path = tmp_path / "umi.txt"
    path.write_text("\n".join(lines) + "\n")
    _assert_same(io.read_counts(path))


def test_ensure_symbols_switches_and_errors():
    counts = _counts()
    adata = ad.AnnData(
        X=counts,
        obs=pd.DataFrame(index=BARCODES),
        var=pd.DataFrame({"feature_name": GENES}, index=IDS),
    )
    io.ensure_symbols(adata, "S1")
    assert list(adata.var_names) == GENES
    assert list(adata.var["gene_ids"]) == IDS

    ids_only = ad.AnnData(X=counts, obs=pd.DataFrame(index=BARCODES), var=pd.DataFrame(index=IDS))
    with pytest.raises(ValueError, match="Ensembl gene IDs.*sample S1|sample S1.*Ensembl"):
        io.ensure_symbols(ids_only, "S1")


def test_ingest_rejects_ensembl_only(tmp_path):
    adata = ad.AnnData(X=_counts(), obs=pd.DataFrame(index=BARCODES), var=pd.DataFrame(index=IDS))
    adata.write_h5ad(tmp_path / "ids.h5ad")
    with pytest.raises(ValueError, match="no gene-symbol column"):
        io.ingest_sample(tmp_path / "ids.h5ad", {"sample_id": "S9"})


def test_ingest_rejects_lognormalised(tmp_path):
    lognorm = _counts().copy()
    lognorm.data = np.log1p(lognorm.data)
    adata = ad.AnnData(X=lognorm, obs=pd.DataFrame(index=BARCODES), var=pd.DataFrame(index=GENES))
    adata.write_h5ad(tmp_path / "log.h5ad")
    with pytest.raises(ValueError, match="sample P3.*non-integer"):
        io.ingest_sample(tmp_path / "log.h5ad", {"sample_id": "P3"})


def test_ingest_organism_mismatch(tmp_path):
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    io.write_10x_h5(path, _counts(), BARCODES, IDS, GENES)
    with pytest.raises(
        ValueError, match=r"organism: mouse but the genes of sample S1 \(.*\) are human \(.*CD3E"
    ):
        io.ingest_sample(path, {"sample_id": "S1"}, organism="mouse")


def test_ingest_empty_sample(tmp_path):
    path = tmp_path / "empty.h5"
    io.write_10x_h5(path, sp.csr_matrix((0, len(GENES))), [], IDS, GENES)
    with pytest.raises(ValueError, match="sample E1 .* has 0 cells"):
        io.ingest_sample(path, {"sample_id": "E1"})


def test_ingest_sample_contract_and_unique_barcodes(tmp_path):
    paths = {}
    for sid in ("S1", "S2"):
        paths[sid] = tmp_path / sid / "filtered_feature_bc_matrix.h5"
        io.write_10x_h5(paths[sid], _counts(), BARCODES, IDS, GENES)  # same barcodes
    sheets = {
        "S1": {
            "sample_id": "S1",
            "condition": "sepsis",
            "donor": "D1",
            "batch": "b1",
            "path": str(paths["S1"]),
            "url": "https://x",
            "age": 61,
        },
        "S2": {
            "sample_id": "S2",
            "condition": "control",
            "donor": "D2",
            "batch": "b2",
            "path": str(paths["S2"]),
            "age": 55,
        },
    }
    adatas = [io.ingest_sample(paths[s], sheets[s], organism="human") for s in sheets]
    a = adatas[0]
    assert a.obs_names[0] == f"S1_{BARCODES[0]}"
    for col in ("sample_id", "condition", "donor", "batch", "age"):
        assert isinstance(a.obs[col].dtype, pd.CategoricalDtype)
    assert "path" not in a.obs and "url" not in a.obs
    assert a.obs["condition"].iloc[0] == "sepsis"
    assert a.uns["ingest"] == {
        "source": str(paths["S1"]),
        "format": "10x_h5",
        "organism": "human",
        "sample_id": "S1",
    }
    assert sp.issparse(a.layers["counts"]) and a.layers["counts"].format == "csr"
    assert a.layers["counts"].dtype == np.float32
    np.testing.assert_array_equal(a.layers["counts"].toarray(), _counts().toarray())
    a.X.data[:] = 0  # X is a separate copy: normalising X must not touch the counts
    assert a.layers["counts"].sum() == _counts().sum()
    assert a.var["mt"].sum() == 2 and a.var["ribo"].sum() == 1
    merged = ad.concat(adatas)
    assert merged.obs_names.is_unique
    assert merged.n_obs == 2 * len(BARCODES)


def test_ingest_steps_label_cells_and_check_organism():
    adata = ad.AnnData(np.zeros((2, 3), dtype=np.float32))
    adata.obs_names = ["AAAC-1", "AAAG-1"]
    adata.var_names = ["MT-CO1", "CD3E", "LYZ"]
    io.ingest._label_cells(adata, {"sample_id": "S1", "condition": "sepsis", "path": "x.h5"}, "S1")
    assert list(adata.obs_names) == ["S1_AAAC-1", "S1_AAAG-1"]
    assert list(adata.obs.columns) == ["barcode", "sample_id", "condition"]  # no path
    assert io.ingest._sample_organism(adata, "human", "S1", "x.h5") == "human"
    with pytest.raises(ValueError, match=r"organism: mouse but the genes of sample S1 \(x.h5\)"):
        io.ingest._sample_organism(adata, "mouse", "S1", "x.h5")
    io.ingest._store_counts_and_flags(adata)
    assert adata.var["mt"].tolist() == [True, False, False] and "counts" in adata.layers
