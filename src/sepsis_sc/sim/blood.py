"""Whole-blood scenario of the simulator: neutrophil-rich samples, blood soup, empty droplets.

The PBMC simulator (:mod:`sepsis_sc.sim.cohort`) draws its soup as the library-weighted mean of
its own cells and its only bad droplets are high-mitochondrial cells, so a QC step that
removes monocytes in neutrophil-rich samples, or keeps droplets of soup, cannot show there.
This module builds a whole-blood cohort on the same cohort model (genes, cell-type profiles,
dispersion, donors, batches, states and planted effects) and adds what real blood brings:

* **Composition**: neutrophils (mature + immature) are ``neutrophil_fraction[condition]`` of
  the cells (default 50 % in controls, 80 % in sepsis; whole blood holds 50-70 % in health
  and more in sepsis, Kwok 2023 PMID 37095375: 75 % in BD Rhapsody whole blood); the other
  types keep the PBMC model's relative fractions and sepsis shifts. Donor and sample noise
  act on the other types as in the PBMC model (none on the neutrophil share itself), so the
  realised share varies by a few points.
* **Soup** (ambient RNA) per sample: 60 % the pooled profile of the sample's cells,
  20 % haemoglobin (lysed erythrocytes: HBB, HBA2, HBA1), 15 % neutrophil granule and
  myeloid transcripts (S100A8, S100A9, LYZ, S100A12) and 5 % platelet transcripts (PPBP,
  PF4); Young & Behjati 2020 (SoupX) show haemoglobin and the highest-expressed myeloid
  genes dominating blood soup. Each droplet gets **additive** Poisson counts from the soup,
  ``soup counts ~ Poisson(N * rho / (1 - rho) * soup)`` where ``N`` is the cell's own count
  and ``rho`` the sample's contamination (uniform in ``contamination`` = (0.02, 0.20), or a
  fixed number), with per-cell log-normal scatter (sd 0.2); the realised soup share per cell
  is recorded in the truth (``true_contamination``) and per sample in ``obs``.
* **Soup-only droplets** (``soup_droplet_rate`` of the cells, default 4 %): droplets that
  Cell Ranger called as cells but that hold only soup (library log-normal, median 300 UMIs,
  log-sd 0.5), cell type ``Soup`` in the truth.
* **Platelet-monocyte aggregates**: a fraction of the monocytes (``pm_aggregate_rate``,
  default 3 % in controls, 10 % in sepsis; aggregates rise in sepsis, Rondina 2015 and Qiu
  2021) carry one or two platelets' counts (Poisson from the platelet profile, library
  log-normal 6.6 / 0.5 as the simulator's platelets). Truth: ``is_pm_aggregate``,
  ``is_doublet`` and ``doublet_partner_type = "Platelet"``.
* **Raw droplets** (``n_empty`` per sample, default 3,000): the unfiltered matrix holds the
  filtered barcodes plus empty droplets of soup only (library log-normal, median 25 UMIs,
  log-sd 0.8), as the Cell Ranger raw matrix does; this is what SoupX estimates the soup
  from (its default ``soupRange`` 0-100 UMIs).

The cohort model is the PBMC simulator's (:func:`sepsis_sc.sim.cohort.cohort_model`); this
module only swaps its base fractions and sepsis multipliers and calls its per-sample step
(:func:`sepsis_sc.sim.counts.simulate_sample`) with no built-in ambient RNA (``ambient=0``:
the blood soup above replaces it), so the two stay in step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sepsis_sc.sim.cohort import check_cohort_args, cohort_model
from sepsis_sc.sim.counts import random_barcodes, sample_anndata, simulate_sample
from sepsis_sc.sim.profiles import STATES

__all__ = ["BLOOD_SOUP_GENES", "simulate_blood_cohort", "blood_soup_profile"]

#: extra soup components of blood, gene -> share within the component
BLOOD_SOUP_GENES: dict[str, dict[str, float]] = {
    "haemoglobin": {"HBB": 0.6, "HBA2": 0.25, "HBA1": 0.15},
    "granule": {"S100A8": 0.35, "S100A9": 0.4, "LYZ": 0.15, "S100A12": 0.1},
    "platelet": {"PPBP": 0.6, "PF4": 0.4},
}
#: weight of each soup component (cells' mean profile, then the extra components)
_SOUP_WEIGHTS = {"cells": 0.60, "haemoglobin": 0.20, "granule": 0.15, "platelet": 0.05}
_NEUTROPHIL_TYPES = ("Mature neutrophil", "Immature neutrophil")
#: immature share of the neutrophils (left shift in sepsis)
_IMMATURE_SHARE = {"control": 0.05, "case": 0.25}


def blood_soup_profile(
    counts: sp.spmatrix, var_names: pd.Index, weights: Mapping[str, float] | None = None
) -> np.ndarray:
    """A blood-like soup: the cells' pooled profile plus haemoglobin, granule and platelet RNA.

    Parameters
    ----------
    counts
        Cells x genes counts of one sample (the cells that lyse into the soup).
    var_names
        Gene symbols of the columns.
    weights
        Share of each component (``cells``, ``haemoglobin``, ``granule``, ``platelet``);
        default 60/20/15/5 %. Components whose genes are absent are dropped.

    Returns
    -------
    The soup profile (proportions over genes, sums to 1).
    """
    w = dict(_SOUP_WEIGHTS if weights is None else weights)
    pooled = np.asarray(counts.sum(axis=0), dtype=float).ravel()
    soup = w.pop("cells") * pooled / max(pooled.sum(), 1.0)
    index = pd.Index(var_names.astype(str))
    for component, share in w.items():
        genes = BLOOD_SOUP_GENES[component]
        cols = index.get_indexer(list(genes))
        present = cols >= 0
        if not present.any():
            continue
        vals = np.array(list(genes.values()))[present]
        soup[cols[present]] += share * vals / vals.sum()
    return soup / soup.sum()


def _blood_model(model: Any, neutrophil_fraction: Mapping[str, float], case: str, control: str):
    """The cohort model with whole-blood base fractions and sepsis multipliers."""
    types = list(model.types)
    is_neut = np.isin(types, _NEUTROPHIL_TYPES)
    mature, immature = (types.index(t) for t in _NEUTROPHIL_TYPES)

    def fractions(neut: float, pbmc: np.ndarray, immature_share: float) -> np.ndarray:
        out = np.zeros(len(types))
        rest = np.where(is_neut, 0.0, pbmc)
        out[~is_neut] = (1.0 - neut) * rest[~is_neut] / rest.sum()
        out[immature] = neut * immature_share
        out[mature] = neut * (1.0 - immature_share)
        return out

    ctrl = fractions(neutrophil_fraction[control], model.base_frac, _IMMATURE_SHARE["control"])
    case_frac = fractions(
        neutrophil_fraction[case], model.base_frac * model.sepsis_mult, _IMMATURE_SHARE["case"]
    )
    # the neutrophil share is the scenario's design: no donor noise on it (other types keep it)
    donor_frac = {d: np.where(is_neut, 0.0, v) for d, v in model.donor_frac.items()}
    return dataclasses.replace(
        model, base_frac=ctrl, sepsis_mult=case_frac / ctrl, donor_frac=donor_frac
    )


def _platelet_aggregates(
    model: Any,
    rng: np.random.Generator,
    counts: sp.csr_matrix,
    truth: pd.DataFrame,
    rate: float,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Add one or two platelets' counts to a fraction ``rate`` of the monocyte singlets."""
    mono = np.flatnonzero(
        (truth["lineage"].to_numpy() == "Monocyte")
        & ~truth["is_doublet"].to_numpy(dtype=bool)
        & ~truth["is_low_quality"].to_numpy(dtype=bool)
    )
    chosen = mono[rng.random(mono.size) < rate]
    flag = np.zeros(counts.shape[0], dtype=bool)
    if chosen.size == 0:
        return counts, flag
    prof = model.profiles[model.type_idx_of["Platelet"]]
    n_plt = rng.integers(1, 3, chosen.size)
    lib = np.exp(rng.normal(6.6, 0.5, chosen.size)) * n_plt
    add = rng.poisson(lib[:, None] * prof[None, :]).astype(np.float32)
    extra = sp.csr_matrix(
        (np.ones(chosen.size, dtype=np.float32), (chosen, np.arange(chosen.size))),
        shape=(counts.shape[0], chosen.size),
    ) @ sp.csr_matrix(add)
    flag[chosen] = True
    return (counts + extra).tocsr(), flag


