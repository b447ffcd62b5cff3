"""Tests for sepsis_sc.integrate: HVGs, accelerator, scVI / PCA / Harmony, scib-style metrics."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from conftest import shared_file

from sepsis_sc import integrate as ig
from sepsis_sc import store
from sepsis_sc.config import IntegrationSettings
from sepsis_sc.integrate import metrics as ig_metrics
from sepsis_sc.integrate import scvi as ig_scvi
from sepsis_sc.pl import integrate as pl_ig
from sepsis_sc.pl.style import savefig

logging.getLogger("lightning").setLevel(logging.WARNING)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def toy_counts(
    n_cells: int = 300,
    n_genes: int = 200,
    n_types: int = 3,
    n_batches: int = 2,
    batch_shift: float = 2.0,
    seed: int = 0,
) -> ad.AnnData:
    """Counts with planted cell types (20 marker genes each) and a multiplicative batch effect."""
    rng = np.random.default_rng(seed)
    cell_type = rng.integers(0, n_types, n_cells)
    batch = rng.integers(0, n_batches, n_cells)
    base = rng.gamma(2.0, 0.5, n_genes)
    profile = np.ones((n_types, n_genes))
    for t in range(n_types):
        profile[t, 20 * t : 20 * (t + 1)] = 8.0
    batch_fx = np.exp(rng.normal(0, np.log(batch_shift), (n_batches, n_genes)))
    size = rng.lognormal(0, 0.3, n_cells)[:, None]
    lam = base[None, :] * profile[cell_type] * batch_fx[batch] * size
    counts = sp.csr_matrix(rng.poisson(lam).astype(np.float32))
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical([f"b{b}" for b in batch]),
            "sample_id": pd.Categorical([f"s{b}" for b in batch]),
            "cell_type": pd.Categorical([f"type{t}" for t in cell_type]),
        },
        index=[f"c{i}" for i in range(n_cells)],
    )
    genes = [f"G{i}" for i in range(n_genes)]
    adata = ad.AnnData(X=counts.copy(), obs=obs, var=pd.DataFrame(index=genes))
    adata.var["mt"] = False
    adata.var["ribo"] = False
    adata.var["hb"] = False
    adata.layers["counts"] = counts
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


# ------------------------------------------------------------------ HVGs
def test_select_hvgs_excludes_flagged_genes():
    adata = toy_counts()
    # the marker genes of type0 are the most variable: flag them as mitochondrial
    adata.var.loc[adata.var_names[:20], "mt"] = True
    ig.select_hvgs(adata, n_hvg=50, batch_key="batch")
    hv = adata.var["highly_variable"]
    assert hv.sum() == 50
    assert not hv[adata.var["mt"]].any()
    # type1/type2 markers (unflagged, highly variable) are chosen
    assert hv.iloc[20:60].sum() >= 35
    assert adata.uns["hvg"]["n_excluded"] == 20
    assert np.isnan(adata.var["highly_variable_rank"].iloc[:20]).all()

    ig.select_hvgs(adata, n_hvg=50, batch_key="batch", exclude_flags=())
    assert adata.var["highly_variable"].iloc[:20].sum() >= 15


def test_select_hvgs_needs_raw_counts():
    adata = toy_counts(n_cells=100)
    adata.layers["counts"] = adata.X.copy()  # log-normalised, not counts
    with pytest.raises(ValueError, match="raw counts"):
        ig.select_hvgs(adata, n_hvg=50)
    del adata.layers["counts"]
    with pytest.raises(KeyError, match="counts"):
        ig.select_hvgs(adata, n_hvg=50)


# ------------------------------------------------------------------ HVGs streamed from the file
_HVG_COLUMNS = (
    "highly_variable",
    "highly_variable_rank",
    "highly_variable_nbatches",
    "variances_norm",
)


def _nb_counts(n_cells: int = 3_000, n_genes: int = 1_500, seed: int = 0) -> ad.AnnData:
    """Negative-binomial counts in 3 batches of unequal size (interleaved, so row chunks
    straddle batches), a one-level ``run`` column and mt-/RPS-/HB-flagged genes."""
    from sepsis_sc.qc import flag_genes

    rng = np.random.default_rng(seed)
    batch = rng.choice(["b0", "b1", "b2"], n_cells, p=[0.55, 0.3, 0.15])
    mu = rng.lognormal(-1.0, 1.5, n_genes)
    batch_fx = np.exp(rng.normal(0, 0.4, (3, n_genes)))
    lam = (
        mu[None, :]
        * batch_fx[np.searchsorted(["b0", "b1", "b2"], batch)]
        * rng.lognormal(0, 0.3, n_cells)[:, None]
    )
    counts = sp.csr_matrix(rng.negative_binomial(2.0, 2.0 / (2.0 + lam)).astype(np.float32))
    genes = [f"G{i}" for i in range(n_genes)]
    genes[:6] = ["MT-CO1", "MT-ND1", "RPS3", "RPL10", "RPS27A", "HBB"]
    obs = pd.DataFrame(
        {"batch": pd.Categorical(batch), "run": pd.Categorical(["r1"] * n_cells)},
        index=[f"c{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(X=counts.copy(), obs=obs, var=pd.DataFrame(index=genes))
    adata.layers["counts"] = counts
    flag_genes(adata, organism="human")
    return adata


@pytest.fixture(scope="module")
def hvg_file(tmp_path_factory):
    """(in-memory AnnData, the .h5ad it was written to)."""
    adata = _nb_counts()
    path = tmp_path_factory.mktemp("hvg") / "counts.h5ad"
    adata.write_h5ad(path)
    return adata, path


def _assert_same_hvgs(streamed: ad.AnnData, expected: ad.AnnData) -> None:
    assert [c for c in _HVG_COLUMNS if c in streamed.var] == [
        c for c in _HVG_COLUMNS if c in expected.var
    ]
    assert streamed.var["highly_variable"].tolist() == expected.var["highly_variable"].tolist()
    for col in ("highly_variable_rank", "highly_variable_nbatches"):
        if col in expected.var:
            np.testing.assert_array_equal(streamed.var[col], expected.var[col])  # NaNs too
    np.testing.assert_allclose(
        streamed.var["variances_norm"], expected.var["variances_norm"], rtol=1e-6, atol=0
    )
    assert streamed.uns["hvg"] == expected.uns["hvg"]


@pytest.mark.parametrize(
    "batch_key", ["batch", None, "run"], ids=["3-batches", "no-key", "one-level"]
)
def test_select_hvgs_streamed_equals_select_hvgs(hvg_file, batch_key):
    adata, path = hvg_file
    expected = adata.copy()
    ig.select_hvgs(expected, n_hvg=300, batch_key=batch_key)
    light = store.read(path)
    assert not light.layers and light.X is None
    # 700-cell chunks: every chunk holds cells of all batches, the last one is short
    ig.select_hvgs(
        light,
        counts=store.FileCounts(path, "counts"),
        n_hvg=300,
        batch_key=batch_key,
        chunk_rows=700,
    )
    _assert_same_hvgs(light, expected)
    assert light.var["highly_variable"].sum() == 300
    flagged = (light.var["mt"] | light.var["ribo"] | light.var["hb"]).to_numpy()
    assert flagged.sum() == light.uns["hvg"]["n_excluded"] == 6
    assert light.var["variances_norm"][flagged].isna().all()
    if batch_key == "run":
        assert light.uns["hvg"]["batch_key"] is None and light.uns["hvg"]["n_batches"] == 1
    # the sums are added in scanpy's order: the same to the last bit, not only within 1e-6
    np.testing.assert_array_equal(light.var["variances_norm"], expected.var["variances_norm"])


def test_select_hvgs_streamed_reads_only_chunks(hvg_file, monkeypatch):
    """Nothing reads the whole count layer: reading it raises, and every chunk is small."""
    adata, path = hvg_file
    expected = adata.copy()
    ig.select_hvgs(expected, n_hvg=300, batch_key="batch")
    light = store.read(path)

    def no_whole_matrix(*args, **kwargs):
        raise AssertionError("the whole count matrix was read")

    monkeypatch.setattr(ad, "read_h5ad", no_whole_matrix)
    monkeypatch.setattr(sc, "read_h5ad", no_whole_matrix)
    monkeypatch.setattr(store, "_read_matrix", no_whole_matrix)  # store.read's layers and X
    monkeypatch.setattr(sc.pp, "highly_variable_genes", no_whole_matrix)
    chunks = []
    iter_rows = store.iter_rows

    def recording_iter_rows(*args, **kwargs):
        for start, stop, chunk in iter_rows(*args, **kwargs):
            chunks.append(chunk.shape[0])
            yield start, stop, chunk

    monkeypatch.setattr(store, "iter_rows", recording_iter_rows)
    counts = store.FileCounts(path, "counts")
    ig.select_hvgs(light, counts=counts, n_hvg=300, batch_key="batch", chunk_rows=700)
    _assert_same_hvgs(light, expected)
    assert max(chunks) == 700 and sum(chunks) == 2 * adata.n_obs  # two passes of chunks


def test_select_hvgs_streamed_rejects_what_select_hvgs_rejects(hvg_file, tmp_path):
    adata, _ = hvg_file
    for name, change, match in (
        ("half", lambda c: c * 0.5, "non-integer"),
        ("negative", lambda c: c - c.max() / 2, "negative"),
    ):
        bad = adata[:, :200].copy()
        counts = bad.layers["counts"].copy()
        counts.data = change(counts.data)
        bad.layers["counts"] = counts
        path = tmp_path / f"{name}.h5ad"
        bad.write_h5ad(path)
        with pytest.raises(ValueError, match=match):
            ig.select_hvgs(
                store.read(path), counts=store.FileCounts(path), n_hvg=50, chunk_rows=700
            )
    # a 3-cell batch breaks its LOESS fit: the message of select_hvgs
    tiny = adata[:, :300].copy()
    tiny.obs["batch"] = tiny.obs["batch"].astype(str)
    tiny.obs.iloc[:3, tiny.obs.columns.get_loc("batch")] = "tiny"
    path = tmp_path / "tiny.h5ad"
    tiny.write_h5ad(path)
    for select in (
        lambda: ig.select_hvgs(tiny.copy(), n_hvg=50),
        lambda: ig.select_hvgs(store.read(path), counts=store.FileCounts(path), n_hvg=50),
    ):
        with pytest.raises(ValueError, match="failed: .*merge small batches"):
            select()
    # the light object must be the file's; the layer must be there
    with pytest.raises(ValueError, match="read from that file"):
        ig.select_hvgs(store.read(path), counts=store.FileCounts(hvg_file[1]), n_hvg=50)
    with pytest.raises(KeyError, match="layers/spliced"):
        ig.select_hvgs(store.read(path), counts=store.FileCounts(path, "spliced"), n_hvg=50)


# ------------------------------------------------------------------ accelerator / epochs
def test_resolve_accelerator(monkeypatch):
    import torch

    assert ig.resolve_accelerator("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ig.resolve_accelerator("auto") == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA GPU.*integration.accelerator"):
        ig.resolve_accelerator("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ig.resolve_accelerator("auto") == "cuda"
    assert ig.resolve_accelerator("gpu") == "cuda"
    with pytest.raises(ValueError, match="accelerator must be"):
        ig.resolve_accelerator("tpu")


def test_default_max_epochs_scales_with_cells():
    assert ig.default_max_epochs(1_000) == 400  # small data: capped like scvi-tools
    assert ig.default_max_epochs(25_600) == 100  # 10,000 updates of 256 cells (the default)
    assert ig.default_max_epochs(2_000_000) == 10  # floor
    assert ig.default_max_epochs(12_800, batch_size=128) == 100
    epochs = [ig.default_max_epochs(n) for n in (5_000, 20_000, 80_000, 320_000)]
    assert epochs == sorted(epochs, reverse=True)
    with pytest.raises(ValueError):
        ig.default_max_epochs(0)


# ------------------------------------------------------------------ scVI
def test_run_scvi_writes_latent_record_and_model(tmp_path):
    adata = toy_counts(n_cells=300)
    counts_before = adata.layers["counts"].copy()
    ig.select_hvgs(adata, n_hvg=100, batch_key="batch")
    rec = ig.run_scvi(
        adata,
        batch_key="batch",
        n_latent=8,
        n_hidden=32,
        max_epochs=3,
        seed=1,
        threads=1,
        accelerator="cpu",
        model_dir=tmp_path / "model",
    )
    assert adata.obsm["X_scVI"].shape == (300, 8)
    assert np.isfinite(adata.obsm["X_scVI"]).all()
    rec_uns = adata.uns["integration"]
    assert rec_uns is not None and rec_uns["method"] == "scvi"
    for key in (
        "method",
        "device",
        "epochs_trained",
        "max_epochs",
        "early_stopped",
        "seed",
        "batch_key",
        "n_hvg",
        "elbo_train_final",
        "elbo_validation_final",
        "seconds",
    ):
        assert key in rec, key
    assert rec["device"] == "cpu"
    assert rec["epochs_trained"] == 3 and rec["max_epochs"] == 3
    assert rec["n_hvg"] == 100 and rec["seed"] == 1 and rec["batch_key"] == "batch"
    assert np.isfinite(rec["elbo_train_final"]) and np.isfinite(rec["elbo_validation_final"])
    assert (tmp_path / "model" / "model.pt").exists()
    # raw counts untouched and still sparse
    assert sp.issparse(adata.layers["counts"])
    assert (adata.layers["counts"] != counts_before).nnz == 0


def test_run_scvi_reproducible_on_cpu():
    adata = toy_counts(n_cells=200, n_genes=120)
    ig.select_hvgs(adata, n_hvg=60, batch_key="batch")
    kw = dict(n_latent=5, n_hidden=16, max_epochs=2, threads=1, accelerator="cpu")
    ig.run_scvi(adata, seed=3, **kw)
    first = adata.obsm["X_scVI"].copy()
    ig.run_scvi(adata, seed=3, **kw)
    np.testing.assert_array_equal(first, adata.obsm["X_scVI"])
    ig.run_scvi(adata, seed=4, **kw)
    assert not np.allclose(first, adata.obsm["X_scVI"])


def test_run_scvi_bad_input():
    adata = toy_counts(n_cells=100)
    with pytest.raises(KeyError, match="select_hvgs"):
        ig.run_scvi(adata, max_epochs=1)
    ig.select_hvgs(adata, n_hvg=50)
    with pytest.raises(KeyError, match="donor"):
        ig.run_scvi(adata, categorical_covariates=["donor"], max_epochs=1)


# ------------------------------------------------------------------ PCA / Harmony
def test_run_pca_sparse_equals_dense_scaled_pca():
    adata = toy_counts(n_cells=250)
    ig.select_hvgs(adata, n_hvg=80, batch_key="batch")
    ig.run_pca(adata, n_pcs=10)
    assert adata.obsm["X_pca"].shape == (250, 10)
    assert sp.issparse(adata.X)  # X untouched
    ref = adata[:, adata.var["highly_variable"]].copy()
    ref.X = ref.X.toarray()
    sc.pp.scale(ref, max_value=10)
    sc.pp.pca(ref, n_comps=10, svd_solver="arpack", random_state=0)
    for i in range(5):  # leading PCs agree up to sign
        r = np.corrcoef(adata.obsm["X_pca"][:, i], ref.obsm["X_pca"][:, i])[0, 1]
        assert abs(r) > 0.999, (i, r)
    assert adata.varm["PCs"].shape == (adata.n_vars, 10)
    adata.X = adata.layers["counts"].copy()
    with pytest.raises(ValueError, match="log-normalised"):
        ig.run_pca(adata, n_pcs=10)


def test_harmony_mixes_batches_better_than_pca():
    adata = toy_counts(n_cells=400, batch_shift=2.0, seed=2)
    ig.select_hvgs(adata, n_hvg=100, batch_key="batch")
    key = ig.integrate(adata, method="harmony", batch_key="batch", n_pcs=10, seed=0)
    assert key == "X_harmony" and adata.obsm["X_harmony"].shape == (400, 10)
    assert adata.uns["integration"]["method"] == "harmony"
    tab = ig.integration_metrics(
        adata, embed_keys=["X_pca", "X_harmony"], batch_key="batch", label_key="cell_type"
    ).set_index("embedding")
    assert tab.loc["X_harmony", "ilisi"] > tab.loc["X_pca", "ilisi"] + 0.2
    assert tab.loc["X_harmony", "ari"] > 0.8  # cell types kept


def test_integrate_dispatcher():
    adata = toy_counts(n_cells=150)
    assert ig.integrate(adata, method="pca", n_pcs=5, n_hvg=60) == "X_pca"
    assert adata.var["highly_variable"].sum() == 60
    assert adata.uns["integration"]["method"] == "pca"
    with pytest.raises(ValueError, match="integration.method"):
        ig.integrate(adata, method="bbknn")


# ------------------------------------------------------------------ metrics
def test_lisi_extremes():
    # 1-D points: neighbours of each cell at equal distances
    n, k = 60, 9
    idx = np.array([[(i + j) % n for j in range(1, k + 1)] for i in range(n)])
    dist = np.ones((n, k))
    same = np.zeros(n, dtype=int)
    np.testing.assert_allclose(ig.lisi(dist, idx, same), 1.0)
    alternating = np.arange(n) % 3  # neighbours split evenly over 3 labels
    np.testing.assert_allclose(ig.lisi(dist, idx, alternating), 3.0, rtol=1e-6)


def _embedding_toy(offset: float, n: int = 400, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    batches = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, 5))
    x[:, 0] += 10 * labels  # two well separated cell types
    x[:, 1] += offset * batches  # batch effect
    obs = pd.DataFrame(
        {"batch": [f"b{b}" for b in batches], "label": [f"l{v}" for v in labels]},
        index=[f"c{i}" for i in range(n)],
    )
    return ad.AnnData(obs=obs, obsm={"X_emb": x.astype(np.float32)})


def test_metrics_direction_separated_vs_mixed():
    mixed = ig.integration_metrics(
        _embedding_toy(0.0), embed_keys=["X_emb"], batch_key="batch", label_key="label"
    ).iloc[0]
    separated = ig.integration_metrics(
        _embedding_toy(30.0), embed_keys=["X_emb"], batch_key="batch", label_key="label"
    ).iloc[0]
    assert mixed["ilisi"] > 0.8 and separated["ilisi"] < 0.05
    assert mixed["batch_asw"] > 0.9 and separated["batch_asw"] < 0.3
    # cell types stay locally pure in both
    assert mixed["clisi"] > 0.95 and separated["clisi"] > 0.95
    assert mixed["label_asw"] > 0.7 and mixed["ari"] > 0.95 and mixed["nmi"] > 0.9
    # each cell type split into one island per batch: graph connectivity drops
    assert mixed["graph_connectivity"] > 0.95 and separated["graph_connectivity"] < 0.7
    assert mixed["batch_correction"] > separated["batch_correction"]
    cols = {"embedding", "ilisi", "clisi", "batch_asw", "label_asw", "graph_connectivity"}
    assert cols <= set(mixed.index)


def test_metrics_without_labels_and_subsampling():
    adata = _embedding_toy(0.0, n=300)
    tab = ig.integration_metrics(
        adata, embed_keys=["X_emb"], batch_key="batch", max_cells_silhouette=100
    )
    row = tab.iloc[0]
    assert 0 <= row["ilisi"] <= 1 and 0 <= row["batch_asw"] <= 1
    assert np.isnan(row["clisi"]) and np.isnan(row["ari"])
    with pytest.raises(KeyError, match="X_missing"):
        ig.integration_metrics(adata, embed_keys=["X_missing"], batch_key="batch")
    with pytest.raises(KeyError, match="nonexistent"):
        ig.integration_metrics(adata, embed_keys=["X_emb"], batch_key="nonexistent")


def test_metric_and_umap_figures(tmp_path):
    adata = _embedding_toy(5.0, n=200)
    adata.obsm["X_other"] = adata.obsm["X_emb"][:, ::-1].copy()
    tab = ig.integration_metrics(
        adata, embed_keys=["X_emb", "X_other"], batch_key="batch", label_key="label"
    )
    p1 = savefig(pl_ig.metrics(tab), tmp_path / "metrics.png")
    fig = pl_ig.embedding_umaps(
        adata,
        embed_keys=["X_emb", "X_other"],
        batch_key="batch",
        label_key="label",
    )
    p2 = savefig(fig, tmp_path / "umaps.png")
    assert p1.stat().st_size > 5_000 and p2.stat().st_size > 5_000
    assert "X_umap" not in adata.obsm  # the figure does not modify the object


# ------------------------------------------------------------------ one batch level
_FAST_LEIDEN = (0.5, 1.0)


def test_one_batch_hvg_scvi_harmony_pca_metrics_and_figures(tmp_path):
    """One sequencing run: no batch correction anywhere, bio metrics kept, figures render."""
    adata = toy_counts(n_cells=300, n_genes=150, n_batches=1)
    assert adata.obs["batch"].nunique() == 1
    # HVGs: chosen without a batch key (same genes as batch_key=None), and recorded
    ig.select_hvgs(adata, n_hvg=80, batch_key=None)
    no_key = adata.var["highly_variable"].copy()
    ig.select_hvgs(adata, n_hvg=80, batch_key="batch")
    assert adata.var["highly_variable"].equals(no_key)
    hvg = adata.uns["hvg"]
    assert hvg["batch_key"] is None and hvg["batch_key_requested"] == "batch"
    assert hvg["n_batches"] == 1 and "one batch level" in hvg["note"]

    # scVI: no batch covariate (same latent space as batch_key=None), recorded
    kw = dict(n_latent=5, n_hidden=16, max_epochs=2, threads=1, accelerator="cpu", seed=2)
    ig.run_scvi(adata, batch_key=None, **kw)
    no_batch = adata.obsm["X_scVI"].copy()
    assert ig.integrate(adata, method="scvi", batch_key="batch", **kw) == "X_scVI"
    np.testing.assert_array_equal(adata.obsm["X_scVI"], no_batch)
    rec = adata.uns["integration"]
    assert rec["batch_key"] is None and rec["batch_key_requested"] == "batch"
    assert rec["batch_corrected"] is False and rec["n_batches"] == 1
    assert "no batch correction" in rec["note"]

    assert ig.integrate(adata, method="pca", batch_key="batch", n_pcs=10) == "X_pca"
    # Harmony as a comparison: skipped (it would equal PCA), nothing written to obsm
    assert (
        ig.integrate(adata, method="harmony", batch_key="batch", n_pcs=10, comparison=True) is None
    )
    assert "X_harmony" not in adata.obsm
    rec = adata.uns["integration"]
    assert rec["skipped"] is True and rec["batch_corrected"] is False
    assert rec["note"].startswith(ig.ONE_BATCH_NOTE)
    harmony_note = rec["note"]

    tab = ig.integration_metrics(
        adata,
        embed_keys=["X_scVI", "X_pca"],
        batch_key="batch",
        label_key="cell_type",
        leiden_resolutions=_FAST_LEIDEN,
        skipped={"X_harmony": harmony_note},
    ).set_index("embedding")
    assert list(tab.index) == ["X_scVI", "X_pca", "X_harmony"]
    assert (tab["n_batches"] == 1).all()
    batch_terms = ["ilisi", "batch_asw", "graph_connectivity", "batch_correction", "overall"]
    assert tab[batch_terms].isna().all().all()
    bio = tab.loc[["X_scVI", "X_pca"], ["clisi", "label_asw", "nmi", "ari", "bio_conservation"]]
    assert ((bio >= 0) & (bio <= 1)).all().all()
    assert tab.loc["X_pca", "ari"] > 0.8  # planted cell types recovered without a batch
    assert tab["note"].str.startswith("skipped: one batch level").all()
    assert "iLISI" in tab.loc["X_pca", "note"] and tab.loc["X_harmony", "note"] == harmony_note
    assert tab.loc["X_harmony", ["clisi", "ari"]].isna().all()

    p1 = savefig(pl_ig.metrics(tab.reset_index()), tmp_path / "metrics.png")
    fig = pl_ig.embedding_umaps(
        adata,
        embed_keys=["X_scVI", "X_pca"],
        batch_key="batch",
        label_key="cell_type",
    )
    p2 = savefig(fig, tmp_path / "umaps.png")
    assert p1.stat().st_size > 5_000 and p2.stat().st_size > 5_000
    notes = pl_ig._metric_notes(tab.reset_index(), ["clisi", "label_asw", "nmi", "ari"])
    assert len(notes) == 2 and notes[1].startswith("Harmony: skipped")


def test_one_batch_harmony_downstream_is_pca_with_warning(caplog):
    adata = toy_counts(n_cells=200, n_genes=120, n_batches=1)
    ig.select_hvgs(adata, n_hvg=60, batch_key="batch")
    with caplog.at_level(logging.WARNING, logger="sepsis_sc.integrate"):
        key = ig.integrate(adata, method="harmony", batch_key="batch", n_pcs=8, seed=0)
    assert key == "X_harmony"
    np.testing.assert_array_equal(adata.obsm["X_harmony"], adata.obsm["X_pca"][:, :8])
    rec = adata.uns["integration"]
    assert rec["method"] == "harmony" and rec["batch_corrected"] is False
    assert "PCA embedding" in rec["note"]
    assert any("nothing to correct" in r.getMessage() for r in caplog.records)


def test_one_sample_as_batch_key_without_labels(tmp_path):
    """batch_key sample_id with one sample, no known labels: every metric skipped, noted."""
    adata = toy_counts(n_cells=200, n_genes=120, n_batches=1)
    ig.select_hvgs(adata, n_hvg=60, batch_key="sample_id")
    assert adata.uns["hvg"]["batch_key"] is None
    ig.run_pca(adata, n_pcs=8)
    ig.run_harmony(adata, batch_key="sample_id", n_pcs=8)
    tab = ig.integration_metrics(adata, embed_keys=["X_pca", "X_harmony"], batch_key="sample_id")
    metric_cols = ["ilisi", "batch_asw", "graph_connectivity", "clisi", "label_asw", "nmi", "ari"]
    assert tab[metric_cols].isna().all().all()
    assert tab["note"].str.contains("one batch level \\('s0' in obs\\['sample_id'\\]\\)").all()
    path = savefig(pl_ig.metrics(tab), tmp_path / "metrics.png")  # notes only, no error
    assert path.stat().st_size > 3_000
    with pytest.raises(ValueError, match="no metric columns"):  # no values and no notes
        pl_ig.metrics(tab.drop(columns="note"))


def test_one_batch_bio_metrics_equal_multi_batch_ones():
    """The biology terms do not depend on the batches: same values with one batch level."""
    adata = _embedding_toy(5.0, n=200)
    two = ig.integration_metrics(
        adata,
        embed_keys=["X_emb"],
        batch_key="batch",
        label_key="label",
        leiden_resolutions=_FAST_LEIDEN,
    ).iloc[0]
    assert "note" not in two.index  # multi-batch table: no note column
    adata.obs["batch"] = "b0"
    one = ig.integration_metrics(
        adata,
        embed_keys=["X_emb"],
        batch_key="batch",
        label_key="label",
        leiden_resolutions=_FAST_LEIDEN,
    ).iloc[0]
    for col in ("clisi", "label_asw", "nmi", "ari", "bio_conservation", "leiden_resolution"):
        assert one[col] == pytest.approx(two[col]), col
    assert np.isnan(one["ilisi"]) and np.isnan(one["graph_connectivity"])
    assert one["note"].startswith(ig.ONE_BATCH_NOTE)


def test_rule_scripts_with_one_batch(tmp_path, monkeypatch):
    """The integrate and integration_metrics rule scripts run with a one-batch cohort."""
    import runpy
    from types import SimpleNamespace

    import yaml

    import sepsis_sc.utils

    monkeypatch.setattr(sepsis_sc.utils, "setup_logging", lambda *a, **k: None)
    scripts = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
    adata = toy_counts(n_cells=200, n_genes=120, n_batches=1)
    adata.write_h5ad(tmp_path / "merged.h5ad")
    cfg = dict(
        n_hvg=200,  # the schema's minimum (the script validates the section): all 120 genes
        batch_key="batch",
        categorical_covariates=[],
        continuous_covariates=[],
        n_latent=5,
        max_epochs=2,
        early_stopping=True,
        batch_size=256,
        accelerator="cpu",
        n_pcs=8,
    )
    methods = ["scvi", "pca", "harmony"]
    out = tmp_path / "integrate"
    smk = SimpleNamespace(
        input=[str(tmp_path / "merged.h5ad")],
        output=SimpleNamespace(
            h5ad=str(out / "integrated.h5ad"),
            model=str(out / "scvi_model"),
            record=str(out / "integration.yaml"),
        ),
        log=[str(tmp_path / "integrate.log")],
        threads=1,
        params=SimpleNamespace(
            integration=cfg, methods=methods, seed=0, counts_layer="soupx_counts"
        ),
    )
    runpy.run_path(str(scripts / "integrate.py"), init_globals={"snakemake": smk})
    record = yaml.safe_load((out / "integration.yaml").read_text())
    assert record["method"] == "scvi" and record["batch_corrected"] is False
    assert record["runs"]["harmony"]["skipped"] is True
    integrated = ad.read_h5ad(out / "integrated.h5ad")
    assert "X_harmony" not in integrated.obsm and "X_scVI" in integrated.obsm

    smk = SimpleNamespace(
        input=SimpleNamespace(h5ad=str(out / "integrated.h5ad"), labels=[]),
        output=SimpleNamespace(
            table=str(out / "metrics.tsv"),
            figure=str(out / "figures" / "integration_metrics.png"),
            umaps=str(out / "figures" / "umap_by_batch.png"),
        ),
        log=[str(tmp_path / "metrics.log")],
        params=SimpleNamespace(
            methods=methods,
            integration=cfg,
            label_key="cell_type",
            label_title=None,
            n_neighbors=15,
            seed=0,
        ),
    )
    runpy.run_path(str(scripts / "integration_metrics.py"), init_globals={"snakemake": smk})
    tab = pd.read_csv(out / "metrics.tsv", sep="\t").set_index("embedding")
    assert list(tab.index) == ["X_scVI", "X_pca", "X_harmony"]
    assert tab["ilisi"].isna().all() and tab.loc["X_pca", "ari"] > 0.5
    assert tab["note"].str.startswith("skipped: one batch level").all()
    for name in ("integration_metrics.png", "umap_by_batch.png"):
        assert (out / "figures" / name).stat().st_size > 5_000


# ------------------------------------------------------------------ real data
@pytest.mark.realdata
def test_kang_condition_as_batch_metrics():
    adata = ad.read_h5ad(shared_file("kang_ifnb_harmony.h5ad"))
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    ig.select_hvgs(adata, n_hvg=1500, batch_key="stim")
    ig.run_pca(adata, n_pcs=30)
    ig.run_harmony(adata, batch_key="stim", n_pcs=30, seed=0)
    ig.run_scvi(adata, batch_key="stim", max_epochs=3, threads=1, batch_size=256, seed=0)
    tab = ig.integration_metrics(
        adata, embed_keys=["X_pca", "X_harmony", "X_scVI"], batch_key="stim"
    ).set_index("embedding")
    metrics = tab[["ilisi", "batch_asw"]]
    assert ((metrics >= 0) & (metrics <= 1)).all().all()
    # the IFN-beta response separates ctrl and stim in PCA; Harmony mixes them
    assert tab.loc["X_pca", "ilisi"] < 0.2
    assert tab.loc["X_harmony", "ilisi"] > 0.6
    assert tab.loc["X_harmony", "batch_asw"] > tab.loc["X_pca", "batch_asw"]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_torch_keeps_its_own_openmp_after_numba_parallel_code():
    """Importing sepsis_sc.integrate loads torch before numba's OpenMP pool starts.

    If numba's parallel code runs first, torch binds to the system libgomp that numba loaded
    and scVI trains 2-2.5x slower on CPU (4.2 vs 1.9 s per epoch measured on 2 cores).
    """
    import subprocess
    import sys

    code = """
