"""Simulated PBMC sepsis cohort with planted truth (demo run, tests, benchmarks).

This module holds the entry points (:func:`simulate_cohort`, :func:`write_demo_cohort`,
:func:`targeted_panel`) and the cohort model (:class:`CohortModel`: genes, profiles,
dispersions, batch and donor effects, drawn once per cohort by :func:`cohort_model`). The
constants live in :mod:`~sepsis_sc.sim.profiles`, the per-sample count model in
:mod:`~sepsis_sc.sim.counts` and the planted truth in :mod:`~sepsis_sc.sim.truth`.

Generative model
----------------
Every cell's counts are negative binomial (gamma-Poisson), drawn per sample in chunks of cells
and stored as CSR, so memory stays at one chunk of cells x genes (``counts._CHUNK`` cells) however
large the cohort is.

* **Genes**: ``resources/genes/human_genes.tsv.gz`` (14,955 symbols expressed in 10x PBMC,
  GRCh38 feature list, plus XIST; see its README). ``n_genes`` picks every gene the simulator
  moves (type folds, state programmes, sex-linked genes), the 13 ``MT-`` genes, ribosomal
  and haemoglobin genes, then the rest by expression in the fitted data (highest mean CP10k of
  any population first; seed-independent, blind to marker lists).
* **Cell-type profiles come from data, not from the annotator.** Each type starts from the
  mean CP10k of a real population (``resources/simulator/profiles.tsv.gz``, fitted by
  ``benchmarks/fit_simulator_profiles.py``): the pure cells of soupx_pbmc4k's T CD4,
  T CD8, NK, B, monocyte and cDC labels and its 20 pDCs; celltypist_sample macrophages
  (TREM2-high). Subsets and populations absent from healthy PBMC (plasmablasts from B,
  neutrophils and platelets from monocytes, TREM2-low macrophages) get literature fold
  changes of 2-8x, plus literature identity levels where PBMC has no such cell
  (:data:`~sepsis_sc.sim.profiles.TYPE_LEVELS`)
  (:data:`~sepsis_sc.sim.profiles.TYPE_FOLDS`: Azimuth level-2 / Monaco / Villani / Xie, not
  ``resources/markers``; an up gene rises from max(level, 0.5 CP10k)), so markers are
  as sparse as in real data (dropout from the NB at real means) and partly overlap the
  annotator's lists. 2 % of genes per type carry extra log-normal noise (sd 0.3).
  ``sepsis_sc.sim`` reads no marker or signature file (``tests/test_designs.py``).
* **Covariates**: ``sex`` in the sheet silences Y-linked genes (RPS4Y1, DDX3Y, UTY, KDM5D,
  EIF1AY, USP9Y, ZFY, NLGN4Y) in women and XIST/TSIX in men (drawn per donor if absent);
  ``age`` moves log fractions per year above 50 (CD4 naive T -0.015, CD8 naive T -0.03,
  CD8 effector/memory +0.01).
* **Library size** per cell type: log-normal fitted per ``soupx_pbmc4k`` annotation
  (log-mean / log-sd: T CD4 8.28/0.36, T CD8 8.27/0.32, NK 8.12/0.28, B 8.19/0.36,
  monocytes/DCs 8.39/0.55); neutrophils 6.9/0.35 (~1,000 UMIs, 500-1,500 as in low-density
  neutrophils of sepsis PBMC), immature 6.8/0.35; platelets 6.6/0.5; plasmablasts 9.0/0.4.
* **Dispersion** trend ``phi(mu) = exp(-1.9 - 0.35 log mu)`` clipped to [0.02, 3], with a
  per-gene residual from the data where the fit estimated one (pooled within-population
  method-of-moments, halved, clipped to +-0.5), log-normal scatter (sd 0.3) elsewhere. The
  trend was tuned so that the fit log phi = a + b log(mean) on one simulated sample
  matches soupx_pbmc4k T CD4 -2.16/-0.39, B -2.39/-0.42, NK -2.02/-0.18 (12 mean bins,
  genes with mean > 0.05); cell states and ambient RNA add dispersion on top.

Planted sepsis effects (``effects=True``; sample level, sizes as multipliers on the control)
---------------------------------------------------------------------------------------------
* Composition: T cells x0.5, NK x0.4, B cells x0.4, DCs x0.45, plasmablasts x2.5,
  classical monocytes x1.7, mature neutrophils x2, immature neutrophils x4, TREM2-high
  macrophages x4 (1 % other macrophages), platelets x3 (then renormalised). Sizes are set
  so that the demo design (6 vs 6 samples, 1,500 cells) detects each at FDR 0.05 with power
  >= 0.9 when tested on the true labels (:func:`~sepsis_sc.sim.truth.oracle_tests`,
  ``benchmarks/oracle_power.py``, 20 seeds: 0.90-1.00, TREM2-high share 0.95).
* **State programmes are broader than the signatures** (:data:`profiles._STATE_CORE`,
  :data:`profiles._STATE_REST`): each state moves 53-66 genes from the literature (core folds
  given, the rest drawn once, log-uniform 1.5-4x up, 1.5-3x down), and each flagged cell
  carries its programme at its own intensity (fold ** w, w ~ U(0.4, 1.6)). The shipped
  signature is a partial subset: 70-81 % of a signature's genes are planted, 16-29 % of a
  programme is scored (:func:`~sepsis_sc.sim.truth.planted_vs_scored`; the demo writes
  ``planted_vs_scored_genes.tsv``).
* States and rates: MS1-like (``ms1_like``, Reyes 2020) 8 % -> 26 % of classical monocytes,
  MS1 cells are also ``hla_low``; HLA class II loss (``hla_low``) 10 % -> 35 % of monocytes
  and 10 % -> 60 % of DCs (Poehlmann 2009), with PD-L1 / IL-10 / IL4I1 up; T-cell
  exhaustion (``exhausted``) 5 % -> 16 % of T cells at the reference odds, x3 odds in
  effector/memory CD8 T, x1.5 in memory CD4 T and Treg, x0.5 in naive T (exhaustion follows
  differentiation; effector/memory CD8 T also carry TIGIT, PDCD1, TOX, CD244, EOMES at
  baseline); cytokine programme (``cytokine_high``) 5 % -> 20 % of monocytes; TREM2-high
  macrophages (``trem2_high``, a cell type: the data macrophage profile, against the
  other macrophages with the lipid-associated genes divided out) more frequent.

Donor variation (both conditions, also with ``effects=False``): donor random effects on the
log cell-type fractions (sd 0.3) and on the logit state fractions (sd 0.35), plus a smaller
per-sample term (sd 0.1), so statistics are not trivially perfect. With ``effects=False`` both
conditions use the same generative model.

Nuisance
--------
Batches (``batch`` column): per-gene multiplicative factor per batch, log-normal with sd
``batch_effect`` (0.4), and a library-size shift per batch (log-sd 0.2). Low-quality cells
(``low_quality_rate`` 5 %): library x0.15-0.5, mitochondrial fraction 20-60 %. Heterotypic
doublets: rate 3 % + 1 % per 1,000 cells (4.5 % at 1,500 cells); counts of two cells of
different types summed. Ambient RNA: each cell's expected profile mixes in the sample's mean
profile (the soup) at ``ambient`` (3 %, per-cell log-sd 0.3).
"""

