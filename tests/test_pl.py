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


def test_every_vocabulary_label_has_its_own_colour():
    """Every cell-type label of the vocabulary (coarse ones such as 'T unresolved' and
    'naive T' included) has a fixed colour, and no two labels share one: the fallback
    palette drew 'T unresolved' in CD4 naive T's colour and 'DC unresolved' in classical
    monocytes'."""
    from sepsis_sc.annotate import load_vocabulary
    from sepsis_sc.pl.style import CELL_TYPE_COLOURS

    labels = list(load_vocabulary().cell_types.index)
    missing = [c for c in labels if c not in CELL_TYPE_COLOURS]
    assert not missing, missing
    colours = [CELL_TYPE_COLOURS[c].lower() for c in labels]
    dup = {c for c in colours if colours.count(c) > 1}
    assert not dup, [lab for lab in labels if CELL_TYPE_COLOURS[lab].lower() in dup]
