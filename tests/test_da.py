"""Tests for sepsis_sc.da: Milo neighbourhoods with donors as units, spatial FDR, which
significant neighbourhoods a named population or state explains, and the workflow script."""

from __future__ import annotations

import functools

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sepsis_sc import da, stats
from sepsis_sc.design import Contrast, resolve_design, sample_meta
from sepsis_sc.sim import UNNAMED_STATES, cohort_adata, two_arm_sheet

SEPSIS = Contrast("sepsis_vs_control", "condition", "sepsis", "control")


@functools.cache
def _cohort(effects: bool, seed: int, n_per: int = 6, repeated: bool = False) -> ad.AnnData:
    """Simulated cells (truth labels in obs) with a PCA embedding: what DA reads."""
    return cohort_adata(
        two_arm_sheet(n_per, repeated="patients" if repeated else None),
        cells_per_sample=1000,
        n_genes=4000,
        seed=seed,
        effects=effects,
        truth_columns=("cell_type", "lineage", "ms1_like", *UNNAMED_STATES),
        target_sum=None,
        n_pcs=30,
        doublets=False,
        low_quality_rate=0.0,
    )


def _run(adata: ad.AnnData) -> pd.DataFrame:
    adata = adata.copy()
    da.make_nhoods(adata, use_rep="X_pca", seed=0)
    design = resolve_design(sample_meta(adata), SEPSIS, None)
    tested = da.test_nhoods(adata, design)
    comp = pd.concat(
        [
            stats.composition_test(adata, contrast=SEPSIS, meta=sample_meta(adata), level=lv)
            for lv in ("lineage", "cell_type")
        ]
    )
    nh = da.explain_nhoods(
        da.describe_nhoods(adata).join(tested.set_index("nhood")), composition=comp
    )
    member = sp.csc_matrix(adata.obsm["nhoods"])
    size = nh["size"].to_numpy(float)
    for col in ("ms1_like", *UNNAMED_STATES):
        nh[f"truth_{col}"] = (member.T @ adata.obs[col].to_numpy(float)) / size
    immature = (adata.obs["cell_type"] == "Immature neutrophil").to_numpy(float)
    nh["truth_immature"] = (member.T @ immature) / size
    return nh


def test_spatial_fdr_is_weighted_bh():
    p = np.array([0.001, 0.01, 0.02, 0.5, np.nan])
    # equal weights: plain Benjamini-Hochberg
    np.testing.assert_allclose(da.spatial_fdr(p, np.ones(5))[:4], stats.bh_fdr(p[:4]), rtol=1e-12)
    assert np.isnan(da.spatial_fdr(p, np.ones(5))[4])
    # Milo's graphSpatialFDR: sum(w) * p_(i) / cumsum(w)_(i), then the running minimum
    w = 1 / np.array([1.0, 2.0, 4.0, 1.0])
    want = w.sum() * p[:4] / np.cumsum(w)
    want = np.minimum.accumulate(want[::-1])[::-1]
    np.testing.assert_allclose(da.spatial_fdr(p[:4], np.array([1.0, 2.0, 4.0, 1.0])), want)


def test_neighbourhoods_are_index_cells_with_their_graph_neighbours():
    adata = _cohort(True, 1).copy()
    da.make_nhoods(adata, use_rep="X_pca", seed=0, k=20, prop=0.05)
    member = sp.csc_matrix(adata.obsm["nhoods"])
    index = adata.uns["nhoods"]["index"]
    assert member.shape == (adata.n_obs, index.size)
    assert np.unique(index).size == index.size  # refined sampling drops duplicates
    assert member[index, np.arange(index.size)].min() == 1  # each holds its index cell
    sizes = np.asarray(member.sum(axis=0)).ravel()
    assert sizes.min() >= 20  # at least the index cell's k nearest (undirected graph: more)
    assert adata.uns["nhoods"]["kth_distance"].shape == (index.size,)
    counts = da.nhood_counts(adata)
    assert counts.to_numpy().sum() == member.sum()
    assert list(counts.columns) == sorted(adata.obs["sample_id"].unique())