from __future__ import annotations

import gzip
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from sepsis_sc.io import write_10x_h5
from sepsis_sc.resources import resource_path
from sepsis_sc.sim.counts import sample_anndata, simulate_sample
from sepsis_sc.sim.profiles import (
    AGE_REF,
    BASE_FRACTIONS,
    DISP_SCATTER,
    DISP_TREND,
    DONOR_SD_FRACTION,
    DONOR_SD_STATE,
    LINEAGE_EFFECT,
    MT_LEVELS,
    STATE_RATES,
    TYPE_EFFECT,
    TYPE_META,
    UNNAMED_STATES,
    X_FEMALE,
    Y_GENES,
    build_profiles,
    mouse_symbols,
    programme_genes,
    select_genes,
)

logger = logging.getLogger(__name__)

__all__ = [
    "simulate_cohort",
    "write_demo_cohort",
    "targeted_panel",
    "two_arm_sheet",
    "cohort_adata",
]


# ----------------------------------------------------------------------------------------
# main entry
# ----------------------------------------------------------------------------------------
def _check_sheet(samples: pd.DataFrame, case: str, control: str) -> None:
    need = {"sample_id", "condition", "donor", "batch"}
    missing = need - set(samples.columns)
    if missing:
        raise ValueError(
            f"the sample sheet lacks column(s) {sorted(missing)}; the simulator needs "
            "sample_id, condition, donor and batch."
        )
    if not samples["sample_id"].is_unique:
        raise ValueError("sample_id values in the sample sheet must be unique.")
    bad = set(samples["condition"].astype(str)) - {case, control}
    if bad:
        raise ValueError(
            f"conditions {sorted(bad)} are neither case={case!r} nor control={control!r}; "
            "pass case=/control= matching the sheet's condition labels."
        )


