"""Tests for sepsis_sc.annotate: vocabulary, marker files, hierarchical annotation, figures."""

from __future__ import annotations

import importlib.util

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import shared_file

from sepsis_sc import annotate as an
from sepsis_sc.annotate import core as an_core
from sepsis_sc.annotate import lineage as an_lin
from sepsis_sc.annotate import subsets as an_sub
from sepsis_sc.pl import annotate as pl_an
from sepsis_sc.pl.style import savefig
from sepsis_sc.resources import load_yaml, resource_path

VOCAB_LABELS = [
    "CD4 naive T",
    "CD4 memory T",
    "Treg",
    "CD8 naive T",
    "CD8 effector/memory T",
    "MAIT",
    "gamma-delta T",
    "naive T",
    "memory T",
    "T unresolved",
    "NK CD56bright",
    "NK CD56dim",
    "NK unresolved",
    "naive B",
    "memory B",
    "B unresolved",
    "Plasmablast",
    "Classical monocyte",
    "Non-classical monocyte",
    "Monocyte unresolved",
    "cDC1",
    "cDC2",
    "pDC",
    "DC unresolved",
    "Mature neutrophil",
    "Immature neutrophil",
    "TREM2-high macrophage",
    "Macrophage",
    "Platelet",
    "Erythroid",
    "HSPC",
    "Unassigned",
]

# Toy populations: label -> genes expressed at a high rate.
_T = ["CD3D", "CD3E", "CD3G", "TRAC", "TRBC2", "CD2", "LCK", "CD247"]
_POPS = {
    "CD4 naive T": _T + ["CD4", "CCR7", "LEF1", "TCF7", "IL7R", "MAL", "NOSIP", "LDHB"],
    "CD8 effector/memory T": _T + ["CD8A", "CD8B", "CCL5", "GZMH", "GZMK", "NKG7", "CST7"],
    "NK CD56dim": [
        "NKG7",
        "GNLY",
        "KLRD1",
        "KLRF1",
        "PRF1",
        "GZMB",
        "FCGR3A",
        "FCER1G",
        "TYROBP",
        "FGFBP2",
        "SPON2",
        "CD247",
    ],
    "naive B": [
        "MS4A1",
        "CD79A",
        "CD79B",
        "CD19",
        "BANK1",
        "PAX5",
        "CD22",
        "IGHM",
        "IGHD",
        "TCL1A",
        "IL4R",
        "FCER2",
    ],
    "Classical monocyte": [
        "CD14",
        "LYZ",
        "FCN1",
        "VCAN",
        "S100A8",
        "S100A9",
        "CSF1R",
        "CTSS",
        "MNDA",
        "S100A12",
    ],
}
_BACKGROUND = [f"GENE{i}" for i in range(150)]


def _toy(n_per: int = 80, n_empty: int = 20, seed: int = 0, mouse: bool = False) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    markers = sorted({g for gs in _POPS.values() for g in gs})
    genes = markers + _BACKGROUND
    col = {g: i for i, g in enumerate(genes)}
    blocks, labels = [], []
    for label, gs in _POPS.items():
        lam = np.full((n_per, len(genes)), 0.02)
        lam[:, len(markers) :] = 1.0
        lam[:, [col[g] for g in gs]] = 4.0
        blocks.append(rng.poisson(lam))
        labels += [label] * n_per
    # debris-like droplets: background genes only, no marker signal
    lam = np.full((n_empty, len(genes)), 0.02)
    lam[:, len(markers) :] = 1.0
    blocks.append(rng.poisson(lam))
    labels += ["debris"] * n_empty
    X = sp.csr_matrix(np.vstack(blocks).astype(np.float32))
    names = [g.capitalize() if mouse and not g.startswith("GENE") else g for g in genes]
    adata = ad.AnnData(
        X=X.copy(),
        obs=pd.DataFrame(
            {"truth": labels, "cl": [lab.replace(" ", "_") for lab in labels]},
            index=[f"c{i}" for i in range(len(labels))],
        ),
        var=pd.DataFrame(index=names),
    )
    adata.layers["counts"] = X
    return adata


def _mouse_markers() -> dict:
    """Packaged human sets with capitalised symbols, to test the mouse code path on the toy."""
    mk = load_yaml(resource_path("markers", "human.yaml"))

    def cap(sets):
        return [
            {
                **s,
                "up": [g.capitalize() for g in s["up"]],
                "down": [g.capitalize() for g in s["down"]],
                "core": [g.capitalize() for g in s.get("core", [])],
            }
            for s in sets
        ]

    return {"lineage_sets": cap(mk["lineage_sets"]), "subset_sets": cap(mk["subset_sets"])}


