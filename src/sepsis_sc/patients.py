"""Patient-level immune profiles: "which of my patients has which deficit", per sample and over time.

Cohort statistics (:mod:`sepsis_sc.stats`) ask whether sepsis differs from control on
average. Immunomodulatory trials instead select *patients* by immune state (GM-CSF /
IFN-gamma for low monocyte HLA-DR, anakinra for hyperinflammation, IL-7 / anti-PD-(L)1 for
lymphopenia or exhaustion). This module profiles every sample against a reference range
built from the control samples:

* :func:`sample_readouts`: one value per sample x readout (:data:`READOUTS`): lymphocyte
  shares, a monocyte mHLA-DR analogue (classical-monocyte pseudobulk log2 CPM of HLA-DR
  genes), MS1 / HLA-DR-low monocytes, immature neutrophils, exhausted CD8 T cells, Treg and
  DC shares, DC HLA class II, cytokine and IFN programmes, TREM2-high macrophages.
* :func:`reference_ranges` / :func:`score_samples`: robust centre (median) and spread
  (max of 1.4826 x MAD and SD) over **one value per control donor**; z-score, empirical
  percentile and flag (below / within / above when ``|z|`` exceeds a prediction-interval
  threshold that is ``z_threshold`` for many controls and wider for few, see
  :func:`flag_multiplier`) per sample; control samples are scored **leave-one-out** (their
  donor left out of their own reference).
* :func:`call_states`: immune-state calls from the rules in
  ``resources/patient_states.yaml`` (each with threshold, source and therapy *hypotheses*).
* :func:`endotype_scores`: published bulk-blood endotype scores (SRS, MARS, Sweeney) on
  whole-sample pseudobulk, with caveats; no endotype is called (see ``endotypes.yaml``).
* :func:`trajectories`: donors sampled more than once (e.g. T0 / T6).
* :func:`profile`: all of the above in one call (notebook entry point).

Flow cut-offs used by trials (mHLA-DR < 8,000 antibodies/cell, ALC <= 900/uL, ferritin
> 4,420 ng/mL) are protein or clinical measures: nothing here transfers them to mRNA. Calls
rank patients relative to this run's controls, for research; they are never treatment advice.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import stats as sstats

from sepsis_sc import store
from sepsis_sc.data import get_counts, pseudobulk
from sepsis_sc.design import ConfigSettings, sample_meta
from sepsis_sc.resources import load_yaml, resource_path

logger = logging.getLogger(__name__)

__all__ = [
    "READOUTS",
    "Readout",
    "PatientProfiles",
    "PatientSettings",
    "InsufficientReferenceError",
    "profile",
    "sample_meta",
    "sample_readouts",
    "pseudobulk_log2cpm",
    "reference_ranges",
    "flag_multiplier",
    "score_samples",
    "read_reference",
    "load_state_rules",
    "call_states",
    "load_endotypes",
    "endotype_scores",
    "trajectories",
]

FLAGS = ("below", "within", "above")
NOT_ASSESSED = "not assessed"
_MAD_TO_SD = 1.4826


class InsufficientReferenceError(ValueError):
    """Too few control donors to build a reference range (no flags are made)."""


# --------------------------------------------------------------------------------------
# readouts
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Readout:
    """One per-sample readout.

    Attributes
    ----------
    name, label, group
        Id, plain-language label and display group (cards and heatmap order).
    kind
        ``"share"``: cells matching ``cells`` / cells matching ``of`` (None = all cells);
        ``"pseudobulk"``: log2(CPM + 1) of the summed counts of ``genes`` (the set's total,
        dominated by its most expressed genes, as flow mHLA-DR is by HLA-DRA; robust to a
        gene absent from some haplotypes such as HLA-DRB5) in the summed raw counts of the
        ``cells`` population; ``"state"``: ``metric`` of ``state`` from the per-sample
        table of :func:`sepsis_sc.stats.sample_table`.
    source
        What the readout stands for and its evidence tags ([V] / [V2] / [M]).
    """

    name: str
    label: str
    group: str
    kind: str
    source: str
    cells: Mapping[str, Sequence[str]] | None = None
    of: Mapping[str, Sequence[str]] | None = None
    genes: tuple[str, ...] = ()
    state: str | None = None
    metric: str | None = None


_CD4 = ("CD4 naive T", "CD4 memory T", "Treg")
_CD8 = ("CD8 naive T", "CD8 effector/memory T")
_CLASSICAL = {"cell_type": ("Classical monocyte",)}

#: The readouts, in display order.
READOUTS: tuple[Readout, ...] = (
    Readout(
        "lymphocyte_share",
        "lymphocytes (T+NK+B) / all cells",
        "lymphocytes",
        "share",
        "relative analogue of the absolute lymphocyte count used by IL-7 / anti-PD-L1 trials "
        "(IRIS-7 [V], Hotchkiss 2019 [V]); relative, preparation-dependent [M]",
        cells={"lineage": ("T", "NK", "B")},
    ),
    Readout(
        "t_share",
        "T cells / all cells",
        "lymphocytes",
        "share",
        "T-cell loss in sepsis (Hotchkiss 2013 [M]; Boomer 2011 [V])",
        cells={"lineage": ("T",)},
    ),
    Readout(
        "cd4_share",
        "CD4 T / all cells",
        "lymphocytes",
        "share",
        "IRIS-7 CD4 counts [V]",
        cells={"cell_type": _CD4},
    ),
    Readout(
        "cd8_share",
        "CD8 T / all cells",
        "lymphocytes",
        "share",
        "IRIS-7 CD8 counts [V]",
        cells={"cell_type": _CD8},
    ),
    Readout(
        "nk_share",
        "NK cells / all cells",
        "lymphocytes",
        "share",
        "NK loss in sepsis [M]",
        cells={"lineage": ("NK",)},
    ),
    Readout(
        "b_share",
        "B cells / all cells",
        "lymphocytes",
        "share",
        "B-cell loss in sepsis [M]",
        cells={"lineage": ("B",)},
    ),
    Readout(
        "treg_share",
        "Treg / CD4 T cells",
        "lymphocytes",
        "share",
        "Treg share of CD4 T cells (flow convention); MSC Treg induction (Gonzalez-Rey 2009 [V]); "
        "human blood Treg results conflict [M]",
        cells={"cell_type": ("Treg",)},
        of={"cell_type": _CD4},
    ),
    Readout(
        "exhausted_cd8_fraction",
        "exhausted CD8 effector/memory T fraction",
        "lymphocytes",
        "state",
        "t_exhaustion calls within CD8 effector/memory T cells (Boomer 2011/2012 [V])",
        state="t_exhaustion",
        metric="fraction",
    ),
    Readout(
        "mono_hladr_expr",
        "mHLA-DR analogue (log2 CPM)",
        "monocytes",
        "pseudobulk",
        "classical-monocyte pseudobulk HLA-DR mRNA; analogue of flow mHLA-DR (Monneret 2006 [V]); "
        "flow cut-offs do not transfer to mRNA [V: biology-patients.md section 4]",
        cells=_CLASSICAL,
        genes=("HLA-DRA", "HLA-DRB1", "HLA-DRB5"),
    ),
    Readout(
        "hladr_low_fraction",
        "HLA-DR-low monocyte fraction",
        "monocytes",
        "state",
        "mono_hladr_low calls in monocytes (Yao 2023 [V])",
        state="mono_hladr_low",
        metric="fraction",
    ),
    Readout(
        "ms1_score",
        "MS1 score (monocytes)",
        "monocytes",
        "state",
        "MS1 programme, mean per-cell score (Reyes 2020 [V]; 20-gene list [V2]); MS1 is not a "
        "discrete call in this pipeline, so a score, not a fraction",
        state="ms1_monocyte",
        metric="mean_score",
    ),
    Readout(
        "cytokine_score",
        "cytokine programme (monocytes)",
        "monocytes",
        "state",
        "cytokine_storm mean score in monocytes (hyperinflammation analogue; MALS itself is "
        "ferritin-defined, PROVIDE 2022 [V])",
        state="cytokine_storm.monocyte",
        metric="mean_score",
    ),
    Readout(
        "mono_nfkb_expr",
        "monocyte NF-kB cytokines (log2 CPM)",
        "monocytes",
        "pseudobulk",
        "TSG-6 / NF-kB dampening readout of MSCs (Choi 2011 [V] mechanism; genes [M])",
        cells=_CLASSICAL,
        genes=("TNF", "IL1B", "CXCL8", "CCL3", "CCL4", "NFKBIA", "NFKBIZ"),
    ),
    Readout(
        "mono_il10_expr",
        "monocyte IL-10 / PGE2 programme (log2 CPM)",
        "monocytes",
        "pseudobulk",
        "MSC PGE2 -> EP2/EP4 -> IL-10 reprogramming readout (Nemeth 2009 [V] mechanism; genes [M])",
        cells=_CLASSICAL,
        genes=("IL10", "PTGER2", "PTGER4", "NR4A1", "NR4A2", "CREM", "CD163"),
    ),
    Readout(
        "dc_share",
        "DCs / all cells",
        "dendritic cells",
        "share",
        "DC loss predicts death (Poehlmann 2009 [V])",
        cells={"lineage": ("DC",)},
    ),
    Readout(
        "dc_hla_class2_expr",
        "DC HLA class II (log2 CPM)",
        "dendritic cells",
        "pseudobulk",
        "DC pseudobulk HLA class II mRNA (proxy genes of biology-patients.md section 4 [M])",
        cells={"lineage": ("DC",)},
        genes=("HLA-DRA", "HLA-DRB1", "HLA-DPA1", "HLA-DPB1", "HLA-DQA1", "HLA-DQB1", "CD74"),
    ),
    Readout(
        "dc_tolerogenic_score",
        "tolerogenic cDC2 score",
        "dendritic cells",
        "state",
        "dc_tolerogenic mean score in cDC2, the commoner blood cDC [M]",
        state="dc_tolerogenic.cdc2",
        metric="mean_score",
    ),
    Readout(
        "immature_neutrophil_score",
        "immature neutrophil score",
        "neutrophils",
        "state",
        "neutrophil_immature mean score (Kwok 2023 [V])",
        state="neutrophil_immature",
        metric="mean_score",
    ),
    Readout(
        "immature_neutrophil_share",
        "immature neutrophils / all cells",
        "neutrophils",
        "share",
        "emergency granulopoiesis (Kwok 2023 [V]); PBMC holds only low-density neutrophils",
        cells={"cell_type": ("Immature neutrophil",)},
    ),
    Readout(
        "neutrophil_activation_expr",
        "neutrophil activation / NET genes (log2 CPM)",
        "neutrophils",
        "pseudobulk",
        "MSC-dampened neutrophil activation / NETs: not verified; genes [M]",
        cells={"lineage": ("Neutrophil",)},
        genes=("PADI4", "MPO", "ELANE", "CD177", "ITGAM"),
    ),
    Readout(
        "ifn_score",
        "type I IFN response (monocytes)",
        "global",
        "state",
        "ifn_response mean score in monocytes (Leite 2024 [V]; gene set [M])",
        state="ifn_response.monocyte",
        metric="mean_score",
    ),
    Readout(
        "trem2_macrophage_fraction",
        "TREM2-high macrophage fraction",
        "tissue",
        "state",
        "trem2_high_macrophage calls in macrophages (Zhang 2023 [V], mouse heart); tissue only",
        state="trem2_high_macrophage",
        metric="fraction",
    ),
)

_READOUT = {r.name: r for r in READOUTS}


def _mask(obs: pd.DataFrame, spec: Mapping[str, Sequence[str]] | None) -> np.ndarray:
    """Cells matching ``{lineage: [...]}`` or ``{cell_type: [...]}`` (None = all cells)."""
    if spec is None:
        return np.ones(len(obs), bool)
    out = np.zeros(len(obs), bool)
    for key, values in spec.items():
        if key not in obs:
            raise KeyError(f"obs[{key!r}] is missing; it comes from sepsis_sc.annotate")
        out |= obs[key].astype(str).isin(list(values)).to_numpy()
    return out


def pseudobulk_log2cpm(
    adata: ad.AnnData,
    cells: np.ndarray,
    genes: Sequence[str],
    *,
    sample_key: str = "sample_id",
    layer: str | None = "counts",
    counts_file: str | os.PathLike[str] | None = None,
    min_cells: int = 10,
) -> tuple[pd.DataFrame, pd.Series]:
    """log2(CPM + 1) of ``genes`` in the summed raw counts of ``cells``, per sample.

    Counts of the selected cells are summed per sample (as in
    :func:`sepsis_sc.stats.sample_table`), the library size is the sum over all genes of
    that pseudobulk, and CPM are taken before selecting ``genes``.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``layers[layer]`` (or an integer-valued ``X``; ``X``
        when ``layer`` is None).
    cells
        Boolean mask of the population.
    genes
        Genes to return (absent genes are dropped).
    sample_key, layer
        Sample column and count layer.
    counts_file
        Sum ``layers[layer]`` of this ``.h5ad`` in one streamed pass instead of ``adata``'s
        matrix (``adata`` then needs no matrix).
    min_cells
        Samples with fewer cells of the population get NaN.

    Returns
    -------
    values
        Samples x present genes (all samples of ``obs[sample_key]``; NaN below ``min_cells``).
    n_cells
        Cells of the population per sample.
    """
    samples = adata.obs[sample_key].astype(str).to_numpy()
    all_ids = list(dict.fromkeys(samples))
    n_cells = pd.Series({s: int((cells & (samples == s)).sum()) for s in all_ids}, dtype=int)
    present = [g for g in genes if g in adata.var_names]
    out = pd.DataFrame(np.nan, index=all_ids, columns=present)
    keep = [s for s in all_ids if n_cells[s] >= min_cells]
    if not keep or not present:
        return out, n_cells
    codes = pd.Categorical(samples, categories=keep).codes
    codes = np.where(cells & (codes >= 0), codes, -1)
    if counts_file is not None:
        pb = pseudobulk(store.FileCounts(counts_file, layer or "X"), codes, len(keep))
    else:
        counts = adata.X if layer is None else get_counts(adata, layer, check=False)[0]
        pb = pseudobulk(
            store.CountSource(counts), codes, len(keep)
        )  # no copy of the population's rows
    lib = np.maximum(pb.sum(axis=1), 1.0)
    idx = adata.var_names.get_indexer(present)
    sel_counts = pb[:, idx]
    out.loc[keep, present] = np.log2(sel_counts * (1e6 / lib[:, None]) + 1.0)
    return out, n_cells


def sample_readouts(
    adata: ad.AnnData,
    sample_table: pd.DataFrame | None = None,
    *,
    readouts: Sequence[Readout] = READOUTS,
    sample_key: str = "sample_id",
    layer: str | None = "counts",
    counts_file: str | os.PathLike[str] | None = None,
    min_cells: int = 10,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compute every readout per sample.

    Parameters
    ----------
    adata
        Scored AnnData (``obs`` ``lineage``, ``cell_type``, ``sample_id``; raw counts in
        ``layers[layer]``), as written to ``targets/scored.h5ad``.
    sample_table
        Long per-sample table of :func:`sepsis_sc.stats.sample_table`; computed here when
        None (``min_cells`` then applies to it too).
    readouts
        Readout specs (default :data:`READOUTS`).
    sample_key, layer
        Sample column and raw-count layer.
    min_cells
        Minimum cells of a share's denominator or a pseudobulk population per sample
        (below it the value is NaN and ``reason`` says why).

    Returns
    -------
    values
        Samples x readouts (float, NaN where not measurable).
    detail
        Long table: ``sample_id``, ``readout``, ``value``, ``n_cells`` (cells behind the
        value), ``reason`` (empty when valid).
    """
    if sample_table is None:
        from sepsis_sc.stats import sample_table as _st

        sample_table = _st(
            adata, sample_key=sample_key, min_cells=min_cells, layer=layer, counts_file=counts_file
        )
    samples = adata.obs[sample_key].astype(str).to_numpy()
    ids = list(dict.fromkeys(samples))
    st = sample_table.copy()
    st["sample_id"] = st["sample_id"].astype(str)
    rows: list[dict[str, Any]] = []
    for r in readouts:
        if r.kind == "share":
            rows += _share_rows(adata.obs, r, samples, ids, min_cells)
        elif r.kind == "pseudobulk":
            rows += _pseudobulk_rows(
                adata,
                r,
                ids,
                sample_key=sample_key,
                layer=layer,
                counts_file=counts_file,
                min_cells=min_cells,
            )
        elif r.kind == "state":
            rows += _state_readout_rows(st, r, ids)
        else:
            raise ValueError(f"readout {r.name!r}: unknown kind {r.kind!r}")
    detail = pd.DataFrame(rows)
    values = detail.pivot(index="sample_id", columns="readout", values="value")
    values = values.reindex(index=ids, columns=[r.name for r in readouts])
    return values, detail