def _sim_defaults() -> dict[str, Any]:
    import inspect

    sig = inspect.signature(simulate_cohort)
    return {k: v.default for k, v in sig.parameters.items() if v.default is not inspect._empty}


def simulate_cohort(
    samples: pd.DataFrame,
    *,
    cells_per_sample: int = 1500,
    n_genes: int = 12000,
    effects: bool = True,
    batch_effect: float = 0.4,
    ambient: float = 0.03,
    low_quality_rate: float = 0.05,
    doublets: bool = True,
    seed: int = 0,
    organism: str = "human",
    case: str = "sepsis",
    control: str = "control",
    gene_panel: int | Sequence[str] | None = None,
) -> tuple[dict[str, ad.AnnData], pd.DataFrame]:
    """Simulate a PBMC sepsis cohort with planted truth (see the module docstring).

    Parameters
    ----------
    samples
        Sample sheet with ``sample_id``, ``condition``, ``donor``, ``batch`` (free columns
        are copied into ``obs``). An optional ``n_cells`` column overrides
        ``cells_per_sample`` per sample.
    cells_per_sample
        Cells (droplets, doublets included) per sample.
    n_genes
        Genes simulated (>= the ~700 programme genes; 10,000+ recommended).
    effects
        Plant the sepsis effects; ``False`` gives both conditions the same model.
    batch_effect
        Log-sd of the per-gene multiplicative factor of each batch (0 disables).
    ambient
        Mean fraction of each cell's expected counts that comes from the soup.
    low_quality_rate
        Fraction of low-quality cells (low counts, 20-60 % mitochondrial).
    doublets
        Add heterotypic doublets (3 % + 1 % per 1,000 cells).
    seed
        Random seed; the same sheet and seed give identical output.
    organism
        ``"human"`` or ``"mouse"`` (mouse: approximate ortholog names, ``mt-`` genes).
    case, control
        Condition labels of the sheet.
    gene_panel
        A targeted gene panel: only these genes are measured (a list of symbols, or a
        number of genes for :func:`targeted_panel`). Cells are simulated over all
        ``n_genes`` first, so panel counts are what a targeted assay of the same cells reads
        (smaller libraries, no MT genes unless listed).

    Design covariates read from the sheet: ``sex`` (F/M: Y-linked genes or XIST silenced;
    drawn per donor where absent) and ``age`` (years: naive T fractions fall with age). A
    donor with several samples (time points) shares its donor effects across them.

    Returns
    -------
    adatas
        ``{sample_id: AnnData}``: CSR float32 integer counts in ``X`` and
        ``layers["counts"]``, ``obs_names`` ``"{sample_id}_{barcode}"``, sheet columns in
        ``obs``, ``var["gene_ids"]``, ``var["gene_symbols"]``; ``uns["simulation"]`` holds the
        parameters.
    truth
        One row per cell: ``cell_id``, ``sample_id``, ``barcode``, ``condition``, ``donor``,
        ``batch``, ``cell_type``, ``lineage``, ``is_doublet``, ``doublet_partner_type``,
        ``is_low_quality``, the state flags in :data:`~sepsis_sc.sim.profiles.STATES`, ``total_counts``.
    """
    t0 = time.perf_counter()
    adatas: dict[str, ad.AnnData] = {}
    truths = []
    for sid, adata, truth in _iter_cohort(
        samples,
        cells_per_sample=cells_per_sample,
        n_genes=n_genes,
        effects=effects,
        batch_effect=batch_effect,
        ambient=ambient,
        low_quality_rate=low_quality_rate,
        doublets=doublets,
        seed=seed,
        organism=organism,
        case=case,
        control=control,
        gene_panel=gene_panel,
    ):
        adatas[sid] = adata
        truths.append(truth)
    truth = pd.concat(truths, ignore_index=True)
    logger.info(
        "simulated %d samples, %d cells x %d genes in %.1f s",
        len(adatas),
        len(truth),
        next(iter(adatas.values())).n_vars if adatas else 0,
        time.perf_counter() - t0,
    )
    return adatas, truth


