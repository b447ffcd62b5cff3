"""Tests for sepsis_sc.cluster: multi-resolution Leiden, stability summary, UMAP, markers."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from sepsis_sc import cluster as cl
from sepsis_sc import store
from sepsis_sc.cluster import graph as cl_graph
from sepsis_sc.cluster import leiden as cl_leiden
from sepsis_sc.cluster import markers as cl_markers
from sepsis_sc.pl import cluster as pl_cl
from sepsis_sc.pl.style import savefig

SUMMARY_COLUMNS = [
    "resolution",
    "key",
    "n_clusters",
    "smallest_cluster",
    "largest_cluster_fraction",
    "modularity",
    "stability_ari",
    "ari_previous",
    "chosen",
]


def blobs(n_cells: int = 600, n_blobs: int = 4, dim: int = 10, seed: int = 0) -> ad.AnnData:
    """Well separated Gaussian blobs in obsm['X_pca'] with sample/batch/condition columns."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, n_blobs, n_cells)
    centres = rng.normal(0, 8, (n_blobs, dim))
    x = centres[truth] + rng.normal(0, 1, (n_cells, dim))
    sample = rng.integers(0, 4, n_cells)
    obs = pd.DataFrame(
        {
            "truth": pd.Categorical(truth.astype(str)),
            "sample_id": pd.Categorical([f"S{s}" for s in sample]),
            "batch": pd.Categorical([f"b{s // 2}" for s in sample]),
            "condition": pd.Categorical(["sepsis" if s % 2 else "control" for s in sample]),
        },
        index=[f"c{i}" for i in range(n_cells)],
    )
    return ad.AnnData(obs=obs, obsm={"X_pca": x.astype(np.float32)})


def test_leiden_multi_writes_slots_and_summary():
    adata = blobs()
    summary = cl.leiden_multi(
        adata,
        use_rep="X_pca",
        resolutions=(0.1, 0.5, 1.0),
        resolution=0.5,
        seed=0,
        n_stability_runs=2,
        umap_maxiter=50,
    )
    for res in (0.1, 0.5, 1.0):
        assert cl.leiden_key(res) in adata.obs
    assert cl.leiden_key(1.0) == "leiden_r1.0"
    assert (adata.obs["leiden"] == adata.obs["leiden_r0.5"]).all()
    assert adata.obsm["X_umap"].shape == (600, 2)
    assert "connectivities" in adata.obsp
    assert adata.uns["leiden_multi"]["resolution"] == 0.5
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert summary["resolution"].tolist() == [0.1, 0.5, 1.0]
    assert summary["chosen"].tolist() == [False, True, False]
    # more clusters at higher resolution; well separated blobs give stable partitions
    assert summary["n_clusters"].is_monotonic_increasing
    assert (summary["stability_ari"] > 0.9).iloc[:2].all()
    assert np.isnan(summary["ari_previous"].iloc[0]) and summary["ari_previous"].iloc[1] > 0
    assert summary["modularity"].between(0, 1).all() and summary["modularity"].iloc[1] > 0.5
    # clusters are ordered by size: 0 is the largest
    sizes = adata.obs["leiden"].value_counts()
    assert sizes.idxmax() == "0"
    assert adjusted_rand_score(adata.obs["truth"], adata.obs["leiden_r0.1"]) > 0.95
    # the stored summary can be recomputed from the object alone
    again = cl.resolution_summary(adata, n_stability_runs=0)
    assert again["n_clusters"].tolist() == summary["n_clusters"].tolist()
    assert again["chosen"].tolist() == [False, True, False]


def test_leiden_multi_same_seed_same_result():
    results = []
    for seed in (7, 7, 8):
        adata = blobs(n_cells=500, n_blobs=6, seed=1)
        cl.leiden_multi(
            adata,
            use_rep="X_pca",
            resolutions=(1.0, 2.0),
            resolution=2.0,
            seed=seed,
            n_stability_runs=0,
            umap_maxiter=30,
        )
        results.append(adata)
    a, b, c = results
    for key in ("leiden_r1.0", "leiden_r2.0", "leiden"):
        assert (a.obs[key] == b.obs[key]).all()
    np.testing.assert_array_equal(a.obsm["X_umap"], b.obsm["X_umap"])
    assert not np.allclose(a.obsm["X_umap"], c.obsm["X_umap"])