import sepsis_sc.integrate
import numba, numpy as np

@numba.njit(parallel=True)
def f(x):
    s = 0.0
    for i in numba.prange(x.size):
        s += x[i]
    return s

f(np.ones(1000))
layer = numba.threading_layer()
import os, torch
maps = open("/proc/self/maps").read()
ships = any(p.startswith("libgomp") for p in os.listdir(os.path.join(os.path.dirname(torch.__file__), "lib")))
print(layer, "torch/lib/libgomp" in maps, ships)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    layer, torch_gomp_mapped, torch_ships_gomp = out.stdout.split()
    if layer != "omp" or torch_ships_gomp != "True":
        pytest.skip(f"numba threading layer {layer}; torch ships libgomp: {torch_ships_gomp}")
    assert torch_gomp_mapped == "True"


# --------------------------------------------------------------------------------------
# IntegrationSettings and the steps of run_scvi / integration_metrics
# --------------------------------------------------------------------------------------
#: keys of the ``integration`` config section that are not scVI settings
_NOT_SCVI = {"method", "compare", "metrics", "batch_key", "n_hvg", "n_pcs"} | {
    "metrics_label_key",
    "metrics_labels",
}


def test_scviparams_defaults_are_the_schema_defaults():
    from sepsis_sc.config import load_schema

    section = load_schema("config")["properties"]["integration"]["properties"]
    params = IntegrationSettings()
    checked = []
    for key, spec in section.items():
        if key in _NOT_SCVI:
            continue
        value = getattr(params, key)
        assert (list(value) if isinstance(value, tuple) else value) == spec["default"], key
        checked.append(key)
    # covariates x2, n_latent, n_layers, n_hidden, gene_likelihood, max_epochs,
    # early_stopping (+min_improvement, +patience), train_size, batch_size, accelerator
    assert len(checked) == 13
    assert IntegrationSettings.from_config({k: v["default"] for k, v in section.items()}) == params