def _iter_cohort(
    samples: pd.DataFrame,
    *,
    cells_per_sample: int,
    n_genes: int,
    effects: bool,
    batch_effect: float,
    ambient: float,
    low_quality_rate: float,
    doublets: bool,
    seed: int,
    organism: str,
    case: str,
    control: str,
    gene_panel: int | Sequence[str] | None = None,
):
    """Yield ``(sample_id, AnnData, truth)`` one sample at a time (bounded memory).

    Random numbers: the cohort model draws from ``default_rng(seed)`` once, in a fixed order
    (:func:`cohort_model`); each sample then draws only from its own generator, seeded
    from that master generator, step by step in :func:`~sepsis_sc.sim.counts.simulate_sample`.
    """
    samples = samples.reset_index(drop=True).copy()
    check_cohort_args(
        samples,
        case=case,
        control=control,
        organism=organism,
        cells_per_sample=cells_per_sample,
        ambient=ambient,
        low_quality_rate=low_quality_rate,
        batch_effect=batch_effect,
    )
    model = cohort_model(samples, n_genes=n_genes, batch_effect=batch_effect, seed=seed)
    panel = None
    if gene_panel is not None:
        panel = _panel_index(model.gene_table["gene_symbol"], gene_panel)
        out_model = replace(model, gene_table=model.gene_table.iloc[panel].reset_index(drop=True))
    else:
        out_model = model
    mouse = _mouse_genes(out_model.gene_table) if organism == "mouse" else None
    uns = {
        "seed": int(seed),
        "effects": bool(effects),
        "batch_effect": float(batch_effect),
        "ambient": float(ambient),
        "organism": organism,
    }
    for row, sseed in zip(samples.to_dict("records"), model.sample_seeds):
        sid, counts, truth = simulate_sample(
            model,
            row,
            np.random.default_rng(sseed),
            cells_per_sample=cells_per_sample,
            effects=effects,
            case=case,
            ambient=ambient,
            low_quality_rate=low_quality_rate,
            doublets=doublets,
        )
        if panel is not None:
            counts = counts[:, panel]
            truth["total_counts"] = np.asarray(counts.sum(1)).ravel().astype(np.int64)
        yield sid, sample_anndata(out_model, row, counts, truth, uns, mouse), truth


def two_arm_sheet(n_per: int = 6, *, repeated: str | None = None, digits: int = 1) -> pd.DataFrame:
    """A sample sheet of ``n_per`` sepsis and ``n_per`` control donors, one batch, alternating
    (``S0`` sepsis, ``S1`` control, ...). ``repeated="patients"``: every sepsis donor is
    sampled a second time (``S<i>b``, sepsis again); ``repeated="paired"``: every donor is
    also sampled in the other condition (a paired design). ``digits``: sample and donor
    numbers zero-padded to this width (``S00``; donors are drawn in sorted order, so the
    width is part of a seeded cohort)."""
    if repeated not in (None, "patients", "paired"):
        raise ValueError(f"repeated must be None, 'patients' or 'paired', not {repeated!r}.")
    rows = []
    for i in range(2 * n_per):
        cond = "sepsis" if i % 2 == 0 else "control"
        k = f"{i:0{digits}d}"
        rows.append({"sample_id": f"S{k}", "condition": cond, "donor": f"D{k}", "batch": "b1"})
        if repeated == "paired" or (repeated == "patients" and cond == "sepsis"):
            again = (
                cond if repeated == "patients" else ("control" if cond == "sepsis" else "sepsis")
            )
            rows.append(
                {"sample_id": f"S{k}b", "condition": again, "donor": f"D{k}", "batch": "b1"}
            )
    return pd.DataFrame(rows)