# ---------------------------------------------------------------------------------------------
# vocabulary and marker resources
# ---------------------------------------------------------------------------------------------
def test_vocabulary_matches_architecture_contract():
    vocab = an.load_vocabulary()
    assert list(vocab.cell_types.index) == VOCAB_LABELS
    assert list(vocab.lineages.index) == list(an.LINEAGES)
    ct = vocab.cell_types
    expected_cl = {
        "CD4 naive T": "CL:0000895",
        "Treg": "CL:0000815",
        "Classical monocyte": "CL:0000860",
        "Non-classical monocyte": "CL:0000875",
        "pDC": "CL:0000784",
        "Plasmablast": "CL:0000980",
        "NK CD56dim": "CL:0000939",
        "NK CD56bright": "CL:0000938",
        "MAIT": "CL:0000940",
        "gamma-delta T": "CL:0000798",
        "naive B": "CL:0000788",
        "memory B": "CL:0000787",
        "naive T": "CL:0000898",  # issue #32: naive vs memory without CD4 / CD8 genes
        "memory T": "CL:0000813",
    }
    for label, cl in expected_cl.items():
        assert ct.at[label, "cl"] == cl, label
    assert vocab.lineages.at["NK", "cl"] == "CL:0000623"
    # labels without an exact CL term say so and carry the parent term
    assert not ct.at["TREM2-high macrophage", "cl_exact"]
    assert ct.at["TREM2-high macrophage", "cl"] == vocab.lineages.at["Macrophage", "cl"]
    assert ct.at["CD4 naive T", "cl_exact"]
    for label, row in ct.drop(index="Unassigned").iterrows():
        assert row["lineage"] in an.LINEAGES
        assert isinstance(row["definition"], str) and len(row["definition"]) > 10, label


# CL is_a facts (Cell Ontology, checked against the OBO release used by CELLxGENE) that the
# vocabulary's terms rely on: child -> one of its ancestors.
_CL_IS_A = {
    "CL:0000980": "CL:0000946",  # plasmablast is_a antibody secreting cell
    "CL:0000786": "CL:0000946",  # plasma cell is_a antibody secreting cell
    "CL:0000895": "CL:0000624",  # naive CD4 ab T is_a CD4-positive, alpha-beta T cell
    "CL:0000900": "CL:0000625",  # naive CD8 ab T is_a CD8-positive, alpha-beta T cell
    "CL:0000860": "CL:0000576",  # classical monocyte is_a monocyte
    "CL:0000875": "CL:0000576",  # non-classical monocyte is_a monocyte
    "CL:0000938": "CL:0000623",  # CD56-bright NK is_a NK
    "CL:0000939": "CL:0000623",  # CD56-dim NK is_a NK
    "CL:0000784": "CL:0000451",  # pDC is_a dendritic cell
    "CL:0000788": "CL:0000236",  # naive B is_a B cell (via mature B cell)
    "CL:0000787": "CL:0000236",  # memory B is_a B cell (via mature B cell)
    "CL:0000898": "CL:0000084",  # naive T cell is_a T cell (via mature T cell CL:0002419)
    "CL:0000813": "CL:0000084",  # memory T cell is_a T cell (via mature T cell CL:0002419)
}


def test_vocabulary_ontology_parents():
    """Every label's CL term is its lineage's term or a descendant of it (issue #16 item 7)."""
    vocab = an.load_vocabulary()
    ct, lin = vocab.cell_types, vocab.lineages
    assert lin.at["Plasma", "cl"] == "CL:0000946"  # antibody secreting cell, not plasma cell
    assert ct.at["Plasmablast", "cl"] == "CL:0000980"
    for label, row in ct.drop(index="Unassigned").iterrows():
        lin_cl = lin.at[row["lineage"], "cl"]
        assert row["cl"] == lin_cl or lin_cl in row["cl_ancestors"], label
        if row["cl"] in _CL_IS_A:
            assert _CL_IS_A[row["cl"]] in row["cl_ancestors"], label
    # every lineage with more than one subset has a default (program-free or unresolved)
    for lineage in an.LINEAGES:
        if len(vocab.subsets_of(lineage)) > 1:
            assert lin.at[lineage, "default_subset"] is not None, lineage
    for lineage in ("T", "B", "DC"):
        d = lin.at[lineage, "default_subset"]
        assert d == f"{lineage} unresolved" and ct.at[d, "cl"] == lin.at[lineage, "cl"]


def test_vocabulary_rejects_subset_outside_lineage_term(tmp_path):
    import copy

    raw = copy.deepcopy(load_yaml(resource_path("cell_types.yaml")))  # load_yaml is cached
    raw["lineages"]["Plasma"]["cl"] = "CL:0000786"  # plasma cell: plasmablast is not its child
    path = tmp_path / "vocab.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="descendant"):
        an.load_vocabulary(path)


@pytest.mark.parametrize("organism", ["human", "mouse"])
def test_no_identity_set_uses_measured_state_genes(organism):
    """MHC class II never decides DC / monocyte identity, checkpoints never T (item 4)."""
    vocab = an.load_vocabulary()
    mk = an.load_markers(None, organism)
    assert {"mhc_class_ii", "t_checkpoint"} <= set(mk["state_genes"])
    mhc = set(mk["state_genes"]["mhc_class_ii"]["genes"])
    chk = set(mk["state_genes"]["t_checkpoint"]["genes"])
    for s in mk["lineage_sets"] + mk["subset_sets"]:
        t = s["target"]
        lin = t if t in vocab.lineages.index else vocab.lineage_of(t)
        assert not mhc & set(s["down"]), s["name"]
        if lin in ("DC", "Monocyte"):
            assert not mhc & set(s["up"]), s["name"]
        if lin == "T":
            assert not chk & set(s["up"] + s["down"]), s["name"]
    bad = {
        "state_genes": {"mhc": {"lineages": ["DC"], "genes": ["HLA-DQA1"]}},
        "lineage_sets": [{"name": "x", "lineage": "DC", "up": ["CD1C", "HLA-DQA1"]}],
    }
    with pytest.raises(ValueError, match="measured"):
        an.load_markers(bad)