def test_planted_expansions_are_found_and_the_unnamed_one_is_flagged():
    """Immature neutrophils and MS1 monocytes expand (planted) and are explained by named
    populations; the zinc / metallothionein programme planted in CD4 memory T cells (whose
    share falls) expands too, and no cell type or state explains it."""
    nh = _run(_cohort(True, 1))
    sig = nh[nh["significant"]]
    assert len(sig) > 20
    for col in ("truth_immature", "truth_ms1_like"):
        mostly = nh[nh[col] >= 0.5]
        assert len(mostly) >= 5, col
        assert (mostly["direction"] == "expanded").mean() >= 0.8, col
    zinc = nh[nh["truth_zinc_stress"] >= 0.4]
    assert len(zinc) >= 2
    assert zinc["unexplained"].mean() >= 0.5, zinc
    assert (zinc.loc[zinc["significant"], "direction"] == "expanded").all()
    # the unexplained ones are mostly the planted programme, and the table reads them
    unexpl = nh[nh["unexplained"]]
    assert (unexpl["truth_zinc_stress"] >= 0.2).mean() >= 0.5
    rows = stats.targets.unexplained_rows(nh)
    assert rows and rows[0]["state"] == "unexplained_expansion"
    assert "CD4 memory T" in rows[0]["meaning"]


def test_a_null_cohort_finds_no_neighbourhood():
    # ten null cohorts: benchmarks/da_calibration.py
    nh = _run(_cohort(False, 11))
    assert not nh["significant"].any(), nh.sort_values("pvalue").head()


def test_repeated_samples_are_one_unit_and_per_sample_shares_are_written():
    adata = _cohort(True, 2, n_per=4, repeated=True).copy()
    da.make_nhoods(adata, use_rep="X_pca", seed=0)
    design = resolve_design(sample_meta(adata), SEPSIS, None)
    assert design.n_case == 4 and design.n_control == 4  # S0 and S0b are one donor
    counts = da.nhood_counts(adata)
    units = design.aggregate_sum(counts.T)
    np.testing.assert_array_equal(
        units.loc[design.sample_unit["S0"]].to_numpy(), (counts["S0"] + counts["S0b"]).to_numpy()
    )
    nh = da.describe_nhoods(adata).join(da.test_nhoods(adata, design).set_index("nhood"))
    nh["unexplained"] = nh["significant"]  # every significant one, for the shares
    per = da.unexplained_per_sample(adata, nh)
    assert set(per["readout"]) == {"unexplained_expansion", "unexplained_depletion"}
    assert per["value"].between(0, 1).all()
    assert len(per) == 2 * adata.obs["sample_id"].nunique()


def test_explanation_needs_the_same_direction_and_a_majority():
    nh = pd.DataFrame(
        {
            "significant": [True, True, True, False],
            "log2fc": [2.0, 2.0, -1.0, 3.0],
            "cell_type": ["A", "A", "B", "A"],
            "cell_type_fraction": [0.9, 0.3, 0.9, 0.9],
            "state": ["s1", "", "s1", ""],
            "state_fraction": [0.1, 0.0, 0.8, 0.0],
            "direction": ["expanded", "expanded", "depleted", ""],
        }
    )
    comp = pd.DataFrame(
        {
            "level": ["cell_type"] * 2,
            "label": ["A", "B"],
            "significant": [True, True],
            "effect": [1.0, 1.0],
        }
    )
    eff = pd.DataFrame(
        {"state": ["s1"], "metric": ["fraction"], "significant": [True], "effect": [-0.5]}
    )
    out = da.explain_nhoods(nh, composition=comp, effects=eff)
    assert out["explained_by"].tolist() == ["composition: A", "", "state: s1", ""]
    assert out["unexplained"].tolist() == [False, True, False, False]