def cohort_adata(
    sheet: pd.DataFrame,
    *,
    cells_per_sample: int,
    n_genes: int,
    seed: int,
    effects: bool,
    truth_columns: Sequence[str] = ("cell_type", "lineage"),
    target_sum: float | None = 1e4,
    n_pcs: int | None = None,
    pca_seed: int = 0,
    **simulate_kw: Any,
) -> ad.AnnData:
    """One log-normalised AnnData of a simulated cohort (:func:`simulate_cohort` of
    ``sheet``): the sheet's ``condition``, ``donor``, ``batch`` and ``sample_id`` and the
    truth's ``truth_columns`` in ``obs``; ``normalize_total(target_sum)`` + log1p in ``X``;
    with ``n_pcs`` a PCA of the 2,000 most variable genes in ``obsm["X_pca"]`` (what the
    neighbourhood and axis tests read in place of an integrated embedding)."""
    import scanpy as sc

    adatas, truth = simulate_cohort(
        sheet,
        cells_per_sample=cells_per_sample,
        n_genes=n_genes,
        seed=seed,
        effects=effects,
        **simulate_kw,
    )
    meta = sheet.set_index("sample_id")
    for sid, a in adatas.items():
        for col in ("condition", "donor", "batch"):
            if col in meta:
                a.obs[col] = meta.loc[sid, col]
        a.obs["sample_id"] = sid
    adata = ad.concat(list(adatas.values()), index_unique=None)
    adata.obs = adata.obs.join(truth.set_index("cell_id")[list(truth_columns)])
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    if n_pcs:
        sc.pp.highly_variable_genes(adata, n_top_genes=2000)
        sc.pp.pca(adata, n_comps=n_pcs, mask_var="highly_variable", random_state=pca_seed)
    return adata


def targeted_panel(n_genes: int = 1300, *, seed: int = 1300) -> list[str]:
    """A targeted immune panel of ``n_genes`` symbols (fixed by ``seed``): about half of the
    genes the simulator moves (type folds, state programmes, sex-linked genes), no MT or
    ribosomal genes, the rest drawn from the gene resource. Like commercial immune panels it
    covers some markers of each population but not all, so marker sets can lose most of
    their genes."""
    table = pd.read_csv(resource_path("genes", "human_genes.tsv.gz"), sep="\t", dtype=str)
    sym = table["gene_symbol"]
    rng = np.random.default_rng(seed)
    prog = np.array(sorted(set(programme_genes()) - set(MT_LEVELS)))
    take = prog[rng.random(prog.size) < 0.5][:n_genes]
    rest = sym[~sym.isin(prog) & ~sym.str.match(r"^MT-|^RP[SL]\d")].to_numpy()
    extra = rng.choice(rest, max(n_genes - take.size, 0), replace=False)
    return sorted(set(take) | set(extra))


def _panel_index(symbols: pd.Series, gene_panel: int | Sequence[str]) -> np.ndarray:
    """Column indices of the simulated genes in the panel (order of the gene table)."""
    wanted = targeted_panel(gene_panel) if isinstance(gene_panel, int) else list(gene_panel)
    idx = np.flatnonzero(np.asarray(symbols.isin(set(wanted))))
    if idx.size < 10:
        raise ValueError(
            f"gene_panel keeps {idx.size} of the simulated genes; a panel needs >= 10 of them "
            "(raise n_genes or list genes the simulator draws)."
        )
    return idx


