"""Mouse runs use the mouse marker and signature sets end to end (symbol case, mt- genes)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sepsis_sc.annotate import annotate
from sepsis_sc.data import detect_organism
from sepsis_sc.qc import filter_cells_qc, merge_samples, normalize, run_qc
from sepsis_sc.score import score_states
from sepsis_sc.sim import simulate_cohort


@pytest.fixture(scope="module")
def mouse_cohort():
    sheet = pd.DataFrame(
        {
            "sample_id": ["M1", "M2", "M3", "M4"],
            "condition": ["CLP", "sham", "CLP", "sham"],
            "donor": ["m1", "m2", "m3", "m4"],
            "batch": ["b1", "b1", "b2", "b2"],
        }
    )
    adatas, truth = simulate_cohort(
        sheet,
        cells_per_sample=500,
        n_genes=4000,
        organism="mouse",
        case="CLP",
        control="sham",
        seed=3,
    )
    filtered = []
    for sid, adata in adatas.items():
        for col in ("sample_id", "condition", "donor", "batch"):
            adata.obs[col] = (
                sheet.set_index("sample_id").loc[sid, col] if col != "sample_id" else sid
            )
        run_qc(adata, sample_id=sid, organism="mouse", seed=0)
        filtered.append(filter_cells_qc(adata))
    merged = merge_samples(filtered, organism="mouse")
    normalize(merged)
    return merged, truth.set_index("cell_id")


def test_mouse_symbols_and_mito_genes(mouse_cohort):
    adata, _ = mouse_cohort
    assert detect_organism(adata.var_names) == "mouse"
    mt = adata.var_names[adata.var["mt"]]
    assert len(mt) >= 10 and all(g.startswith("mt-") for g in mt)
    assert "pct_counts_mt" in adata.obs and adata.obs["pct_counts_mt"].median() > 0.5


def test_mouse_annotation_uses_mouse_markers(mouse_cohort):
    adata, truth = mouse_cohort
    annotate(adata, organism="auto", expected_organism="mouse", seed=0)
    found = truth.reindex(adata.obs_names)
    ok = found["lineage"].notna() & ~found["is_doublet"].astype(bool)
    accuracy = (adata.obs.loc[ok, "lineage"] == found.loc[ok, "lineage"]).mean()
    assert accuracy >= 0.85, accuracy
    assert {"T", "B", "Monocyte"} <= set(adata.obs["lineage"])
    # a human config on mouse data is a clear error, not silent nonsense
    with pytest.raises(ValueError, match="(?i)mouse"):
        annotate(adata.copy(), organism="auto", expected_organism="human")


def test_mouse_states_scored_with_mouse_signatures(mouse_cohort):
    adata, _ = mouse_cohort
    if "lineage" not in adata.obs:
        annotate(adata, organism="mouse", seed=0)
    rules = score_states(adata, organism="mouse", control="sham")
    scored = rules[rules["status"] == "scored"]
    assert len(scored) >= 4
    assert "mono_hladr_low_score" in adata.obs
    values = adata.obs["mono_hladr_low_score"]
    mono = adata.obs["lineage"] == "Monocyte"
    assert values[mono].notna().all() and values[~mono].isna().all()
    assert np.isfinite(values[mono]).mean() == 1.0
