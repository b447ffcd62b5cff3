"""The README's notebook example runs as written: on a small simulated cohort (both blocks)
and, when ``../shared/data`` is present, its first block on a real 10x PBMC sample (only the
input path substituted)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import shared_file

from sepsis_sc.qc import filter_cells_qc, merge_samples, normalize, run_qc
from sepsis_sc.sim import simulate_cohort

REPO = Path(__file__).resolve().parents[1]


def _notebook_blocks() -> list[str]:
    """The python blocks of the README's notebook section, as printed."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Use the library in a notebook", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _notebook_snippet() -> str:
    return "\n".join(_notebook_blocks())


def _with_input(code: str, path: Path) -> str:
    """The code with the one input path of ``sc.read_h5ad("...")`` replaced by ``path``."""
    new, n = re.subn(r'sc\.read_h5ad\("[^"]+"\)', f"sc.read_h5ad({str(path)!r})", code)
    assert n == 1, "the README example should read exactly one h5ad"
    return new


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
    assert str(adata.obs["mono_hladr_low"].dtype) == "boolean"  # calls against the controls
    assert set(table["sample_id"]) == {"A", "B", "C", "D"}
    assert {"effect", "ci_low", "ci_high", "pvalue", "fdr"} <= set(effects.columns)


def test_readme_notebook_first_block_runs_on_a_real_pbmc_sample():
    """One healthy 10x sample, counts in X, no condition column: scores, no calls."""
    path = shared_file("soupx_pbmc4k.h5ad")
    code = _with_input(_notebook_blocks()[0], path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    adata = namespace["adata"]
    assert "counts" not in adata.layers  # the counts were found in X
    assert {"lineage", "cell_type", "annotation_confidence"} <= set(adata.obs.columns)
    mono = adata.obs["lineage"] == "Monocyte"
    assert mono.sum() > 300  # ~600 MNP in the file's own labels
    assert adata.obs.loc[mono, "mono_hladr_low_score"].notna().all()
    assert "mono_hladr_low" not in adata.obs  # no control samples: no state calls
    # the call without a reference is refused, with the fix in the message
    import sepsis_sc as ss

    with pytest.raises(ValueError, match=r"control=.*calls=False"):
        ss.score.score_states(adata, organism="human")