@pytest.mark.parametrize("organism", ["human", "mouse"])
def test_marker_files_cover_vocabulary(organism):
    vocab = an.load_vocabulary()
    mk = an.load_markers(None, organism)
    lineages = {s["target"] for s in mk["lineage_sets"]}
    assert set(an.LINEAGES) <= lineages
    labels = {s["target"] for s in mk["subset_sets"]}
    for lineage in an.LINEAGES:
        subsets = vocab.subsets_of(lineage)
        default = vocab.lineages.at[lineage, "default_subset"]
        fallbacks = set(vocab.cell_types["coarse"].dropna()) | {
            vocab.lineages.at[lineage, "unresolved"]
        }
        if len(subsets) > 1:  # every multi-subset lineage can tell its subsets apart
            assert set(subsets) - {default} - fallbacks <= labels, lineage
    for s in mk["lineage_sets"] + mk["subset_sets"]:
        assert s["source"], s["name"]
        genes = s["up"] + s["down"]
        if organism == "mouse":  # MGI case, not human symbols
            assert not any(g.isupper() and len(g) > 3 for g in genes), s["name"]
        else:
            assert all(g == g.upper() or g.startswith(("C1orf", "LINC")) for g in genes), s["name"]


def test_load_markers_rejects_unknown_label():
    bad = {"lineage_sets": [{"name": "x", "lineage": "Tcell", "up": ["CD3E"]}]}
    with pytest.raises(ValueError, match="unknown lineage"):
        an.load_markers(bad)
    bad = {
        "lineage_sets": [{"name": "x", "lineage": "T", "up": ["CD3E"]}],
        "subset_sets": [{"name": "y", "cell_type": "CD4 T", "up": ["CD4"]}],
    }
    with pytest.raises(ValueError, match="unknown cell_type"):
        an.load_markers(bad)


# ---------------------------------------------------------------------------------------------
# annotate on toy data
# ---------------------------------------------------------------------------------------------
def test_annotate_toy_recovers_lineages_and_subsets():
    adata = _toy()
    X_before = adata.X.copy()
    summary = an.annotate(adata, cluster_key="cl")
    obs = adata.obs
    for col in an_core._OBS_KEYS:
        assert col in obs
    real = obs["truth"] != "debris"
    assert (obs.loc[real, "cell_type"].astype(str) == obs.loc[real, "truth"]).mean() >= 0.95
    vocab = an.load_vocabulary()
    truth_lin = obs.loc[real, "truth"].map(vocab.lineage_of)
    assert (obs.loc[real, "lineage"].astype(str) == truth_lin).mean() >= 0.98
    # ontology ids follow the labels; confidence is a 0-1 number, 0 for Unassigned
    ids = obs["cell_type"].astype(str).map(vocab.cell_types["cl"])
    assert (obs["cell_type_ontology_term_id"].astype(str) == ids).all()
    conf = obs["annotation_confidence"]
    assert conf.between(0, 1).all()
    assert (conf[obs["lineage"] == "Unassigned"] == 0).all()
    assert conf[real].median() > 0.5
    # X untouched, summary per cluster
    assert (adata.X != X_before).nnz == 0
    assert set(summary["cluster"]) == set(obs["cl"])
    assert {"n_cells", "lineage", "cell_type", "mean_confidence", "score_T"} <= set(summary)
    assert "annotation_lineage_scores" in adata.obsm
    assert adata.uns["annotation"]["params"]["organism"] == "human"


def test_debris_is_unassigned_not_forced():
    adata = _toy()
    an.annotate(adata, cluster_key="cl")
    debris = adata.obs["truth"] == "debris"
    assert (adata.obs.loc[debris, "cell_type"] == "Unassigned").all()
    assert adata.obs.loc[debris, "annotation_source"].str.startswith("markers:unassigned").all()


def test_cell_level_evidence_overrides_mixed_cluster():
    """A B cell inside a T-cell cluster keeps its own lineage (cell + cluster evidence)."""
    adata = _toy()
    b_idx = np.flatnonzero(adata.obs["truth"] == "naive B")[:3]
    cl = adata.obs["cl"].astype(str).to_numpy()
    cl[b_idx] = "CD4_naive_T"
    adata.obs["cl"] = cl
    an.annotate(adata, cluster_key="cl", cluster_weight=0.3)
    assert (adata.obs["lineage"].iloc[b_idx] == "B").all()
    # and with cluster evidence only, the same cells follow their cluster
    an.annotate(adata, cluster_key="cl", cluster_weight=1.0, key_added="clu")
    assert (adata.obs["clu_lineage"].iloc[b_idx] == "T").all()


def test_annotate_own_overclustering_and_prefix():
    adata = _toy(n_per=60, seed=1)
    an.annotate(adata, cluster_key=None, key_added="mk", resolution=1.0, seed=0)
    assert "mk_cell_type" in adata.obs and "cell_type" not in adata.obs
    assert "mk_annotation_cluster" in adata.obs
    real = adata.obs["truth"] != "debris"
    acc = (adata.obs.loc[real, "mk_cell_type"].astype(str) == adata.obs.loc[real, "truth"]).mean()
    assert acc >= 0.9


def test_counts_from_integer_X_and_errors_for_normalised_X():
    adata = _toy()
    del adata.layers["counts"]
    an.annotate(adata, cluster_key="cl")  # integer X accepted as counts
    assert (adata.obs["lineage"] == "T").sum() > 100
    adata.X = adata.X.copy()
    adata.X.data = np.log1p(adata.X.data)
    with pytest.raises(ValueError, match="raw"):
        an.annotate(adata, cluster_key="cl")