def test_leiden_multi_bad_input():
    adata = blobs(n_cells=100)
    with pytest.raises(ValueError, match="clustering.resolution"):
        cl.leiden_multi(adata, use_rep="X_pca", resolutions=(0.5, 1.0), resolution=0.8)
    with pytest.raises(KeyError, match="X_scVI"):
        cl.leiden_multi(adata, use_rep="X_scVI")
    # the config's method name resolves to its embedding
    adata.obsm["X_harmony"] = adata.obsm["X_pca"]
    cl.leiden_multi(adata, use_rep="harmony", resolutions=(1.0,), n_stability_runs=0, umap=False)
    assert adata.uns["leiden_multi"]["use_rep"] == "X_harmony"


def test_knn_method_exact_up_to_the_cutoff(monkeypatch):
    assert cl.knn_method(10_000) == "exact"
    assert cl.knn_method(cl.EXACT_KNN_MAX_CELLS + 1) == "approx"
    assert cl.knn_method(10, "approx") == "approx"
    with pytest.raises(ValueError, match="knn must be"):
        cl.knn_method(10, "fast")
    adata = blobs(n_cells=400, seed=2)

    def knn_used(a: ad.AnnData) -> str:
        cl.leiden_multi(
            a,
            use_rep="X_pca",
            resolutions=(0.5,),
            resolution=0.5,
            n_stability_runs=0,
            umap=False,
        )
        return a.uns["leiden_multi"]["knn"]

    assert knn_used(adata) == "exact"
    # exact: every cell's neighbours are its true nearest neighbours
    x = adata.obsm["X_pca"]
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    true_nn = np.argsort(d, axis=1)[:, :14]
    dist = adata.obsp["distances"].tocsr()
    found = [set(dist[i].indices) for i in range(adata.n_obs)]
    assert np.mean([len(set(t) & f) / 14 for t, f in zip(true_nn, found, strict=True)]) > 0.999
    monkeypatch.setattr(cl_graph, "EXACT_KNN_MAX_CELLS", 100)
    assert knn_used(adata) == "approx"


def test_large_cohort_pynndescent_path():
    """The approximate (pynndescent) kNN path, used above EXACT_KNN_MAX_CELLS, must work."""
    adata = blobs(n_cells=10_500, n_blobs=8, dim=15, seed=3)
    summary = cl.leiden_multi(
        adata,
        use_rep="X_pca",
        n_neighbors=15,
        resolutions=(0.2, 0.5),
        resolution=0.2,
        seed=0,
        n_stability_runs=1,
        umap_maxiter=20,
        knn="approx",
    )
    assert adata.uns["leiden_multi"]["knn"] == "approx"
    assert adata.n_obs == 10_500
    assert adata.obsp["connectivities"].shape == (10_500, 10_500)
    # each cell keeps ~n_neighbors - 1 outgoing edges (the symmetrised graph has at least that)
    assert (adata.obsp["distances"].getnnz(axis=1) >= 14).all()
    assert adata.obsm["X_umap"].shape == (10_500, 2)
    assert np.isfinite(adata.obsm["X_umap"]).all()
    assert adjusted_rand_score(adata.obs["truth"], adata.obs["leiden"]) > 0.9
    assert summary.loc[summary["chosen"], "n_clusters"].item() >= 8


def marker_data(n_cells: int = 300, seed: int = 0) -> ad.AnnData:
    """Three clusters, each with one planted marker gene (G0, G1, G2)."""
    rng = np.random.default_rng(seed)
    n_genes = 60
    cluster = rng.integers(0, 3, n_cells)
    lam = np.full((n_cells, n_genes), 2.0)
    lam[np.arange(n_cells), cluster] = 30.0
    counts = sp.csr_matrix(rng.poisson(lam).astype(np.float32))
    adata = ad.AnnData(
        X=counts,
        obs=pd.DataFrame(
            {"leiden": pd.Categorical(cluster.astype(str))}, index=[f"c{i}" for i in range(n_cells)]
        ),
        var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]),
    )
    adata.layers["counts"] = counts.copy()
    return adata


