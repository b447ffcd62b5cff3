"""The simulator's constants: cell types, their profiles, planted states and covariates.

What :mod:`sepsis_sc.sim.cohort` draws a cohort from (the generative model is described
there): the fitted constants of soupx_pbmc4k (MT levels, dispersion trend, library sizes),
the cell types (:data:`TYPE_META`, control fractions :data:`BASE_FRACTIONS`, sepsis shifts
:data:`LINEAGE_EFFECT` / :data:`TYPE_EFFECT`), their literature fold changes and identity
levels on the fitted data columns (:data:`TYPE_FOLDS`, :data:`TYPE_LEVELS`), the state
programmes and rates (:data:`STATE_PROGRAMMES`, :data:`STATE_RATES`), donor and sample noise,
sex-linked genes and age slopes, the mouse names; and the functions that turn them into the
simulated genes (:func:`select_genes`) and per-type mean profiles (:func:`build_profiles`).
Nothing here reads a marker or signature file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from sepsis_sc.resources import resource_path

__all__ = ["STATES", "UNNAMED_STATES", "cell_type_table"]

#: planted per-cell state flags in the truth table
STATES = ("ms1_like", "hla_low", "exhausted", "cytokine_high", "trem2_high", "zinc_stress")
#: planted states that no signature of resources/signatures scores: the neighbourhood DA
#: must find them as unexplained changes (sepsis_sc.da)
UNNAMED_STATES = ("zinc_stress",)


# ----------------------------------------------------------------------------------------
# fitted constants (soupx_pbmc4k, 2,170 cells; see sepsis_sc.sim.cohort)
# ----------------------------------------------------------------------------------------
_BASE_LOGCP10K = (-2.914, 2.120)  # other genes: log mean CP10k ~ N(mu, sd)
_RIBO_LOGCP10K = (2.263, 2.925)
_RIBO_FRACTION = 0.36  # median ribosomal fraction of UMIs in lymphocytes
_MT_FRACTION = 0.028  # median mitochondrial fraction
#: relative MT gene levels (mean CP10k in soupx_pbmc4k)
MT_LEVELS = {
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
DISP_TREND = (-1.9, -0.35)  # log phi = a + b log(mean count); see sepsis_sc.sim.cohort
DISP_SCATTER = 0.3

# lineage, (log library mean, sd), ribosomal scale
TYPE_META: dict[str, tuple[str, tuple[float, float], float]] = {
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
BASE_FRACTIONS = {
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
LINEAGE_EFFECT = {"T": 0.5, "NK": 0.4, "B": 0.4, "DC": 0.45, "Plasma": 2.5, "Platelet": 3.0}
TYPE_EFFECT = {
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
TYPE_FOLDS: dict[str, dict[str, float]] = {
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
TYPE_LEVELS: dict[str, dict[str, float]] = {
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
_PLATELET_CARRYOVER = "platelet genes of TYPE_LEVELS capped at the T-cell level"
#: lipid-associated genes that make the TREM2-high macrophage differ from the other
#: macrophage: its planted "programme" (the data profile, against the divided-out one)
_TREM2_PROGRAMME = [g for g, f in TYPE_FOLDS["Macrophage"].items() if f < 1]
#: fraction of ribosomal UMIs relative to the source population (low-RNA granulocytes and
#: anucleate platelets carry fewer ribosomal transcripts; Xie 2020)
_RIBO_RELATIVE = {"Mature neutrophil": 0.5, "Immature neutrophil": 0.5, "Platelet": 0.5}

# ----------------------------------------------------------------------------------------
# covariates: sex-linked genes and age
# ----------------------------------------------------------------------------------------
#: Y-linked genes silent in female donors; XIST silent in male donors
Y_GENES = ("RPS4Y1", "DDX3Y", "UTY", "KDM5D", "EIF1AY", "USP9Y", "ZFY", "NLGN4Y")
X_FEMALE = ("XIST", "TSIX")
#: log change of a type's fraction per year of age above 50 (naive T cells fall with age,
#: CD8 faster than CD4; effector/memory rise: Goronzy & Weyand 2019 Nat Immunol; Saule 2006)
AGE_SLOPE = {"CD4 naive T": -0.015, "CD8 naive T": -0.03, "CD8 effector/memory T": 0.01}
AGE_REF = 50.0

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
    # zinc / metallothionein and oxidative-stress programme of lymphocytes: metallothionein
    # and zinc-transporter genes rise in septic shock blood (Wong 2007 Physiol Genomics
    # [M]; Cvijanovich 2016 [M]); NRF2 targets, heat-shock and ER / integrated stress
    # response genes of a stressed cell [M].
    # No signature of the scorer reads these genes: the planted change no name covers. All
    # are among the demo's 12,000 genes anyway, so adding the state changes its gene list not
    "zinc_stress": _folds(
        "MT2A:6 MT1X:6 MT1E:6 MT1F:6 MT1G:6 SLC30A1:5 HMOX1:4 TXNRD1:4 GCLM:4 NQO1:4 SQSTM1:3"
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
    "zinc_stress": (
        "SLC39A10 HSPA1A HSPA1B DNAJB1 HSPH1 BAG3 ZFAND2A OSGIN1 SLC7A11 "
        "G6PD PIR ME1 AKR1C1 ABCC1 TRIB3 SESN2 FTH1 FTL MAFF HSPA6 "
        "HSPA5 HSP90B1 PDIA4 PDIA6 CALR HYOU1 DNAJB9 SEL1L HERPUD1 ATF4 DDIT3 ASNS SLC3A2 "
        "SLC7A5 PSAT1 MTHFD2 GADD45A GADD45B CDKN1A TXN PRDX1 GCLC GSR HSP90AA1 HSPD1 HSPE1 "
        "DNAJA1 CHORDC1 STIP1",
        "",
    ),
}
#: every cell's intensity of its states' programmes is fold ** w, w ~ U(*INTENSITY)
INTENSITY = (0.4, 1.6)


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


STATE_PROGRAMMES = _state_programmes()
# state -> (types it applies to, control fraction, sepsis fraction)
STATE_RATES = {
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
    # in CD4 memory T cells, whose share falls in sepsis: the stressed ones expand within a
    # shrinking population, so neither the composition test nor any state explains them
    "zinc_stress": (("CD4 memory T",), 0.04, 0.50),
}
#: per-type sepsis rate where it differs from the state's default (state -> type -> rate).
#: Circulating DCs of septic patients lose HLA-DR in most patients (Poehlmann 2009 Crit Care,
#: mDC and pDC HLA-DR loss; Hotchkiss 2013 Nat Rev Immunol): 60 % of septic DCs vs 35 % of
#: monocytes. With ~15 DCs per septic sample a 10 % -> 35 % shift has oracle power < 0.8.
STATE_CASE_RATE_BY_TYPE = {"hla_low": {"cDC1": 0.6, "cDC2": 0.6, "pDC": 0.6}}
#: odds multipliers of a state by type (both conditions): exhaustion follows
#: differentiation, most frequent in effector/memory CD8 T, rare in naive T (Wherry 2015
#: Nat Rev Immunol; Boomer 2011 JAMA saw PD-1 mostly on memory/effector cells)
STATE_TYPE_ODDS = {
    "exhausted": {
        "CD8 effector/memory T": 3.0,
        "CD4 memory T": 1.5,
        "Treg": 1.5,
        "CD4 naive T": 0.5,
        "CD8 naive T": 0.5,
    },
}
DONOR_SD_FRACTION = 0.3
DONOR_SD_STATE = 0.35
SAMPLE_SD = 0.1

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
    for ct, (lin, (mu, sd), ribo) in TYPE_META.items():
        rows.append(
            {
                "cell_type": ct,
                "lineage": lin,
                "control_fraction": BASE_FRACTIONS[ct],
                "log_library_mean": mu,
                "log_library_sd": sd,
                "ribo_scale": ribo,
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------
# genes and profiles
# ----------------------------------------------------------------------------------------
def programme_genes() -> list[str]:
    """Every gene the simulator moves: type folds, state programmes, sex-linked genes, MT."""
    genes: list[str] = []
    for d in (*TYPE_FOLDS.values(), *TYPE_LEVELS.values()):
        genes.extend(d)
    for prog in STATE_PROGRAMMES.values():
        genes.extend(prog)
    genes.extend(Y_GENES + X_FEMALE)
    genes.extend(MT_LEVELS)
    genes.extend(["ISG15", "IFI6", "MX1", "IFIT1", "IFIT3", "IFI44L", "PTPRC", "ACTB", "B2M"])
    return list(dict.fromkeys(genes))


def _profile_table() -> pd.DataFrame:
    """The fitted per-population mean CP10k and dispersion residual of every gene
    (``resources/simulator/profiles.tsv.gz``; see its README)."""
    return pd.read_csv(resource_path("simulator", "profiles.tsv.gz"), sep="\t", index_col=0)


def select_genes(n_genes: int) -> pd.DataFrame:
    """The ``n_genes`` simulated genes (rows of ``resources/genes/human_genes.tsv.gz``, in
    its order): every gene the simulator moves, MT, ribosomal and haemoglobin genes, then the
    rest by their highest mean CP10k in the fitted profiles."""
    table = pd.read_csv(resource_path("genes", "human_genes.tsv.gz"), sep="\t", dtype=str)
    table["gene_id"] = table["gene_id"].fillna("")
    sym = table["gene_symbol"]
    wanted = set(programme_genes())
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


def build_profiles(
    genes: pd.Series, rng: np.random.Generator
) -> tuple[np.ndarray, list[str], dict[str, np.ndarray], np.ndarray]:
    """Return (type x gene mean proportions, type names, state fold vectors, per-gene
    dispersion residual).

    Each type: its fitted data column (mean CP10k of a real population), times the type's
    literature folds (:data:`TYPE_FOLDS`; up genes from max(level, ``_FOLD_REF``)), times a
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
    types = list(TYPE_META)
    profiles = np.empty((len(types), n), dtype=np.float64)
    floor = 1e-3  # CP10k: genes never seen in the data keep a trace
    plt_idx = [pos[g] for g in TYPE_LEVELS["Platelet"] if g in pos]
    t_level = np.maximum(table["T_CD4"].fillna(0).to_numpy(float), floor)
    for k, ct in enumerate(types):
        p = np.maximum(table[_PROFILE_SOURCE[ct]].fillna(0).to_numpy(float), floor)
        for g, fold in TYPE_FOLDS[ct].items():
            i = pos[g]
            p[i] = max(p[i], _FOLD_REF) * fold if fold > 1 else p[i] * fold
        for g, level in TYPE_LEVELS.get(ct, {}).items():
            if g in pos:
                p[pos[g]] = max(p[pos[g]], level)
        if ct != "Platelet":  # see _PLATELET_CARRYOVER
            for i in plt_idx:
                p[i] = min(p[i], t_level[i])
        p = p * np.where(rng.random(n) < 0.02, np.exp(rng.normal(0, 0.3, n)), 1.0)
        p[is_ribo] *= _RIBO_RELATIVE.get(ct, 1.0)
        other = ~is_mt
        p[other] *= (1 - _MT_FRACTION) / p[other].sum()
        mt = np.array([MT_LEVELS[g] for g in sym[is_mt]])
        p[is_mt] = _MT_FRACTION * mt / mt.sum()
        profiles[k] = p
    states = {}
    for state, prog in STATE_PROGRAMMES.items():
        fold = np.ones(n)
        ref = np.zeros(n)
        for g, f in prog.items():
            fold[pos[g]] = f
            ref[pos[g]] = _FOLD_REF / 1e4 if f > 1 else 0.0
        states[state] = np.vstack([fold, ref])
    resid = np.clip(table["disp_resid"].fillna(0).to_numpy(float), -0.5, 0.5)
    resid[plt_idx] = 0.0
    return profiles, types, states, resid


def mouse_symbols(symbols: Sequence[str]) -> list[str | None]:
    """Approximate mouse names of human symbols (:data:`_MOUSE_NAMES`, ``mt-`` genes, title
    case otherwise); None where there is no mouse name (most ``HLA-`` genes)."""
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