def test_organism_detection_and_mismatch():
    mouse = _toy(mouse=True)
    mk = _mouse_markers()
    an.annotate(mouse, organism="auto", markers=mk, cluster_key="cl")
    assert mouse.uns["annotation"]["params"]["organism"] == "mouse"
    with pytest.raises(ValueError, match="expects organism 'human'"):
        an.annotate(mouse, markers=mk, cluster_key="cl", expected_organism="human")
    with pytest.raises(
        ValueError, match="organism: human but the genes of the annotation input are mouse"
    ):
        an.annotate(mouse, organism="human", cluster_key="cl")
    human = _toy()
    with pytest.raises(ValueError, match="expects organism 'mouse'"):
        an.annotate(human, cluster_key="cl", expected_organism="mouse")
    ens = _toy()
    ens.var_names = [f"ENSG{i:011d}" for i in range(ens.n_vars)]
    with pytest.raises(ValueError, match="gene symbols"):
        an.annotate(ens, cluster_key="cl")


def test_missing_cluster_key_is_a_clear_error():
    with pytest.raises(KeyError, match="cluster_key"):
        an.annotate(_toy(), cluster_key="leiden")


def test_annotation_agreement_reports_lineage_accuracy():
    adata = _toy()
    an.annotate(adata, cluster_key="cl")
    adata.obs["coarse"] = adata.obs["truth"].map(
        {
            "CD4 naive T": "T_CD4",
            "CD8 effector/memory T": "T_CD8",
            "NK CD56dim": "NK",
            "naive B": "B",
            "Classical monocyte": "MNP",
            "debris": "Unassigned",
        }
    )
    tab = an.annotation_agreement(adata, "coarse", "cell_type", label_map={"MNP": "Monocyte"})
    assert tab.attrs["lineage_accuracy"] >= 0.98
    row = tab.set_index("label").loc["T_CD8"]
    assert row["best_match"] == "CD8 effector/memory T" and row["lineage"] == "T"
    # a deliberately wrong annotation drops the accuracy
    adata.obs["wrong"] = "naive B"
    assert an.annotation_agreement(adata, "coarse", "wrong").attrs["lineage_accuracy"] < 0.3


def test_figures_are_written(tmp_path):
    adata = _toy()
    an.annotate(adata, cluster_key="cl")
    rng = np.random.default_rng(0)
    adata.obsm["X_umap"] = rng.normal(size=(adata.n_obs, 2))
    p1 = savefig(pl_an.marker_dotplot(an.dotplot_markers(adata)), tmp_path / "dot.png")
    p2 = savefig(pl_an.umap_cell_types(adata), tmp_path / "umap.png")
    assert p1.stat().st_size > 5000 and p2.stat().st_size > 5000
    del adata.obsm["X_umap"]
    with pytest.raises(KeyError, match="UMAP"):
        pl_an.umap_cell_types(adata)


def test_dotplot_streams_counts_from_the_file(tmp_path, monkeypatch):
    """dotplot_markers(counts=FileCounts) gives the same values from the counts streamed out
    of the .h5ad (adata without a matrix, as the workflow's figure job)."""
    from sepsis_sc import store
    from sepsis_sc.annotate import dotplot as an_dot
    from sepsis_sc.utils import write_h5ad

    adata = _toy()
    an.annotate(adata, cluster_key="cl")
    path = tmp_path / "a.h5ad"
    write_h5ad(adata, path)
    expr = []  # the cells' log1p CP10k of the marker genes, as each run computes it
    real = an_dot.log_normalise
    monkeypatch.setattr(
        an_dot, "log_normalise", lambda *a, **k: expr.append(real(*a, **k)) or expr[-1]
    )
    mem = an.dotplot_markers(adata)
    light = store.read(path)
    assert light.X is None and not light.layers
    streamed = an.dotplot_markers(light, counts=store.FileCounts.matching(path, "counts", light))
    assert list(mem["gene"]) == list(streamed["gene"])
    assert (expr[0] != expr[1]).nnz == 0
    pd.testing.assert_frame_equal(mem, streamed, check_exact=True)


# ---------------------------------------------------------------------------------------------
# CellTypist path (optional dependency)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(
    importlib.util.find_spec("celltypist") is None, reason="celltypist not installed"
)
def test_annotate_celltypist_with_locally_trained_model(tmp_path):
    import celltypist

    train = _toy(n_per=60, n_empty=0, seed=3)
    ref = train.copy()
    ref.X = ref.layers["counts"].copy()
    tot = np.asarray(ref.X.sum(axis=1)).ravel()
    ref.X = sp.csr_matrix(sp.diags(1e4 / tot) @ ref.X)
    ref.X.data = np.log1p(ref.X.data)
    # SGD path: celltypist 1.7 passes `multi_class` to sklearn>=1.8 LogisticRegression (removed)
    model = celltypist.train(
        ref, labels=ref.obs["truth"].to_numpy(), use_SGD=True, max_iter=200, n_jobs=1
    )
    path = tmp_path / "toy.pkl"
    model.write(str(path))
    query = _toy(seed=4)
    summary = an.annotate_celltypist(query, path)
    real = query.obs["truth"] != "debris"
    assert (
        query.obs.loc[real, "celltypist_label"].astype(str) == query.obs.loc[real, "truth"]
    ).mean() > 0.95
    assert set(summary["lineage"]) >= {"T", "NK", "B", "Monocyte"}
    an.annotate(query, cluster_key="cl")
    tab = an.annotation_agreement(query, "celltypist_label", "cell_type")
    assert tab.attrs["lineage_accuracy"] > 0.9
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        an.annotate_celltypist(query, tmp_path / "Immune_All_Low.pkl")


