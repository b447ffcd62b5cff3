"""Fit the simulator's cell-type profiles from real labelled data (``resources/simulator/``).

Writes ``resources/simulator/profiles.tsv.gz``: for every gene of
``resources/genes/human_genes.tsv.gz``, the mean CP10k of each coarse population of real
data, and a per-gene dispersion residual. ``sepsis_sc.sim`` builds every simulated cell
type from one of these columns (times literature fold changes for subsets and for
populations absent from healthy PBMC); it never reads the annotator's marker lists.

Populations (columns):

* ``T_CD4``, ``T_CD8``, ``NK``, ``B``, ``MNP`` (monocytes), ``cDC``: ``soupx_pbmc4k``
  ``obs.Annotation`` (SoupX package data, 10x 4k PBMC, one healthy male donor), each on the
  label's pure cells: NK without CD3/TRAC UMIs (55 of 209; the others are gamma-delta T,
  MAIT and NKT cells), monocytes without DC (CD1C/FCER1A/CLEC10A) or platelet (PPBP/PF4)
  UMIs (455 of 597), cDCs = MNP cells with >= 2 DC-marker UMIs and no CD14 (33).
* ``pDC``: the 20 ``"?"`` cells of ``soupx_pbmc4k`` (LILRA4, JCHAIN, MZB1 high: plasmacytoid
  DCs).
* ``MAC``: macrophages of ``celltypist_sample`` (one female donor, lung/BAL), gated on CD68
  plus a lipid or alveolar macrophage gene (APOE or FABP4 CP10k > 0): 190 cells, 182 of them
  TREM2+ (lipid-associated; Jaitin 2019 Cell, Ramachandran 2019 Nature), so this is a
  TREM2-high profile; the simulator's TREM2-low macrophage divides its lipid-associated
  programme back out. Genes not detected anywhere in
  that sample (its matrix holds 9,810 non-zero genes of 32,786) take the ``MNP`` value.
* ``XIST`` (absent from the male PBMC donor): the mean CP10k of all ``celltypist_sample``
  cells (female donor) in every PBMC column; the simulator silences it in male donors.

Means are shrunk towards the all-cell mean with 5 pseudo-cells (a gene never seen in a small
population keeps a trace). ``disp_resid``: per gene, the log of the method-of-moments
dispersion (size-factor adjusted, within each soupx population with mean count > 0.1) minus
the population's fitted trend log phi = a + b log mean, averaged over populations, shrunk by
half and clipped to [-1, 1]; 0 where not estimable. The per-population trends are printed.

Usage::

    python benchmarks/fit_simulator_profiles.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "resources" / "simulator" / "profiles.tsv.gz"
SHRINK = 5.0
#: old symbols in soupx_pbmc4k -> the current HGNC symbols of the gene resource
RENAMED = {
    "SEPP1": "SELENOP",
    "SDPR": "CAVIN2",
    "FYB": "FYB1",
    "WARS": "WARS1",
    "HIST1H2AC": "H2AC6",
    "HRASLS2": "PLAAT2",
    "FAM129A": "NIBAN1",
}


def _cp10k(X: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    lib = np.asarray(X.sum(1)).ravel()
    return sp.diags(1e4 / np.maximum(lib, 1)) @ X, lib


def _means(cp: sp.csr_matrix, mask: np.ndarray, overall: np.ndarray) -> np.ndarray:
    n = int(mask.sum())
    m = np.asarray(cp[mask].mean(0)).ravel()
    return (n * m + SHRINK * overall) / (n + SHRINK)


def _dispersion(X: sp.csr_matrix, lib: np.ndarray, mask: np.ndarray):
    """Per-gene MoM dispersion within one population and the fitted trend (a, b)."""
    Y = X[mask].astype(np.float64)
    s = lib[mask] / lib[mask].mean()
    Z = sp.diags(1 / s) @ Y
    mu = np.asarray(Z.mean(0)).ravel()
    var = np.asarray(Z.multiply(Z).mean(0)).ravel() - mu**2
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = (var - mu * np.mean(1 / s)) / mu**2
    ok = (mu > 0.1) & (phi > 1e-3)
    x, y = np.log(mu[ok]), np.log(phi[ok])
    bins = np.quantile(x, np.linspace(0, 1, 13))
    idx = np.clip(np.digitize(x, bins[1:-1]), 0, 11)
    bx = np.array([np.median(x[idx == k]) for k in range(12)])
    by = np.array([np.median(y[idx == k]) for k in range(12)])
    b, a = np.polyfit(bx, by, 1)
    resid = np.full(mu.shape, np.nan)
    resid[ok] = y - (a + b * x)
    return resid, (a, b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    args = ap.parse_args()
    data = Path(args.data)
    genes = pd.read_csv(REPO / "resources" / "genes" / "human_genes.tsv.gz", sep="\t", dtype=str)
    symbols = pd.Index(genes["gene_symbol"])

    pbmc = ad.read_h5ad(data / "soupx_pbmc4k.h5ad")
    pbmc = pbmc[:, ~pbmc.var_names.duplicated()]
    X = sp.csr_matrix(pbmc.X, dtype=np.float64)
    cp, lib = _cp10k(X)
    overall = np.asarray(cp.mean(0)).ravel()
    lab = pbmc.obs["Annotation"].astype(str).to_numpy()
    cols: dict[str, np.ndarray] = {}
    resid = []

    def umis(genes: list[str]) -> np.ndarray:
        idx = [pbmc.var_names.get_loc(g) for g in genes]
        return np.asarray(X[:, idx].sum(axis=1)).ravel()

    # A label's mean is the mean of a mixture: 154 of the 209 "NK" cells carry CD3 / TRAC
    # UMIs (gamma-delta T, MAIT and NKT cells: TRDC 9.7, KLRB1 23 CP10k in the label's mean),
    # and the MNP label mixes monocytes, 33 DCs and 42 platelet-bound monocytes. A simulated
    # type drawn from such a mean is every member at once (a CD3+ TRDC+ "NK" cell), so each
    # column is fitted on the label's pure cells.
    t_umis = umis(["CD3D", "CD3E", "CD3G", "TRAC"])
    dc_umis = umis(["CD1C", "FCER1A", "CLEC10A"])
    plt_umis = umis(["PPBP", "PF4"])
    cd14 = umis(["CD14"])
    masks = {
        "T_CD4": lab == "T_CD4",
        "T_CD8": lab == "T_CD8",
        "NK": (lab == "NK") & (t_umis <= 1),
        "B": lab == "B",
        "MNP": (lab == "MNP") & (dc_umis == 0) & (plt_umis == 0),
        "cDC": (lab == "MNP") & (dc_umis >= 2) & (cd14 == 0),
        "pDC": lab == "?",
    }
    for name, mask in masks.items():
        print(f"{name}: {int(mask.sum())} cells")
        cols[name] = _means(cp, mask, overall)
        if mask.sum() > 100:
            r, (a, b) = _dispersion(X, lib, mask)
            resid.append(r)
            print(f"{name}: {mask.sum()} cells, dispersion trend a={a:.2f} b={b:.2f}")
    pbmc_tab = pd.DataFrame(cols, index=pbmc.var_names)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = np.nanmean(np.vstack(resid), 0)
    pbmc_tab["disp_resid"] = np.clip(np.nan_to_num(0.5 * r), -1, 1)

    mac = ad.read_h5ad(data / "celltypist_sample.h5ad")
    mac = mac[:, ~mac.var_names.duplicated()]
    Xm = sp.csr_matrix(mac.X, dtype=np.float64)
    cpm, _ = _cp10k(Xm)

    def g(n: str) -> np.ndarray:
        return np.asarray(cpm[:, mac.var_names.get_loc(n)].todense()).ravel()

    is_mac = (g("CD68") > 0) & ((g("APOE") > 0) | (g("FABP4") > 0))
    print(
        f"celltypist_sample: {is_mac.sum()} macrophages, {(is_mac & (g('TREM2') > 0)).sum()} TREM2+"
    )
    overall_m = np.asarray(cpm.mean(0)).ravel()
    detected = np.asarray((Xm > 0).sum(0)).ravel() > 0
    mac_tab = pd.DataFrame({"MAC": _means(cpm, is_mac, overall_m)}, index=mac.var_names)[detected]

    # genes renamed to current HGNC symbols in the gene resource keep their PBMC values
    pbmc_tab = pbmc_tab.rename(index=RENAMED)
    out = pbmc_tab.reindex(symbols)
    # XIST: the PBMC donor is male; the female level comes from celltypist_sample (below)
    out = out.fillna({c: 0.0 for c in out.columns})
    mac_tab = mac_tab.rename(index=RENAMED).reindex(symbols)
    female = np.asarray(cpm[:, mac.var_names.get_loc("XIST")].mean(0)).ravel()[0]
    out.loc["XIST", ["T_CD4", "T_CD8", "NK", "B", "MNP", "cDC", "pDC"]] = float(female)
    print(f"XIST (female, celltypist_sample, all cells): {female:.2f} CP10k")
    out["MAC"] = mac_tab["MAC"].fillna(out["MNP"])
    out = out[["T_CD4", "T_CD8", "NK", "B", "MNP", "cDC", "pDC", "MAC", "disp_resid"]]
    out.index.name = "gene_symbol"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(OUT, sep="\t", float_format="%.4g", compression="gzip")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB, {len(out)} genes)")


if __name__ == "__main__":
    main()