def _share_rows(
    obs: pd.DataFrame, r: Readout, samples: np.ndarray, ids: Sequence[str], min_cells: int
) -> list[dict[str, Any]]:
    """A ``share`` readout per sample: cells matching ``cells`` / cells matching ``of``."""
    num = _mask(obs, r.cells)
    den = _mask(obs, r.of)
    rows = []
    for s in ids:
        ins = samples == s
        nd = int((den & ins).sum())
        ok = nd >= (min_cells if r.of is not None else 1)
        rows.append(
            {
                "sample_id": s,
                "readout": r.name,
                "value": float((num & ins).sum() / nd) if ok else np.nan,
                "n_cells": nd,
                "reason": "" if ok else f"{nd} cells in the denominator (< min_cells={min_cells})",
            }
        )
    return rows


def _pseudobulk_rows(
    adata: ad.AnnData,
    r: Readout,
    ids: Sequence[str],
    *,
    sample_key: str,
    layer: str | None,
    counts_file: str | os.PathLike[str] | None = None,
    min_cells: int,
) -> list[dict[str, Any]]:
    """A ``pseudobulk`` readout per sample: log2(CPM + 1) of the gene set's summed CPM."""
    vals, n = pseudobulk_log2cpm(
        adata,
        _mask(adata.obs, r.cells),
        r.genes,
        sample_key=sample_key,
        layer=layer,
        min_cells=min_cells,
        counts_file=counts_file,
    )
    cpm = np.exp2(vals) - 1.0
    rows = []
    for s in ids:
        if vals.shape[1] == 0:
            v, why = np.nan, f"none of {list(r.genes)} in the data"
        elif n[s] < min_cells:
            v, why = np.nan, f"{n[s]} cells of the population (< min_cells={min_cells})"
        else:
            v, why = float(np.log2(cpm.loc[s].sum() + 1.0)), ""
        rows.append(
            {"sample_id": s, "readout": r.name, "value": v, "n_cells": int(n[s]), "reason": why}
        )
    return rows


