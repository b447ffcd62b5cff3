"""Simulated PBMC sepsis cohort with planted truth (demo run, tests, benchmarks).

Generative model
----------------
Every cell's counts are negative binomial (gamma-Poisson), drawn per sample in chunks of cells
and stored as CSR, so memory stays at one chunk of cells x genes (``_CHUNK`` cells) however
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
  (:data:`_TYPE_LEVELS`)
  (:data:`_TYPE_FOLDS`: Azimuth level-2 / Monaco / Villani / Xie, not
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
  >= 0.9 when tested on the true labels (:func:`oracle_tests`,
  ``benchmarks/oracle_power.py``, 20 seeds: 0.90-1.00, TREM2-high share 0.95).
* **State programmes are broader than the signatures** (:data:`_STATE_CORE`,
  :data:`_STATE_REST`): each state moves 53-66 genes from the literature (core folds
  given, the rest drawn once, log-uniform 1.5-4x up, 1.5-3x down), and each flagged cell
  carries its programme at its own intensity (fold ** w, w ~ U(0.4, 1.6)). The shipped
  signature is a partial subset: 70-81 % of a signature's genes are planted, 16-29 % of a
  programme is scored (:func:`planted_vs_scored`; the demo writes
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
from collections.abc import Mapping, Sequence
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

logger = logging.getLogger(__name__)

__all__ = [
    "simulate_cohort",
    "write_demo_cohort",
    "cell_type_table",
    "check_planted_effects",
    "oracle_tests",
    "null_calibration",
    "PLANTED_EFFECTS",
    "STATES",
    "planted_programmes",
    "planted_vs_scored",
    "targeted_panel",
]

_CHUNK = 512  # cells per dense block while sampling
_EXACT_MU = 0.1  # below this mean, NB draws use the fast exact-zero scheme (_sample_nb)

#: planted per-cell state flags in the truth table
STATES = ("ms1_like", "hla_low", "exhausted", "cytokine_high", "trem2_high")

# ----------------------------------------------------------------------------------------
# fitted constants (soupx_pbmc4k, 2,170 cells; see module docstring)
# ----------------------------------------------------------------------------------------
_BASE_LOGCP10K = (-2.914, 2.120)  # other genes: log mean CP10k ~ N(mu, sd)
_RIBO_LOGCP10K = (2.263, 2.925)
_RIBO_FRACTION = 0.36  # median ribosomal fraction of UMIs in lymphocytes
_MT_FRACTION = 0.028  # median mitochondrial fraction
#: relative MT gene levels (mean CP10k in soupx_pbmc4k)
_MT_LEVELS = {
    "MT-ND1": 17.2,
    "MT-ND2": 26.6,
    "MT-CO1": 69.9,
    "MT-CO2": 44.1,
    "MT-ATP8": 0.2,
    "MT-ATP6": 21.0,
    "MT-CO3": 49.8,
    "MT-ND3": 25.9,
    "MT-ND4L": 3.1,
    "MT-ND4": 31.2,
    "MT-ND5": 12.0,
    "MT-ND6": 0.4,
    "MT-CYB": 18.7,
}
_DISP_TREND = (-1.9, -0.35)  # log phi = a + b log(mean count); see module docstring
_DISP_SCATTER = 0.3

# lineage, (log library mean, sd), ribosomal scale
_TYPE_META: dict[str, tuple[str, tuple[float, float], float]] = {
    "CD4 naive T": ("T", (8.28, 0.36), 1.0),
    "CD4 memory T": ("T", (8.28, 0.36), 1.0),
    "Treg": ("T", (8.28, 0.36), 1.0),
    "CD8 naive T": ("T", (8.27, 0.32), 1.0),
    "CD8 effector/memory T": ("T", (8.27, 0.32), 0.9),
    "NK CD56dim": ("NK", (8.12, 0.28), 0.8),
    "NK CD56bright": ("NK", (8.12, 0.28), 0.9),
    "naive B": ("B", (8.19, 0.36), 1.0),
    "memory B": ("B", (8.19, 0.36), 1.0),
    "Plasmablast": ("Plasma", (9.0, 0.40), 0.5),
    "Classical monocyte": ("Monocyte", (8.39, 0.45), 0.55),
    "Non-classical monocyte": ("Monocyte", (8.39, 0.45), 0.6),
    "cDC1": ("DC", (8.39, 0.50), 0.6),
    "cDC2": ("DC", (8.39, 0.50), 0.6),
    "pDC": ("DC", (8.30, 0.45), 0.7),
    "Mature neutrophil": ("Neutrophil", (6.90, 0.35), 0.3),
    "Immature neutrophil": ("Neutrophil", (6.80, 0.35), 0.3),
    "Platelet": ("Platelet", (6.60, 0.50), 0.3),
    "TREM2-high macrophage": ("Macrophage", (8.80, 0.40), 0.5),
    "Macrophage": ("Macrophage", (8.80, 0.40), 0.5),
}

#: control (healthy PBMC) cell-type fractions. cDC2 at 2 % (CD1c+ DCs are 0.3-2 % of PBMC,
#: the high end): the tolerogenic-DC state is tested within cDC2 with >= 10 cells per
#: sample (stats.min_cells), and at 1.2 % a septic sample (DCs x0.45) held 5-8 of them
#: (oracle power 0.8 under that rule; 1.0 at 2 %)
_BASE_FRACTIONS = {
    "CD4 naive T": 0.16,
    "CD4 memory T": 0.14,
    "Treg": 0.02,
    "CD8 naive T": 0.06,
    "CD8 effector/memory T": 0.08,
    "NK CD56dim": 0.09,
    "NK CD56bright": 0.006,
    "naive B": 0.06,
    "memory B": 0.03,
    "Plasmablast": 0.005,
    "Classical monocyte": 0.18,
    "Non-classical monocyte": 0.03,
    "cDC1": 0.004,
    "cDC2": 0.02,
    "pDC": 0.006,
    "Mature neutrophil": 0.03,
    "Immature neutrophil": 0.008,
    "Platelet": 0.012,
    "TREM2-high macrophage": 0.005,
    "Macrophage": 0.01,
}

# Platelets x3: Qiu 2021 (GSE167363) saw 6 % in healthy controls -> 34 % of PBMC in late
# non-survivors; x3 is a moderate version that a 6 vs 6 design detects (oracle power > 0.9)
_LINEAGE_EFFECT = {"T": 0.5, "NK": 0.4, "B": 0.4, "DC": 0.45, "Plasma": 2.5, "Platelet": 3.0}
_TYPE_EFFECT = {
    "Classical monocyte": 1.7,
    "Mature neutrophil": 2.0,
    "Immature neutrophil": 4.0,
    # x4 with 1 % other macrophages: the TREM2-high share of macrophages (its primary row)
    # has oracle power >= 0.9 in the demo design; x3 with 0.5 % had 0.6-0.75 (20 seeds)
    "TREM2-high macrophage": 4.0,
}

# ----------------------------------------------------------------------------------------
# cell-type profiles: real data (resources/simulator/profiles.tsv.gz, fitted by
# benchmarks/fit_simulator_profiles.py) x literature fold changes. Deliberately NOT the
# annotator's lists (resources/markers/*): the subset genes below are a separate source
# (Azimuth PBMC level-2 markers, Hao 2021 Cell; Monaco 2019 Cell Rep; Villani 2017 Science
# for DCs; Xie 2020 Nat Immunol and Wigerblad 2022 for neutrophils; Rowley 2011 Blood for
# platelets; Mildner/Ramachandran 2019 Nature for macrophages; "[M]" literature memory),
# with partial overlap with the annotator's sets, and folds of 2-8x, not 25x.
# ----------------------------------------------------------------------------------------
#: simulated type -> fitted data column it starts from
_PROFILE_SOURCE = {
    "CD4 naive T": "T_CD4",
    "CD4 memory T": "T_CD4",
    "Treg": "T_CD4",
    "CD8 naive T": "T_CD8",
    "CD8 effector/memory T": "T_CD8",
    "NK CD56dim": "NK",
    "NK CD56bright": "NK",
    "naive B": "B",
    "memory B": "B",
    "Plasmablast": "B",
    "Classical monocyte": "MNP",
    "Non-classical monocyte": "MNP",
    "cDC1": "cDC",
    "cDC2": "cDC",
    "pDC": "pDC",
    "Mature neutrophil": "MNP",
    "Immature neutrophil": "MNP",
    "Platelet": "MNP",
    "TREM2-high macrophage": "MAC",
    "Macrophage": "MAC",
}
#: an up-regulated gene of a type reaches max(source level, _FOLD_REF CP10k) x fold, so a
#: gene near zero in the source population (FCGR3B in PBMC monocytes) gets a modest level
_FOLD_REF = 0.5
_MHC2 = "HLA-DRA HLA-DRB1 HLA-DPA1 HLA-DPB1 HLA-DQA1 HLA-DQB1 CD74"
_MONO_CORE = "LYZ S100A8 S100A9 S100A12 CD14 FCN1 VCAN CSF3R"


def _folds(spec: str) -> dict[str, float]:
    """``"GENE:fold GENE:fold ..."``; a bare list after ``|x`` shares one fold
    (``"|0.25 CD14 VCAN"``)."""
    out: dict[str, float] = {}
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        if part.startswith("|"):
            head, *genes = part[1:].split()
            out.update({g: float(head) for g in genes})
        else:
            for tok in part.split():
                g, f = tok.rsplit(":", 1)
                out[g] = float(f)
    return out


#: type -> gene fold changes on top of its source column (up 2-8, down 1/8-1/2)
_TYPE_FOLDS: dict[str, dict[str, float]] = {
    k: _folds(v)
    for k, v in {
        "CD4 naive T": "CCR7:3 SELL:3 LEF1:3 TCF7:2 NOSIP:2 PIK3IP1:2 LRRN3:4 FHIT:2; "
        "|0.3 KLRB1 GZMK CCL5 S100A4 ANXA1",
        "CD4 memory T": "KLRB1:4 GZMK:3 CCL5:3 ANXA1:2 S100A4:2.5 LGALS1:2 AQP3:2 ITGB1:2 "
        "CRIP1:2; |0.4 CCR7 LEF1 SELL LRRN3",
        "Treg": "FOXP3:8 IL2RA:6 CTLA4:4 RTKN2:6 IKZF2:4 TIGIT:3 FANK1:4 BATF:2 TNFRSF4:3 "
        "TNFRSF18:3 DUSP4:3; |0.3 IL7R",
        "CD8 naive T": "CCR7:3 LEF1:3 SELL:3 TCF7:2 NELL2:3 LRRN3:4 CD8B:2; "
        "|0.2 CCL5 GZMK GZMH NKG7 GNLY KLRD1",
        # effector/memory CD8 T carry part of the "exhaustion" programme at baseline
        # (TIGIT, PDCD1, TOX, CD244, EOMES in healthy effector memory: Szabo 2019 Nat Commun)
        "CD8 effector/memory T": "CCL5:3 GZMK:3 GZMH:4 GZMA:3 NKG7:3 CST7:3 KLRD1:3 GNLY:3 "
        "CCL4:2 TIGIT:2.5 PDCD1:2 TOX:2 CD244:2 EOMES:2.5; |0.25 CCR7 SELL LEF1 LRRN3",
        "NK CD56dim": "FCGR3A:3 FGFBP2:3 SPON2:2 GZMB:2 PRF1:2 CX3CR1:3; "
        "|0.25 XCL1 XCL2 SELL GZMK KLRC1",
        "NK CD56bright": "NCAM1:4 XCL1:6 XCL2:6 GZMK:6 SELL:4 KLRC1:3 SPINK2:6 CD44:2; "
        "|0.15 FCGR3A FGFBP2 CX3CR1; |0.4 GZMB PRF1",
        "naive B": "IGHD:4 IGHM:2 TCL1A:4 FCER2:4 IL4R:3 PLPP5:3 YBX3:2; |0.3 AIM2 SSPN COCH",
        "memory B": "AIM2:4 COCH:5 SSPN:4 TNFRSF13B:4 CD27:3 CRIP1:2 IGHA1:3 IGHG1:3; "
        "|0.25 IGHD TCL1A FCER2",
        "Plasmablast": "JCHAIN:8 MZB1:8 XBP1:6 TXNDC5:8 DERL3:8 IGHG1:8 IGHA1:8 PRDM1:4 "
        "TNFRSF17:8 SDC1:4 CD38:6 FKBP11:6 SEC11C:4 SSR4:4; "
        "|0.125 MS4A1 TCL1A FCER2 IGHD; |0.25 CD19 BANK1 CD22 CD37 " + _MHC2,
        "Classical monocyte": "CD14:2 VCAN:2 S100A12:2 CSF3R:2 FCN1:2; "
        "|0.25 FCGR3A CDKN1C CD1C FCER1A CLEC10A; |0.4 MS4A7",
        "Non-classical monocyte": "FCGR3A:6 CDKN1C:6 MS4A7:4 HES4:4 LST1:2 AIF1:2 IFITM2:2 "
        "RHOC:3 C1QA:4 TCF7L2:3 CX3CR1:3; |0.15 CD14 S100A12 VCAN CSF3R; |0.35 S100A8 LYZ",
        # both from the cDC column (33 pure cDCs of soupx_pbmc4k, mostly cDC2)
        "cDC1": "CLEC9A:8 XCR1:8 IDO1:6 CADM1:8 DNASE1L3:8 C1orf54:8 CPNE3:4 WDFY4:6 BATF3:6 "
        "HLA-DPB1:2 HLA-DPA1:2; |0.2 CD1C FCER1A CLEC10A CD1E; |0.5 " + _MONO_CORE,
        "cDC2": "CD1C:2 FCER1A:2 CLEC10A:2 HLA-DQA1:2 CD1E:3 PKIB:3 ENHO:2",
        "pDC": "",  # its own data column (the 20 pDCs of soupx_pbmc4k)
        "Mature neutrophil": "FCGR3B:8 CSF3R:4 CXCR2:8 CXCR1:8 CMTM2:8 FPR1:4 MME:6 PROK2:8 "
        "NAMPT:3 G0S2:4 S100A8:2 S100A9:2 S100A12:3 MNDA:2 IFITM2:3 SOD2:3 MGAM:8 AQP9:6 "
        "CXCL8:2 PTGS2:3; |0.125 HLA-DRB1 CST3 CSF1R VCAN MS4A7 " + _MHC2 + "; |0.25 LYZ CD14 "
        "LGALS2 CD68 FCN1 LST1",
        "Immature neutrophil": "LCN2:8 LTF:8 CAMP:8 MMP8:8 CEACAM8:8 CEACAM6:6 OLFM4:8 CD24:6 "
        "BPI:6 CRISP3:6 CHI3L1:6 ARG1:6 MMP9:6 RETN:4 S100A8:2 S100A9:2 S100A12:3 CSF3R:2 "
        "FCGR3B:2; |0.125 HLA-DRB1 CST3 CSF1R VCAN MS4A7 " + _MHC2 + "; |0.25 LYZ CD14 LGALS2 CD68 "
        "FCN1 LST1",
        "Platelet": "PPBP:8 PF4:8 GP9:8 ITGA2B:8 TUBB1:8 GNG11:8 NRGN:8 CAVIN2:8 CLU:6 "
        "H2AC6:6 SPARC:6 TREML1:8 CMTM5:6 TSC22D1:3; |0.03 CST3 CTSS VCAN "
        + _MONO_CORE
        + " "
        + _MHC2
        + "; |0.25 TYROBP FCER1G LST1 AIF1",
        "TREM2-high macrophage": "",  # its own data column (celltypist_sample macrophages)
        # TREM2-low macrophage: the lipid-associated programme divided back out, resident
        # genes up (Ramachandran 2019 Nature; Dick 2022 Sci Immunol TLF+ macrophages)
        "Macrophage": "C1QA:4 C1QB:4 C1QC:4 MRC1:4 SELENOP:6 FOLR2:6 LYVE1:6 F13A1:4 MARCO:4 "
        "CD163:3; |0.15 TREM2; |0.2 SPP1; |0.25 GPNMB LPL ACP5; |0.3 APOE CD9 FABP5; "
        "|0.4 CTSL LIPA PLIN2; |0.5 LGALS3 CTSD CD36",
    }.items()
}
#: identity transcripts of the populations that the fitted PBMC data lack (their source
#: column is a stand-in: monocytes for neutrophils and platelets, B cells for plasmablasts),
#: as minimum levels in CP10k. A fold of 2-8x on a monocyte's PPBP (0.8 CP10k) does not make
#: a platelet: PPBP / PF4 are among the top transcripts of blood platelets (Rowley 2011 Blood;
#: Qiu 2021 platelets of GSE167363), FCGR3B / CXCR2 / CSF3R of mature neutrophils and
#: LTF / LCN2 / CAMP of immature ones (Xie 2020 Nat Immunol; Mare 2015 Genome Med; Kwok 2023
#: Nat Immunol), immunoglobulin and JCHAIN of plasmablasts (5-20 % of their UMIs).
_TYPE_LEVELS: dict[str, dict[str, float]] = {
    "Platelet": {
        "PPBP": 300,
        "PF4": 150,
        "NRGN": 40,
        "GNG11": 30,
        "CAVIN2": 20,
        "CLU": 20,
        "TUBB1": 15,
        "SPARC": 15,
        "H2AC6": 10,
        "GP9": 8,
        "ITGA2B": 6,
        "TREML1": 6,
    },
    "Mature neutrophil": {
        "FCGR3B": 60,
        "IFITM2": 30,
        "CSF3R": 25,
        "CXCR2": 20,
        "NAMPT": 20,
        "G0S2": 15,
        "MNDA": 12,
        "CXCR1": 10,
        "FPR1": 10,
        "CMTM2": 8,
        "MGAM": 8,
        "AQP9": 8,
        "PROK2": 6,
    },
    "Immature neutrophil": {
        "LTF": 60,
        "LCN2": 40,
        "CAMP": 30,
        "MMP8": 10,
        "OLFM4": 10,
        "CEACAM8": 8,
        "CD24": 8,
        "BPI": 6,
        "ARG1": 5,
    },
    "Plasmablast": {"IGHG1": 150, "IGHA1": 120, "JCHAIN": 60, "MZB1": 30, "XBP1": 15, "TXNDC5": 10},
}
#: Platelet transcripts in the fitted monocyte column (PPBP 0.8, NRGN 0.8 CP10k, with a
#: heavy tail) come from platelet-monocyte aggregates in the source PBMC data; the simulator
#: plants aggregates and platelet doublets itself, so in every non-platelet type these genes
#: sit at the T-cell level with the trend dispersion (otherwise one plain monocyte in 30
#: carries an aggregate's worth of platelet RNA).
_PLATELET_CARRYOVER = "platelet genes of _TYPE_LEVELS capped at the T-cell level"
#: lipid-associated genes that make the TREM2-high macrophage differ from the other
#: macrophage: its planted "programme" (the data profile, against the divided-out one)
_TREM2_PROGRAMME = [g for g, f in _TYPE_FOLDS["Macrophage"].items() if f < 1]
#: fraction of ribosomal UMIs relative to the source population (low-RNA granulocytes and
#: anucleate platelets carry fewer ribosomal transcripts; Xie 2020)
_RIBO_RELATIVE = {"Mature neutrophil": 0.5, "Immature neutrophil": 0.5, "Platelet": 0.5}

# ----------------------------------------------------------------------------------------
# covariates: sex-linked genes and age
# ----------------------------------------------------------------------------------------
#: Y-linked genes silent in female donors; XIST silent in male donors
_Y_GENES = ("RPS4Y1", "DDX3Y", "UTY", "KDM5D", "EIF1AY", "USP9Y", "ZFY", "NLGN4Y")
_X_FEMALE = ("XIST", "TSIX")
#: log change of a type's fraction per year of age above 50 (naive T cells fall with age,
#: CD8 faster than CD4; effector/memory rise: Goronzy & Weyand 2019 Nat Immunol; Saule 2006)
_AGE_SLOPE = {"CD4 naive T": -0.015, "CD8 naive T": -0.03, "CD8 effector/memory T": 0.01}
_AGE_REF = 50.0

# ----------------------------------------------------------------------------------------
# state programmes: broad literature programmes (60-100 genes each), of which the shipped
# signature (resources/signatures/human.yaml, read only by the scorer) is a partial subset:
# some signature genes are not planted at all, most programme genes are not in the
# signature (see planted_vs_scored). Folds: "core" genes given, the rest drawn once
# (seed-independent) log-uniform in [1.5, 4] up and [1/3, 1/1.5] down; each flagged cell
# carries the programme at its own intensity (fold ** w, w ~ U(0.4, 1.6)).
# ----------------------------------------------------------------------------------------
_STATE_CORE: dict[str, dict[str, float]] = {
    # MS1 (Reyes 2020 Nat Med), S100A-high HLA-DR-low monocytes (Schulte-Schrepping 2020
    # Cell), emergency-myelopoiesis granule genes (Kwok 2023 Nat Immunol)
    "ms1_like": _folds(
        "RETN:6 IL1R2:6 MCEMP1:5 CYP1B1:4 S100A12:3 HP:4 SLC39A8:3 ACSL1:3 "
        "CD163:3 PLAC8:2 VCAN:2; |0.4 " + _MHC2
    ),
    # MHC-II loss with a tolerogenic shift (Monneret 2006; Guignant 2011; Hotchkiss 2013)
    "hla_low": _folds(
        "CD274:4 IL10:3 IL4I1:3; |0.35 HLA-DRA HLA-DRB1 HLA-DPA1 "
        "HLA-DPB1 HLA-DQA1 HLA-DQB1 HLA-DMA HLA-DMB; |0.5 CD74 CIITA CD86"
    ),
    # exhausted / dysfunctional T (Wherry 2007 Immunity; Zheng 2017 Cell; Guo 2018 Nat Med)
    "exhausted": _folds(
        "PDCD1:6 TOX:4 TIGIT:4 LAG3:5 HAVCR2:5 CD244:3 LAYN:4 PHLDA1:3 "
        "TNFRSF9:3; |0.4 IL7R TCF7 CCR7 SELL"
    ),
    # circulating inflammatory monocytes (Schulte-Schrepping 2020; Wilk 2020 Nat Med)
    "cytokine_high": _folds(
        "IL1B:5 TNF:4 CXCL8:4 CCL3:4 CCL4:4 IL6:6 IER3:3 NFKBIA:2.5 TNFAIP3:2.5 CXCL2:4 PTGS2:3"
    ),
}
_STATE_REST: dict[str, tuple[str, str]] = {  # (other up genes, other down genes)
    "ms1_like": (
        "S100A8 S100A9 SELL ALOX5AP CD36 FKBP5 TSC22D3 "
        "ZBTB16 VSIG4 IRAK3 PADI4 DYSF CLEC4E CLEC4D FCGR1A PGD ECHDC3 TLR5 BCL6 SOCS3 "
        "IL18R1 IL1RN PFKFB2 GYG1 STEAP4 CD177 MMP9 LCN2 CAMP ARG1 MGAM AQP9 NAMPT CSF3R "
        "ANXA1 OLFM4",
        "CX3CR1 LGALS2 CD1D MS4A6A KLF4 FCER1A CLEC10A CSF1R CD86 CIITA HLA-DMA HLA-DMB",
    ),
    "hla_low": (
        "LILRB2 ARG2 ADM S100A8 S100A9 SOCS3 TGFBI MARCKS SIGLEC10 IRAK3 IL1RN TSC22D3 "
        "ANXA1 LGALS1 FCGR1A CLEC4E VSIG4 MS4A4A",
        "CD40 CD80 CPVL IRF8 LGALS2 CST3 CTSS CLEC10A FCER1A CD1C CD1D CD1E PKIB HLA-DQA1 "
        "CD83 LAMP3 HLA-DOA HLA-DOB LY86 MS4A7 CD4 MARCKSL1",
    ),
    "exhausted": (
        "SNX9 ITGAE CCL3 CCL4 CCL5 GZMB GZMK RGS1 DUSP4 NR4A1 NR4A2 EOMES PRDM1 "
        "BATF IRF4 ID2 MAF HLA-DRA CD38 B3GAT1 SIRPG CXCR6 ITM2A SRGN KLRG1 CTSW NKG7 CST7 "
        "TNFRSF18 CD27 RGS2 CD7",
        "CD28 LEF1 KLF2 S1PR1 GPR183 LTB MAL NOSIP PIK3IP1 LRRN3 FHIT",
    ),
    "cytokine_high": (
        "CCL2 CXCL3 CCL20 EREG NFKBIZ ICAM1 CD83 PLAUR OSM CCL4L2 PPP1R15A DUSP2 KDM6B ZFP36 "
        "FOSB JUN ATF3 MAFF BCL2A1 SERPINB2 CXCL1 TRAF1 IL23A CXCL10 IL18 NLRP3 EHD1 SGK1 "
        "SOD2 G0S2 IL10 IL1RN SOCS3 THBS1 NAMPT NR4A3 EGR1 EGR2 EGR3 IRF1 RELB NFKB1 NFKB2 "
        "BIRC3 TNFAIP6 PDE4B TNFAIP2 CXCL5",
        "",
    ),
}
#: every cell's intensity of its states' programmes is fold ** w, w ~ U(*_INTENSITY)
_INTENSITY = (0.4, 1.6)


def _state_programmes() -> dict[str, dict[str, float]]:
    """state -> {gene: fold}: the core folds plus the broader programme, whose folds are
    drawn once from a fixed generator (the same programme in every cohort)."""
    rng = np.random.default_rng(18)
    out = {}
    for state, core in _STATE_CORE.items():
        prog = dict(core)
        up, down = _STATE_REST[state]
        for g in up.split():
            prog.setdefault(g, float(np.exp(rng.uniform(np.log(1.5), np.log(4.0)))))
        for g in down.split():
            prog.setdefault(g, float(np.exp(-rng.uniform(np.log(1.5), np.log(3.0)))))
        out[state] = prog
    return out


_STATE_PROGRAMMES = _state_programmes()
# state -> (types it applies to, control fraction, sepsis fraction)
_STATE_RATES = {
    "ms1_like": (("Classical monocyte",), 0.08, 0.26),
    "hla_low": (
        ("Classical monocyte", "Non-classical monocyte", "cDC1", "cDC2", "pDC"),
        0.10,
        0.35,
    ),
    "exhausted": (
        ("CD4 naive T", "CD4 memory T", "Treg", "CD8 naive T", "CD8 effector/memory T"),
        0.05,
        0.16,
    ),
    "cytokine_high": (("Classical monocyte", "Non-classical monocyte"), 0.05, 0.20),
}
#: per-type sepsis rate where it differs from the state's default (state -> type -> rate).
#: Circulating DCs of septic patients lose HLA-DR in most patients (Poehlmann 2009 Crit Care,
#: mDC and pDC HLA-DR loss; Hotchkiss 2013 Nat Rev Immunol): 60 % of septic DCs vs 35 % of
#: monocytes. With ~15 DCs per septic sample a 10 % -> 35 % shift has oracle power < 0.8.
_STATE_CASE_RATE_BY_TYPE = {"hla_low": {"cDC1": 0.6, "cDC2": 0.6, "pDC": 0.6}}
#: odds multipliers of a state by type (both conditions): exhaustion follows
#: differentiation, most frequent in effector/memory CD8 T, rare in naive T (Wherry 2015
#: Nat Rev Immunol; Boomer 2011 JAMA saw PD-1 mostly on memory/effector cells)
_STATE_TYPE_ODDS = {
    "exhausted": {
        "CD8 effector/memory T": 3.0,
        "CD4 memory T": 1.5,
        "Treg": 1.5,
        "CD4 naive T": 0.5,
        "CD8 naive T": 0.5,
    },
}
_DONOR_SD_FRACTION = 0.3
_DONOR_SD_STATE = 0.35
_SAMPLE_SD = 0.1

# mouse names that are not the title-cased human symbol (approximation: ortholog by name)
_MOUSE_NAMES = {
    "LYZ": "Lyz2",
    "CD8B": "Cd8b1",
    "HBB": "Hbb-bs",
    "HBA1": "Hba-a1",
    "HBA2": "Hba-a2",
    "HLA-DRA": "H2-Ea",
    "HLA-DRB1": "H2-Eb1",
    "HLA-DQA1": "H2-Aa",
    "HLA-DQB1": "H2-Ab1",
    "HLA-DMA": "H2-DMa",
    "HLA-DMB": "H2-DMb1",
    "HLA-A": "H2-K1",
    "HLA-B": "H2-D1",
    "HLA-E": "H2-T23",
    "CD244": "Cd244a",
    "RETN": "Retnlg",
    "FCGR3B": "Ly6g",
    "S100A12": "Chil3",
    "GNLY": "Klrb1c",
    "CD1C": "Cd209a",
    "LILRA4": "Siglech",
    "CXCL8": "Cxcl2",
    "MCEMP1": "Clec4d",
    "FCGR3A": "Fcgr4",
    "SELENOP": "Selenop",
    "MT-CYB": "mt-Cytb",
    "TRAC": "Trac",
    "TRBC2": "Trbc2",
    "FTL": "Ftl1",
    "CAVIN2": "Cavin2",
    "H2AC6": "H2ac6",
    "IGHM": "Ighm",
    "IGHD": "Ighd",
    "IGHG1": "Ighg1",
    "IGHA1": "Igha",
    "JCHAIN": "Jchain",
    "HLA-DPA1": None,
    "HLA-DPB1": None,
    "HLA-DRB5": None,
    "HLA-C": None,
    "KLRF1": None,
    "CEACAM8": None,
    "IGHA2": None,
    "HBD": None,
    "HBG1": None,
    "HBG2": None,
}


def cell_type_table() -> pd.DataFrame:
    """The simulated cell types: lineage, control fraction and library-size parameters."""
    rows = []
    for ct, (lin, (mu, sd), ribo) in _TYPE_META.items():
        rows.append(
            {
                "cell_type": ct,
                "lineage": lin,
                "control_fraction": _BASE_FRACTIONS[ct],
                "log_library_mean": mu,
                "log_library_sd": sd,
                "ribo_scale": ribo,
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------
# genes and profiles
# ----------------------------------------------------------------------------------------
def _programme_genes() -> list[str]:
    """Every gene the simulator moves: type folds, state programmes, sex-linked genes, MT."""
    genes: list[str] = []
    for d in (*_TYPE_FOLDS.values(), *_TYPE_LEVELS.values()):
        genes.extend(d)
    for prog in _STATE_PROGRAMMES.values():
        genes.extend(prog)
    genes.extend(_Y_GENES + _X_FEMALE)
    genes.extend(_MT_LEVELS)
    genes.extend(["ISG15", "IFI6", "MX1", "IFIT1", "IFIT3", "IFI44L", "PTPRC", "ACTB", "B2M"])
    return list(dict.fromkeys(genes))


def _profile_table() -> pd.DataFrame:
    """The fitted per-population mean CP10k and dispersion residual of every gene
    (``resources/simulator/profiles.tsv.gz``; see its README)."""
    return pd.read_csv(resource_path("simulator", "profiles.tsv.gz"), sep="\t", index_col=0)


def _select_genes(n_genes: int) -> pd.DataFrame:
    table = pd.read_csv(resource_path("genes", "human_genes.tsv.gz"), sep="\t", dtype=str)
    table["gene_id"] = table["gene_id"].fillna("")
    sym = table["gene_symbol"]
    wanted = set(_programme_genes())
    missing = sorted(wanted - set(sym))
    if missing:
        raise RuntimeError(f"gene resource lacks programme genes {missing[:10]}")
    priority = (
        sym.isin(wanted) | sym.str.startswith("MT-") | sym.str.match(r"^RP[SL]\d|^HB[ABDGMQ]\d?$")
    ).to_numpy()
    n_prio = int(priority.sum())
    if n_genes < n_prio:
        raise ValueError(
            f"n_genes={n_genes} is smaller than the {n_prio} programme, sex-linked, MT, "
            "ribosomal and haemoglobin genes the simulator needs; use n_genes >= "
            f"{n_prio} (10,000+ for realistic data)."
        )
    if n_genes > len(table):
        raise ValueError(f"n_genes={n_genes} exceeds the {len(table)} genes in the resource.")
    rest = np.flatnonzero(~priority)
    # the rest by expression in the data (the highest mean CP10k of any fitted population),
    # as a real matrix keeps the genes it detects: seed-independent, so cohorts share one
    # gene list, and chosen without looking at any marker list
    level = _profile_table().drop(columns="disp_resid").max(axis=1).reindex(sym).fillna(0)
    order = rest[np.argsort(-level.to_numpy()[rest], kind="stable")]
    chosen = order[: n_genes - n_prio]
    idx = np.sort(np.concatenate([np.flatnonzero(priority), chosen]))
    return table.iloc[idx].reset_index(drop=True)


def _build_profiles(
    genes: pd.Series, rng: np.random.Generator
) -> tuple[np.ndarray, list[str], dict[str, np.ndarray], np.ndarray]:
    """Return (type x gene mean proportions, type names, state fold vectors, per-gene
    dispersion residual).

    Each type: its fitted data column (mean CP10k of a real population), times the type's
    literature folds (:data:`_TYPE_FOLDS`; up genes from max(level, ``_FOLD_REF``)), times a
    small per-type random perturbation of 2 % of genes (log-sd 0.3: two donors' worth of
    subset noise); ribosomal genes scaled for low-RNA types; MT genes at their fitted
    relative levels and share.
    """
    table = _profile_table().reindex(pd.Index(genes))
    sym = pd.Index(genes)
    n = len(sym)
    pos = {g: i for i, g in enumerate(sym)}
    is_mt = np.asarray(sym.str.startswith("MT-"))
    is_ribo = np.asarray(sym.str.match(r"^RP[SL]\d"))
    types = list(_TYPE_META)
    profiles = np.empty((len(types), n), dtype=np.float64)
    floor = 1e-3  # CP10k: genes never seen in the data keep a trace
    plt_idx = [pos[g] for g in _TYPE_LEVELS["Platelet"] if g in pos]
    t_level = np.maximum(table["T_CD4"].fillna(0).to_numpy(float), floor)
    for k, ct in enumerate(types):
        p = np.maximum(table[_PROFILE_SOURCE[ct]].fillna(0).to_numpy(float), floor)
        for g, fold in _TYPE_FOLDS[ct].items():
            i = pos[g]
            p[i] = max(p[i], _FOLD_REF) * fold if fold > 1 else p[i] * fold
        for g, level in _TYPE_LEVELS.get(ct, {}).items():
            if g in pos:
                p[pos[g]] = max(p[pos[g]], level)
        if ct != "Platelet":  # see _PLATELET_CARRYOVER
            for i in plt_idx:
                p[i] = min(p[i], t_level[i])
        p = p * np.where(rng.random(n) < 0.02, np.exp(rng.normal(0, 0.3, n)), 1.0)
        p[is_ribo] *= _RIBO_RELATIVE.get(ct, 1.0)
        other = ~is_mt
        p[other] *= (1 - _MT_FRACTION) / p[other].sum()
        mt = np.array([_MT_LEVELS[g] for g in sym[is_mt]])
        p[is_mt] = _MT_FRACTION * mt / mt.sum()
        profiles[k] = p
    states = {}
    for state, prog in _STATE_PROGRAMMES.items():
        fold = np.ones(n)
        ref = np.zeros(n)
        for g, f in prog.items():
            fold[pos[g]] = f
            ref[pos[g]] = _FOLD_REF / 1e4 if f > 1 else 0.0
        states[state] = np.vstack([fold, ref])
    resid = np.clip(table["disp_resid"].fillna(0).to_numpy(float), -0.5, 0.5)
    resid[plt_idx] = 0.0
    return profiles, types, states, resid


def _barcodes(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unique 10x-style barcodes (16 nt + ``-1``)."""
    codes = np.unique(rng.integers(0, 4**16, size=n + 16))
    while codes.size < n:  # pragma: no cover - collisions are ~1e-9 per pair
        codes = np.unique(np.concatenate([codes, rng.integers(0, 4**16, size=n)]))
    codes = rng.permutation(codes)[:n]
    letters = np.array(list("ACGT"))
    digits = (codes[:, None] // (4 ** np.arange(15, -1, -1, dtype=np.int64))[None, :]) % 4
    return np.array(["".join(row) + "-1" for row in letters[digits]], dtype=object).astype(str)


def _sample_nb(mu: np.ndarray, shape: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Negative binomial counts with mean ``mu`` and dispersion ``1/shape`` (float32).

    Entries with ``mu >= _EXACT_MU`` are drawn exactly as gamma-Poisson. The many entries
    with smaller means are drawn from the exact NB probability of a non-zero count,
    ``1 - (1 + phi mu)^(-1/phi)``, and a non-zero is 1, or 2 with probability
    ``mu (1 + phi) / 2`` (counts >= 3 have probability < 0.3 % there). This is ~4x faster
    than gamma-Poisson on every entry and keeps the zero fraction exact.
    """
    phi = np.reciprocal(shape)
    p_nz = -np.expm1(-np.log1p(phi * mu) / phi)
    u = rng.random(mu.shape, dtype=np.float32)
    out = (u < p_nz).astype(np.float32)
    # the same uniform gives 2 with probability p_nz * q, i.e. P(2 | non-zero) = q
    out += u < p_nz * np.minimum(mu * (1 + phi) * 0.5, 1.0)
    hi = np.flatnonzero(mu >= _EXACT_MU)
    shp = shape.ravel()[hi]
    lam = rng.standard_gamma(shp, dtype=np.float32) * (mu.ravel()[hi] / shp)
    out.ravel()[hi] = rng.poisson(lam)
    return out


def _mouse_symbols(symbols: Sequence[str]) -> list[str | None]:
    out: list[str | None] = []
    for s in symbols:
        if s in _MOUSE_NAMES:
            out.append(_MOUSE_NAMES[s])
        elif s.startswith("MT-"):
            out.append("mt-" + s[3:].capitalize())
        elif s.startswith("HLA-"):
            out.append(None)
        else:
            out.append(s[0] + s[1:].lower())
    return out


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


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.asarray(p, dtype=float)
    return np.log(p / (1 - p))


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
        ``is_low_quality``, the state flags in :data:`STATES`, ``total_counts``.
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
    (:func:`_cohort_model`); each sample then draws only from its own generator, seeded
    from that master generator, step by step in :func:`_simulate_sample`.
    """
    samples = samples.reset_index(drop=True).copy()
    _check_cohort_args(
        samples,
        case=case,
        control=control,
        organism=organism,
        cells_per_sample=cells_per_sample,
        ambient=ambient,
        low_quality_rate=low_quality_rate,
        batch_effect=batch_effect,
    )
    model = _cohort_model(samples, n_genes=n_genes, batch_effect=batch_effect, seed=seed)
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
        sid, counts, truth = _simulate_sample(
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
        yield sid, _sample_anndata(out_model, row, counts, truth, uns, mouse), truth


def targeted_panel(n_genes: int = 1300, *, seed: int = 1300) -> list[str]:
    """A targeted immune panel of ``n_genes`` symbols (fixed by ``seed``): about half of the
    genes the simulator moves (type folds, state programmes, sex-linked genes), no MT or
    ribosomal genes, the rest drawn from the gene resource. Like commercial immune panels it
    covers some markers of each population but not all, so marker sets can lose most of
    their genes."""
    table = pd.read_csv(resource_path("genes", "human_genes.tsv.gz"), sep="\t", dtype=str)
    sym = table["gene_symbol"]
    rng = np.random.default_rng(seed)
    prog = np.array(sorted(set(_programme_genes()) - set(_MT_LEVELS)))
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


def _check_cohort_args(
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
class _CohortModel:
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


def _cohort_model(
    samples: pd.DataFrame, *, n_genes: int, batch_effect: float, seed: int
) -> _CohortModel:
    """Draw the cohort model from ``default_rng(seed)``.

    The draw order is part of the output (same seed, same cohort): profiles, dispersion
    scatter, batch gene factors, batch library shifts, donor fractions, donor states,
    sample seeds.
    """
    gene_table = _select_genes(n_genes)
    master = np.random.default_rng(seed)
    profiles, types, state_vecs, disp_resid = _build_profiles(gene_table["gene_symbol"], master)
    n_types, n = profiles.shape
    lib_mu = np.array([_TYPE_META[t][1][0] for t in types])
    # dispersion per (type, gene) from the fitted trend on the typical mean count
    mean_count = profiles * np.exp(lib_mu)[:, None]
    a, b = _DISP_TREND
    phi = np.exp(a + b * np.log(np.maximum(mean_count, 1e-3)))
    # per-gene scatter: the data's residual where the fit estimated one, random elsewhere
    scatter = master.normal(0, _DISP_SCATTER, n)
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
    donor_frac = {d: master.normal(0, _DONOR_SD_FRACTION, n_types) for d in donors}
    donor_state = {d: master.normal(0, _DONOR_SD_STATE, len(_STATE_RATES)) for d in donors}
    sample_seeds = master.integers(0, 2**63 - 1, size=len(samples))
    donor_sex, donor_age = _donor_covariates(samples, donors, master)
    sym = gene_table["gene_symbol"]
    return _CohortModel(
        gene_table=gene_table,
        types=types,
        profiles=profiles,
        profiles32=profiles.astype(np.float32),
        state_vecs=state_vecs,
        shape=(1.0 / phi).astype(np.float32),
        type_lineage=np.array([_TYPE_META[t][0] for t in types]),
        lib_mu=lib_mu,
        lib_sd=np.array([_TYPE_META[t][1][1] for t in types]),
        base_frac=np.array([_BASE_FRACTIONS[t] for t in types]),
        sepsis_mult=np.array(
            [_TYPE_EFFECT.get(t, _LINEAGE_EFFECT.get(_TYPE_META[t][0], 1.0)) for t in types]
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
        y_genes=np.asarray(sym.isin(_Y_GENES)),
        x_female_genes=np.asarray(sym.isin(_X_FEMALE)),
    )


def _donor_covariates(
    samples: pd.DataFrame, donors: list[str], rng: np.random.Generator
) -> tuple[dict[str, str], dict[str, float]]:
    """Each donor's sex (sheet ``sex``: F/female/M/male; drawn 50:50 where absent or
    unreadable) and age (sheet ``age``; ``_AGE_REF`` where absent, i.e. no age effect)."""
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
        age[d] = float(val) if np.isfinite(val) else _AGE_REF
    return sex, age


def _mouse_genes(gene_table: pd.DataFrame) -> tuple[np.ndarray, pd.Index]:
    """Genes kept for a mouse cohort and their mouse names: genes without a mouse name are
    dropped; on a name collision the first gene wins."""
    mouse = pd.Series(_mouse_symbols(list(gene_table["gene_symbol"])), dtype=object)
    keep_g = (mouse.notna() & ~mouse.duplicated()).to_numpy()
    return keep_g, pd.Index(mouse[keep_g].astype(str))


def _simulate_sample(
    model: _CohortModel,
    row: Mapping[str, Any],
    rng: np.random.Generator,
    *,
    cells_per_sample: int,
    effects: bool,
    case: str,
    ambient: float,
    low_quality_rate: float,
    doublets: bool,
) -> tuple[str, sp.csr_matrix, pd.DataFrame]:
    """One sample's counts (cells x genes, CSR) and truth table, drawn from ``rng``.

    Steps, in the order they draw random numbers: composition, states, low quality,
    library sizes, counts, doublets, barcodes.
    """
    sid, cond, donor, batch = (str(row[k]) for k in ("sample_id", "condition", "donor", "batch"))
    is_case = effects and cond == case
    n_cells = int(row.get("n_cells", cells_per_sample) or cells_per_sample)
    d_rate = min(0.03 + 0.01 * n_cells / 1000, 0.12) if doublets else 0.0
    n_dbl = int(round(d_rate * n_cells))
    n_gen = n_cells + n_dbl  # singlets generated; n_dbl partners are merged away
    ctype = _sample_cell_types(model, rng, is_case=is_case, donor=donor, n_gen=n_gen)
    flags = _sample_states(model, rng, ctype, is_case=is_case, donor=donor)
    low_q = rng.random(n_gen) < low_quality_rate
    lib, mt_target, amb = _sample_libraries(model, rng, ctype, low_q, batch, ambient)
    gene_fac = model.batch_gene[batch] * model.sex_factor(donor)
    counts = _sample_counts(model, rng, ctype, flags, low_q, lib, mt_target, amb, gene_fac)
    counts, is_dbl, partner_type, drop = _add_doublets(model, rng, counts, ctype, low_q, n_dbl)
    keep = np.flatnonzero(~drop)[:n_cells]
    counts = counts[keep]
    counts.sort_indices()
    barcodes = _barcodes(len(keep), rng)
    truth = pd.DataFrame(
        {
            "cell_id": np.array([f"{sid}_{bc}" for bc in barcodes]),
            "sample_id": sid,
            "barcode": barcodes,
            "condition": cond,
            "donor": donor,
            "batch": batch,
            "cell_type": np.array(model.types)[ctype[keep]],
            "lineage": model.type_lineage[ctype[keep]],
            "is_doublet": is_dbl[keep],
            "doublet_partner_type": partner_type[keep].astype(str),
            "is_low_quality": low_q[keep],
            **{s: flags[s][keep] for s in STATES},
            "total_counts": np.asarray(counts.sum(1)).ravel().astype(np.int64),
        }
    )
    return sid, counts, truth


def _sample_cell_types(
    model: _CohortModel, rng: np.random.Generator, *, is_case: bool, donor: str, n_gen: int
) -> np.ndarray:
    """Cell type index of each generated cell: base fractions (x the sepsis shifts in a
    case), with donor and sample noise on the log scale."""
    n_types = len(model.types)
    logf = np.log(model.base_frac * (model.sepsis_mult if is_case else 1.0))
    age_shift = np.array([_AGE_SLOPE.get(t, 0.0) for t in model.types])
    logf = logf + age_shift * (model.donor_age[donor] - _AGE_REF)
    logf = logf + model.donor_frac[donor] + rng.normal(0, _SAMPLE_SD, n_types)
    frac = np.exp(logf) / np.exp(logf).sum()
    return rng.choice(n_types, size=n_gen, p=frac)


def _sample_states(
    model: _CohortModel, rng: np.random.Generator, ctype: np.ndarray, *, is_case: bool, donor: str
) -> dict[str, np.ndarray]:
    """Boolean state flags per cell (:data:`STATES`): per-type rates (case or control) with
    donor and sample noise on the logit scale, among the types each state applies to."""
    n_types, n_gen = len(model.types), ctype.size
    type_idx_of = model.type_idx_of
    flags = {s: np.zeros(n_gen, dtype=bool) for s in STATES}
    for j, (state, (applies, p_ctrl, p_case)) in enumerate(_STATE_RATES.items()):
        by_type = _STATE_CASE_RATE_BY_TYPE.get(state, {}) if is_case else {}
        p_type = np.full(n_types, p_case if is_case else p_ctrl)
        for t, rate in by_type.items():
            p_type[type_idx_of[t]] = rate
        odds = _STATE_TYPE_ODDS.get(state, {})
        lo = np.log([odds.get(t, 1.0) for t in model.types])
        lp = _logit(p_type) + lo + model.donor_state[donor][j] + rng.normal(0, _SAMPLE_SD)
        p = (1 / (1 + np.exp(-lp)))[ctype]
        eligible = np.isin(ctype, [type_idx_of[t] for t in applies])
        flags[state] = eligible & (rng.random(n_gen) < p)
    flags["hla_low"] |= flags["ms1_like"]
    flags["trem2_high"] = ctype == type_idx_of["TREM2-high macrophage"]
    return flags


def _sample_libraries(
    model: _CohortModel,
    rng: np.random.Generator,
    ctype: np.ndarray,
    low_q: np.ndarray,
    batch: str,
    ambient: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Library size per cell (low-quality cells 15-50 % of it), the mitochondrial fraction
    targeted in low-quality cells, and the ambient fraction per cell."""
    n_gen = ctype.size
    log_lib = rng.normal(model.lib_mu[ctype] + model.batch_lib[batch], model.lib_sd[ctype])
    log_lib[low_q] += np.log(rng.uniform(0.15, 0.5, low_q.sum()))
    lib = np.exp(log_lib)
    mt_target = rng.uniform(0.2, 0.6, n_gen)
    amb = np.clip(ambient * np.exp(rng.normal(0, 0.3, n_gen)), 0, 0.5)
    return lib, mt_target, amb


def _sample_counts(
    model: _CohortModel,
    rng: np.random.Generator,
    ctype: np.ndarray,
    flags: Mapping[str, np.ndarray],
    low_q: np.ndarray,
    lib: np.ndarray,
    mt_target: np.ndarray,
    amb: np.ndarray,
    gene_fac: np.ndarray,
) -> sp.csr_matrix:
    """Negative-binomial counts of every generated cell, in chunks of ``_CHUNK`` cells.

    Each cell's profile: its type's, times the per-gene factors of the sample (``gene_fac``:
    batch, sex-linked genes), with its states' programmes at the cell's own intensity
    (up genes from max(level, ``_FOLD_REF``) x fold ** w, down genes x fold ** w); low-quality cells get ``mt_target`` of it on mitochondrial genes; then a
    fraction ``amb`` of the library comes from the soup (the sample's library-weighted mean
    profile).
    """
    n_gen, n = ctype.size, model.profiles.shape[1]
    # ---- soup: the sample's expected mean expression profile (library-weighted)
    weights = np.bincount(ctype, weights=lib, minlength=len(model.types))
    soup = (weights[:, None] * model.profiles).sum(0) * gene_fac
    soup /= soup.sum()
    soup32 = soup.astype(np.float32)
    mt_cols = np.flatnonzero(model.is_mt)
    blocks = []
    bfac32 = gene_fac.astype(np.float32)
    prog_cols = {s: np.flatnonzero(v[0] != 1) for s, v in model.state_vecs.items()}
    for start in range(0, n_gen, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n_gen))
        ct = ctype[sl]
        p = model.profiles32[ct] * bfac32[None, :]
        for state, vec in model.state_vecs.items():
            rows = np.flatnonzero(flags[state][sl])
            if rows.size:
                cols = prog_cols[state]
                w = rng.uniform(*_INTENSITY, rows.size).astype(np.float32)
                sub = np.maximum(p[np.ix_(rows, cols)], vec[1][cols] * bfac32[cols])
                p[np.ix_(rows, cols)] = sub * vec[0][cols].astype(np.float32)[None, :] ** w[:, None]
        p /= p.sum(1, keepdims=True)
        lq = np.flatnonzero(low_q[sl])
        if lq.size:
            mt_sum = p[np.ix_(lq, mt_cols)].sum(1)
            scale_mt = mt_target[sl][lq] / np.maximum(mt_sum, 1e-12)
            scale_other = (1 - mt_target[sl][lq]) / np.maximum(1 - mt_sum, 1e-12)
            p[lq] *= scale_other[:, None]
            p[np.ix_(lq, mt_cols)] *= (scale_mt / scale_other)[:, None]
        a_ = amb[sl][:, None].astype(np.float32)
        mu = lib[sl][:, None].astype(np.float32) * ((1 - a_) * p + a_ * soup32[None, :])
        blocks.append(sp.csr_matrix(_sample_nb(mu, model.shape[ct], rng)))
        del p, mu
    return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n))


def _add_doublets(
    model: _CohortModel,
    rng: np.random.Generator,
    counts: sp.csr_matrix,
    ctype: np.ndarray,
    low_q: np.ndarray,
    n_dbl: int,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """Heterotypic doublets: ``n_dbl`` good-quality cells each get the counts of a partner
    of another type, and the partners are dropped.

    Returns (counts, is_doublet, partner type name ("" for singlets), dropped partner).
    """
    n_gen = ctype.size
    is_dbl = np.zeros(n_gen, dtype=bool)
    partner_type = np.full(n_gen, "", dtype=object)
    drop = np.zeros(n_gen, dtype=bool)
    if not n_dbl:
        return counts, is_dbl, partner_type, drop
    cand = rng.permutation(np.flatnonzero(~low_q))
    prim, part = [], []
    used = np.zeros(n_gen, dtype=bool)
    for i in cand:
        if len(prim) == n_dbl:
            break
        if used[i]:
            continue
        pool = cand[(ctype[cand] != ctype[i]) & ~used[cand]]
        pool = pool[pool != i]
        if pool.size == 0:
            continue
        j = pool[rng.integers(pool.size)]
        used[i] = used[j] = True
        prim.append(i)
        part.append(j)
    prim_a, part_a = np.array(prim, dtype=int), np.array(part, dtype=int)
    add = sp.csr_matrix(
        (np.ones(len(prim_a), dtype=np.float32), (prim_a, part_a)), shape=(n_gen, n_gen)
    )
    counts = (counts + add @ counts).tocsr()
    is_dbl[prim_a] = True
    partner_type[prim_a] = np.array(model.types)[ctype[part_a]]
    drop[part_a] = True
    return counts, is_dbl, partner_type, drop


def _sample_anndata(
    model: _CohortModel,
    row: Mapping[str, Any],
    counts: sp.csr_matrix,
    truth: pd.DataFrame,
    uns: Mapping[str, Any],
    mouse: tuple[np.ndarray, pd.Index] | None,
) -> ad.AnnData:
    """The sample as AnnData: counts in ``X`` and ``layers["counts"]``, the sheet row in
    ``obs`` (categorical), gene IDs and symbols in ``var`` (mouse names for a mouse cohort)."""
    cell_ids = truth["cell_id"].to_numpy()
    obs = pd.DataFrame(index=pd.Index(cell_ids))
    obs["barcode"] = truth["barcode"].to_numpy()
    for key, value in row.items():
        if key in ("path", "url", "n_cells") or key == "barcode":
            continue
        obs[key] = pd.Categorical([str(value)] * len(cell_ids))
    var_sym = model.gene_table["gene_symbol"].to_numpy()
    adata = ad.AnnData(
        X=counts,
        obs=obs,
        var=pd.DataFrame(
            {"gene_ids": model.gene_table["gene_id"].to_numpy(), "gene_symbols": var_sym},
            index=pd.Index(var_sym),
        ),
    )
    adata.layers["counts"] = counts.copy()
    adata.uns["simulation"] = dict(uns)
    if mouse is not None:
        keep_g, mouse_names = mouse
        adata = adata[:, keep_g].copy()
        adata.var = pd.DataFrame(
            {"gene_ids": "", "gene_symbols": np.asarray(mouse_names)}, index=mouse_names
        )
    return adata


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


#: which planted state each scored signature reads (signature name -> truth flag)
SIGNATURE_STATES = {
    "ms1_monocyte": "ms1_like",
    "mono_hladr_low": "hla_low",
    "dc_tolerogenic": "hla_low",
    "t_exhaustion": "exhausted",
    "cytokine_storm": "cytokine_high",
    "trem2_high_macrophage": "trem2_high",
}


def planted_programmes() -> pd.DataFrame:
    """Every gene a planted state moves: ``state``, ``gene``, ``fold`` (the fold at a cell's
    mean intensity), ``direction``. ``trem2_high`` is a cell type: its programme is what
    separates it from the other macrophages (the lipid-associated genes up, resident genes
    down)."""
    rows = [
        {"state": st, "gene": g, "fold": f, "direction": "up" if f > 1 else "down"}
        for st, prog in _STATE_PROGRAMMES.items()
        for g, f in prog.items()
    ]
    for g, f in _TYPE_FOLDS["Macrophage"].items():
        rows.append(
            {
                "state": "trem2_high",
                "gene": g,
                "fold": 1 / f,
                "direction": "up" if f < 1 else "down",
            }
        )
    return pd.DataFrame(rows)


def planted_vs_scored(
    signatures: Sequence[Mapping[str, Any]], *, organism: str = "human"
) -> pd.DataFrame:
    """Overlap between the genes each planted state moves and the genes its signature scores.

    Parameters
    ----------
    signatures
        The scorer's signature sets (:func:`sepsis_sc.score.load_signatures`: ``name``,
        ``up``, ``down``). The simulator never reads them itself; a caller passes them in.
    organism
        ``"mouse"`` compares the mouse names the simulator writes (approximate orthologs).

    Returns
    -------
    pandas.DataFrame
        One row per signature of :data:`SIGNATURE_STATES`: ``signature``, ``state``,
        ``n_programme`` (genes the state moves), ``n_signature`` (genes the signature
        scores), ``n_shared`` (scored genes planted in the scored direction),
        ``signature_planted`` (``n_shared / n_signature``), ``programme_scored``
        (``n_shared / n_programme``), ``opposite`` (scored genes planted the other way),
        ``scored_not_planted`` (scored genes the state leaves alone).
    """
    prog = planted_programmes()
    if organism == "mouse":
        prog["gene"] = _mouse_symbols(list(prog["gene"]))
        prog = prog.dropna(subset=["gene"])
    rows = []
    for sig in signatures:
        state = SIGNATURE_STATES.get(str(sig["name"]))
        if state is None:
            continue
        mine = prog[prog["state"] == state].set_index("gene")["direction"]
        scored = {g: "up" for g in sig.get("up") or []} | {g: "down" for g in sig.get("down") or []}
        shared = [g for g, d in scored.items() if mine.get(g) == d]
        opposite = [g for g, d in scored.items() if g in mine.index and mine[g] != d]
        absent = [g for g in scored if g not in mine.index]
        rows.append(
            {
                "signature": sig["name"],
                "state": state,
                "n_programme": len(mine),
                "n_signature": len(scored),
                "n_shared": len(shared),
                "signature_planted": round(len(shared) / max(len(scored), 1), 3),
                "programme_scored": round(len(shared) / max(len(mine), 1), 3),
                "opposite": " ".join(opposite),
                "scored_not_planted": " ".join(absent),
            }
        )
    return pd.DataFrame(rows)


#: The sample-level effects the simulator plants in sepsis (``effects=True``), each with the
#: pre-specified table row that must detect it: (source table, level/state, label, expected
#: direction). A state is read from its **primary** row (the metric fixed in
#: ``resources/therapy_targets.yaml``, ``role == "primary"`` in the effects table), the same
#: row :func:`sepsis_sc.stats.therapy_targets` reads, so the demo check and the therapy
#: table cannot disagree on what a state's readout is, and the check cannot pick the
#: luckiest metric.
PLANTED_EFFECTS: tuple[dict[str, str], ...] = (
    {
        "effect": "fewer T cells",
        "table": "composition",
        "level": "lineage",
        "label": "T",
        "direction": "down",
    },
    {
        "effect": "fewer NK cells",
        "table": "composition",
        "level": "lineage",
        "label": "NK",
        "direction": "down",
    },
    {
        "effect": "fewer B cells",
        "table": "composition",
        "level": "lineage",
        "label": "B",
        "direction": "down",
    },
    {
        "effect": "fewer DCs",
        "table": "composition",
        "level": "lineage",
        "label": "DC",
        "direction": "down",
    },
    {
        "effect": "more plasmablasts",
        "table": "composition",
        "level": "cell_type",
        "label": "Plasmablast",
        "direction": "up",
    },
    {
        "effect": "more mature neutrophils",
        "table": "composition",
        "level": "cell_type",
        "label": "Mature neutrophil",
        "direction": "up",
    },
    {
        "effect": "more platelets",
        "table": "composition",
        "level": "lineage",
        "label": "Platelet",
        "direction": "up",
    },
    {
        "effect": "classical monocyte expansion",
        "table": "composition",
        "level": "cell_type",
        "label": "Classical monocyte",
        "direction": "up",
    },
    {
        "effect": "more immature neutrophils",
        "table": "composition",
        "level": "cell_type",
        "label": "Immature neutrophil",
        "direction": "up",
    },
    {
        "effect": "more TREM2-high macrophages",
        "table": "effects",
        "level": "trem2_high_macrophage",
        "label": "primary",
        "direction": "up",
    },
    {
        "effect": "MS1-like monocyte state",
        "table": "effects",
        "level": "ms1_monocyte",
        "label": "primary",
        "direction": "up",
    },
    {
        "effect": "HLA class II loss in monocytes",
        "table": "effects",
        "level": "mono_hladr_low",
        "label": "primary",
        "direction": "up",
    },
    {
        "effect": "HLA class II loss in DCs",
        "table": "effects",
        "level": "dc_tolerogenic.cdc2",
        "label": "primary",
        "direction": "up",
    },
    {
        "effect": "T-cell exhaustion programme",
        "table": "effects",
        "level": "t_exhaustion",
        "label": "primary",
        "direction": "up",
    },
    {
        "effect": "monocyte cytokine programme",
        "table": "effects",
        "level": "cytokine_storm.monocyte",
        "label": "primary",
        "direction": "up",
    },
)


#: truth flag and parent cell types behind each state row of :data:`PLANTED_EFFECTS`: the
#: population the pipeline scores the state in (``parent`` in resources/signatures), so the
#: oracle answers the same question (exhaustion within CD8 effector/memory T, the
#: tolerogenic-DC shift within cDC2, the cytokine programme within monocytes)
_ORACLE_STATES = {
    "trem2_high_macrophage": ("trem2_high", ("Macrophage", "TREM2-high macrophage")),
    "ms1_monocyte": ("ms1_like", ("Classical monocyte",)),
    "mono_hladr_low": ("hla_low", ("Classical monocyte", "Non-classical monocyte")),
    "dc_tolerogenic.cdc2": ("hla_low", ("cDC2",)),
    "t_exhaustion": ("exhausted", ("CD8 effector/memory T",)),
    "cytokine_storm.monocyte": ("cytokine_high", ("Classical monocyte", "Non-classical monocyte")),
}


def oracle_tests(
    truth: pd.DataFrame, *, case: str = "sepsis", control: str = "control", min_cells: int = 1
) -> pd.DataFrame:
    """The planted effects tested on the simulator's truth: the design's own power.

    Uses the true cell types and state flags of the intact single cells (no QC, annotation or
    scoring error). Composition rows run the pipeline's own test
    (:func:`sepsis_sc.stats.composition_test`, propeller style) on the true labels; state
    rows compare the per-sample logit fraction of flagged cells within the true parent
    population (0.5-cell pseudo-counts) with a plain Welch t-test (no moderation). BH over
    the planted effects. An effect the oracle misses is beyond the design (too few samples or
    cells); one the oracle finds and the pipeline misses points at the pipeline.

    Parameters
    ----------
    truth
        The truth table the simulator writes (``truth.tsv.gz``).
    case, control
        Condition labels.
    min_cells
        A sample whose true parent population has fewer cells gives no value for that state
        (the pipeline's pre-specified ``stats.min_cells`` rule, so the oracle's power is the
        design's under the same analysis rule; default 1: every sample with a parent cell).

    Returns
    -------
    pandas.DataFrame
        One row per entry of :data:`PLANTED_EFFECTS`: ``oracle_effect`` (case minus control
        mean of the sample values), ``oracle_pvalue`` and ``oracle_fdr``.
    """
    from sepsis_sc.stats import bh_fdr, composition_test, welch_test

    cells = truth[~truth["is_doublet"].astype(bool) & ~truth["is_low_quality"].astype(bool)]
    cells = cells.reset_index(drop=True)
    cond = cells.groupby("sample_id", observed=True)["condition"].first().astype(str)
    n_all = cells.groupby("sample_id", observed=True).size()
    obs = cells[["sample_id", "condition", "donor", "lineage", "cell_type"]].astype(str)
    obs.index = obs.index.astype(str)
    labelled = ad.AnnData(obs=obs)
    comp = {
        level: composition_test(labelled, case=case, control=control, level=level).set_index(
            "label"
        )
        for level in ("lineage", "cell_type")
    }
    rows = []
    for spec in PLANTED_EFFECTS:
        if spec["table"] == "composition":
            tab = comp[spec["level"]]
            hit = tab.loc[spec["label"]] if spec["label"] in tab.index else None
            rows.append(
                {
                    "oracle_effect": float(hit["effect"]) if hit is not None else np.nan,
                    "oracle_pvalue": float(hit["pvalue"]) if hit is not None else np.nan,
                }
            )
            continue
        flag, parents = _ORACLE_STATES[spec["level"]]
        sub = cells[cells["cell_type"].isin(parents)]
        n = sub.groupby("sample_id", observed=True).size().reindex(n_all.index, fill_value=0)
        k = sub.groupby("sample_id", observed=True)[flag].sum().reindex(n_all.index, fill_value=0)
        value = np.log((k + 0.5) / (n - k + 0.5)).where(n >= max(int(min_cells), 1))
        a = value[cond == case].dropna().to_numpy(float)
        b = value[cond == control].dropna().to_numpy(float)
        pval = (
            welch_test(a, b)[3] if len(a) >= 2 and len(b) >= 2 else np.nan
        )  # unmoderated reference
        effect = float(a.mean() - b.mean()) if len(a) and len(b) else np.nan
        rows.append({"oracle_effect": effect, "oracle_pvalue": pval})
    out = pd.DataFrame(rows)
    out["oracle_fdr"] = bh_fdr(out["oracle_pvalue"].to_numpy())
    return out


def _primary_row(
    effects: pd.DataFrame, state: str, targets: Mapping[str, Any]
) -> tuple[pd.DataFrame, str]:
    """A state's pre-specified primary row of ``effects`` and its metric, chosen as
    :func:`sepsis_sc.stats.therapy_targets` chooses it (``targets``: the therapy-target
    entries)."""
    from sepsis_sc.score import base_state
    from sepsis_sc.stats import primary_rows

    entry = targets.get(state) or targets.get(base_state(state)) or {}
    hit = primary_rows(effects[effects["state"] == state], entry)
    metric = str(hit["metric"].iloc[0]) if len(hit) else "primary metric"
    return hit.head(1), metric


def _oracle(truth: pd.DataFrame | None, oracle_args: Mapping[str, Any]) -> pd.DataFrame | None:
    """:func:`oracle_tests` of ``truth`` with ``oracle_args`` (``case``, ``control``,
    ``min_cells``); None without a truth table. Other keywords are refused, as a signature
    would."""
    unknown = sorted(set(oracle_args) - {"case", "control", "min_cells"})
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    return None if truth is None else oracle_tests(truth, **oracle_args)


def check_planted_effects(
    effects: pd.DataFrame,
    composition: pd.DataFrame,
    *,
    alpha: float = 0.05,
    truth: pd.DataFrame | None = None,
    **oracle_args: Any,
) -> pd.DataFrame:
    """Score a run's sample-level results against the effects the simulator planted.

    Parameters
    ----------
    effects
        ``targets/condition_effects.tsv`` (:func:`sepsis_sc.stats.condition_effects`).
    composition
        ``targets/composition.tsv`` (:func:`sepsis_sc.stats.composition_test`).
    alpha
        FDR level.
    truth, case, control, min_cells
        Optional truth table of the simulated cohort: adds the :func:`oracle_tests` columns
        (``oracle_fdr``, ``oracle_detected``), the same effects tested on the true labels, so
        a miss can be told apart as the design's (oracle misses too) or the pipeline's.
        ``case``, ``control`` (the condition labels) and ``min_cells`` (the run's
        ``stats.min_cells``) go to :func:`oracle_tests`.

    Returns
    -------
    pandas.DataFrame
        One row per entry of :data:`PLANTED_EFFECTS`: the pre-specified row's ``effect_size``,
        ``fdr``, observed ``observed_direction`` and ``detected`` (FDR <= alpha in the planted
        direction). A row missing from the results (e.g. too few cells) is not detected.
    """
    from sepsis_sc.stats import load_targets

    targets = load_targets(None)  # read once: each state's primary metric
    rows = []
    for spec in PLANTED_EFFECTS:
        if spec["table"] == "composition":
            hit = composition[
                (composition["level"] == spec["level"]) & (composition["label"] == spec["label"])
            ]
            where = f"composition {spec['level']} {spec['label']}"
        else:
            hit, metric = _primary_row(effects, spec["level"], targets)
            where = f"state {spec['level']} ({metric}, primary)"
        effect = float(hit["effect"].iloc[0]) if len(hit) else np.nan
        fdr = float(hit["fdr"].iloc[0]) if len(hit) else np.nan
        observed = "up" if effect > 0 else "down" if effect < 0 else "none"
        rows.append(
            {
                "planted_effect": spec["effect"],
                "tested_as": where,
                "expected_direction": spec["direction"],
                "effect_size": effect,
                "fdr": fdr,
                "observed_direction": observed if np.isfinite(effect) else "not tested",
                "detected": bool(
                    np.isfinite(fdr) and fdr <= alpha and observed == spec["direction"]
                ),
            }
        )
    out = pd.DataFrame(rows)
    oracle = _oracle(truth, oracle_args)
    if oracle is not None:
        sign = np.where([spec["direction"] == "up" for spec in PLANTED_EFFECTS], 1.0, -1.0)
        out["oracle_fdr"] = oracle["oracle_fdr"].to_numpy()
        out["oracle_detected"] = (oracle["oracle_fdr"].to_numpy() <= alpha) & (
            np.sign(oracle["oracle_effect"].to_numpy()) == sign
        )
    return out


def null_calibration(
    effects: pd.DataFrame,
    composition: pd.DataFrame,
    *,
    alpha: float = 0.05,
    truth: pd.DataFrame | None = None,
    **oracle_args: Any,
) -> dict[str, float]:
    """False-positive summary for a cohort simulated with ``effects=False``.

    Returns the number of sample-level tests, how many have p < ``alpha`` and FDR <=
    ``alpha``, and the fraction with p < ``alpha`` (expected about ``alpha``). With the truth
    table, also how many of the :func:`oracle_tests` (the planted-effect tests on the true
    labels) have p < ``alpha``: donors differ at random, so a null draw can hold a real chance
    difference between the groups, which the pipeline then reports faithfully. Parameters
    as in :func:`check_planted_effects`.
    """
    p = pd.concat([effects["pvalue"], composition["pvalue"]]).dropna().to_numpy(dtype=float)
    fdr = pd.concat([effects["fdr"], composition["fdr"]]).dropna().to_numpy(dtype=float)
    out: dict[str, Any] = {
        "n_tests": int(p.size),
        "n_p_below_alpha": int((p < alpha).sum()),
        "fraction_p_below_alpha": float((p < alpha).mean()) if p.size else float("nan"),
        "n_fdr_below_alpha": int((fdr <= alpha).sum()),
    }
    oracle = _oracle(truth, oracle_args)
    if oracle is not None:
        below = [
            spec["effect"]
            for spec, pv in zip(PLANTED_EFFECTS, oracle["oracle_pvalue"])
            if np.isfinite(pv) and pv < alpha
        ]
        out["n_oracle_tests"] = len(oracle)
        out["oracle_p_below_alpha"] = "; ".join(below) or "none"
    return out
