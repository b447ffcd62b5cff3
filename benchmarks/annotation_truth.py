"""Truth labels of the real labelled data sets (issue #32), one definition for the reference
build (``benchmarks/annotation_reference.py``), the robustness suite
(``benchmarks/annotation_robustness.py``) and the tests.

Data sets (``../shared/data``, never committed; see its README):

* ``eccite_pbmc_citefuse`` -- protein gates on CLR-normalised ADT counts, two-component
  Gaussian mixtures per protein (positive: posterior > 0.9, negative: < 0.1, else ambiguous).
  The panel's CD14 antibody is near background (its "positive" mixture component holds CD8+
  T cells), so myeloid cells are gated on CD11b (bimodal) instead. Lineage: B = CD19+ CD3-
  CD11b-; T = CD3+ CD19- CD11b-; NK = CD56+ CD3- CD19- HLA-DR not positive; myeloid
  (monocytes + DCs, "MNP") = CD11b+ HLA-DR+, not CD3+ / CD19+ / CD56+ (CD11b's mixture has no
  confident negatives, so "not positive" stands for CD11b-). Within T: CD4 = CD4+ CD8-,
  CD8 = CD8+ CD4-. Naive vs memory: CD45RA and CD45RO are weak and unimodal one by one in
  this panel, so T cells are gated on CD45RA - CD45RO (CLR), a two-component mixture over
  the T cells (posterior 0.9), and on CD27 (mixture over the T cells): naive = RA-high and
  CD27+, memory = RO-high, or RA-high and CD27- (TEMRA, effector memory re-expressing
  CD45RA: "CD8 effector/memory T" in the vocabulary); the rest is left out. CCR7 protein is
  at background in this panel (29 of 500 cells positive), so CD27, lost with CCR7 on the
  way from naive to effector (Romero et al. 2007, J Immunol, DOI 10.4049/jimmunol.178.7.4112),
  takes its place in splitting naive cells from TEMRA.
* ``soupx_pbmc4k`` -- SoupX's ``Annotation`` with its ``Cluster``: MNP cluster 0 classical
  monocytes, 9 non-classical monocytes, 10 cDC, "?" (cluster 11) pDC; cluster 6 (labelled NK,
  CD3+ TRDC+ gamma-delta / MAIT-like T cells) is ambiguous: T or NK accepted, never a
  reference profile.
* ``kang_ifnb_harmony`` -- the 114 author-labelled cells (``muscat_cluster_id_partial``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

__all__ = ["eccite_truth", "soupx_truth", "kang_truth", "TRUTH", "REF_LINEAGE"]

#: reference label -> lineage (the labels the reference profiles carry)
REF_LINEAGE = {
    "CD4 T": "T",
    "CD8 T": "T",
    "NK": "NK",
    "B": "B",
    "Classical monocyte": "Monocyte",
    "Non-classical monocyte": "Monocyte",
    "cDC": "DC",
    "pDC": "DC",
}


def _gate(x: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(2, random_state=seed).fit(x.reshape(-1, 1))
    p = gm.predict_proba(x.reshape(-1, 1))[:, int(np.argmax(gm.means_.ravel()))]
    return np.where(p > 0.9, 1, np.where(p < 0.1, 0, -1))


def _frame(index: pd.Index) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "lineage": "none",  # truth lineage, "none" = not gated / not labelled
            "ok": [frozenset() for _ in range(len(index))],  # accepted calls
            "side": "none",  # CD4 / CD8 / none
            "naive": "none",  # naive / memory / none
            "ref_label": "none",  # label for the reference profiles
        },
        index=index,
    )


def eccite_truth(adata: AnnData) -> pd.DataFrame:
    """Protein-gated truth of the ECCITE-seq PBMC (see the module docstring)."""
    adt = adata.obsm["ADT_counts"].astype(float)
    lg = np.log1p(adt)
    clr = lg.sub(lg.mean(axis=1), axis=0)
    names = ["CD3", "CD4", "CD8", "CD19", "CD56", "CD11b", "MHCII (HLA-DR)"]
    g = {m: _gate(clr[m].to_numpy()) for m in names}

    def pos(m: str) -> np.ndarray:
        return g[m] == 1

    def neg(m: str) -> np.ndarray:
        return g[m] == 0

    out = _frame(adata.obs_names)
    b = pos("CD19") & neg("CD3") & ~pos("CD11b")
    t = pos("CD3") & neg("CD19") & ~pos("CD11b")
    nk = pos("CD56") & neg("CD3") & neg("CD19") & ~pos("MHCII (HLA-DR)")
    mnp = pos("CD11b") & pos("MHCII (HLA-DR)") & ~pos("CD3") & ~pos("CD19") & ~pos("CD56")
    for mask, lin, ok, ref in (
        (b, "B", {"B"}, "B"),
        (t, "T", {"T"}, "none"),
        (nk, "NK", {"NK"}, "NK"),
        (mnp, "Monocyte", {"Monocyte", "DC"}, "none"),
    ):
        out.loc[mask, "lineage"] = lin
        out.loc[mask, "ok"] = pd.Series([frozenset(ok)] * int(mask.sum()), dtype=object).values
        out.loc[mask, "ref_label"] = ref
    cd4 = t & pos("CD4") & neg("CD8")
    cd8 = t & pos("CD8") & neg("CD4")
    out.loc[cd4, "side"] = "CD4"
    out.loc[cd8, "side"] = "CD8"
    out.loc[cd4, "ref_label"] = "CD4 T"
    out.loc[cd8, "ref_label"] = "CD8 T"
    ra_ro = np.zeros(len(out), dtype=int) - 1
    ra_ro[t] = _gate((clr["CD45RA"] - clr["CD45RO"]).to_numpy()[t])
    cd27 = np.zeros(len(out), dtype=int) - 1
    cd27[t] = _gate(clr["CD27"].to_numpy()[t])
    out.loc[(ra_ro == 1) & (cd27 == 1), "naive"] = "naive"
    out.loc[(ra_ro == 0) | ((ra_ro == 1) & (cd27 == 0)), "naive"] = "memory"
    return out


_SOUPX = {
    "T_CD4": ("T", {"T"}, "CD4"),
    "T_CD8": ("T", {"T"}, "CD8"),
    "B": ("B", {"B"}, "none"),
    "NK": ("NK", {"NK"}, "none"),
    "MNP": ("Monocyte", {"Monocyte", "DC"}, "none"),
    "?": ("DC", {"DC"}, "none"),
}
_SOUPX_REF = {"0": "Classical monocyte", "9": "Non-classical monocyte", "10": "cDC", "11": "pDC"}


def soupx_truth(adata: AnnData) -> pd.DataFrame:
    """SoupX author labels (coarse; cluster 6 accepted as T or NK, see the module docstring)."""
    out = _frame(adata.obs_names)
    lab = adata.obs["Annotation"].astype(str).to_numpy()
    cl = adata.obs["Cluster"].astype(str).to_numpy()
    for key, (lin, ok, side) in _SOUPX.items():
        m = lab == key
        out.loc[m, "lineage"] = lin
        out.loc[m, "ok"] = pd.Series([frozenset(ok)] * int(m.sum()), dtype=object).values
        out.loc[m, "side"] = side
    gd = (lab == "NK") & (cl == "6")
    out.loc[gd, "ok"] = pd.Series([frozenset({"T", "NK"})] * int(gd.sum()), dtype=object).values
    ref = pd.Series(cl).map(_SOUPX_REF).to_numpy()
    ref = np.where(lab == "T_CD4", "CD4 T", ref)
    ref = np.where(lab == "T_CD8", "CD8 T", ref)
    ref = np.where(lab == "B", "B", ref)
    ref = np.where((lab == "NK") & (cl == "8"), "NK", ref)
    out["ref_label"] = pd.Series(ref).fillna("none").astype(str).to_numpy()
    return out


_KANG = {
    "CD14+ Monocytes": ("Monocyte", "none", "Classical monocyte"),
    "FCGR3A+ Monocytes": ("Monocyte", "none", "Non-classical monocyte"),
    "CD4 T cells": ("T", "CD4", "CD4 T"),
    "CD8 T cells": ("T", "CD8", "CD8 T"),
    "B cells": ("B", "none", "B"),
    "NK cells": ("NK", "none", "NK"),
    "Dendritic cells": ("DC", "none", "cDC"),
}


def kang_truth(adata: AnnData) -> pd.DataFrame:
    """Kang et al. author labels (114 cells; the others are not labelled)."""
    out = _frame(adata.obs_names)
    lab = adata.obs["muscat_cluster_id_partial"].astype(object).fillna("none").astype(str)
    for key, (lin, side, ref) in _KANG.items():
        m = (lab == key).to_numpy()
        out.loc[m, "lineage"] = lin
        out.loc[m, "ok"] = pd.Series([frozenset({lin})] * int(m.sum()), dtype=object).values
        out.loc[m, "side"] = side
        out.loc[m, "ref_label"] = ref
    return out


#: data set -> (file name, truth function)
TRUTH = {
    "eccite": ("eccite_pbmc_citefuse.h5ad", eccite_truth),
    "soupx": ("soupx_pbmc4k.h5ad", soupx_truth),
    "kang": ("kang_ifnb_harmony.h5ad", kang_truth),
}