# ---------------------------------------------------------------------------------------------
# real data (skipped when ../shared/data is absent)
# ---------------------------------------------------------------------------------------------
def test_pbmc4k_lineage_and_cd4_cd8_accuracy():
    adata = ad.read_h5ad(shared_file("soupx_pbmc4k.h5ad"))
    adata.layers["counts"] = adata.X.copy()
    an.annotate(adata, organism="auto", expected_organism="human", seed=0)
    obs = adata.obs
    lab = obs["Annotation"].astype(str)
    pred = obs["lineage"].astype(str)
    ok_map = {"T_CD4": {"T"}, "T_CD8": {"T"}, "NK": {"NK"}, "B": {"B"}, "MNP": {"Monocyte", "DC"}}
    # SoupX's coarse label calls reference cluster 6 "NK", but it is a CD3+ TRDC+/KLRB1+
    # gamma-delta / MAIT-like T cluster (CD3D detected in >90 % of its cells vs ~10 % in the
    # reference NK cluster 8); T is accepted there too. See the task report for both numbers.
    ok_map_c6 = {"T", "NK"}
    labelled = lab != "?"
    ok = [
        p in (ok_map_c6 if (a == "NK" and str(c) == "6") else ok_map[a])
        for a, p, c in zip(lab[labelled], pred[labelled], obs["Cluster"][labelled], strict=True)
    ]
    assert np.mean(ok) >= 0.97  # issue #16 target (0.980 measured, docs/annotation.md)
    raw = np.mean([p in ok_map[a] for a, p in zip(lab[labelled], pred[labelled], strict=True)])
    assert raw >= 0.90
    t = lab.isin(["T_CD4", "T_CD8"])
    ct = obs["cell_type"].astype(str)
    cd4 = ct.isin(["CD4 naive T", "CD4 memory T", "Treg"])
    cd8 = ct.isin(["CD8 naive T", "CD8 effector/memory T"])
    assert (((lab == "T_CD4") & cd4) | ((lab == "T_CD8") & cd8))[t].mean() >= 0.92  # issue #16
    assert (pred == "Unassigned").mean() < 0.05
    assert obs.loc[lab == "?", "cell_type"].eq("pDC").mean() > 0.9  # reference "?" = pDC