def check_cohort_args(
    samples: pd.DataFrame,
    *,
    case: str,
    control: str,
    organism: str,
    cells_per_sample: int,
    ambient: float,
    low_quality_rate: float,
    batch_effect: float,
) -> None:
    """Reject a bad sheet, organism, cell count, ambient or low-quality fraction."""
    _check_sheet(samples, case, control)
    if organism not in ("human", "mouse"):
        raise ValueError(f"organism must be 'human' or 'mouse', not {organism!r}.")
    if cells_per_sample < 10 and "n_cells" not in samples.columns:
        raise ValueError("cells_per_sample must be at least 10.")
    if not 0 <= ambient < 0.5 or not 0 <= low_quality_rate < 0.5 or batch_effect < 0:
        raise ValueError("ambient and low_quality_rate must lie in [0, 0.5); batch_effect >= 0.")


@dataclass(frozen=True)
class CohortModel:
    """What all samples of a cohort share: genes, type profiles, dispersions, batch and
    donor effects, and each sample's seed."""

    gene_table: pd.DataFrame
    types: list[str]
    profiles: np.ndarray  # type x gene mean proportions
    profiles32: np.ndarray
    state_vecs: dict[str, np.ndarray]  # state -> (fold, floor) per gene
    shape: np.ndarray  # NB shape (1 / dispersion) per type and gene, float32
    type_lineage: np.ndarray
    lib_mu: np.ndarray
    lib_sd: np.ndarray
    base_frac: np.ndarray
    sepsis_mult: np.ndarray
    type_idx_of: dict[str, int]
    is_mt: np.ndarray
    batch_gene: dict[str, np.ndarray]
    batch_lib: dict[str, float]
    donor_frac: dict[str, np.ndarray]
    donor_state: dict[str, np.ndarray]
    sample_seeds: np.ndarray
    donor_sex: dict[str, str]  # "F" / "M"
    donor_age: dict[str, float]
    y_genes: np.ndarray
    x_female_genes: np.ndarray

    def sex_factor(self, donor: str) -> np.ndarray:
        """Per-gene factor of a donor: Y-linked genes off in women, XIST off in men."""
        off = self.y_genes if self.donor_sex[donor] == "F" else self.x_female_genes
        return np.where(off, 0.0, 1.0)


def cohort_model(
    samples: pd.DataFrame, *, n_genes: int, batch_effect: float, seed: int
) -> CohortModel:
    """Draw the cohort model from ``default_rng(seed)``.

    The draw order is part of the output (same seed, same cohort): profiles, dispersion
    scatter, batch gene factors, batch library shifts, donor fractions, donor states,
    sample seeds.
    """
    gene_table = select_genes(n_genes)
    master = np.random.default_rng(seed)
    profiles, types, state_vecs, disp_resid = build_profiles(gene_table["gene_symbol"], master)
    n_types, n = profiles.shape
    lib_mu = np.array([TYPE_META[t][1][0] for t in types])
    # dispersion per (type, gene) from the fitted trend on the typical mean count
    mean_count = profiles * np.exp(lib_mu)[:, None]
    a, b = DISP_TREND
    phi = np.exp(a + b * np.log(np.maximum(mean_count, 1e-3)))
    # per-gene scatter: the data's residual where the fit estimated one, random elsewhere
    scatter = master.normal(0, DISP_SCATTER, n)
    scatter = np.where(disp_resid != 0, disp_resid, scatter)
    phi = np.clip(phi * np.exp(scatter)[None, :], 0.02, 3.0)
    # batches and donors
    batches = sorted(samples["batch"].astype(str).unique())
    batch_gene = {
        bt: np.exp(master.normal(0, batch_effect, n)) if batch_effect > 0 else np.ones(n)
        for bt in batches
    }
    batch_lib = {bt: master.normal(0, 0.2) if batch_effect > 0 else 0.0 for bt in batches}
    donors = sorted(samples["donor"].astype(str).unique())
    donor_frac = {d: master.normal(0, DONOR_SD_FRACTION, n_types) for d in donors}
    named = [st for st in STATE_RATES if st not in UNNAMED_STATES]
    donor_state = {d: master.normal(0, DONOR_SD_STATE, len(named)) for d in donors}
    sample_seeds = master.integers(0, 2**63 - 1, size=len(samples))
    donor_sex, donor_age = _donor_covariates(samples, donors, master)
    # the unnamed states draw from a stream of their own: adding one re-draws nothing else
    side = np.random.default_rng([seed, 1])
    for d in donors:
        extra = side.normal(0, DONOR_SD_STATE, len(STATE_RATES) - len(named))
        donor_state[d] = np.concatenate([donor_state[d], extra])
    sym = gene_table["gene_symbol"]
    return CohortModel(
        gene_table=gene_table,
        types=types,
        profiles=profiles,
        profiles32=profiles.astype(np.float32),
        state_vecs=state_vecs,
        shape=(1.0 / phi).astype(np.float32),
        type_lineage=np.array([TYPE_META[t][0] for t in types]),
        lib_mu=lib_mu,
        lib_sd=np.array([TYPE_META[t][1][1] for t in types]),
        base_frac=np.array([BASE_FRACTIONS[t] for t in types]),
        sepsis_mult=np.array(
            [TYPE_EFFECT.get(t, LINEAGE_EFFECT.get(TYPE_META[t][0], 1.0)) for t in types]
        ),
        type_idx_of={t: k for k, t in enumerate(types)},
        is_mt=np.asarray(gene_table["gene_symbol"].str.startswith("MT-")),
        batch_gene=batch_gene,
        batch_lib=batch_lib,
        donor_frac=donor_frac,
        donor_state=donor_state,
        sample_seeds=sample_seeds,
        donor_sex=donor_sex,
        donor_age=donor_age,
        y_genes=np.asarray(sym.isin(Y_GENES)),
        x_female_genes=np.asarray(sym.isin(X_FEMALE)),
    )