def test_cluster_markers_recovers_planted_genes():
    adata = marker_data()
    with pytest.raises(ValueError, match="raw counts"):
        cl.cluster_markers(adata)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    markers = cl.cluster_markers(adata, n_marker_genes=5)
    assert list(markers.columns) == [
        "cluster",
        "rank",
        "gene",
        "score",
        "logfoldchange",
        "pval",
        "pval_adj",
        "pct_in_cluster",
        "pct_out_cluster",
    ]
    assert len(markers) == 15
    top = markers[markers["rank"] == 1].set_index("cluster")["gene"]
    assert top.to_dict() == {"0": "G0", "1": "G1", "2": "G2"}
    assert (markers.loc[markers["rank"] == 1, "logfoldchange"] > 2).all()
    assert "rank_genes_leiden" in adata.uns
    with pytest.raises(KeyError, match="missing_column"):
        cl.cluster_markers(adata, groupby="missing_column")


def test_cluster_markers_equal_scanpy_without_calling_it(monkeypatch):
    """The sparse Wilcoxon gives scanpy's numbers (scores, p-values, fold changes, detection
    rates, gene order) in scanpy's uns layout, without running sc.tl.rank_genes_groups."""
    rng = np.random.default_rng(3)
    n_cells, n_genes = 700, 60
    groups = rng.integers(0, 4, n_cells)
    groups[:1] = 9  # a one-cell group: not tested, but part of every "rest"
    lam = rng.gamma(0.6, 1.0, (5, n_genes))
    lam[0, :5] *= 6
    counts = rng.poisson(lam[np.minimum(groups, 4)]).astype(np.float32)
    counts[rng.random(counts.shape) < 0.3] = 0
    x = sp.csr_matrix(counts)
    x.data[:5] = 0  # stored zeros tie with the implicit ones
    obs = pd.DataFrame(
        {"leiden": pd.Categorical(groups.astype(str))}, index=[f"c{i}" for i in range(n_cells)]
    )
    ref = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]))
    sc.pp.log1p(ref)
    fast = ref.copy()
    sc.tl.rank_genes_groups(
        ref,
        "leiden",
        groups=["0", "1", "2", "3"],
        method="wilcoxon",
        use_raw=False,
        n_genes=8,
        pts=True,
        key_added="ref",
    )

    def refuse(*args, **kwargs):
        raise AssertionError("scanpy's rank_genes_groups ran")

    monkeypatch.setattr(sc.tl, "rank_genes_groups", refuse)
    got = cl.cluster_markers(fast, n_marker_genes=8)
    assert len(got) == 4 * 8
    want = sc.get.rank_genes_groups_df(ref, group=None, key="ref")
    have = sc.get.rank_genes_groups_df(fast, group=None, key="rank_genes_leiden")
    assert list(have["group"]) == list(want["group"])
    assert list(have["names"]) == list(want["names"])
    for col in ("scores", "logfoldchanges", "pvals", "pvals_adj", "pct_nz_group"):
        np.testing.assert_allclose(have[col], want[col], rtol=1e-6, atol=1e-12, err_msg=col)
    np.testing.assert_allclose(
        fast.uns["rank_genes_leiden"]["pts_rest"]["2"], ref.uns["ref"]["pts_rest"]["2"]
    )


def test_leiden_reuses_one_graph_and_matches_scanpy(monkeypatch):
    """Every Leiden run and modularity on a kNN graph share one igraph graph (scanpy builds
    it again per call), and the partition is the one sc.tl.leiden gives for the same seed."""
    adata = blobs(n_cells=500)
    sc.pp.neighbors(adata, use_rep="X_pca", n_neighbors=15, random_state=0)
    sc.tl.leiden(
        adata, resolution=0.8, random_state=4, flavor="igraph", n_iterations=2, directed=False
    )
    got = cl_leiden._run_leiden(
        adata.obsp["connectivities"], 0.8, 4, n_iterations=2, flavor="igraph"
    )
    assert adjusted_rand_score(adata.obs["leiden"], got) == 1.0
    assert np.array_equal(adata.obs["leiden"].astype(int).to_numpy(), got)

    builds = []
    real = cl_leiden._igraph
    monkeypatch.setattr(cl_leiden, "_igraph", lambda adj: builds.append(1) or real(adj))
    monkeypatch.setattr(
        sc._utils, "get_igraph_from_adjacency", lambda *a, **k: pytest.fail("scanpy graph build")
    )
    summary = cl.leiden_multi(
        adata,
        use_rep="X_pca",
        resolutions=(0.5, 1.0),
        resolution=1.0,
        n_stability_runs=2,
        umap=False,
    )
    assert len(builds) == 1  # leiden_multi's graph serves its summary too
    assert summary["stability_ari"].notna().all()