def _otsu_free_gate(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Two-component Gaussian mixture gate: 1 positive, 0 negative, -1 ambiguous."""
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(2, random_state=seed).fit(x.reshape(-1, 1))
    p = gm.predict_proba(x.reshape(-1, 1))[:, int(np.argmax(gm.means_.ravel()))]
    return np.where(p > 0.9, 1, np.where(p < 0.1, 0, -1))


def test_eccite_rna_lineage_agrees_with_protein_gates():
    adata = ad.read_h5ad(shared_file("eccite_pbmc_citefuse.h5ad"))
    an.annotate(adata, expected_organism="human", seed=0)
    adt = adata.obsm["ADT_counts"].astype(float)
    lg = np.log1p(adt)
    clr = lg.sub(lg.mean(axis=1), axis=0)  # CLR per cell
    g = {
        m: _otsu_free_gate(clr[m].to_numpy()) for m in ["CD3", "CD4", "CD8", "CD14", "CD19", "CD56"]
    }

    def pos(m):
        return g[m] == 1

    def neg(m):
        return g[m] == 0

    gate = pd.Series("none", index=adata.obs_names)
    gate[pos("CD19") & neg("CD3")] = "B"
    gate[pos("CD3") & neg("CD19") & neg("CD14") & (pos("CD4") | pos("CD8"))] = "T"
    gate[pos("CD14") & neg("CD3") & neg("CD19") & ~pos("CD56")] = "Monocyte"
    gate[pos("CD56") & neg("CD3") & neg("CD19") & neg("CD14")] = "NK"
    gated = gate != "none"
    assert gated.sum() >= 100
    agree = (gate[gated] == adata.obs.loc[gated, "lineage"].astype(str)).mean()
    assert agree >= 0.90


def test_celltypist_sample_trem2_macrophages():
    adata = ad.read_h5ad(shared_file("celltypist_sample.h5ad"))
    an.annotate(adata, expected_organism="human", seed=0)
    X = adata.X.tocsc()
    col = {g: i for i, g in enumerate(adata.var_names)}
    trip = np.ones(adata.n_obs, dtype=bool)
    for g in ["TREM2", "SPP1", "GPNMB"]:
        trip &= X[:, col[g]].toarray().ravel() > 0
    assert trip.sum() >= 100
    assert (adata.obs["cell_type"][trip] == "TREM2-high macrophage").mean() >= 0.95
    cd68 = X[:, col["CD68"]].toarray().ravel() > 0
    c1q = X[:, col["C1QB"]].toarray().ravel() > 0
    mac_like = cd68 & (X[:, col["APOE"]].toarray().ravel() > 0) & ~trip
    lin = adata.obs["lineage"].astype(str)
    assert (lin[trip] == "Macrophage").mean() >= 0.95
    if mac_like.sum() >= 5:
        assert (lin[mac_like | (cd68 & c1q)] == "Macrophage").mean() >= 0.8


def _simulated_pair(*, cells_per_sample: int, n_genes: int, seed: int):
    """Two simulated samples (one septic, one control, one batch) concatenated, and the truth."""
    simulate = pytest.importorskip("sepsis_sc.sim")
    sheet = pd.DataFrame(
        {
            "sample_id": ["s1", "s2"],
            "condition": ["sepsis", "control"],
            "donor": ["d1", "d2"],
            "batch": ["b1", "b1"],
        }
    )
    adatas, truth = simulate.simulate_cohort(
        sheet, cells_per_sample=cells_per_sample, n_genes=n_genes, seed=seed
    )
    return ad.concat(list(adatas.values())), truth


def test_simulated_cohort_subset_precision_recall():
    """Planted truth of sepsis_sc.simulate (same vocabulary): lineage and subset accuracy."""
    adata, truth = _simulated_pair(cells_per_sample=1200, n_genes=4000, seed=0)
    an.annotate(adata, expected_organism="human", seed=0)
    tr = truth.set_index("cell_id").reindex(adata.obs_names)
    clean = (~tr["is_doublet"] & ~tr["is_low_quality"]).to_numpy()
    y = tr["cell_type"].astype(str).to_numpy()[clean]
    p = adata.obs["cell_type"].astype(str).to_numpy()[clean]
    lin = adata.obs["lineage"].astype(str).to_numpy()[clean]
    # Issue #18: the simulator no longer plants the annotator's markers at 25x; profiles come
    # from the pure cells of real populations with literature folds of 2-8x. Measured here
    # (seed 0, 4,000 genes): lineage 0.985, cell type 0.90 (0.98 / 0.93 on the old
    # self-consistent simulator; 0.82 / 0.73 when the NK profile was the mean of a label
    # holding gamma-delta T and MAIT cells). Weak spots: CD8 naive T called effector/memory
    # (49 of 93), Tregs called CD4 T (28 of 40), plasmablasts (9 cells) absorbed by B cells.
    # Thresholds sit just below the measured values.
    assert (lin == tr["lineage"].astype(str).to_numpy()[clean]).mean() >= 0.96
    assert (y == p).mean() >= 0.87
    nk = np.isin(y, ["NK CD56dim", "NK CD56bright"])
    assert (lin[nk] == "NK").mean() >= 0.95  # measured 0.985
    for label in ["CD4 naive T", "Classical monocyte", "naive B"]:
        recall = (p[y == label] == label).mean()
        precision = (y[p == label] == label).mean()
        assert recall >= 0.8 and precision >= 0.8, (label, precision, recall)


def test_large_lineage_chooses_hvgs_on_a_sample(monkeypatch):
    """Lineages above LINEAGE_HVG_CELLS pick their re-embedding HVGs on a seeded sample and
    read only those columns for every cell (no second copy of a 400,000-cell lineage's
    counts at atlas scale); the calls stay those of the full computation."""
    adata, truth = _simulated_pair(cells_per_sample=1200, n_genes=4000, seed=0)
    full = adata.copy()
    an.annotate(full, expected_organism="human", seed=0)
    calls = []
    real = an_sub._hvg_columns
    monkeypatch.setattr(an_sub, "LINEAGE_HVG_CELLS", 300)
    monkeypatch.setattr(
        an_sub, "_hvg_columns", lambda *a, **k: calls.append(a[1].size) or real(*a, **k)
    )
    an.annotate(adata, expected_organism="human", seed=0)
    assert calls and max(calls) > 300  # the sampled path ran, on whole lineages
    same = (adata.obs["cell_type"].astype(str) == full.obs["cell_type"].astype(str)).mean()
    assert same >= 0.95, same
    tr = truth.set_index("cell_id").reindex(adata.obs_names)
    clean = (~tr["is_doublet"] & ~tr["is_low_quality"]).to_numpy()
    acc = (
        adata.obs["cell_type"].astype(str).to_numpy()[clean]
        == tr["cell_type"].astype(str).to_numpy()[clean]
    ).mean()
    assert acc >= 0.86, acc


def test_annotate_streams_counts_from_the_file(tmp_path):
    """annotate(counts=FileCounts) reads the counts from the .h5ad in row chunks (the
    workflow's path at atlas scale; adata holds no matrix) and calls exactly what the
    in-memory run calls."""
    from sepsis_sc import store
    from sepsis_sc.utils import write_h5ad

    adata, _ = _simulated_pair(cells_per_sample=600, n_genes=3000, seed=3)
    adata.layers["counts"] = adata.X.copy()
    path = tmp_path / "cells.h5ad"
    write_h5ad(adata, path)
    an.annotate(adata, expected_organism="human", seed=0)
    light = store.read(path)
    assert light.X is None and not light.layers
    counts = store.FileCounts.matching(path, "counts", light)
    an.annotate(light, expected_organism="human", seed=0, counts=counts)
    for col in ("lineage", "cell_type", "annotation_cluster"):
        assert (light.obs[col].astype(str) == adata.obs[col].astype(str)).all(), col
    np.testing.assert_array_equal(
        light.obs["annotation_confidence"], adata.obs["annotation_confidence"]
    )
    with pytest.raises(ValueError, match="hold 1200 cells"):
        an.annotate(
            light[:100].copy(), expected_organism="human", counts=store.FileCounts(path, "counts")
        )


def test_annotate_reuses_leiden_multi_partition_on_same_embedding():
    """With the clustering stage's Leiden run on the same embedding, neighbours, seed and
    resolution, annotate reuses that partition instead of building a second kNN graph; any
    difference (other resolution or embedding) falls back to its own over-clustering."""
    from sepsis_sc.cluster import leiden_multi

    adata = _toy(n_per=60, seed=1)
    adata.obsm["X_emb"] = np.asarray(
        np.log1p(adata.layers["counts"][:, :30].toarray()), dtype=np.float32
    )
    leiden_multi(
        adata,
        use_rep="X_emb",
        n_neighbors=15,
        resolutions=[1.0, 2.0],
        resolution=1.0,
        seed=0,
        umap=False,
    )
    an.annotate(adata, cluster_key=None, use_rep="X_emb", resolution=2.0, seed=0)
    clusters = adata.obs["annotation_cluster"].astype(str)
    assert (clusters == adata.obs["leiden_r2.0"].astype(str)).all()
    assert "reused" in adata.uns["annotation"]["params"]["cluster_source"]
    other = an_lin._reusable_leiden(adata, "X_emb", 1.5, 15, 0)
    assert other is None
    assert an_lin._reusable_leiden(adata, "X_emb", 2.0, 15, 1) is None
    assert an_lin._reusable_leiden(adata, "X_pca", 2.0, 15, 0) is None
    assert an_lin._reusable_leiden(adata, "X_emb", 2.0, 15, 0) == "leiden_r2.0"


def test_dc_recall_survives_mhc_class_ii_loss():
    """Issue #16 item 4: DC identity never uses MHC class II, the sepsis DC state measured.

    On real PBMC, the counts of every MHC class II gene (HLA-D*, CD74, CIITA) in the cells
    called DC are thinned 5-fold (binomial, p = 0.2); re-annotated, >= 90 % stay DC.
    """
    adata = ad.read_h5ad(shared_file("soupx_pbmc4k.h5ad"))
    adata.layers["counts"] = adata.X.copy()
    an.annotate(adata, expected_organism="human", seed=0)
    dc = (adata.obs["lineage"] == "DC").to_numpy()
    assert dc.sum() >= 25
    mhc = np.flatnonzero(adata.var_names.str.match(r"^(HLA-D|CD74$|CIITA$)"))
    assert mhc.size >= 10
    X = adata.layers["counts"].tocsc(copy=True).astype(np.float32)
    rng = np.random.default_rng(0)
    rows = np.flatnonzero(dc)
    for j in mhc:
        col = X[:, j].toarray().ravel()
        col[rows] = rng.binomial(col[rows].astype(np.int64), 0.2)
        X[:, j] = sp.csc_matrix(col.reshape(-1, 1))
    before = np.asarray(adata.layers["counts"][rows][:, mhc].sum())
    X = sp.csr_matrix(X)
    X.eliminate_zeros()
    lost = ad.AnnData(X=X.copy(), obs=adata.obs[[]].copy(), var=adata.var[[]].copy())
    lost.layers["counts"] = X
    assert np.asarray(lost.layers["counts"][rows][:, mhc].sum()) < 0.3 * before
    an.annotate(lost, expected_organism="human", seed=0)
    recall = (lost.obs["lineage"].to_numpy()[dc] == "DC").mean()
    assert recall >= 0.9, recall
    # monocytes losing nothing keep their calls (no drift from the DCs' change)
    mono = (adata.obs["lineage"] == "Monocyte").to_numpy()
    assert (lost.obs["lineage"].to_numpy()[mono] == "Monocyte").mean() >= 0.95


def _kang_panel(n_genes: int = 1300) -> ad.AnnData:
    adata = ad.read_h5ad(shared_file("kang_ifnb_harmony.h5ad"))
    det = np.asarray((adata.X > 0).sum(axis=0)).ravel()
    keep = np.sort(np.argsort(-det, kind="stable")[:n_genes])
    adata = adata[:, keep].copy()
    adata.layers["counts"] = adata.X.copy()
    return adata


def test_kang_targeted_panel_lineage_accuracy_and_unassigned():
    """Issue #16: a real two-condition set restricted to its 1,300 most detected genes (no
    MS4A1 / CD79A / CD4 / CD8A): lineage accuracy >= 0.90 on the author-labelled cells,
    <= 10 % Unassigned, B cells reached through the partial / MHC-II B sets, and no CD4 / CD8
    guess without CD4 / CD8 genes."""
    adata = _kang_panel()
    an.annotate(adata, expected_organism="human", seed=0)
    obs = adata.obs
    lab = obs["muscat_cluster_id_partial"]
    has = lab.notna().to_numpy()
    ok_map = {
        "CD14+ Monocytes": "Monocyte",
        "FCGR3A+ Monocytes": "Monocyte",
        "CD4 T cells": "T",
        "CD8 T cells": "T",
        "B cells": "B",
    }
    want = lab[has].astype(str).map(ok_map)
    got = obs.loc[has, "lineage"].astype(str)
    assert (want == got).mean() >= 0.90
    assert (obs["lineage"] == "Unassigned").mean() <= 0.10
    assert (got[want == "B"] == "B").mean() >= 0.9
    cov = pd.DataFrame(adata.uns["annotation"]["lineage_coverage"]).set_index("lineage")
    assert cov.at["B", "best_coverage"] >= 0.5 and cov.at["DC", "best_coverage"] < 0.5
    ct = obs["cell_type"].astype(str)
    t_cd = ct.isin(["CD4 naive T", "CD4 memory T", "Treg", "CD8 naive T", "CD8 effector/memory T"])
    # issue #32: no CD4 / CD8 guess, but naive vs memory is still called (CL:0000898 / 0813)
    assert not t_cd.any() and ct.isin(["naive T", "memory T"]).sum() > 500


def test_partial_marker_set_degrades_instead_of_being_skipped():
    """Issue #16 item 3: a B set reduced to MS4A1 (a core gene) still calls B cells, with the
    coverage reported; a set reduced to a non-core gene is no evidence."""
    mk = load_yaml(resource_path("markers", "human.yaml"))
    lin_sets = []
    for st in mk["lineage_sets"]:
        st = dict(st)
        if st["name"] == "B_cell":
            st["up"] = ["MS4A1"] + [f"ABSENT{i}" for i in range(7)]
            st["core"] = ["MS4A1"]
        if st["name"] == "B_cell_MHCII_lymphoid":
            continue
        lin_sets.append(st)
    markers = {**mk, "lineage_sets": lin_sets}
    adata = _toy()
    an.annotate(adata, cluster_key="cl", markers=markers)
    rep = pd.DataFrame(adata.uns["annotation"]["marker_sets"]).set_index("set")
    assert rep.at["B_cell", "n_up_found"] == 1 and rep.at["B_cell", "weight"] == 0.5
    b = adata.obs["truth"] == "naive B"
    assert (adata.obs.loc[b, "lineage"] == "B").mean() >= 0.9
    assert rep.at["B_cell", "coverage"] == pytest.approx(1 / 8)
    assert an_lin._set_weights(1, 0, 8) == 0.0 and an_lin._set_weights(4, 0, 8) == 1.0


def _figure_texts(fig) -> list[str]:
    import matplotlib

    out = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    return [t for t in out if t]


def test_marker_dotplot_is_transposed_with_full_label_names():
    import anndata as ad
    import scipy.sparse as sp

    from sepsis_sc.pl import annotate as pl_an

    pops = {
        "CD8 effector/memory T": ["CST7", "KLRD1", "GZMH", "CD3E", "CD8A"],
        "Non-classical monocyte": ["CDKN1C", "HES4", "MS4A7", "FCGR3A", "LYZ"],
        "TREM2-high macrophage": ["GPNMB", "SPP1", "FABP5", "TREM2", "APOE"],
    }
    genes = sorted({g for gs in pops.values() for g in gs}) + [f"GENE{i}" for i in range(30)]
    rng = np.random.default_rng(0)
    blocks, labels = [], []
    for label, gs in pops.items():
        lam = np.full((60, len(genes)), 0.05)
        lam[:, [genes.index(g) for g in gs]] = 5.0
        lam[:, -30:] = 1.0
        blocks.append(rng.poisson(lam))
        labels += [label] * 60
    X = sp.csr_matrix(np.vstack(blocks).astype(np.float32))
    obs = pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(len(labels))])
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    fig = pl_an.marker_dotplot(an.dotplot_markers(adata, organism="human", layer=None))
    texts = [t.replace("\n", " ") for t in _figure_texts(fig)]
    for label in pops:
        assert label in texts  # named in full beside its genes, not cut to fit
    main = [ax for ax in fig.axes if ax.get_title() == "Marker genes by cell type"][0]
    assert len(main.get_yticklabels()) > len(main.get_xticklabels())  # genes in rows


def test_subset_reason_is_kept_apart_from_the_lineage_reason():
    """``annotation_source`` says why a cell has its lineage and ``annotation_subset_source``
    why it has its subset: a lineage whose subset genes are absent keeps its lineage call
    (``T unresolved``, ``genes_absent``) and its lineage reason (``markers``), where the
    subset step used to overwrite that reason."""
    full = _toy()
    an.annotate(full, cluster_key="cl")
    obs = full.obs
    why = obs["annotation_subset_source"].astype(str)
    assert set(why) <= set(an_sub.SUBSET_SOURCES)
    assert (why[obs["lineage"] == "Unassigned"] == "none").all()
    real = obs["truth"] != "debris"
    assert why[real].isin(["markers", "default_subset", "single_subset"]).all()
    assert (why[real] == "markers").mean() >= 0.8
    mk = an.load_markers()
    vocab = an.load_vocabulary()
    t_subsets = set(vocab.subsets_of("T"))
    every_t_subset_gene = {
        g for s in mk["subset_sets"] if s["target"] in t_subsets for g in s["up"]
    }  # TRAC too, which the T lineage set shares: CD3D/E/G, TRBC2 ... still call T
    for gone, label, reason in (
        (["CD4", "CD8A", "CD8B"], {"naive T", "memory T"}, "coarse_markers"),
        (sorted(every_t_subset_gene), {"T unresolved"}, "genes_absent"),
    ):
        work = _toy()
        work = work[:, ~work.var_names.isin(gone)].copy()
        an.annotate(work, cluster_key="cl")
        t = (work.obs["lineage"] == "T").to_numpy()
        assert t.sum() >= 0.9 * obs["lineage"].eq("T").sum()
        assert work.obs["cell_type"][t].isin(label).all()
        sub_why = work.obs["annotation_subset_source"].astype(str)[t]
        assert (sub_why == reason).mean() >= 0.9, sub_why.value_counts()
        src = work.obs["annotation_source"].astype(str)[t]
        assert (src == obs["annotation_source"].astype(str)[work.obs_names[t]]).all()
        assert (src == "markers").mean() >= 0.9