def _state_readout_rows(st: pd.DataFrame, r: Readout, ids: Sequence[str]) -> list[dict[str, Any]]:
    """A ``state`` readout per sample: the state's metric from the per-sample table."""
    sub = st[(st["state"] == r.state) & (st["metric"] == r.metric)].set_index("sample_id")
    rows = []
    for s in ids:
        if s not in sub.index:
            rows.append(
                {
                    "sample_id": s,
                    "readout": r.name,
                    "value": np.nan,
                    "n_cells": 0,
                    "reason": f"state {r.state!r} ({r.metric}) not scored in this run",
                }
            )
            continue
        row = sub.loc[s]
        reason = row.get("reason", "")
        reason = "" if (reason is None or reason != reason) else str(reason)
        rows.append(
            {
                "sample_id": s,
                "readout": r.name,
                "value": float(row["value"]),
                "n_cells": int(row["n_cells"]),
                "reason": reason,
            }
        )
    return rows


# --------------------------------------------------------------------------------------
# reference ranges
# --------------------------------------------------------------------------------------
def _centre_spread(x: np.ndarray) -> tuple[float, float]:
    """Median and spread = max(1.4826 x MAD, SD) of the reference values (NaN when 0).

    The median keeps one outlying control from moving the centre. The spread takes the
    larger of the MAD-based and the ordinary SD: with the 3-10 control donors of a typical
    cohort the MAD alone is so noisy that about 1 in 7 healthy samples would be flagged
    (simulated normal data, 5 controls, |z| > 3.1); the larger estimate errs towards fewer
    flags (an outlying control widens the range instead of narrowing it).
    """
    c = float(np.median(x))
    s = _MAD_TO_SD * float(np.median(np.abs(x - c)))
    if x.size > 1:
        s = max(s, float(np.std(x, ddof=1)))
    return c, (s if s > 0 else np.nan)


def flag_multiplier(n: int, z_threshold: float = 2.0) -> float:
    """Half-width of the reference range in spread units, for ``n`` reference donors.

    A new sample from the reference population falls outside ``centre +/- k * spread``
    with the two-sided tail probability of ``z_threshold`` under a normal model (4.6 %
    for 2) once the uncertainty of centre and spread is included: the prediction-interval
    multiplier ``k = t(1 - p/2, n - 1) * sqrt(1 + 1/n)`` (5.2 for 3 donors, 3.1 for 5, 2.6
    for 8, 2.1 for 30, -> ``z_threshold`` for many donors). Checked by simulation: with the
    spread of :func:`_centre_spread`, 3.7-4.3 % of normal reference samples fall outside.

    Parameters
    ----------
    n
        Reference donors with a value.
    z_threshold
        Normal-scale threshold that sets the tail probability.

    Returns
    -------
    float
        ``k`` (NaN for ``n < 2``).
    """
    if n < 2:
        return np.nan
    p = 2.0 * float(sstats.norm.sf(z_threshold))
    return float(sstats.t.ppf(1.0 - p / 2.0, n - 1) * np.sqrt(1.0 + 1.0 / n))