def _soup_counts(
    rng: np.random.Generator, soup: np.ndarray, lib: np.ndarray, chunk: int = 512
) -> sp.csr_matrix:
    """Poisson counts ``lib[i] * soup`` per droplet, CSR, drawn in chunks."""
    blocks = []
    for start in range(0, lib.size, chunk):
        mu = lib[start : start + chunk, None] * soup[None, :]
        blocks.append(sp.csr_matrix(rng.poisson(mu).astype(np.float32)))
    if not blocks:
        return sp.csr_matrix((0, soup.size), dtype=np.float32)
    return sp.vstack(blocks, format="csr")


def _check_args(neutrophil_fraction, contamination, case, control, organism) -> None:
    if organism != "human":
        raise ValueError("the whole-blood scenario is human only (its soup genes are human).")
    for cond in (case, control):
        f = neutrophil_fraction.get(cond)
        if f is None or not 0 < f < 1:
            raise ValueError(f"neutrophil_fraction[{cond!r}] must lie in (0, 1), not {f!r}.")
    lo, hi = contamination if isinstance(contamination, tuple) else (contamination,) * 2
    if not 0 <= lo <= hi < 0.5:
        raise ValueError(f"contamination must lie in [0, 0.5), not {contamination!r}.")


def simulate_blood_cohort(
    samples: pd.DataFrame,
    *,
    cells_per_sample: int = 1500,
    n_genes: int = 12000,
    neutrophil_fraction: Mapping[str, float] | None = None,
    contamination: float | tuple[float, float] = (0.02, 0.20),
    soup_droplet_rate: float = 0.04,
    pm_aggregate_rate: Mapping[str, float] | None = None,
    n_empty: int = 3000,
    low_quality_rate: float = 0.05,
    doublets: bool = True,
    effects: bool = True,
    batch_effect: float = 0.4,
    seed: int = 0,
    case: str = "sepsis",
    control: str = "control",
    organism: str = "human",
) -> tuple[dict[str, ad.AnnData], pd.DataFrame, dict[str, ad.AnnData]]:
    """Simulate a whole-blood sepsis cohort (see the module docstring).

    Parameters
    ----------
    samples
        Sample sheet as for :func:`sepsis_sc.sim.simulate_cohort`.
    cells_per_sample, n_genes, low_quality_rate, doublets, effects, batch_effect, seed, \
case, control
        As in :func:`sepsis_sc.sim.simulate_cohort` (``cells_per_sample`` counts the
        cells, soup-only droplets come on top).
    neutrophil_fraction
        Neutrophil share per condition; default ``{control: 0.5, case: 0.8}``.
    contamination
        Soup share of each droplet's counts: a number, or a (low, high) range from which
        each sample draws its own uniformly.
    soup_droplet_rate
        Soup-only droplets per cell, in the filtered matrix.
    pm_aggregate_rate
        Share of monocytes carrying platelets, per condition; default
        ``{control: 0.03, case: 0.10}``.
    n_empty
        Empty (soup-only, low-UMI) droplets added to each sample's raw matrix.
    organism
        ``"human"`` only.

    Returns
    -------
    adatas
        ``{sample_id: AnnData}`` of the filtered barcodes (cells and soup-only droplets), as
        :func:`~sepsis_sc.sim.simulate_cohort` makes them; ``obs["true_contamination"]``
        is the sample's contamination setting and ``uns["simulation"]["soup"]`` the soup.
    truth
        The simulator's truth table plus ``is_soup_droplet``, ``is_pm_aggregate``,
        ``true_contamination`` (soup share of the droplet's counts) and
        ``sample_contamination``; soup-only droplets have ``cell_type`` and ``lineage``
        ``"Soup"``.
    raw
        ``{sample_id: AnnData}``: the unfiltered droplet matrix (filtered barcodes first,
        then ``n_empty`` empty droplets).
    """
    neutrophil_fraction = dict(neutrophil_fraction or {control: 0.5, case: 0.8})
    pm_rate = dict(pm_aggregate_rate or {control: 0.03, case: 0.10})
    _check_args(neutrophil_fraction, contamination, case, control, organism)
    sheet = samples.reset_index(drop=True).copy()
    check_cohort_args(
        sheet,
        case=case,
        control=control,
        organism=organism,
        cells_per_sample=cells_per_sample,
        ambient=0.0,
        low_quality_rate=low_quality_rate,
        batch_effect=batch_effect,
    )
    model = cohort_model(sheet, n_genes=n_genes, batch_effect=batch_effect, seed=seed)
    model = _blood_model(model, neutrophil_fraction, case, control)
    var_names = pd.Index(model.gene_table["gene_symbol"].astype(str))
    adatas, raws, truths = {}, {}, []
    for row, sseed in zip(sheet.to_dict("records"), model.sample_seeds, strict=True):
        sid, counts, truth = simulate_sample(
            model,
            row,
            np.random.default_rng(sseed),
            cells_per_sample=cells_per_sample,
            effects=effects,
            case=case,
            ambient=0.0,
            low_quality_rate=low_quality_rate,
            doublets=doublets,
        )
        rng = np.random.default_rng([int(sseed) % 2**32, 17])
        cond = str(row["condition"])
        counts, pm = _platelet_aggregates(model, rng, counts, truth, pm_rate.get(cond, 0.0))
        truth["is_pm_aggregate"] = pm
        truth.loc[pm, "is_doublet"] = True
        truth.loc[pm, "doublet_partner_type"] = "Platelet"
        adata, raw, truth = _blood_sample(
            model,
            row,
            rng,
            counts,
            truth,
            var_names,
            contamination=contamination,
            soup_droplet_rate=soup_droplet_rate,
            n_empty=n_empty,
            uns={"seed": int(seed), "scenario": "whole_blood", "effects": bool(effects)},
        )
        adatas[sid], raws[sid] = adata, raw
        truths.append(truth)
    return adatas, pd.concat(truths, ignore_index=True), raws