def test_scviparams_from_config_and_overrides():
    p = IntegrationSettings.from_config(
        {"n_latent": 8, "method": "scvi", "continuous_covariates": ["x"]}
    )
    assert p.n_latent == 8 and p.continuous_covariates == ("x",)
    with pytest.raises(ValueError, match="'integration.n_latnet' is not a known option"):
        IntegrationSettings.from_config({"n_latnet": 8})
    assert p.with_overrides({"max_epochs": 3}).max_epochs == 3
    with pytest.raises(TypeError, match="max_epoch"):
        p.with_overrides({"max_epoch": 3})
    adata = toy_counts()
    with pytest.raises(TypeError, match="max_epoch"):
        ig.run_scvi(adata, max_epoch=3)


def test_scvi_steps():
    p = IntegrationSettings(categorical_covariates=["donor"], continuous_covariates=("pct",))
    assert ig_scvi._scvi_obs_keys("batch", p) == ["batch", "donor", "pct"]
    assert ig_scvi._scvi_obs_keys(None, p) == ["donor", "pct"]
    assert ig_scvi._scvi_max_epochs(IntegrationSettings(max_epochs=7), 1000) == 7
    assert ig_scvi._scvi_max_epochs(IntegrationSettings(), 1000) == ig.default_max_epochs(1000)
    with pytest.raises(ValueError, match="max_epochs must be >= 1"):
        ig_scvi._scvi_max_epochs(IntegrationSettings(max_epochs=0), 1000)
    history = {"elbo_train": pd.DataFrame({"elbo_train": [3.0, 2.0]})}
    assert ig_scvi._history_last(history, "elbo_train") == 2.0
    assert ig_scvi._history_last(history, "elbo_validation") is None
    adata = ad.AnnData(obs=pd.DataFrame({"batch": ["a"] * 4}, index=list("wxyz")))
    key, one = ig_scvi._scvi_batch_key(adata, "batch")
    assert key is None and one["batch_corrected"] is False and one["n_batches"] == 1
    adata.obs["batch"] = ["a", "b"] * 2
    assert ig_scvi._scvi_batch_key(adata, "batch") == ("batch", {})