def _donor_values(values: pd.DataFrame, donors: pd.Series) -> pd.DataFrame:
    """One value per donor: the mean of the donor's samples (repeated samples count once)."""
    return values.groupby(donors.reindex(values.index).to_numpy(), sort=False).mean()


def reference_ranges(
    values: pd.DataFrame,
    donors: pd.Series,
    *,
    min_controls: int = 3,
    z_threshold: float = 2.0,
    source_run: str = "",
    reference: str = "",
) -> pd.DataFrame:
    """Control reference range per readout, from one value per control donor.

    Parameters
    ----------
    values
        Reference samples x readouts (only the control samples).
    donors
        Donor of each sample (index = sample id); a donor's samples are averaged first.
    min_controls
        Minimum control donors; fewer raises :class:`InsufficientReferenceError`, and a
        readout with fewer donors holding a value gets NaN centre / spread.
    z_threshold
        The range is centre +/- ``k`` x spread, ``k`` = :func:`flag_multiplier` (n,
        z_threshold): wider with few control donors.
    source_run, reference
        Recorded in the table (run name; which samples form the reference).

    Returns
    -------
    pandas.DataFrame
        ``readout``, ``centre`` (median), ``spread`` (max of 1.4826 x MAD and SD), ``low``,
        ``high``, ``k`` (range half-width in spread units), ``n`` (control donors with a
        value), ``z_threshold``,
        ``reference``, ``source_run`` - the layout :func:`read_reference` accepts.
    """
    dv = _donor_values(values, donors)
    if len(dv) < min_controls:
        raise InsufficientReferenceError(
            f"only {len(dv)} control donor(s) ({', '.join(map(str, dv.index)) or 'none'}); at "
            f"least min_controls={min_controls} are needed for a reference range, so no sample "
            "is flagged. Add controls, or pass a saved reference file (patients/reference.tsv "
            "of a run with enough controls)."
        )
    rows = []
    for r in values.columns:
        x = dv[r].dropna().to_numpy(dtype=float)
        c, s = _centre_spread(x) if x.size >= min_controls else (np.nan, np.nan)
        k = flag_multiplier(x.size, z_threshold)
        rows.append(
            {
                "readout": r,
                "centre": c,
                "spread": s,
                "low": c - k * s,
                "high": c + k * s,
                "k": k,
                "n": int(x.size),
                "z_threshold": z_threshold,
                "reference": reference,
                "source_run": source_run,
            }
        )
    return pd.DataFrame(rows)


def read_reference(path: str | Path) -> pd.DataFrame:
    """Read a saved reference table (``patients/reference.tsv`` of another run).

    Parameters
    ----------
    path
        Tab-separated file with at least ``readout``, ``centre``, ``spread``, ``n``
        (``source_run`` and ``reference`` are kept when present).

    Returns
    -------
    pandas.DataFrame
        The table, ``readout`` as str.
    """
    ref = pd.read_csv(path, sep="\t", keep_default_na=True)
    missing = {"readout", "centre", "spread", "n"} - set(ref.columns)
    if missing:
        raise ValueError(f"reference file {path} lacks column(s) {sorted(missing)}")
    ref["readout"] = ref["readout"].astype(str)
    for col in ("source_run", "reference"):
        if col not in ref:
            ref[col] = ""
        ref[col] = ref[col].fillna("").astype(str)
    return ref


def _flag(z: float, k: float) -> str:
    if not (np.isfinite(z) and np.isfinite(k)):
        return NOT_ASSESSED
    return "below" if z < -k else ("above" if z > k else "within")


def score_samples(
    values: pd.DataFrame,
    meta: pd.DataFrame,
    *,
    is_reference: pd.Series | None = None,
    reference: pd.DataFrame | None = None,
    min_controls: int = 3,
    z_threshold: float = 2.0,
) -> pd.DataFrame:
    """z-score, percentile and flag of every sample x readout against the control range.

    Parameters
    ----------
    values
        Samples x readouts.
    meta
        Per-sample table with ``donor`` (index = sample id).
    is_reference
        Boolean per sample: the in-run control samples. Their own donor is left out of the
        reference they are scored against (leave-one-out); the others use all control donors.
    reference
        Saved reference table (:func:`read_reference`), used when ``is_reference`` is None;
        percentiles then come from the normal approximation ``100 * Phi(z)``.
    min_controls, z_threshold
        As in :func:`reference_ranges`; a readout with fewer reference donors is
        ``not assessed``; flagged when ``|z| > k`` (:func:`flag_multiplier` of the number of
        reference donors behind that sample's range).

    Returns
    -------
    pandas.DataFrame
        Long: ``sample_id``, ``readout``, ``value``, ``ref_centre``, ``ref_spread``,
        ``ref_low``, ``ref_high``, ``ref_k`` (flag threshold on ``|z|``), ``ref_n``, ``ref_basis`` (all controls / leave-one-out /
        file), ``z``, ``percentile``, ``flag`` (below / within / above / not assessed).
    """
    donors = meta["donor"].astype(str)
    if is_reference is not None:
        is_ref = is_reference.reindex(values.index).fillna(False).astype(bool)
        dv = _donor_values(values[is_ref], donors)

        def ref_of(sid: Any, r: str) -> tuple[float, float, int, str, np.ndarray | None]:
            return _control_reference(dv, donors[sid], bool(is_ref[sid]), r, min_controls)
    else:
        assert reference is not None
        rr = reference.set_index("readout")

        def ref_of(sid: Any, r: str) -> tuple[float, float, int, str, np.ndarray | None]:
            return _file_reference(rr, r)

    rows = [
        _score_row(sid, r, float(values.at[sid, r]), *ref_of(sid, r), z_threshold)
        for sid in values.index
        for r in values.columns
    ]
    return pd.DataFrame(rows)


def _control_reference(
    dv: pd.DataFrame, donor: str, own: bool, r: str, min_controls: int
) -> tuple[float, float, int, str, np.ndarray]:
    """Centre, spread, donors, basis and values of the in-run control reference of readout
    ``r`` for one sample (its own donor left out when it is a control)."""
    ref_vals = (dv.drop(index=donor) if own else dv)[r].dropna().to_numpy(float)
    basis = "controls, leave-one-out" if own else "controls"
    if ref_vals.size >= min_controls:
        c, s = _centre_spread(ref_vals)
    else:
        c, s = np.nan, np.nan
        basis += f" ({ref_vals.size} donors with a value < min_controls={min_controls})"
    return c, s, int(ref_vals.size), basis, ref_vals