def _donor_covariates(
    samples: pd.DataFrame, donors: list[str], rng: np.random.Generator
) -> tuple[dict[str, str], dict[str, float]]:
    """Each donor's sex (sheet ``sex``: F/female/M/male; drawn 50:50 where absent or
    unreadable) and age (sheet ``age``; ``AGE_REF`` where absent, i.e. no age effect)."""
    first = samples.drop_duplicates("donor").set_index(
        samples.drop_duplicates("donor")["donor"].astype(str)
    )
    coin = rng.random(len(donors))
    sex, age = {}, {}
    for d, u in zip(donors, coin):
        raw = str(first.loc[d, "sex"]).strip().upper()[:1] if "sex" in first.columns else ""
        sex[d] = raw if raw in ("F", "M") else ("F" if u < 0.5 else "M")
        val = (
            pd.to_numeric(first.loc[d, "age"], errors="coerce")
            if "age" in first.columns
            else np.nan
        )
        age[d] = float(val) if np.isfinite(val) else AGE_REF
    return sex, age


def _mouse_genes(gene_table: pd.DataFrame) -> tuple[np.ndarray, pd.Index]:
    """Genes kept for a mouse cohort and their mouse names: genes without a mouse name are
    dropped; on a name collision the first gene wins."""
    mouse = pd.Series(mouse_symbols(list(gene_table["gene_symbol"])), dtype=object)
    keep_g = (mouse.notna() & ~mouse.duplicated()).to_numpy()
    return keep_g, pd.Index(mouse[keep_g].astype(str))


