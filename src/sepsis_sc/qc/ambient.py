"""Ambient RNA (soup) for blood: soup profile, contamination, correction, soup-only droplets.

Blood soup is rich in haemoglobin (lysed erythrocytes), S100A8/A9 and LYZ (neutrophils and
monocytes) and PPBP/PF4 (platelets), more so in sepsis. Left in, it gives T cells a myeloid
"inflammatory" signal, inflates platelet and erythroid markers everywhere and lets droplets
holding only soup pass as neutrophils or platelets. The steps, per sample:

1. **First-pass lineage** (:func:`first_pass_lineage`): a coarse label per droplet from the
   mean log CP10k of lineage markers that are *not* soup-dominated (CD14/FCN1/CSF1R rather
   than LYZ/S100A8, FCGR3B/CSF3R/CXCR2 for neutrophils). A droplet is ``Platelet`` only
   when it has no leukocyte identity, so platelet-monocyte aggregates stay ``Monocyte``.
   The labels group cells for SoupX's non-expressing-cell test, for the per-lineage QC
   summary and for the upper-tail rule of :mod:`sepsis_sc.qc.blood`.
2. **Soup profile** (:func:`estimate_soup`): with the raw (unfiltered) droplet matrix, the
   SoupX estimate (Young & Behjati 2020, GigaScience 9:giaa151): the pooled profile of the
   droplets with 0 < UMIs < ``soup_max_counts`` (100, SoupX's ``soupRange``). Without raw
   droplets the pooled profile of the filtered cells stands in (as in decontX, Yang 2020
   Genome Biol): it lacks transcripts from cells that were never captured (haemoglobin of
   erythrocytes), so those genes are not used to estimate the contamination then.
3. **Contamination** (:func:`estimate_contamination`): SoupX's ``calculateContaminationFraction``
   with ``estimateNonExpressingCells``: gene sets exclusive to one lineage (haemoglobin;
   PPBP/PF4; S100A8/S100A9/LYZ; immunoglobulins) are counted in the lineages where no cell
   expresses them beyond what soup alone could give, and the Poisson fit of those counts on
   the soup expectation gives one rho per sample.
4. **Correction** (:func:`correct_counts`): SoupX's subtraction (``adjustCounts``, per
   first-pass lineage, stochastically rounded to integers) into ``layers["soupx_counts"]``;
   ``layers["counts"]`` keeps the raw counts.
5. **Soup-only droplets** (:func:`flag_soup_droplets`): a droplet below its sample's median
   UMIs whose counts are better explained by the soup profile than by any lineage profile
   (multinomial log-likelihood) is soup, whatever markers it carries.

SoupX's estimation and correction come from ``pysoupx`` (a Python port of SoupX; its soup
profile, rho and subtraction were checked against the whole-blood simulator, see
``docs/qc.md``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from sepsis_sc.data import get_counts

logger = logging.getLogger(__name__)

__all__ = [
    "LINEAGE_MARKERS",
    "LINEAGE_NEGATIVES",
    "LINEAGES",
    "NON_EXPRESSED_SETS",
    "first_pass_lineage",
    "estimate_soup",
    "estimate_contamination",
    "correct_counts",
    "flag_soup_droplets",
]

#: first-pass lineage markers (human), chosen to be cell-intrinsic rather than soup-dominated
#: (biology reference §1.2; Azimuth PBMC, Hao 2021 PMID 34062119)
LINEAGE_MARKERS: dict[str, list[str]] = {
    "T": ["CD3D", "CD3E", "CD3G", "TRAC", "CD2", "LCK"],
    "NK": ["NKG7", "GNLY", "KLRD1", "KLRF1", "PRF1"],
    "B": ["MS4A1", "CD79A", "CD79B", "BANK1", "CD19"],
    "Plasma": ["JCHAIN", "MZB1", "TNFRSF17", "DERL3", "TXNDC5"],
    "Monocyte": ["CD14", "FCN1", "VCAN", "CSF1R", "LST1", "MS4A7"],
    "DC": ["FCER1A", "CD1C", "CLEC10A", "LILRA4", "CLEC9A"],
    "Neutrophil": ["FCGR3B", "CSF3R", "CXCR2", "CMTM2", "FPR1"],
    # immature (left-shifted) neutrophils of sepsis lack FCGR3B / CXCR2 and carry granule
    # protein transcripts instead (Mare 2015 Genome Med; Reyes 2020 Nat Med; Kwok 2023 Nat
    # Immunol); without this set they read as monocytes (LST1 / VCAN)
    "Neutrophil/immature": ["LCN2", "LTF", "CAMP", "MMP8", "CEACAM8", "OLFM4", "BPI"],
    "Platelet": ["GP9", "ITGA2B", "TUBB1", "GNG11", "NRGN", "PPBP", "PF4"],
    "Erythroid": ["ALAS2", "AHSP", "CA1", "SLC4A1", "HBD"],
}
#: genes whose expression counts against a lineage's first-pass score (their mean log1p
#: CP10k is subtracted): the NK set's NKG7 / GNLY / PRF1 / KLRD1 are made by cytotoxic CD8 T
#: cells too, so without this a CD8-rich sample's T cells were labelled NK (eccite PBMC: 66 %
#: of protein-gated T cells; issue #32's shared-gene failure, here in QC)
LINEAGE_NEGATIVES: dict[str, list[str]] = {
    "NK": ["CD3D", "CD3E", "CD3G", "TRAC"],
}
#: the lineages a first-pass label can take (plus ``Unassigned``), in summary order
LINEAGES: tuple[str, ...] = (*dict.fromkeys(k.split("/")[0] for k in LINEAGE_MARKERS), "Unassigned")

#: gene sets expressed by one lineage only (SoupX's nonExpressedGeneList), and that lineage
NON_EXPRESSED_SETS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "haemoglobin": (["HBB", "HBA1", "HBA2"], ("Erythroid",)),
    "platelet": (["PPBP", "PF4"], ("Platelet",)),
    "granule": (["S100A8", "S100A9", "LYZ"], ("Monocyte", "Neutrophil", "DC")),
    "immunoglobulin": (["IGKC", "IGHM", "IGLC2", "JCHAIN", "IGHG1", "IGHA1"], ("B", "Plasma")),
}


def _lognorm(counts: sparse.csr_matrix) -> sparse.csr_matrix:
    total = np.asarray(counts.sum(axis=1)).ravel()
    scale = 1e4 / np.maximum(total, 1.0)
    x = sparse.diags(scale) @ counts
    x = sparse.csr_matrix(x)
    x.data = np.log1p(x.data)
    return x


def first_pass_lineage(
    adata: ad.AnnData,
    *,
    markers: Mapping[str, Sequence[str]] | None = None,
    negatives: Mapping[str, Sequence[str]] | None = None,
    min_score: float = 0.5,
    key_added: str = "qc_lineage",
    n_neighbors: int = 15,
    seed: int = 0,
) -> pd.Series:
    """Coarse lineage per droplet from raw counts (mean log1p CP10k of each marker set,
    averaged over the droplet's nearest neighbours).

    Parameters
    ----------
    adata
        Raw counts in ``layers["counts"]`` (or integer ``X``); gene symbols as ``var_names``.
    markers
        ``{lineage: genes}``; default :data:`LINEAGE_MARKERS`. Sets with no gene present are
        skipped; ``"<lineage>/<name>"`` keys are alternative sets of one lineage (its score is
        the best of them, e.g. mature and immature neutrophils).
    negatives
        ``{lineage: genes}`` whose mean log1p CP10k is subtracted from the lineage's score
        (default :data:`LINEAGE_NEGATIVES`: T-cell receptor complex genes against NK, whose
        set a cytotoxic CD8 T cell shares); ``{}`` for none.
    min_score
        A droplet whose best score is below this is ``Unassigned``.
    key_added
        ``obs`` column written (categorical).
    n_neighbors
        Marker scores are averaged over each droplet and its ``n_neighbors`` nearest
        droplets (Euclidean, 20 principal components of the log CP10k of the 2,000 most
        variable genes) before the label is taken; 0 scores each droplet alone. A 1,000-UMI
        neutrophil carries two or three counts of its markers, so droplet-alone labels are
        noisy: on the whole-blood simulator one septic neutrophil in three was labelled
        Monocyte, which pulled the monocytes' per-lineage upper count cut down onto real
        monocytes (7.8 % of septic monocytes removed, 0 % of control ones); with 15
        neighbours the labels follow the cell's neighbourhood.
    seed
        Random state of the randomized PCA.

    Returns
    -------
    The labels (index ``obs_names``). ``Platelet`` (or ``Erythroid``) is given only to
    droplets whose best leukocyte score is below both ``min_score`` and 0.4 x their platelet
    score: platelet genes on a leukocyte mark an aggregate, not a platelet.
    """
    markers = dict(LINEAGE_MARKERS if markers is None else markers)
    negatives = dict(LINEAGE_NEGATIVES if negatives is None else negatives)
    counts = sparse.csr_matrix(get_counts(adata, check=False)[0])
    x = _lognorm(counts)
    index = pd.Index(adata.var_names.astype(str))

    def mean_of(genes: Sequence[str]) -> np.ndarray | None:
        cols = index.get_indexer(list(genes))
        cols = cols[cols >= 0]
        return np.asarray(x[:, cols].mean(axis=1)).ravel() if cols.size else None

    names, scores = [], []
    for lineage, genes in markers.items():
        score = mean_of(genes)
        if score is None:
            continue
        lineage = lineage.split("/")[0]
        neg = mean_of(negatives.get(lineage, []))
        if neg is not None:
            score = np.maximum(score - neg, 0.0)
        if lineage in names:  # alternative set of a lineage: the better of the two
            i = names.index(lineage)
            scores[i] = np.maximum(scores[i], score)
            continue
        names.append(lineage)
        scores.append(score)
    if not names:
        labels = np.full(adata.n_obs, "Unassigned", dtype=object)
    else:
        s = np.vstack(scores).T
        leuko = [i for i, n in enumerate(names) if n not in ("Platelet", "Erythroid")]
        best = np.array(names, dtype=object)[s.argmax(axis=1)]
        best_leuko = s[:, leuko].max(axis=1) if leuko else np.zeros(adata.n_obs)
        # which leukocyte: from the neighbourhood-averaged scores; whether a droplet is a
        # leukocyte, a platelet or nothing: from its own counts (aggregates and soup-only
        # droplets are single droplets, not neighbourhoods)
        other = np.isin(best, ["Platelet", "Erythroid"])
        leuko_label = best.copy()
        if leuko:
            own = np.array(names, dtype=object)[np.array(leuko)[s[:, leuko].argmax(1)]]
            smooth = _neighbour_mean(x, s[:, leuko], n_neighbors, seed)
            nbhd = np.array(names, dtype=object)[np.array(leuko)[smooth.argmax(1)]]
            # an aggregate's neighbours are platelets: its leukocyte is read from itself
            leuko_label = np.where(other, own, nbhd)
        # platelet / erythroid genes on a droplet with a leukocyte identity mark an aggregate
        # (or soup), not a platelet: such droplets take their leukocyte label
        labels = np.where(
            ~other | (best_leuko >= np.maximum(min_score, 0.4 * s.max(axis=1))), leuko_label, best
        )
        labels[s.max(axis=1) < min_score] = "Unassigned"
    out = pd.Series(pd.Categorical(labels, categories=[c for c in LINEAGES]), index=adata.obs_names)
    adata.obs[key_added] = out.to_numpy()
    return out


def _neighbour_mean(x: sparse.csr_matrix, scores: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``scores`` (droplets x sets) averaged over each droplet and its ``k`` nearest
    droplets in a 20-component PCA of the log CP10k of the 2,000 most variable genes."""
    n = x.shape[0]
    if k <= 0 or n <= k + 2:
        return scores
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    mean = np.asarray(x.mean(axis=0)).ravel()
    var = np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean**2
    top = np.argsort(var)[::-1][: min(2000, x.shape[1])]
    dense = x[:, top].toarray().astype(np.float32)
    n_pcs = min(20, n - 1, dense.shape[1] - 1)
    pcs = PCA(n_components=n_pcs, svd_solver="randomized", random_state=seed).fit_transform(dense)
    idx = NearestNeighbors(n_neighbors=k).fit(pcs).kneighbors(return_distance=False)
    return (scores + scores[idx].sum(axis=1)) / (k + 1)


def estimate_soup(
    adata: ad.AnnData,
    raw: ad.AnnData | None = None,
    *,
    soup_max_counts: float,
    min_droplets: int = 50,
) -> tuple[pd.Series, str]:
    """Soup profile of one sample: from raw droplets (SoupX) or the pooled filtered cells.

    Parameters
    ----------
    adata
        The sample's filtered barcodes (raw counts).
    raw
        The unfiltered droplet matrix of the same sample (or ``None``). Genes are matched by
        name; genes of ``adata`` missing from ``raw`` get soup 0.
    soup_max_counts
        Droplets with 0 < UMIs < this are soup (config ``qc.soup_max_counts``, 100 in the
        schema as SoupX's ``soupRange = c(0, 100)``).
    min_droplets
        Fewer such droplets than this: fall back to the pooled cells (logged).

    Returns
    -------
    ``(profile, source)``: the soup as proportions over ``adata.var_names`` and ``"raw"``
    (SoupX, empty droplets) or ``"filtered_pooled"`` (pooled cells, no raw droplets).
    """
    genes = pd.Index(adata.var_names.astype(str))
    if raw is not None:
        rc = sparse.csr_matrix(get_counts(raw, check=False)[0])
        total = np.asarray(rc.sum(axis=1)).ravel()
        empty = (total > 0) & (total < soup_max_counts)
        if int(empty.sum()) >= min_droplets:
            import pysoupx

            rgenes = pd.Index(raw.var_names.astype(str))
            ch = pysoupx.SoupChannel(
                rc[empty].T,
                rc[:1].T,
                genes=list(rgenes),
                cells=["probe"],
                calc_soup_profile=False,
            )
            ch.n_drop_umis = total[empty]
            pysoupx.estimate_soup(ch, soup_range=(0, soup_max_counts))
            est = pd.Series(ch.soup_profile["est"].to_numpy(), index=rgenes)
            est = est[~est.index.duplicated()].reindex(genes).fillna(0.0)
            logger.info("soup from %d empty droplets (< %g UMIs)", empty.sum(), soup_max_counts)
            return est / max(est.sum(), 1e-12), "raw"
        logger.warning(
            "raw matrix has only %d droplets with < %g UMIs: soup from the pooled cells",
            int(empty.sum()),
            soup_max_counts,
        )
    counts = sparse.csr_matrix(get_counts(adata, check=False)[0])
    pooled = np.asarray(counts.sum(axis=0), dtype=float).ravel()
    return pd.Series(pooled / max(pooled.sum(), 1.0), index=genes), "filtered_pooled"


def _usable_sets(
    adata: ad.AnnData,
    counts: sparse.csr_matrix,
    lineage: np.ndarray,
    sets: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    source: str,
) -> dict[str, list[str]]:
    """Gene sets present in ``var_names``; with a pooled-cell soup only the sets whose
    lineage was captured (its cells hold 5x the set's share of the other cells), because
    a soup of pooled cells cannot hold transcripts of cells never captured."""
    index = pd.Index(adata.var_names.astype(str))
    total = np.asarray(counts.sum(axis=1)).ravel()
    out: dict[str, list[str]] = {}
    for name, (genes, owners) in sets.items():
        present = [g for g in genes if g in index]
        if not present:
            continue
        if source != "raw":
            k = np.asarray(counts[:, index.get_indexer(present)].sum(axis=1)).ravel()
            own = np.isin(lineage, list(owners))
            if own.sum() < 5 or (~own).sum() < 5:
                continue
            f_own = k[own].sum() / max(total[own].sum(), 1)
            f_other = k[~own].sum() / max(total[~own].sum(), 1)
            if f_own < 5 * f_other:
                continue
        out[name] = present
    return out


def estimate_contamination(
    adata: ad.AnnData,
    soup: pd.Series,
    *,
    source: str = "raw",
    lineage_key: str = "qc_lineage",
    sets: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None,
    cells: np.ndarray | None = None,
) -> dict[str, Any]:
    """SoupX contamination fraction rho of one sample from lineage-exclusive gene sets.

    Parameters
    ----------
    adata
        Filtered barcodes with raw counts and ``obs[lineage_key]`` (:func:`first_pass_lineage`).
    soup
        Soup profile over ``adata.var_names`` (:func:`estimate_soup`).
    source
        The soup's source; ``"filtered_pooled"`` keeps only gene sets whose lineage was
        captured (see :func:`_usable_sets`).
    lineage_key
        ``obs`` column with the first-pass lineage (SoupX's clusters).
    sets
        ``{name: (genes, expressing lineages)}``; default :data:`NON_EXPRESSED_SETS`.
    cells
        Boolean mask of droplets to use (default all; pass the cells, not soup droplets).

    Returns
    -------
    ``{"rho": float or NaN, "sets": [names used], "n_cells_used": int}``; NaN when no set
    or no non-expressing cell is usable (logged).
    """
    import pysoupx

    sets = dict(NON_EXPRESSED_SETS if sets is None else sets)
    mask = np.ones(adata.n_obs, dtype=bool) if cells is None else np.asarray(cells, bool)
    sub = adata[mask]
    counts = sparse.csr_matrix(get_counts(sub, check=False)[0])
    lineage = sub.obs[lineage_key].astype(str).to_numpy()
    usable = _usable_sets(sub, counts, lineage, sets, source)
    out: dict[str, Any] = {"rho": np.nan, "sets": sorted(usable), "n_cells_used": 0}
    if not usable:
        logger.warning("no lineage-exclusive gene set usable: contamination not estimated")
        return out
    ch = _channel(sub, counts, soup, lineage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        use = pysoupx.estimate_non_expressing_cells(ch, usable)
        # a lineage never counts for its own set, whatever the Poisson test says
        for name in usable:
            use.loc[np.isin(lineage, list(sets[name][1])), name] = False
        if int(use.to_numpy().sum()) == 0:
            logger.warning("no non-expressing cells: contamination not estimated")
            return out
        pysoupx.calculate_contamination_fraction(ch, usable, use, force_accept=True, verbose=False)
    out["rho"] = float(np.clip(ch.meta_data["rho"].iloc[0], 0.0, 0.5))
    out["n_cells_used"] = int(use.to_numpy().any(axis=1).sum())
    logger.info("contamination %.3f from sets %s (%s soup)", out["rho"], usable, source)
    return out


def _channel(sub: ad.AnnData, counts: sparse.csr_matrix, soup: pd.Series, lineage: np.ndarray):
    """A pysoupx SoupChannel of the cells with the given soup profile and clusters."""
    import pysoupx

    genes = list(sub.var_names.astype(str))
    ch = pysoupx.SoupChannel(
        counts.T,
        counts.T,
        genes=genes,
        cells=list(sub.obs_names.astype(str)),
        calc_soup_profile=False,
    )
    ch.tod = None
    est = soup.reindex(pd.Index(genes)).fillna(0.0).to_numpy()
    ch.soup_profile = pd.DataFrame({"est": est, "counts": est}, index=genes)
    ch.meta_data["clusters"] = lineage
    return ch


def correct_counts(
    adata: ad.AnnData,
    soup: pd.Series,
    rho: float,
    *,
    lineage_key: str = "qc_lineage",
    layer: str = "soupx_counts",
    seed: int = 0,
) -> None:
    """SoupX subtraction of ``rho`` x soup from every droplet, into ``layers[layer]``.

    Correction is per first-pass lineage (SoupX ``adjustCounts`` with clusters), then
    stochastically rounded to integers. ``layers["counts"]`` is not touched. A NaN ``rho``
    copies the raw counts (nothing removed).
    """
    import pysoupx

    counts = sparse.csr_matrix(get_counts(adata, check=False)[0])
    if not np.isfinite(rho) or rho <= 0:
        adata.layers[layer] = counts.copy()
        return
    lineage = adata.obs[lineage_key].astype(str).to_numpy()
    ch = _channel(adata, counts, soup, lineage)
    pysoupx.set_contamination_fraction(ch, float(rho), force_accept=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pysoupx.adjust_counts(ch, round_to_int=True, seed=seed, verbose=0)
    corrected = sparse.csr_matrix(out.T, dtype=np.float32)
    corrected.data = np.round(corrected.data)
    corrected.eliminate_zeros()
    adata.layers[layer] = corrected


def flag_soup_droplets(
    adata: ad.AnnData,
    soup: pd.Series,
    *,
    lineage_key: str = "qc_lineage",
    candidates: np.ndarray | None = None,
    min_lineage_cells: int = 10,
    key_added: str = "soup_droplet",
) -> np.ndarray:
    """Droplets better explained by the soup than by any lineage: soup-only droplets.

    For each candidate droplet (default: below the sample's median UMIs) the multinomial
    log-likelihood of its counts under the soup profile is compared with that under each
    lineage profile (the pooled counts of the droplets with that first-pass label, at least
    ``min_lineage_cells`` of them, smoothed with 5 % of the soup so that every profile
    allows contamination); a droplet is soup when the soup wins.

    Returns the boolean mask and writes ``obs[key_added]`` and
    ``obs["soup_loglik_ratio"]`` (soup minus best lineage, nats; NaN for non-candidates).
    """
    counts = sparse.csr_matrix(get_counts(adata, check=False)[0])
    total = np.asarray(counts.sum(axis=1)).ravel()
    if candidates is None:
        candidates = total < np.median(total)
    candidates = np.asarray(candidates, dtype=bool)
    s = soup.reindex(pd.Index(adata.var_names.astype(str))).fillna(0.0).to_numpy()
    lineage = adata.obs[lineage_key].astype(str).to_numpy()
    floor = 1e-7
    log_soup = np.log(s + floor)
    profiles = []
    for name in pd.unique(lineage):
        if name == "Unassigned":
            continue
        own = (lineage == name) & ~candidates
        if own.sum() < min_lineage_cells:
            own = lineage == name
        if own.sum() < min_lineage_cells:
            continue
        p = np.asarray(counts[own].sum(axis=0), dtype=float).ravel()
        p = 0.95 * p / max(p.sum(), 1.0) + 0.05 * s
        profiles.append(np.log(p + floor))
    llr = np.full(adata.n_obs, np.nan)
    flag = np.zeros(adata.n_obs, dtype=bool)
    idx = np.flatnonzero(candidates)
    if profiles and idx.size:
        sub = counts[idx]
        ll_soup = sub @ log_soup
        ll_best = np.max(np.vstack([sub @ lp for lp in profiles]), axis=0)
        llr[idx] = ll_soup - ll_best
        flag[idx] = llr[idx] > 0
    adata.obs[key_added] = flag
    adata.obs["soup_loglik_ratio"] = llr
    logger.info("%d of %d candidate droplets look like soup only", flag.sum(), idx.size)
    return flag
