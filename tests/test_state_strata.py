"""States are scored within the subset where they are defined (issue #16 item 6).

Two simulated cohorts, both ways round:

* **composition only**: sepsis shifts the mix of subsets whose baselines differ (more CD8
  effector/memory vs naive T, more Tregs among CD4 T, more neutrophils vs monocytes, more
  cDC1 vs cDC2) with no change of state inside any subset. The shipped signatures (scored
  within CD8 effector/memory T, within Tregs, per lineage, per cDC subset) report no state
  effect; the same genes scored over the pooled populations of the old parents do report
  one, which shows that the cohort carries the confound the strata remove.
* **state only**: fixed composition, a state change inside one subset (exhausted CD8
  effector/memory T, cytokine-high monocytes, tolerogenic cDC2, activated Tregs) is found,
  and the strata where nothing changed stay quiet.

Measured over 10 seeds of each cohort: composition only, 1 primary row of ~70 with FDR <= 0.05
(the pooled old parents: 36 of 40 state rows); state only, 36 of 40 planted changes found and
no quiet stratum at p <= 0.05. The tests use fixed seeds.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sepsis_sc import stats
from sepsis_sc.score import load_signatures, score_states

CASE, CONTROL = "sepsis", "control"
HUMAN = {s["name"]: s for s in load_signatures("human")}

#: cell type -> (lineage, baseline mean counts of the genes that differ between subsets).
#: Effector/memory CD8 T carry part of the "exhaustion" genes at rest and less IL7R / CD28 /
#: TCF7; neutrophils make more IL1B / CXCL8 than monocytes; cDC1 express IDO1 and CD274.
TYPES = {
    "CD8 naive T": ("T", {"CD3D": 8, "CD8A": 4, "IL7R": 6, "CD28": 4, "TCF7": 5, "CCR7": 4}),
    "CD8 effector/memory T": (
        "T",
        {
            "CD3D": 8,
            "CD8A": 4,
            "IL7R": 1.5,
            "CD28": 1.0,
            "TCF7": 1.0,
            "PDCD1": 1.0,
            "TIGIT": 1.5,
            "CD160": 0.8,
            "CD244": 0.8,
            "HAVCR2": 0.3,
            "TOX": 0.6,
            "GZMK": 5,
        },
    ),
    "CD4 memory T": ("T", {"CD3D": 8, "CD4": 3, "IL7R": 6, "CD28": 4, "TCF7": 3}),
    "Treg": (
        "T",
        {
            "CD3D": 8,
            "CD4": 3,
            "FOXP3": 2,
            "IL2RA": 2,
            "CTLA4": 1.5,
            "IKZF2": 1,
            "TIGIT": 1.2,
            "TNFRSF18": 0.8,
            "TNFRSF4": 0.8,
            "ENTPD1": 0.5,
            "IL7R": 1,
        },
    ),
    "Classical monocyte": (
        "Monocyte",
        {"CD14": 10, "LYZ": 30, "IL1B": 1.5, "CXCL8": 1.5, "CCL3": 0.4, "CCL4": 0.4, "TNF": 0.2},
    ),
    "Mature neutrophil": (
        "Neutrophil",
        {
            "FCGR3B": 10,
            "CXCR2": 6,
            "IL1B": 6,
            "CXCL8": 10,
            "CCL3": 2,
            "CCL4": 2,
            "TNF": 1.5,
            "OSM": 1.5,
            "CSF3": 0.6,
        },
    ),
    "cDC1": (
        "DC",
        {
            "CLEC9A": 4,
            "HLA-DRA": 25,
            "HLA-DPA1": 10,
            "CD74": 30,
            "IDO1": 5,
            "CD274": 1.5,
            "CD86": 2,
            "CD40": 1.5,
        },
    ),
    "cDC2": (
        "DC",
        {
            "CD1C": 5,
            "HLA-DRA": 25,
            "HLA-DPA1": 10,
            "CD74": 30,
            "IDO1": 0.2,
            "CD274": 0.2,
            "CD86": 2,
            "CD40": 0.8,
        },
    ),
}

#: cells per sample (control); the composition scenario moves them in sepsis
CONTROL_CELLS = {
    "CD8 naive T": 110,
    "CD8 effector/memory T": 50,
    "CD4 memory T": 150,
    "Treg": 20,
    "Classical monocyte": 150,
    "Mature neutrophil": 50,
    "cDC1": 12,
    "cDC2": 50,
}
SEPSIS_SHIFT = {
    "CD8 naive T": 50,
    "CD8 effector/memory T": 110,
    "CD4 memory T": 120,
    "Treg": 42,
    "Classical monocyte": 50,
    "Mature neutrophil": 150,
    "cDC1": 30,
    "cDC2": 32,
}

#: state programmes inside one subset: cell type -> (up genes x fold, down genes x fold,
#: control rate, sepsis rate)
STATES = {
    "CD8 effector/memory T": (
        {g: 8 for g in ("PDCD1", "HAVCR2", "LAG3", "TOX", "CTLA4", "TIGIT")},
        {"IL7R": 0.3, "CD28": 0.3, "TCF7": 0.3},
        0.05,
        0.30,
    ),
    "Classical monocyte": (
        {g: 6 for g in ("IL1B", "CXCL8", "TNF", "CCL3", "CCL4", "IL6", "CCL2")},
        {},
        0.05,
        0.35,
    ),
    "cDC2": (
        {g: 8 for g in ("IDO1", "CD274", "IL10", "PDCD1LG2", "LILRB4")},
        {"HLA-DRA": 0.3, "HLA-DPA1": 0.3, "CD74": 0.4, "CD86": 0.4, "CD40": 0.4},
        0.05,
        0.5,
    ),
    "Treg": (
        {g: 5 for g in ("FOXP3", "CTLA4", "IKZF2", "TNFRSF18", "TNFRSF4", "CCR8", "ENTPD1")},
        {},
        0.1,
        0.6,
    ),
}

#: the states under test and the pooled parents they had before scoring within subsets
OLD_PARENTS = {
    "t_exhaustion": {
        "parent": {"lineage": ["T"]},
        "call_within": {"cell_type": ["CD8 naive T", "CD8 effector/memory T"]},
    },
    "treg_suppressive": {"parent": {"lineage": ["T"]}},
    "dc_tolerogenic": {"parent": {"lineage": ["DC"]}, "per": None},
    "cytokine_storm": {"parent": {"lineage": ["Monocyte", "Neutrophil"]}, "per": None},
}


def _cohort(*, shift: bool, state_change: bool, n: int = 5, seed: int = 0) -> ad.AnnData:
    """``n`` control and ``n`` sepsis samples; ``shift`` moves the subset mix in sepsis,
    ``state_change`` raises the state rates inside the subsets of :data:`STATES`."""
    rng = np.random.default_rng(seed)
    genes = list(dict.fromkeys(g for s in HUMAN.values() for g in s["up"] + s["down"]))
    genes += [g for _, prog in TYPES.values() for g in prog if g not in genes]
    genes = list(dict.fromkeys(genes)) + [f"FILLER{i}" for i in range(300)]
    gidx = {g: i for i, g in enumerate(genes)}
    background = rng.lognormal(-1.0, 1.2, len(genes))
    background[: len(genes) - 300] *= 0.03  # signature genes are mostly off
    blocks, obs = [], []
    for cond in (CONTROL, CASE):
        for i in range(n):
            sid = f"{cond[0].upper()}{i}"
            sepsis = cond == CASE
            sizes = SEPSIS_SHIFT if (sepsis and shift) else CONTROL_CELLS
            for ctype, (lineage, prog) in TYPES.items():
                k = rng.poisson(sizes[ctype] * np.exp(rng.normal(0, 0.2)))
                mu = np.tile(background, (k, 1))
                for g, m in prog.items():
                    mu[:, gidx[g]] = m
                if ctype in STATES:
                    up, down, r0, r1 = STATES[ctype]
                    rate = r1 if (sepsis and state_change) else r0
                    rate = 1 / (1 + np.exp(-(np.log(rate / (1 - rate)) + rng.normal(0, 0.2))))
                    hit = rng.random(k) < rate
                    for g, f in up.items():
                        mu[hit, gidx[g]] = max(mu[0, gidx[g]], 0.3) * f
                    for g, f in down.items():
                        mu[hit, gidx[g]] *= f
                lib = rng.lognormal(0, 0.3, k)[:, None]
                counts = rng.poisson(rng.gamma(5.0, mu * lib / 5.0))
                blocks.append(sp.csr_matrix(counts.astype(np.float32)))
                obs.append(
                    pd.DataFrame(
                        {
                            "sample_id": sid,
                            "condition": cond,
                            "donor": f"D{sid}",
                            "lineage": lineage,
                            "cell_type": ctype,
                        },
                        index=range(k),
                    )
                )
    counts = sp.vstack(blocks).tocsr()
    obs_df = pd.concat(obs, ignore_index=True)
    obs_df.index = [f"c{i}" for i in range(len(obs_df))]
    adata = ad.AnnData(counts.copy(), obs=obs_df, var=pd.DataFrame(index=genes))
    adata.layers["counts"] = counts
    return adata


def _primary_effects(adata: ad.AnnData, signatures=None) -> pd.DataFrame:
    """Score the four states, aggregate per sample, test with the primary metrics."""
    score_states(adata, signatures=signatures, states=list(OLD_PARENTS), control=CONTROL)
    table = stats.sample_table(adata, min_cells=8)
    eff = stats.condition_effects(table, case=CASE, control=CONTROL)
    return eff[eff["role"] == "primary"].set_index("state")


def _old_signatures() -> list[dict]:
    return [{**HUMAN[name], **over} for name, over in OLD_PARENTS.items()]


@pytest.fixture(scope="module")
def shifted():
    return _cohort(shift=True, state_change=False, seed=3)


def test_composition_shift_alone_gives_no_state_effect(shifted):
    eff = _primary_effects(shifted.copy())
    # one row per stratum: cytokine per lineage, tolerogenic DC per cDC subset
    assert {
        "t_exhaustion",
        "treg_suppressive",
        "dc_tolerogenic.cdc1",
        "dc_tolerogenic.cdc2",
        "cytokine_storm.monocyte",
        "cytokine_storm.neutrophil",
    } <= set(eff.index)
    assert eff.loc["t_exhaustion", "population"].startswith("cell_type: CD8 effector/memory T")
    assert (eff["fdr"] > 0.05).all(), eff[["effect", "fdr"]]
    # the same genes over the pooled old parents read the subset shift as a state change
    old = _primary_effects(shifted.copy(), signatures=_old_signatures())
    for state in OLD_PARENTS:
        assert old.loc[state, "fdr"] <= 0.05 and old.loc[state, "effect"] > 0, state


def test_state_change_within_fixed_composition_is_found():
    eff = _primary_effects(_cohort(shift=False, state_change=True, seed=4))
    for state in (
        "t_exhaustion",
        "treg_suppressive",
        "dc_tolerogenic.cdc2",
        "cytokine_storm.monocyte",
    ):
        assert eff.loc[state, "fdr"] <= 0.05 and eff.loc[state, "effect"] > 0, state
    # the strata where nothing was planted stay quiet
    for state in ("dc_tolerogenic.cdc1", "cytokine_storm.neutrophil"):
        assert eff.loc[state, "pvalue"] > 0.05, state


def test_stratified_states_in_therapy_table_and_primary_metrics():
    """A stratified state takes its base state's therapy entry: one target row per stratum."""
    adata = _cohort(shift=False, state_change=True, n=3, seed=5)
    eff = _primary_effects(adata)
    full = stats.condition_effects(
        stats.sample_table(adata, min_cells=8), case=CASE, control=CONTROL
    )
    targets = stats.therapy_targets(full)
    rows = targets.set_index("state")
    assert {
        "cytokine_storm.monocyte",
        "cytokine_storm.neutrophil",
        "dc_tolerogenic.cdc1",
        "dc_tolerogenic.cdc2",
    } <= set(rows.index)
    assert rows.loc["cytokine_storm.monocyte", "therapy"].startswith("Extracorporeal")
    assert rows.loc["dc_tolerogenic.cdc2", "metric"] == "mean_score"
    assert stats.primary_metrics(["dc_tolerogenic.cdc2"]) == {"dc_tolerogenic.cdc2": "mean_score"}
    assert eff.loc["cytokine_storm.monocyte", "label"].endswith("(Monocyte)")


def test_stratification_rules_are_checked(shifted):
    bad = [{**HUMAN["cytokine_storm"], "per": "sample_id"}]
    with pytest.raises(ValueError, match="per must be one of"):
        score_states(shifted.copy(), signatures=bad, control=CONTROL)
    with pytest.raises(ValueError, match="separates a state from its stratum"):
        score_states(
            shifted.copy(), signatures=[{**HUMAN["t_exhaustion"], "name": "a.b"}], control=CONTROL
        )
    # a per-lineage state over all cells: one state per lineage present, Unassigned left out
    a = shifted.copy()
    a.obs["lineage"] = a.obs["lineage"].astype(str)
    a.obs.loc[a.obs_names[:30], "lineage"] = "Unassigned"
    t = score_states(a, states=["ifn_response"], control=CONTROL, min_genes=1).set_index("state")
    assert set(t.index) == {
        "ifn_response.t",
        "ifn_response.monocyte",
        "ifn_response.neutrophil",
        "ifn_response.dc",
    }
    assert np.isnan(a.obs.loc[a.obs_names[:30], "ifn_response.t_score"]).all()