def _blood_sample(
    model: Any,
    row: Mapping[str, Any],
    rng: np.random.Generator,
    counts: sp.csr_matrix,
    truth: pd.DataFrame,
    var_names: pd.Index,
    *,
    contamination: float | tuple[float, float],
    soup_droplet_rate: float,
    n_empty: int,
    uns: Mapping[str, Any],
) -> tuple[ad.AnnData, ad.AnnData, pd.DataFrame]:
    """Soup, contamination, soup-only droplets and the raw matrix of one sample."""
    sid = str(row["sample_id"])
    soup = blood_soup_profile(counts, var_names)
    lo, hi = contamination if isinstance(contamination, tuple) else (contamination,) * 2
    rho = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    own = np.asarray(counts.sum(axis=1)).ravel()
    rho_cell = np.clip(rho * np.exp(rng.normal(0, 0.2, own.size)), 0, 0.6)
    soup_part = _soup_counts(rng, soup, own * rho_cell / (1 - rho_cell))
    counts = (counts + soup_part).tocsr()
    n_soup_in = np.asarray(soup_part.sum(axis=1)).ravel()
    truth["is_soup_droplet"] = False
    truth["is_pm_aggregate"] = truth["is_pm_aggregate"].astype(bool)
    n_sd = int(round(soup_droplet_rate * own.size))
    sd_counts = _soup_counts(rng, soup, np.exp(rng.normal(np.log(300), 0.5, n_sd)))
    counts = sp.vstack([counts, sd_counts], format="csr")
    sd_bc = random_barcodes(n_sd + len(truth), rng)
    sd_bc = np.array([b for b in sd_bc if b not in set(truth["barcode"])][:n_sd])
    sd_truth = pd.DataFrame(
        {
            "cell_id": [f"{sid}_{b}" for b in sd_bc],
            "sample_id": sid,
            "barcode": sd_bc,
            "cell_type": "Soup",
            "lineage": "Soup",
            "is_doublet": False,
            "doublet_partner_type": "",
            "is_low_quality": False,
            "is_soup_droplet": True,
            "is_pm_aggregate": False,
        }
    )
    for key in ("condition", "donor", "batch"):
        sd_truth[key] = str(row[key])
    for state in STATES:
        sd_truth[state] = False
    truth = pd.concat([truth, sd_truth], ignore_index=True)
    total = np.asarray(counts.sum(axis=1)).ravel()
    truth["total_counts"] = total.astype(np.int64)
    soup_share = np.concatenate([n_soup_in, total[own.size :]]) / np.maximum(total, 1)
    truth["true_contamination"] = soup_share
    truth["sample_contamination"] = rho
    counts.sort_indices()
    adata = sample_anndata(model, row, counts, truth, {**uns, "contamination": rho}, None)
    adata.obs["true_contamination"] = rho
    adata.uns["simulation"]["soup"] = soup.astype(np.float32)
    empty = _soup_counts(rng, soup, np.maximum(np.exp(rng.normal(np.log(25), 0.8, n_empty)), 1))
    keep = np.asarray(empty.sum(axis=1)).ravel() > 0
    empty = empty[keep]
    raw_bc = [f"{sid}_empty{i}" for i in range(empty.shape[0])]
    raw = ad.AnnData(
        X=sp.vstack([counts, empty], format="csr"),
        obs=pd.DataFrame(index=pd.Index(list(adata.obs_names) + raw_bc)),
        var=adata.var.copy(),
    )
    return adata, raw, truth
