"""The README's notebook example runs as written (on a small simulated cohort)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from sepsis_sc.qc import filter_cells_qc, merge_samples, normalize, run_qc
from sepsis_sc.simulate import simulate_cohort

REPO = Path(__file__).resolve().parents[1]


def _notebook_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Use the library in a notebook", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_readme_notebook_example_runs(tmp_path, monkeypatch):
    sheet = pd.DataFrame(
        {
            "sample_id": ["A", "B", "C", "D"],
            "condition": ["sepsis", "control", "sepsis", "control"],
            "donor": ["a", "b", "c", "d"],
            "batch": ["b1", "b1", "b2", "b2"],
        }
    )
    adatas, _ = simulate_cohort(sheet, cells_per_sample=300, n_genes=3000, seed=2)
    kept = []
    for sid, adata in adatas.items():
        for col in ("condition", "donor", "batch"):
            adata.obs[col] = sheet.set_index("sample_id").loc[sid, col]
        adata.obs["sample_id"] = sid
        run_qc(adata, sample_id=sid, organism="human", doublet_method="none")
        kept.append(filter_cells_qc(adata))
    merged = merge_samples(kept)
    normalize(merged)
    merged.write_h5ad(tmp_path / "my_cohort.h5ad")

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_notebook_snippet(), "README.md", "exec"), namespace)
    adata, table, effects = namespace["adata"], namespace["table"], namespace["effects"]
    assert {"lineage", "cell_type", "annotation_confidence"} <= set(adata.obs.columns)
    assert any(c.endswith("_score") for c in adata.obs.columns)
    assert set(table["sample_id"]) == {"A", "B", "C", "D"}
    assert {"effect", "ci_low", "ci_high", "pvalue", "fdr"} <= set(effects.columns)
