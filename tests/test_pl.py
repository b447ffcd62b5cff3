"""Figure conventions of sepsis_sc.pl checked on small synthetic inputs (no pipeline run)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd

from sepsis_sc.pl import stats as pl_stats
from sepsis_sc.pl.style import savefig, wrap

matplotlib.use("Agg")

LONG = (
    "Target emergency granulopoiesis / suppressive neutrophils (e.g. IFN-gamma or PD-L1 "
    "blockade in CLP; exploratory) with a deliberately long tail of words"
)


def _texts(fig) -> list[str]:
    out = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    return [t for t in out if t]


def test_wrap_keeps_every_word():
    text = wrap(LONG, 30)
    assert max(len(line) for line in text.splitlines()) <= 30
    assert text.replace("\n", " ") == LONG
    assert wrap("HLA-DR-low", 4) == "HLA-DR-low"  # long words and hyphens are never split


def test_therapy_targets_texts_are_wrapped_not_cut(tmp_path):
    targets = pd.DataFrame(
        {
            "label": ["immature / suppressive neutrophil with a long label", "exhausted T"],
            "therapy": [LONG, "Restore T cells: anti-PD-1 / anti-PD-L1, IL-7"],
            "evidence": ["supported", "not significant"],
            "effect": [0.4, -0.1],
            "fdr": [0.001, 0.5],
        }
    )
    fig = pl_stats.therapy_targets(targets)
    texts = _texts(fig)
    assert not [t for t in texts if "\u2026" in t or "..." in t]
    flat = [t.replace("\n", " ") for t in texts]
    assert LONG in flat and targets["label"][0] in flat
    savefig(fig, tmp_path / "targets.png")


def test_sample_value_and_score_titles_are_wrapped_not_cut():
    label = "TREM2-high (lipid-associated) macrophage in the lung and elsewhere"
    rows = [
        {
            "state": "trem2",
            "label": label,
            "metric": "mean_score",
            "condition": c,
            "donor": f"d{i}",
            "sample_id": f"s{i}{c}",
            "value": float(v),
        }
        for i, (c, v) in enumerate([("control", 0.1), ("sepsis", 0.5), ("control", 0.2)])
    ]
    fig = pl_stats.sample_values(pd.DataFrame(rows), case="sepsis", control="control")
    assert label in [t.replace("\n", " ") for t in _texts(fig)]

    import anndata as ad

    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"trem2_score": rng.random(40)}, index=[f"c{i}" for i in range(40)])
    adata = ad.AnnData(obs=obs)
    adata.obsm["X_umap"] = rng.normal(size=(40, 2))
    adata.uns["state_rules"] = {"trem2": {"label": label}}
    fig = pl_stats.score_umaps(adata)
    assert label in [t.replace("\n", " ") for t in _texts(fig)]


def test_qc_mito_violin_axis_is_robust_to_damaged_cells(tmp_path, monkeypatch):
    from sepsis_sc.pl import qc as pl_qc

    rng = np.random.default_rng(0)
    n = 400
    mt = np.concatenate([rng.gamma(4, 0.6, n - 20), rng.uniform(40, 60, 20)])  # 5% damaged
    obs = pd.DataFrame(
        {
            "sample_id": np.repeat(["A", "B"], n // 2),
            "total_counts": rng.lognormal(8, 0.3, n),
            "n_genes_by_counts": rng.lognormal(7, 0.3, n),
            "pct_counts_mt": rng.permutation(mt),
        },
        index=[f"c{i}" for i in range(n)],
    )
    thr = pd.DataFrame({"sample_id": ["A", "B"], "max_pct_mt": [8.0, 9.0]})
    figs = []
    monkeypatch.setattr(pl_qc, "savefig", lambda fig, path: figs.append(fig) or path)
    pl_qc.violins(obs, thr, tmp_path / "v.png")
    ax = figs[0].axes[2]
    assert 9.0 < ax.get_ylim()[1] <= 1.5 * 9.0 * 1.1 + 1e-9  # threshold shown, outliers cut
    above = sorted(t.get_text() for t in ax.texts)
    n_a = int((obs.loc[obs.sample_id == "A", "pct_counts_mt"] > ax.get_ylim()[1]).sum())
    assert f"\u25b2{n_a}" in above and "highest" in ax.get_title(loc="left")


def test_marker_dotplot_is_transposed_with_full_label_names(tmp_path, monkeypatch):
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
    figs = []
    monkeypatch.setattr(pl_an, "savefig", lambda fig, path: figs.append(fig) or path)
    pl_an.marker_dotplot(adata, tmp_path / "dot.png", organism="human", layer=None)
    fig = figs[0]
    texts = [t.replace("\n", " ") for t in _texts(fig)]
    for label in pops:
        assert label in texts  # named in full beside its genes, not cut to fit
    main = [ax for ax in fig.axes if ax.get_title() == "Marker genes by cell type"][0]
    assert len(main.get_yticklabels()) > len(main.get_xticklabels())  # genes in rows


def test_embedding_umaps_name_the_truth_and_share_the_cell_type_colours(tmp_path, monkeypatch):
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
    figs = []
    monkeypatch.setattr(pl_ig, "savefig", lambda fig, path: figs.append(fig) or path)
    pl_ig.embedding_umaps(
        adata,
        tmp_path / "u.png",
        embed_keys=["X_pca"],
        batch_key="batch",
        label_key="cell_type",
        label_title="simulated truth cell type",
    )
    ax = figs[0].axes[1]
    assert "simulated truth cell type" in ax.get_title().replace("\n", " ")
    drawn = {to_hex(c) for c in ax.collections[0].get_facecolors()}
    assert drawn == set(cell_type_palette(["Classical monocyte", "naive B"]).values())