def test_cluster_figures(tmp_path):
    adata = blobs(n_cells=300)
    summary = cl.leiden_multi(
        adata,
        use_rep="X_pca",
        resolutions=(0.2, 0.6, 1.0),
        resolution=0.6,
        n_stability_runs=1,
        umap_maxiter=30,
    )
    p1 = savefig(pl_cl.resolutions(summary), tmp_path / "res.png")
    p2 = savefig(pl_cl.umaps(adata, case="sepsis", control="control"), tmp_path / "umap.png")
    assert p1.stat().st_size > 5_000 and p2.stat().st_size > 5_000
    del adata.obsm["X_umap"]
    with pytest.raises(KeyError, match="X_umap"):
        pl_cl.umaps(adata)


# --------------------------------------------------------------------------------------
# steps of leiden_multi and cluster_markers
# --------------------------------------------------------------------------------------


def test_clusters_by_size_names_the_largest_zero():
    labels = np.array([2, 2, 2, 0, 1, 1, 0, 1, 1])
    out = cl_leiden._clusters_by_size(labels)
    assert list(out.categories) == ["0", "1", "2"]
    assert list(out) == ["1", "1", "1", "2", "0", "0", "2", "0", "0"]  # ties keep label order


def test_resolve_rep_accepts_method_names():
    adata = ad.AnnData(np.zeros((3, 2)))
    adata.obsm["X_harmony"] = np.zeros((3, 2))
    assert cl_leiden._resolve_rep(adata, "harmony") == "X_harmony"
    assert cl_leiden._resolve_rep(adata, "X_harmony") == "X_harmony"
    with pytest.raises(KeyError, match="X_scVI"):
        cl_leiden._resolve_rep(adata, "scvi")


def test_rank_sum_test_matches_scipy_mannwhitney():
    from scipy.stats import mannwhitneyu, rankdata

    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 30), rng.normal(0, 1, 50)
    ranks = rankdata(np.r_[a, b])
    z, p, p_adj = cl_markers._rank_sum_test(np.array([ranks[:30].sum()]), 30.0, 50.0, 80)
    ref = mannwhitneyu(a, b, use_continuity=False, method="asymptotic")
    assert z[0] > 0 and np.isclose(p[0], ref.pvalue) and np.isclose(p_adj[0], p[0])


def test_marker_groups_skip_singletons():
    adata = ad.AnnData(np.zeros((5, 2)))
    adata.obs["g"] = ["a", "a", "b", "b", "c"]
    groups, skipped = cl_markers._marker_groups(adata, "g")
    assert groups == ["a", "b"] and skipped == ["c"]
    assert isinstance(adata.obs["g"].dtype, pd.CategoricalDtype)
    adata.obs["g"] = ["a", "a", "a", "a", "c"]
    with pytest.raises(ValueError, match="at least two groups"):
        cl_markers._marker_groups(adata, "g")


# --------------------------------------------------------------------------------------
# markers streamed from the file in gene blocks
# --------------------------------------------------------------------------------------


def streamed_marker_file(tmp_path) -> tuple[ad.AnnData, object]:
    """Log-normalised marker_data (four clusters, one of a single cell, which is not
    tested, and some stored zeros) in memory and written to an .h5ad."""
    adata = marker_data(n_cells=430, seed=5)
    cluster = adata.obs["leiden"].astype(str).to_numpy()
    cluster[7] = "3"  # a one-cell cluster: skipped by _marker_groups, part of every "rest"
    adata.obs["leiden"] = pd.Categorical(cluster)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.X.data[:11] = 0  # stored zeros tie with the implicit ones
    path = tmp_path / "clustered.h5ad"
    adata.write_h5ad(path)
    return adata, path