def _file_reference(rr: pd.DataFrame, r: str) -> tuple[float, float, int, str, None]:
    """Centre, spread, donors and basis of readout ``r`` in a saved reference table."""
    if r not in rr.index:
        return np.nan, np.nan, 0, "readout not in the reference file", None
    run = rr.at[r, "source_run"]
    basis = f"reference file (run {run})" if run else "reference file"
    return float(rr.at[r, "centre"]), float(rr.at[r, "spread"]), int(rr.at[r, "n"]), basis, None


def _score_row(
    sid: Any,
    r: str,
    v: float,
    c: float,
    s: float,
    n: int,
    basis: str,
    ref_vals: np.ndarray | None,
    z_threshold: float,
) -> dict[str, Any]:
    """z, percentile (empirical, else from the normal) and flag of one sample x readout."""
    k = flag_multiplier(n, z_threshold)
    z = (v - c) / s if np.isfinite(v) and np.isfinite(c) and s > 0 else np.nan
    if not np.isfinite(z):
        pct = np.nan
    elif ref_vals is not None:
        pct = 100.0 * (np.sum(ref_vals < v) + 0.5 * np.sum(ref_vals == v)) / ref_vals.size
    else:
        pct = 100.0 * float(sstats.norm.cdf(z))
    return {
        "sample_id": sid,
        "readout": r,
        "value": v,
        "ref_centre": c,
        "ref_spread": s,
        "ref_low": c - k * s,
        "ref_high": c + k * s,
        "ref_k": k,
        "ref_n": n,
        "ref_basis": basis,
        "z": z,
        "percentile": pct,
        "flag": _flag(z, k),
    }


