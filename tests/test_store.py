"""sepsis_sc.store: partial reads, streamed matrices, linked and copied matrices."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sepsis_sc import store
from sepsis_sc.data import pseudobulk


@pytest.fixture
def base(tmp_path):
    rng = np.random.default_rng(0)
    x = sp.random(1000, 50, density=0.1, format="csr", dtype=np.float32, random_state=0)
    x.data = np.ceil(x.data * 5)
    a = ad.AnnData(
        x, obs=pd.DataFrame({"s": np.repeat(["a", "b"], 500)}, index=[f"c{i}" for i in range(1000)])
    )
    a.var_names = [f"g{i}" for i in range(50)]
    a.layers["counts"] = x.copy()
    a.layers["other"] = x.copy() * 2
    a.obsm["Z"] = rng.normal(size=(1000, 3))
    path = tmp_path / "base.h5ad"
    a.write_h5ad(path)
    return a, path


def test_read_only_the_parts_asked_for(base):
    a, path = base
    b = store.read(path)
    assert b.X is None and not b.layers and "Z" in b.obsm and b.shape == a.shape
    c = store.read(path, X=True, layers=["counts"], genes=["g3", "g1"], chunk_rows=300)
    assert list(c.var_names) == ["g1", "g3"] and list(c.layers) == ["counts"]
    assert (c.X != a[:, ["g1", "g3"]].X).nnz == 0
    assert (c.layers["counts"] != a[:, ["g1", "g3"]].layers["counts"]).nnz == 0
    with pytest.raises(KeyError, match="no layer"):
        store.read(path, layers=["soupx_counts"])
    with pytest.raises(KeyError, match="not in the file"):
        store.read(path, genes=["nope"])


def test_iter_rows_and_pseudobulk_from_the_file(base):
    a, path = base
    chunks = list(store.iter_rows(path, "counts", chunk_rows=333))
    assert [c[0] for c in chunks] == [0, 333, 666, 999]
    assert (sp.vstack([c[2] for c in chunks]) != a.layers["counts"]).nnz == 0
    groups = np.repeat(np.arange(4), 250)
    groups[:10] = -1  # left out
    sums = pseudobulk(store.FileCounts(path, "counts"), groups, 4, chunk_rows=333)
    want = np.vstack([np.asarray(a.X[groups == g].sum(axis=0)) for g in range(4)])
    np.testing.assert_allclose(sums, want, rtol=1e-6)
    # several groupings in one pass
    other = np.where(np.arange(1000) % 3 == 0, 1, -1)
    both = pseudobulk(store.FileCounts(path, "counts"), [groups, other], [4, 2], chunk_rows=333)
    np.testing.assert_allclose(both[0], want, rtol=1e-6)
    np.testing.assert_allclose(
        both[1][1], np.asarray(a.X[other == 1].sum(axis=0)).ravel(), rtol=1e-6
    )
    assert not both[1][0].any()


def test_write_links_and_copies_matrices(base, tmp_path):
    a, path = base
    mid = store.read(path)
    mid.obs["new"] = 1
    store.write(mid, tmp_path / "d1" / "mid.h5ad", source=path, link=["X", "counts"])
    with h5py.File(tmp_path / "d1" / "mid.h5ad") as f:
        assert isinstance(f.get("X", getlink=True), h5py.ExternalLink)
        assert "other" not in f["layers"]
    final = store.read(tmp_path / "d1" / "mid.h5ad")
    store.write(
        final,
        tmp_path / "d2" / "final.h5ad",
        source=tmp_path / "d1" / "mid.h5ad",
        link=["X"],
        copy=["counts"],
    )
    with h5py.File(tmp_path / "d2" / "final.h5ad") as f:
        link = f.get("X", getlink=True)
        assert link.filename == "../base.h5ad"  # followed to the file that holds it
        assert isinstance(f.get("layers/counts", getlink=True), h5py.HardLink)
    whole = ad.read_h5ad(tmp_path / "d2" / "final.h5ad")
    assert (whole.X != a.X).nnz == 0 and (whole.layers["counts"] != a.X).nnz == 0
    assert whole.obs["new"].eq(1).all()
    with pytest.raises(ValueError, match="cells and genes must be the same"):
        store.write(store.read(path, genes=["g1"]), tmp_path / "bad.h5ad", source=path, link=["X"])
    assert not (tmp_path / "bad.h5ad").exists()


def test_matrix_writer_streams_rows(base, tmp_path):
    a, _ = base
    out = tmp_path / "w.h5ad"
    ad.AnnData(obs=a.obs, var=a.var).write_h5ad(out)
    with store.MatrixWriter(out, ["X", "counts"], n_vars=50, n_obs=1000) as w:
        for s0 in range(0, 1000, 300):
            w.append("X", a.X[s0 : s0 + 300])
            w.append("counts", a.layers["counts"][s0 : s0 + 300])
    back = ad.read_h5ad(out)
    assert (back.X != a.X).nnz == 0 and (back.layers["counts"] != a.X).nnz == 0
    with h5py.File(out) as f:
        assert f["X/indptr"].dtype == np.int64
    # read back with 32-bit offsets: scipy would upcast the indices in every row selection
    m = store.read(out, X=True).X
    assert m.indptr.dtype == np.int32 and m.indices.dtype == np.int32
    assert next(store.iter_rows(out, "X"))[2].indptr.dtype == np.int32
    ad.AnnData(obs=a.obs, var=a.var).write_h5ad(out)
    with pytest.raises(ValueError, match="wrote 300 rows for 1000"):
        with store.MatrixWriter(out, ["X"], n_vars=50, n_obs=1000) as w:
            w.append("X", a.X[:300])


def test_pseudobulk_in_memory_exact_and_without_copying_the_rows():
    """data.pseudobulk over an in-memory CountSource: per-group row sums equal the dense
    computation (rows coded -1 left out), and never copy more than a chunk of the rows."""
    import tracemalloc

    rng = np.random.default_rng(1)
    x = sp.random(20_000, 300, density=0.2, format="csr", dtype=np.float32, random_state=1)
    x.data = np.ceil(x.data * 50)
    codes = rng.integers(-1, 4, size=x.shape[0])
    got = pseudobulk(store.CountSource(x), codes, 4, chunk_rows=1_000)
    dense = x.toarray().astype(np.float64)
    want = np.vstack([dense[codes == g].sum(axis=0) for g in range(4)])
    np.testing.assert_array_equal(got, want)
    tracemalloc.start()
    pseudobulk(
        store.CountSource(x), np.zeros(x.shape[0], dtype=int), 1, chunk_rows=1_000
    )  # every row selected
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    one_copy = x.data.nbytes + x.indices.nbytes
    assert peak < 0.25 * one_copy, peak / one_copy


def test_memory_requests_follow_cells_and_stage(base, tmp_path):
    """Cohort rules ask for their stage's measured footprint at the job's cells (from the
    input files), the floor for small cohorts, the flat per-10k rule when configured, and
    more on a retry."""
    a, path = base
    assert store.h5ad_cells([path, path]) == 2000
    assert store.h5ad_cells([tmp_path / "missing.h5ad"]) is None
    assert store.stage_mem_mb("integrate", 1600) == store.MEMORY_FLOOR_MB
    fixed, slope = store.STAGE_MEMORY["annotate"]
    assert store.stage_mem_mb("annotate", 1_000_000) == int(1.3 * (fixed + slope * 100))
    assert store.stage_mem_mb("annotate", 1_000_000, attempt=2) == 2 * store.stage_mem_mb(
        "annotate", 1_000_000
    )
    assert store.stage_mem_mb("annotate", 200_000, per_10k_cells=2000) == 40_000
    with pytest.raises(KeyError, match="no measured memory"):
        store.stage_mem_mb("nope", 10)


def test_file_counts_equal_in_memory_counts(base):
    """FileCounts reads what CountSource gives from the matrix: totals, columns, rows."""
    a, path = base
    mem = store.CountSource(a.layers["counts"])
    disk = store.FileCounts(path, "counts", chunk_rows=333)
    assert disk.shape == mem.shape
    np.testing.assert_array_equal(disk.totals, mem.totals)
    cols = np.array([7, 3, 40])
    assert (disk.columns(cols) != mem.columns(cols)).nnz == 0
    rows = np.array([0, 5, 332, 333, 334, 998])
    assert (disk.rows(rows) != mem.rows(rows)).nnz == 0
    assert (disk.full() != a.layers["counts"]).nnz == 0


def test_count_source_checks_cells_and_genes_of_the_file(base):
    """store.count_source refuses a file whose cells or genes are not adata's (same shape,
    other order): a stage would otherwise pair each cell with another cell's counts."""
    a, path = base
    light = store.read(path)
    assert store.count_source(light, store.FileCounts(path, "counts")).shape == a.shape
    shuffled = light[::-1].copy()
    with pytest.raises(ValueError, match="other cells"):
        store.count_source(shuffled, store.FileCounts(path, "counts"))
    renamed = light.copy()
    renamed.var_names = [f"x{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="other genes"):
        store.count_source(renamed, store.FileCounts(path, "counts"))
    with pytest.raises(ValueError, match="cells x"):
        store.count_source(light[:10].copy(), store.FileCounts(path, "counts"))