def write_demo_cohort(
    samples: pd.DataFrame,
    outdir: str | Path | None = None,
    *,
    truth_dir: str | Path | None = None,
    fmt: str = "10x_h5",
    **simulate_kwargs: Any,
) -> pd.DataFrame:
    """Simulate a cohort and write each sample where the sheet's ``path`` column says.

    Parameters
    ----------
    samples
        Sample sheet (see :func:`simulate_cohort`). When it has a ``path`` column, each sample
        is written there; otherwise to ``outdir/<sample_id>/filtered_feature_bc_matrix.h5``
        (``fmt="10x_h5"``) or ``outdir/<sample_id>/`` (``fmt="mtx"``). A ``path`` ending in
        ``.h5`` is a 10x HDF5 file; any other ``path`` is a folder that receives
        ``filtered_feature_bc_matrix.h5`` (10x_h5) or the MTX triplet (mtx).
    outdir
        Folder for samples without a ``path``, and the default ``truth_dir``.
    truth_dir
        Where ``truth.tsv.gz`` and ``samples.tsv`` (the sheet with the written paths) go.
    fmt
        ``"10x_h5"`` (Cell Ranger v3 HDF5, readable by :func:`scanpy.read_10x_h5`) or ``"mtx"``
        (``matrix.mtx.gz``, ``features.tsv.gz``, ``barcodes.tsv.gz``).
    **simulate_kwargs
        Passed to :func:`simulate_cohort` (``seed``, ``cells_per_sample``, ``effects`` ...).

    Returns
    -------
    The sample sheet with the ``path`` of every written sample.
    """
    if fmt not in ("10x_h5", "mtx"):
        raise ValueError(f"fmt must be '10x_h5' or 'mtx', not {fmt!r}.")
    sheet = _sheet_with_paths(samples, outdir, fmt)
    truth_dir = Path(truth_dir if truth_dir is not None else (outdir or "."))
    params = _sim_defaults()
    unknown = set(simulate_kwargs) - set(params)
    if unknown:
        raise TypeError(f"unknown simulate_cohort argument(s): {sorted(unknown)}")
    params.update(simulate_kwargs)
    genome = "mm10" if params["organism"] == "mouse" else "GRCh38"
    paths = dict(zip(sheet["sample_id"].astype(str), sheet["path"].astype(str)))
    written = []
    truths = []
    # one sample in memory at a time, so large benchmark cohorts fit
    for sid, adata, truth in _iter_cohort(sheet.drop(columns=["path"]), **params):
        truths.append(truth)
        target = _write_sample(adata, Path(paths[sid]), fmt, genome)
        written.append(str(target))
        logger.info("wrote %s (%d cells)", target, adata.n_obs)
        del adata
    sheet["path"] = written
    truth = pd.concat(truths, ignore_index=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    truth.to_csv(truth_dir / "truth.tsv.gz", sep="\t", index=False)
    sheet.to_csv(truth_dir / "samples.tsv", sep="\t", index=False)
    return sheet


def _sheet_with_paths(samples: pd.DataFrame, outdir: str | Path | None, fmt: str) -> pd.DataFrame:
    """A copy of the sheet where every sample has a ``path`` (missing ones under ``outdir``)."""
    sheet = samples.reset_index(drop=True).copy()
    if "path" not in sheet.columns or sheet["path"].isna().any():
        if outdir is None:
            raise ValueError("give outdir, or a 'path' for every sample in the sheet.")
        default = [
            str(Path(outdir) / sid / ("filtered_feature_bc_matrix.h5" if fmt == "10x_h5" else ""))
            for sid in sheet["sample_id"].astype(str)
        ]
        if "path" in sheet.columns:
            sheet["path"] = sheet["path"].fillna(pd.Series(default))
        else:
            sheet["path"] = default
    return sheet


def _write_sample(adata: ad.AnnData, p: Path, fmt: str, genome: str) -> Path:
    """Write one simulated sample as 10x HDF5 or MTX triplet; returns the file or folder.

    Genes without an Ensembl ID in the resource are written with their symbol as ID.
    """
    barcodes = adata.obs["barcode"].astype(str).to_numpy()
    ids = adata.var["gene_ids"].to_numpy()
    syms = adata.var["gene_symbols"].to_numpy()
    gene_ids = np.where(ids == "", syms, ids)  # no Ensembl IDs in the resource: use symbols
    if fmt == "10x_h5":
        target = p if p.suffix == ".h5" else p / "filtered_feature_bc_matrix.h5"
        write_10x_h5(target, adata.layers["counts"], barcodes, gene_ids, syms, genome=genome)
        return target
    folder = p if p.suffix == "" else p.parent
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(
            fh, sp.coo_matrix(adata.layers["counts"].T.astype(np.int64)), field="integer"
        )
    feats = pd.DataFrame({"id": gene_ids, "name": syms, "type": "Gene Expression"})
    feats.to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(barcodes).to_csv(folder / "barcodes.tsv.gz", header=False, index=False)
    return folder
