"""The data contract (sepsis_sc.data): counts, integer checks, organism, log-CP10k."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sepsis_sc import data

HUMAN = ["CD3E", "PTPRC", "MT-CO1", "LYZ", "ACTB", "GAPDH"]
MOUSE = ["Cd3e", "Ptprc", "mt-Co1", "Lyz2", "Actb", "Gapdh"]


def _counts(n_cells: int = 40, n_genes: int = 30, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32)
    x[:, 0] = 50  # a highly expressed gene: max > 30
    return sp.csr_matrix(x)


def _adata(x) -> ad.AnnData:
    return ad.AnnData(
        X=x,
        obs=pd.DataFrame(index=[f"c{i}" for i in range(x.shape[0])]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(x.shape[1])]),
    )


def _lognorm(x: sp.csr_matrix) -> sp.csr_matrix:
    y = x.copy()
    y.data = np.log1p(y.data)
    return y


# ---------------------------------------------------------------------------- counts
def test_counts_in_layer_or_integer_x():
    counts = _counts()
    a = _adata(_lognorm(counts))
    a.layers["counts"] = counts
    x, slot = data.get_counts(a)
    assert x is a.layers["counts"] and slot == 'layers["counts"]'
    b = _adata(counts)  # counts in X, no layer
    x, slot = data.get_counts(b)
    assert x is b.X and slot == "X"
    x, slot = data.get_counts(b, "raw")  # a named layer that is absent: X too
    assert slot == "X"
    b.obs["sample_id"] = "S7"  # messages name the samples of obs["sample_id"]
    b.X = _lognorm(counts)
    with pytest.raises(ValueError, match=r"sample S7 \(X\) contains non-integer"):
        data.get_counts(b)


def test_log_normalised_input_rejected_with_the_fix():
    a = _adata(_lognorm(_counts()))
    with pytest.raises(
        data.NoRawCountsError,
        match=r"layers\[\"counts\"\] is absent.*non-integer.*adata.layers\['counts'\] = adata.X.copy\(\)",
    ):
        data.get_counts(a)
    # the error is both: old callers caught KeyError (missing layer) or ValueError
    with pytest.raises(KeyError):
        data.get_counts(a)
    with pytest.raises(ValueError):
        data.get_counts(a)
    a.layers["counts"] = a.X.copy()  # a "counts" layer that holds log data
    with pytest.raises(ValueError, match=r'layers\["counts"\].*non-integer'):
        data.get_counts(a)


def test_check_counts_messages_name_sample_and_source():
    data.check_counts(_counts())
    with pytest.raises(
        ValueError, match=r"sample S1 \(x.h5ad\) contains non-integer.*e\.g\. \d\.\d+"
    ):
        data.check_counts(_lognorm(_counts()), sample_id="S1", source="x.h5ad")
    neg = _counts()
    neg.data[3] = -2
    with pytest.raises(
        ValueError, match=r"the count matrix contains negative values \(e\.g\. -2\)"
    ):
        data.check_counts(neg)
    nan = _counts().toarray()
    nan[2, 2] = np.nan
    with pytest.raises(ValueError, match="sample P1 contains non-finite values"):
        data.check_counts(nan, sample_id="P1")
    data.check_counts(np.zeros((0, 3)))  # empty passes


def test_check_counts_samples_at_most_max_values():
    x = _counts(200, 50)
    x.data[-1] = 0.5  # the last stored value only
    with pytest.raises(ValueError, match="non-integer"):
        data.check_counts(x)
    vals = data._stored_values(x, 1000)
    assert vals.size <= 1000


def test_looks_like_counts_needs_integers_and_a_max_above_30():
    counts = _counts()
    assert data.looks_like_counts(counts)
    assert not data.looks_like_counts(_lognorm(counts))
    assert not data.looks_like_counts(sp.csr_matrix(np.ones((5, 5))))  # integers, max 1


def test_require_layer():
    a = _adata(_counts())
    with pytest.raises(KeyError, match=r"layers\['counts'\] is missing \(scVI needs raw counts"):
        data.require_layer(a, "counts", why="scVI needs raw counts")
    a.layers["counts"] = a.X.copy()
    assert data.require_layer(a, "counts") is a.layers["counts"]


# ---------------------------------------------------------------------------- organism
def test_detect_organism_symbols_and_ensembl_ids():
    assert data.detect_organism(HUMAN) == "human"
    assert data.detect_organism(MOUSE) == "mouse"
    assert data.detect_organism(["ENSG00000000003", "ENSG00000000005"]) == "human"
    # upper-case mouse Ensembl IDs are mouse (score._guess_organism called them human)
    mouse_ids = [f"ENSMUSG{i:011d}" for i in range(100)]
    assert data.detect_organism(mouse_ids) == "mouse"


def test_detect_organism_by_case_when_no_probe_gene():
    human_like = [f"GENE{i}X" for i in range(60)]
    mouse_like = [f"Gene{i}x" for i in range(60)]
    assert data.detect_organism(human_like) == "human"
    assert data.detect_organism(mouse_like) == "mouse"


def test_mixed_or_unknown_names_are_undecidable():
    assert data.detect_organism(HUMAN[:3] + MOUSE[:3]) is None
    assert data.detect_organism(["foo1", "bar2"]) is None
    assert data.detect_organism([]) is None
    with pytest.raises(
        ValueError,
        match=r"cannot infer the organism.*human: .*CD3E.*mouse: .*Cd3e.*organism='human'",
    ):
        data.resolve_organism(HUMAN[:3] + MOUSE[:3])


def test_resolve_organism_mismatch_errors_give_evidence():
    assert data.resolve_organism(HUMAN) == "human"
    assert data.resolve_organism(["foo1"], "mouse") == "mouse"  # nothing contradicts it
    with pytest.raises(
        ValueError, match=r"organism: human but the genes of sample S2 are mouse \(.*Cd3e"
    ):
        data.resolve_organism(MOUSE, "human", what="sample S2")
    ids = [f"ENSMUSG{i:011d}" for i in range(10)]
    with pytest.raises(ValueError, match="10 ENSMUSG IDs"):
        data.resolve_organism(ids, "human")
    with pytest.raises(ValueError, match="config expects organism 'human'"):
        data.resolve_organism(MOUSE, "auto", expected="human")
    with pytest.raises(ValueError, match="organism must be"):
        data.resolve_organism(HUMAN, "rat")
    ev = data.organism_evidence(HUMAN)
    assert ev.organism == "human" and ev.human > ev.mouse and "CD3E" in ev.probes["human"]


# ---------------------------------------------------------------------------- log-CP10k
def test_log_normalise_matrix_form():
    counts = _counts()
    counts[3] = 0  # an empty cell stays 0
    got = data.log_normalise(counts)
    assert sp.isspmatrix_csr(got) and got.dtype == np.float32
    dense = counts.toarray().astype(float)
    tot = dense.sum(1, keepdims=True)
    want = np.log1p(np.divide(dense * 1e4, tot, out=np.zeros_like(dense), where=tot > 0))
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-5)
    cols = np.array([2, 5, 7])
    sub = data.log_normalise(counts, columns=cols)  # size factors still from all genes
    np.testing.assert_array_equal(sub.toarray(), got.toarray()[:, cols])
    assert counts[0, 0] == 50  # input untouched


def test_log_normalise_anndata_form_is_scanpys():
    import scanpy as sc

    counts = _counts()
    a = _adata(counts.copy())
    assert data.log_normalise(a) is None
    ref = _adata(counts.copy())
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    np.testing.assert_array_equal(a.X.toarray(), ref.X.toarray())
    np.testing.assert_allclose(a.X.toarray(), data.log_normalise(counts).toarray(), rtol=1e-6)


def test_counts_layer_prefers_the_corrected_counts_when_present():
    from sepsis_sc.data import counts_layer

    a = ad.AnnData(sp.csr_matrix(np.ones((3, 2), dtype=np.float32)))
    a.layers["counts"] = a.X.copy()
    assert counts_layer(a, "soupx_counts") == "counts"  # nothing corrected
    a.layers["soupx_counts"] = a.X.copy()
    assert counts_layer(a, "soupx_counts") == "soupx_counts"
    assert counts_layer(a, "counts") == "counts" and counts_layer(a, None) == "counts"