def test_cluster_markers_streamed_equals_in_memory(tmp_path):
    adata, path = streamed_marker_file(tmp_path)
    want = cl.cluster_markers(adata, n_marker_genes=7)
    light = store.read(path)
    assert light.X is None
    # 37 genes per block leaves a short last block of 60; 150 rows a short last chunk of 430
    got = cl.cluster_markers(
        light,
        counts=store.FileCounts(path, "X"),
        n_marker_genes=7,
        genes_per_block=37,
        chunk_rows=150,
    )
    assert set(got["cluster"]) == {"0", "1", "2"}  # the one-cell cluster is not tested
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-12, atol=0)
    have, ref = light.uns["rank_genes_leiden"], adata.uns["rank_genes_leiden"]
    assert set(have) == set(ref) and have["params"] == ref["params"]
    for k in ("names", "scores", "logfoldchanges", "pvals", "pvals_adj"):
        assert have[k].dtype == ref[k].dtype, k
        for g in ref[k].dtype.names:
            if k == "names":
                assert list(have[k][g]) == list(ref[k][g])
            else:
                np.testing.assert_allclose(have[k][g], ref[k][g], rtol=1e-12, atol=0, err_msg=k)
    for k in ("pts", "pts_rest"):
        pd.testing.assert_frame_equal(have[k], ref[k], check_exact=False, rtol=1e-12, atol=0)
    # one block of all genes gives the same again
    again = cl.cluster_markers(
        store.read(path), counts=store.FileCounts(path, "X"), n_marker_genes=7, genes_per_block=1000
    )
    pd.testing.assert_frame_equal(again, want, check_exact=False, rtol=1e-12, atol=0)


def test_cluster_markers_streamed_never_reads_the_whole_matrix(tmp_path, monkeypatch):
    """With every whole-matrix read refused, the streamed markers still come out, reading one
    full row chunk (the raw-counts check) and otherwise only a block's columns at a time."""
    adata, path = streamed_marker_file(tmp_path)
    want = cl.cluster_markers(adata, n_marker_genes=5)

    def refuse(*args, **kwargs):
        raise AssertionError("the whole matrix was read")

    real_read, real_iter = store.read, store.iter_rows
    seen = []

    def read(*args, X=False, layers=(), **kwargs):
        if X or layers:
            refuse()
        return real_read(*args, X=X, layers=layers, **kwargs)

    def iter_rows(*args, genes=None, **kwargs):
        for start, stop, chunk in real_iter(*args, genes=genes, **kwargs):
            seen.append((genes is None, chunk.shape))
            yield start, stop, chunk

    light = store.read(path)
    counts = store.FileCounts(path, "X")
    monkeypatch.setattr(ad, "read_h5ad", refuse)
    monkeypatch.setattr(ad.io, "read_h5ad", refuse)
    monkeypatch.setattr(store, "read", read)
    monkeypatch.setattr(store, "_read_matrix", refuse)
    monkeypatch.setattr(store, "iter_rows", iter_rows)
    got = cl.cluster_markers(
        light, counts=counts, n_marker_genes=5, genes_per_block=37, chunk_rows=150
    )
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-12, atol=0)
    whole = [shape for all_genes, shape in seen if all_genes]
    assert whole == [(150, 60)]  # the first chunk only, for the raw-counts check
    assert max(shape[1] for all_genes, shape in seen if not all_genes) == 37
    assert max(shape[0] for _, shape in seen) == 150


def test_cluster_markers_streamed_checks_its_input(tmp_path):
    adata, path = streamed_marker_file(tmp_path)
    light = store.read(path)
    counts = store.FileCounts(path, "X")
    with pytest.raises(KeyError, match="missing_column"):
        cl.cluster_markers(light, counts=counts, groupby="missing_column")
    with pytest.raises(ValueError, match="raw counts"):
        cl.cluster_markers(light, counts=store.FileCounts(path, "layers/counts"))
    with pytest.raises(ValueError, match="other genes"):
        cl.cluster_markers(light[:, ::-1].copy(), counts=counts)