def test_metric_summary_scores_and_table():
    cells = ig_metrics._MetricCells(
        batches=np.array(["a", "b"]),
        n_batches=2,
        batch_note=None,
        labels=None,
        n_labels=0,
        sub=np.arange(2),
    )
    row = {
        "ilisi": 0.5,
        "batch_asw": 0.7,
        "graph_connectivity": np.nan,
        "clisi": np.nan,
        "label_asw": np.nan,
        "nmi": np.nan,
        "ari": np.nan,
    }
    ig_metrics._summary_scores(row, cells)
    assert row["batch_correction"] == pytest.approx(0.6)
    assert np.isnan(row["bio_conservation"]) and np.isnan(row["overall"]) and "note" not in row
    table = ig_metrics._metrics_table([{"embedding": "X_pca", **row}])
    assert list(table.columns) == list(ig_metrics._METRIC_COLUMNS)
    skipped = ig_metrics._skipped_rows({"X_harmony": "why"}, 10, cells)
    table = ig_metrics._metrics_table([{"embedding": "X_pca", **row}, *skipped])
    assert table.columns[-1] == "note" and table["note"].tolist()[1] == "why"


def test_plateau_stopping_on_the_smoothed_validation_loss():
    """plateau_stopping stops once the 5-epoch mean of the validation loss fell by less than
    min_improvement (relative) over `patience` epochs, and not while it still falls; a noisy
    new best does not restart it (scvi-tools' rule would)."""
    from types import SimpleNamespace

    import torch

    def run(losses, **kw):
        cb = ig.plateau_stopping(**kw)
        trainer = SimpleNamespace(
            sanity_checking=False, should_stop=False, current_epoch=0, callback_metrics={}
        )
        for epoch, loss in enumerate(losses):
            trainer.current_epoch = epoch
            trainer.callback_metrics = {"elbo_validation": torch.tensor(loss)}
            cb.on_validation_end(trainer, None)
            if trainer.should_stop:
                return epoch + 1
        return None

    rng = np.random.default_rng(0)
    falling = 1000 * np.exp(-np.arange(200) / 20) + 700  # improving > 0.2 % per 10 epochs early on
    stop = run(falling + rng.normal(0, 0.3, 200))  # the defaults: 10-epoch means, 10 apart, 0.2 %
    assert stop is not None and 60 < stop < 200
    then, now = falling[stop - 20 : stop - 10].mean(), falling[stop - 10 : stop].mean()
    assert (then - now) / now < 3e-3  # noise-free fall at the stop: about the threshold
    flat = 700 + rng.normal(0, 0.5, 100)  # noise only: stops as soon as it can judge
    assert run(flat) == 20
    assert run(flat, patience=20, window=5, min_improvement=3e-3) == 25
    assert run(np.linspace(900, 700, 100)) is None  # a steady fall never stops
    with pytest.raises(ValueError, match="patience and window"):
        ig.plateau_stopping(patience=0)


def test_embedding_umaps_name_the_truth_and_share_the_cell_type_colours():
    import anndata as ad
    from matplotlib.colors import to_hex

    from sepsis_sc.pl import integrate as pl_ig
    from sepsis_sc.pl.style import cell_type_palette

    rng = np.random.default_rng(0)
    types = np.repeat(["Classical monocyte", "naive B"], 60)
    emb = rng.normal(size=(120, 5)) + (types == "naive B")[:, None] * 6.0
    obs = pd.DataFrame(
        {"batch": np.tile(["b1", "b2"], 60), "cell_type": types},
        index=[f"c{i}" for i in range(120)],
    )
    adata = ad.AnnData(obs=obs, obsm={"X_pca": emb})
    fig = pl_ig.embedding_umaps(
        adata,
        embed_keys=["X_pca"],
        batch_key="batch",
        label_key="cell_type",
        label_title="simulated truth cell type",
    )
    ax = fig.axes[1]
    assert "simulated truth cell type" in ax.get_title().replace("\n", " ")
    drawn = {to_hex(c) for c in ax.collections[0].get_facecolors()}
    assert drawn == set(cell_type_palette(["Classical monocyte", "naive B"]).values())