# --------------------------------------------------------------------------------------
# immune-state rules
# --------------------------------------------------------------------------------------
def load_state_rules(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Load and check the immune-state rules (default ``resources/patient_states.yaml``).

    Parameters
    ----------
    path
        YAML list of rules (see the header of the packaged file).

    Returns
    -------
    list of dict
        One dict per rule with ``all_of``, ``any_of``, ``support``, ``hypotheses``,
        ``therapy_targets`` defaulted to empty lists and ``tissue_only`` to False.

    Raises
    ------
    ValueError
        When a rule lacks name, label, threshold or source, has neither ``all_of`` nor
        ``any_of``, names an unknown readout or flag, or a therapy target that is not in
        ``resources/therapy_targets.yaml``.
    """
    p = Path(path) if path is not None else resource_path("patient_states.yaml")
    raw = load_yaml(p)
    if not isinstance(raw, list):
        raise ValueError(f"{p}: expected a list of state rules")
    targets = set(load_yaml(resource_path("therapy_targets.yaml")) or {})
    out, seen = [], set()
    for i, rule in enumerate(raw):
        rule = dict(rule)
        name = rule.get("name", f"#{i}")
        for key in ("name", "label", "threshold", "source"):
            if not rule.get(key):
                raise ValueError(f"{p}: state rule {name!r} has no {key!r}")
        if name in seen:
            raise ValueError(f"{p}: state rule {name!r} is repeated")
        seen.add(name)
        for key in ("all_of", "any_of", "support", "hypotheses", "therapy_targets"):
            rule[key] = list(rule.get(key) or [])
        rule["tissue_only"] = bool(rule.get("tissue_only", False))
        if bool(rule["all_of"]) == bool(rule["any_of"]):
            raise ValueError(f"{p}: state rule {name!r} needs exactly one of all_of / any_of")
        for cond in rule["all_of"] + rule["any_of"] + rule["support"]:
            if cond.get("readout") not in _READOUT:
                raise ValueError(
                    f"{p}: state rule {name!r}: unknown readout {cond.get('readout')!r}"
                )
            if cond.get("flag") not in ("below", "above"):
                raise ValueError(f"{p}: state rule {name!r}: flag must be below / above")
        bad = set(rule["therapy_targets"]) - targets
        if bad:
            raise ValueError(f"{p}: state rule {name!r}: therapy target(s) {sorted(bad)} unknown")
        out.append(rule)
    return out


def _fmt(readout: str, row: pd.Series | None) -> str:
    if row is None or not np.isfinite(row["z"]):
        return f"{readout} {NOT_ASSESSED}"
    return f"{readout} z={row['z']:.1f} ({row['flag']})"


def call_states(
    scored: pd.DataFrame,
    rules: Sequence[Mapping[str, Any]] | None = None,
    *,
    note: str = "",
    z_probable: float | None = 2.0,
) -> pd.DataFrame:
    """Immune-state call per sample x rule from the readout flags.

    Parameters
    ----------
    scored
        Output of :func:`score_samples` (long, with ``flag`` and ``z``).
    rules
        State rules (default :func:`load_state_rules`).
    note
        When set (no reference range), every call is ``not assessed`` with this evidence.
    z_probable
        ``probable`` call: the primary readout(s) are not beyond the (small-sample,
        conservative) flag threshold but at least ``z_probable`` robust SDs out in the rule's
        direction, *and* at least one supporting readout is flagged in its direction. Two
        independent lines of evidence replace one extreme one (None: no probable calls).

    Returns
    -------
    pandas.DataFrame
        ``sample_id``, ``state``, ``label``, ``call`` (yes / probable / no /
        not assessable / not assessed), ``n_support`` (supporting flags that hold), ``n_support_total``,
        ``evidence``, ``threshold``, ``source``, ``therapy_targets``, ``hypotheses``.
        ``all_of``: yes when every listed flag holds, not assessable when one is missing.
        ``any_of``: yes when one holds, not assessable when none is assessable.
    """
    rules = list(rules) if rules is not None else load_state_rules()
    by = (
        {(s, r): row for (s, r), row in scored.set_index(["sample_id", "readout"]).iterrows()}
        if len(scored)
        else {}
    )
    rows = []
    for sid in dict.fromkeys(scored["sample_id"]):
        for rule in rules:
            prim = rule["all_of"] or rule["any_of"]
            got = [by.get((sid, c["readout"])) for c in prim]
            ok = [g is not None and g["flag"] in FLAGS for g in got]
            hit = [o and g["flag"] == c["flag"] for o, g, c in zip(ok, got, prim)]
            if note:
                call = NOT_ASSESSED
            elif rule["all_of"]:
                call = "not assessable" if not all(ok) else ("yes" if all(hit) else "no")
            else:
                call = "yes" if any(hit) else ("no" if any(ok) else "not assessable")
            sup = [(c, by.get((sid, c["readout"]))) for c in rule["support"]]
            n_sup = sum(1 for c, g in sup if g is not None and g["flag"] == c["flag"])
            if call == "no" and z_probable is not None and n_sup >= 1:
                need = (
                    prim
                    if rule["all_of"]
                    else [c for c, g in zip(prim, got) if g is not None and g["flag"] in FLAGS]
                )
                zs = {c["readout"]: by.get((sid, c["readout"])) for c in need}
                near = [
                    g is not None
                    and np.isfinite(float(g["z"]))
                    and (
                        float(g["z"]) <= -z_probable
                        if c["flag"] == "below"
                        else float(g["z"]) >= z_probable
                    )
                    for c, g in ((c, zs[c["readout"]]) for c in need)
                ]
                if near and (all(near) if rule["all_of"] else any(near)):
                    call = "probable"
            if note:
                evidence = note
            else:
                evidence = "; ".join(_fmt(c["readout"], g) for c, g in zip(prim, got)) + (
                    ""
                    if not sup
                    else " | support: " + ", ".join(_fmt(c["readout"], g) for c, g in sup)
                )
                if call == "not assessable" and rule["tissue_only"]:
                    evidence += " | tissue-only state: too few or no cells of the population"
            rows.append(
                {
                    "sample_id": sid,
                    "state": rule["name"],
                    "label": rule["label"],
                    "call": call,
                    "n_support": n_sup if not note else 0,
                    "n_support_total": len(sup),
                    "evidence": evidence,
                    "threshold": " ".join(str(rule["threshold"]).split()),
                    "source": " ".join(str(rule["source"]).split()),
                    "therapy_targets": ", ".join(rule["therapy_targets"]),
                    "hypotheses": " / ".join(rule["hypotheses"]),
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------
# published endotype scores
# --------------------------------------------------------------------------------------
def load_endotypes(path: str | Path | None = None) -> dict[str, Any]:
    """Load the endotype gene sets (default ``resources/endotypes.yaml``).

    Returns
    -------
    dict
        ``aliases`` (symbol -> older symbols) and ``endotypes`` (list of dicts with
        ``name``, ``kind``, ``up`` / ``down`` or ``pairs``, ``score``, ``call``, ``source``,
        ``marker``).
    """
    p = Path(path) if path is not None else resource_path("endotypes.yaml")
    raw = load_yaml(p)
    for e in raw["endotypes"]:
        for key in ("name", "kind", "source", "marker", "call"):
            if not e.get(key):
                raise ValueError(f"{p}: endotype {e.get('name')!r} has no {key!r}")
    return raw


def _resolve(gene: str, var: pd.Index, aliases: Mapping[str, Sequence[str]]) -> str | None:
    if gene in var:
        return gene
    return next((a for a in aliases.get(gene, ()) if a in var), None)


def endotype_scores(
    adata: ad.AnnData,
    *,
    sample_key: str = "sample_id",
    layer: str | None = "counts",
    counts_file: str | os.PathLike[str] | None = None,
    endotypes: Mapping[str, Any] | None = None,
    min_cells: int = 10,
) -> pd.DataFrame:
    """Published bulk-blood endotype scores on whole-sample pseudobulk (all cells summed).

    Parameters
    ----------
    adata
        AnnData with raw counts in ``layers[layer]``.
    sample_key, layer, min_cells
        Sample column, count layer, minimum cells per sample.
    endotypes
        Output of :func:`load_endotypes` (default: the packaged file).

    Returns
    -------
    pandas.DataFrame
        ``sample_id``, ``endotype``, ``component`` (the score, or the MARS pair), ``score``,
        ``z`` (across samples; cohort-relative), ``genes_used``, ``genes_missing``,
        ``call`` (never an endotype here: why not), ``caveat``, ``source``, ``marker``.
        Scores: ``classifier`` = mean log2CPM(up) - mean log2CPM(down); ``pairs`` =
        log2CPM(up) - log2CPM(down) per pair; ``score`` (Sweeney) = geomMean(up) -
        (n_down/n_up) geomMean(down) of log2(CPM + 1). A component missing its up or down
        genes is NaN.
    """
    cfg = endotypes if endotypes is not None else load_endotypes()
    aliases = cfg.get("aliases", {})
    caveat = (
        "derived on whole-blood / leukocyte bulk transcriptomes; on single-cell pseudobulk "
        "(PBMC especially) scores are exploratory and composition-driven; read with the "
        "neutrophil share"
    )
    comps: list[tuple[dict, str, list[str], list[str]]] = []
    for e in cfg["endotypes"]:
        if e["kind"] == "pairs":
            for k, pr in e["pairs"].items():
                comps.append((e, k, [pr["up"]], [pr["down"]]))
        else:
            comps.append((e, e["name"], list(e.get("up") or []), list(e.get("down") or [])))
    var = pd.Index(adata.var_names)
    wanted = sorted(
        {
            g2
            for _, _, up, dn in comps
            for g in up + dn
            if (g2 := _resolve(g, var, aliases)) is not None
        }
    )
    allc = np.ones(adata.n_obs, bool)
    lc, _ = pseudobulk_log2cpm(
        adata,
        allc,
        wanted,
        sample_key=sample_key,
        layer=layer,
        min_cells=min_cells,
        counts_file=counts_file,
    )
    rows = []
    for e, comp, up, dn in comps:
        upr = [g2 for g in up if (g2 := _resolve(g, var, aliases))]
        dnr = [g2 for g in dn if (g2 := _resolve(g, var, aliases))]
        miss = [g for g in up + dn if _resolve(g, var, aliases) is None]
        need_both = bool(up) and bool(dn)
        if not upr or (need_both and not dnr):
            score = pd.Series(np.nan, index=lc.index)
        elif e["kind"] == "score":

            def gm(genes: list[str]) -> pd.Series:
                return np.exp(np.log1p(lc[genes]).mean(axis=1)) - 1.0

            score = gm(upr) - ((len(dn) / len(up)) * gm(dnr) if dnr else 0.0)
        else:
            score = lc[upr].mean(axis=1) - (lc[dnr].mean(axis=1) if dnr else 0.0)
        sd = float(np.nanstd(score, ddof=1)) if np.isfinite(score).sum() > 1 else np.nan
        z = (score - np.nanmean(score)) / sd if sd and sd > 0 else score * np.nan
        for sid in lc.index:
            rows.append(
                {
                    "sample_id": sid,
                    "endotype": e["name"],
                    "component": comp,
                    "score": float(score[sid]),
                    "z": float(z[sid]),
                    "genes_used": ", ".join(upr + dnr),
                    "genes_missing": ", ".join(miss),
                    "call": " ".join(str(e["call"]).split()),
                    "caveat": caveat,
                    "source": e["source"],
                    "marker": e["marker"],
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------
# longitudinal
# --------------------------------------------------------------------------------------
def _time_key(value: Any) -> tuple[float, str]:
    m = re.search(r"-?\d+(\.\d+)?", str(value))
    return (float(m.group()) if m else np.inf, str(value))


def trajectories(
    profiles: pd.DataFrame,
    meta: pd.DataFrame,
    *,
    timepoint_column: str | None = "timepoint",
) -> pd.DataFrame:
    """Per-readout trajectory of every donor with more than one sample.

    Parameters
    ----------
    profiles
        Long table of :func:`score_samples` (``sample_id``, ``readout``, ``value``, ``z``,
        ``flag``).
    meta
        Per-sample table with ``donor`` (and ``timepoint_column`` when present).
    timepoint_column
        Sheet column ordering a donor's samples; numbers inside the labels order them
        (T0 < T6 < day14), sheet order otherwise.

    Returns
    -------
    pandas.DataFrame
        ``donor``, ``sample_id``, ``timepoint``, ``order`` (0, 1, ...), ``readout``,
        ``value``, ``z``, ``ref_k`` (flag threshold on ``|z|``), ``flag``, ``delta`` (value
        minus the donor's first value).
        Empty when no donor was sampled twice.
    """
    cols = [
        "donor",
        "sample_id",
        "timepoint",
        "order",
        "readout",
        "value",
        "z",
        "ref_k",
        "flag",
        "delta",
    ]
    m = meta.copy()
    m["timepoint"] = m[timepoint_column] if timepoint_column and timepoint_column in m else ""
    m["_pos"] = np.arange(len(m))
    rep = m.groupby("donor")["donor"].transform("size") > 1
    if not rep.any():
        return pd.DataFrame(columns=cols)
    parts = []
    for donor, sub in m[rep].groupby("donor", sort=False):
        sub = sub.assign(
            _k=[_time_key(t) if t != "" else (p, "") for t, p in zip(sub["timepoint"], sub["_pos"])]
        )
        sub = sub.sort_values("_k")
        order = {s: i for i, s in enumerate(sub.index)}
        p = profiles[profiles["sample_id"].isin(order)].copy()
        if "ref_k" not in p:
            p["ref_k"] = np.nan
        p["donor"] = donor
        p["order"] = p["sample_id"].map(order)
        p["timepoint"] = p["sample_id"].map(sub["timepoint"])
        rank = {r: i for i, r in enumerate(dict.fromkeys(profiles["readout"]))}
        p = p.assign(_r=p["readout"].map(rank)).sort_values(["_r", "order"]).drop(columns="_r")
        p["delta"] = p["value"] - p.groupby("readout")["value"].transform("first")
        parts.append(p)
    return pd.concat(parts, ignore_index=True)[cols]


# --------------------------------------------------------------------------------------
# one call
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatientSettings(ConfigSettings):
    """The config's ``patients`` section: reference samples and flag threshold.

    Field defaults equal the schema's (checked by ``tests/test_patients.py``);
    :func:`profile` takes the same names as keywords.

    Attributes
    ----------
    reference_column, reference_value
        The in-run reference (control) samples: ``obs[reference_column] == reference_value``.
    reference_file
        Saved ``patients/reference.tsv`` used when the run has no reference samples.
    min_controls
        Fewest control donors for a reference range.
    z_threshold
        Sets the flag's tail probability (:func:`flag_multiplier`).
    timepoint_column
        obs column ordering a donor's samples (None: no trajectories).
    endotypes
        Also compute the published endotype scores.
    """

    reference_column: str = "condition"
    reference_value: str | None = None
    reference_file: str | None = None
    min_controls: int = 3
    z_threshold: float = 2.0
    timepoint_column: str | None = "timepoint"
    endotypes: bool = True


@dataclass
class PatientProfiles:
    """Everything :func:`profile` computes (tables are pandas DataFrames).

    Attributes
    ----------
    status
        ``"ok"`` (in-run controls), ``"reference_file"``, ``"refused"`` (too few control
        donors: no flags) or ``"skipped"`` (no controls and no reference file).
    notes
        Plain-language notes (why refused / skipped, which reference was used).
    values
        Samples x readouts.
    profiles
        Long sample x readout table: meta, ``value``, reference centre / low / high, ``z``,
        ``percentile``, ``flag`` (see :func:`score_samples`), ``n_cells``, ``reason``.
    states
        :func:`call_states` output (with donor and condition).
    reference
        :func:`reference_ranges` output of this run's controls (empty when not built).
    endotypes, trajectories
        :func:`endotype_scores` and :func:`trajectories` outputs.
    meta
        Per-sample table (donor, condition, reference membership, timepoint).
    z_threshold
        Flag threshold used.
    """

    status: str
    notes: list[str]
    values: pd.DataFrame
    profiles: pd.DataFrame
    states: pd.DataFrame
    reference: pd.DataFrame
    endotypes: pd.DataFrame
    trajectories: pd.DataFrame
    meta: pd.DataFrame
    z_threshold: float = 2.0
    condition_key: str = "condition"
    extra: dict[str, Any] = field(default_factory=dict)

    def flags(self) -> pd.DataFrame:
        """Samples x readouts table of flags."""
        return self.profiles.pivot(index="sample_id", columns="readout", values="flag")

    def calls(self) -> pd.DataFrame:
        """Samples x states table of calls."""
        return self.states.pivot(index="sample_id", columns="state", values="call")


def profile(
    adata: ad.AnnData,
    sample_table: pd.DataFrame | str | Path | None = None,
    *,
    reference_column: str = "condition",
    reference_value: str | None = None,
    reference_file: str | Path | None = None,
    min_controls: int = 3,
    z_threshold: float = 2.0,
    min_cells: int = 10,
    sample_key: str = "sample_id",
    donor_key: str = "donor",
    condition_key: str = "condition",
    timepoint_column: str | None = "timepoint",
    layer: str | None = "counts",
    counts_file: str | os.PathLike[str] | None = None,
    state_rules: str | Path | Sequence[Mapping[str, Any]] | None = None,
    endotypes: bool = True,
    run_name: str = "",
) -> PatientProfiles:
    """Profile every sample against the control reference range and call immune states.

    Parameters
    ----------
    adata
        Scored AnnData (``targets/scored.h5ad``).
    sample_table
        :func:`sepsis_sc.stats.sample_table` output, or the path of
        ``targets/sample_table.tsv`` (computed when None).
    reference_column, reference_value
        The reference (control) samples are those with ``obs[reference_column] ==
        reference_value``. None (or a value no sample has): no in-run reference, then
        ``reference_file`` is used, or profiling is skipped with a note.
    reference_file
        Saved ``patients/reference.tsv`` of another run, used when the run has no
        reference samples (never mixed with in-run controls). Cross-run comparisons need
        the same preparation, chemistry and gene panel: scores and log2 CPM shift with them.
    min_controls
        Minimum control donors (repeated samples of a donor count once); fewer: refused,
        no flags.
    z_threshold
        Sets the flag's tail probability (2: about 4.6 % of reference-like samples flagged
        per readout, two-sided); the threshold on ``|z|`` is widened for few control donors
        (:func:`flag_multiplier`: 3.1 with 5 donors, 2.6 with 8).
    min_cells
        Minimum cells behind a share or pseudobulk value (and the sample table, when
        computed here).
    sample_key, donor_key, condition_key, timepoint_column, layer
        obs columns and raw-count layer.
    counts_file
        Stream the counts of the pseudobulk readouts from this ``.h5ad`` (one pass per
        readout) instead of ``adata``'s matrix, which it then does not need.
    state_rules
        Rules path or list (default ``resources/patient_states.yaml``).
    endotypes
        Also compute the published endotype scores.
    run_name
        Recorded as ``source_run`` in the reference table.

    Returns
    -------
    PatientProfiles
    """
    settings = PatientSettings(
        reference_column=reference_column,
        reference_value=reference_value,
        reference_file=None if reference_file is None else str(reference_file),
        min_controls=min_controls,
        z_threshold=z_threshold,
        timepoint_column=timepoint_column,
        endotypes=endotypes,
    )
    sample_table = _read_sample_table(sample_table)
    rules = (
        load_state_rules(state_rules)
        if state_rules is None or isinstance(state_rules, str | Path)
        else list(state_rules)
    )
    meta = _profile_meta(
        adata, settings, sample_key=sample_key, donor_key=donor_key, condition_key=condition_key
    )
    values, detail = sample_readouts(
        adata,
        sample_table,
        sample_key=sample_key,
        layer=layer,
        counts_file=counts_file,
        min_cells=min_cells,
    )
    notes: list[str] = []
    is_ref = _reference_samples(meta, settings, notes)
    meta["is_reference"] = is_ref if is_ref is not None else False
    status, note, reference, scored = _score_against_reference(
        values,
        meta,
        is_ref,
        settings,
        reference_file=reference_file,
        run_name=run_name,
        notes=notes,
    )
    prof, m = _profile_table(scored, detail, meta, condition_key, timepoint_column)
    states = call_states(prof, rules, note=note, z_probable=z_threshold)
    states = m.merge(states, on="sample_id")
    endo = (
        endotype_scores(
            adata, sample_key=sample_key, layer=layer, min_cells=min_cells, counts_file=counts_file
        )
        if endotypes
        else pd.DataFrame()
    )
    traj = trajectories(prof, meta, timepoint_column=timepoint_column)
    n_yes = states[states["call"] == "yes"].groupby("state").size().to_dict() if len(states) else {}
    logger.info("patient profiles: status %s; calls %s", status, n_yes)
    return PatientProfiles(
        status=status,
        notes=notes,
        values=values,
        profiles=prof,
        states=states,
        reference=reference,
        endotypes=endo,
        trajectories=traj,
        meta=meta,
        z_threshold=z_threshold,
        condition_key=condition_key,
    )


def _read_sample_table(sample_table: pd.DataFrame | str | Path | None) -> pd.DataFrame | None:
    """The per-sample table as given, or read from its TSV (empty reasons as "")."""
    if isinstance(sample_table, str | Path):
        sample_table = pd.read_csv(sample_table, sep="\t", keep_default_na=True)
        sample_table["reason"] = sample_table["reason"].fillna("")
    return sample_table


def _profile_meta(
    adata: ad.AnnData,
    settings: PatientSettings,
    *,
    sample_key: str,
    donor_key: str,
    condition_key: str,
) -> pd.DataFrame:
    """Per sample (order of appearance, index ``sample_id``): donor, condition, reference
    column and time point (:func:`sepsis_sc.design.sample_meta`)."""
    tp = settings.timepoint_column
    meta = sample_meta(
        adata,
        sample_key,
        columns=[condition_key, settings.reference_column] + ([tp] if tp else []),
        donor_key=donor_key,
        obs_order=True,
    )
    meta.index.name = "sample_id"
    return meta


def _reference_samples(
    meta: pd.DataFrame, settings: PatientSettings, notes: list[str]
) -> pd.Series | None:
    """Which samples are the in-run reference (None: none); says why not in ``notes``."""
    column, value = settings.reference_column, settings.reference_value
    if value is not None and column in meta:
        is_ref = meta[column].astype(str) == str(value)
        if not is_ref.any():
            notes.append(f"no sample has {column} == {value!r}")
            return None
        return is_ref
    if value is not None:
        notes.append(f"obs[{column!r}] missing: no in-run reference samples")
    return None


def _score_against_reference(
    values: pd.DataFrame,
    meta: pd.DataFrame,
    is_ref: pd.Series | None,
    settings: PatientSettings,
    *,
    reference_file: str | Path | None,
    run_name: str,
    notes: list[str],
) -> tuple[str, str, pd.DataFrame, pd.DataFrame]:
    """``(status, note, reference, scored)``: in-run controls, else the reference file,
    else nothing; when refused or skipped every value is ``not assessed`` (``note`` says why).
    """
    reference = pd.DataFrame()
    status, note = "ok", ""
    scored = None
    ref_desc = f"{settings.reference_column} == {settings.reference_value}"
    if is_ref is not None:
        try:
            reference = reference_ranges(
                values[is_ref],
                meta["donor"],
                min_controls=settings.min_controls,
                z_threshold=settings.z_threshold,
                source_run=run_name,
                reference=ref_desc,
            )
            scored = score_samples(
                values,
                meta,
                is_reference=is_ref,
                min_controls=settings.min_controls,
                z_threshold=settings.z_threshold,
            )
            n_don = meta.loc[is_ref, "donor"].nunique()
            notes.append(
                f"reference: {n_don} control donors ({ref_desc}); controls scored "
                "leave-one-out; one value per donor"
            )
        except InsufficientReferenceError as err:
            status, note = "refused", f"refused: {err}"
    elif reference_file is not None:
        ref = read_reference(reference_file)
        scored = score_samples(
            values,
            meta,
            reference=ref,
            min_controls=settings.min_controls,
            z_threshold=settings.z_threshold,
        )
        status = "reference_file"
        runs = ", ".join(sorted(set(ref["source_run"]) - {""})) or "unnamed run"
        notes.append(
            f"no in-run controls: reference ranges from {reference_file} ({runs}); "
            "percentiles from the normal approximation; valid only for the same "
            "preparation, chemistry and gene panel"
        )
    else:
        status, note = "skipped", _skipped_note(settings)
    if note:
        notes.append(note)
        logger.warning("patient profiles %s", note)
        scored = _unscored(values, note)
    assert scored is not None
    return status, note, reference, scored


def _skipped_note(settings: PatientSettings) -> str:
    """Why profiling was skipped: no reference samples and no reference file."""
    value = settings.reference_value
    return (
        "skipped: no reference samples in this run"
        + (f" ({settings.reference_column} == {value!r} matches none)" if value is not None else "")
        + " and no reference_file given; pass patients.reference_file "
        "(patients/reference.tsv of a run with >= min_controls control donors)"
    )


def _unscored(values: pd.DataFrame, note: str) -> pd.DataFrame:
    """The :func:`score_samples` layout with every value ``not assessed`` (basis = ``note``)."""
    return pd.DataFrame(
        [
            {
                "sample_id": s,
                "readout": r,
                "value": float(values.at[s, r]),
                "ref_centre": np.nan,
                "ref_spread": np.nan,
                "ref_low": np.nan,
                "ref_high": np.nan,
                "ref_k": np.nan,
                "ref_n": 0,
                "ref_basis": note,
                "z": np.nan,
                "percentile": np.nan,
                "flag": NOT_ASSESSED,
            }
            for s in values.index
            for r in values.columns
        ]
    )


def _profile_table(
    scored: pd.DataFrame,
    detail: pd.DataFrame,
    meta: pd.DataFrame,
    condition_key: str,
    timepoint_column: str | None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The long profile table (meta, labels, cells behind each value; readouts with a reason
    are ``not assessed``) and the per-sample columns it starts with."""
    lab = {r.name: r for r in READOUTS}
    prof = scored.merge(
        detail[["sample_id", "readout", "n_cells", "reason"]],
        on=["sample_id", "readout"],
        how="left",
    )
    prof["label"] = prof["readout"].map(lambda x: lab[x].label if x in lab else x)
    prof["group"] = prof["readout"].map(lambda x: lab[x].group if x in lab else "")
    prof["flag"] = np.where(prof["reason"].fillna("") != "", NOT_ASSESSED, prof["flag"])
    m = meta.reset_index()[
        ["sample_id", "donor"]
        + [c for c in (condition_key, timepoint_column) if c and c in meta and c != "donor"]
    ]
    m = m.loc[:, ~m.columns.duplicated()]
    return m.merge(prof, on="sample_id"), m
