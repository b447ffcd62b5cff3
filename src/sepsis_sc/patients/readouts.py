"""The per-sample readouts of a patient profile (:data:`READOUTS`) and their values.

* :class:`Readout`, :data:`READOUTS`: what each readout measures (a cell share, a
  population's pseudobulk log2 CPM of a gene set, a state metric of the per-sample table)
  and what it stands for.
* :func:`sample_readouts`: one value per sample x readout.
* :func:`population_log2cpm`: log2(CPM + 1) of genes in the summed raw counts of cell
  populations, per sample (:func:`sepsis_sc.data.pseudobulk` and
  :func:`sepsis_sc.data.log2cpm`, all populations in one pass over the counts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from sepsis_sc import store
from sepsis_sc.data import log2cpm, pseudobulk

__all__ = ["READOUTS", "Readout", "sample_readouts", "population_log2cpm"]


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
        table of :func:`sepsis_sc.stats.sample_table`; ``"external"``: a value computed by
        another stage and passed in (the neighbourhood DA's unexplained shares,
        :func:`sepsis_sc.da.unexplained_per_sample`; the therapy-axis scores,
        :func:`sepsis_sc.ccc.axis_scores`); left out when not passed.
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
    Readout(
        "unexplained_expansion",
        "cells in expanded neighbourhoods no signature names",
        "unnamed",
        "external",
        "share of the sample's cells in neighbourhoods of the integrated graph that expand "
        "with the first tested contrast at spatial FDR <= da.alpha and that no tested cell "
        "type or called state explains (Milo, Dann 2022 [V]; rule, this pipeline [M])",
    ),
    Readout(
        "unexplained_depletion",
        "cells in depleted neighbourhoods no signature names",
        "unnamed",
        "external",
        "as unexplained_expansion, for neighbourhoods depleted in the case group [M]",
    ),
)

#: therapy axes between cells (sepsis_sc.ccc, resources/therapy_axes.yaml): name, label
_AXES = (
    ("pd1", "PD-L1 -> PD-1 axis (anti-PD-1 / PD-L1)"),
    ("il7", "IL-7 -> IL-7R axis (IL-7, CYT107)"),
    ("gm_csf", "GM-CSF -> receptor axis (GM-CSF)"),
    ("ifng", "IFN-gamma -> IFNGR axis (rIFN-gamma)"),
    ("il10", "IL-10 -> IL-10R axis"),
    ("mhc2_cd4", "HLA-DR -> CD4 axis"),
    ("apoe_trem2", "APOE -> TREM2 axis"),
    ("il1b", "IL-1beta -> IL-1R1 axis (anakinra)"),
    ("il6", "IL-6 -> IL-6R axis (adsorption)"),
    ("tnf", "TNF -> TNFR1 axis (adsorption)"),
    ("cxcl8", "IL-8 -> CXCR1/2 axis (adsorption)"),
)
#: per-sample axis scores: LIANA's lr_means on the pooled source and target cells
#: (:func:`sepsis_sc.ccc.axis_scores`, ``ccc/per_sample.tsv``), readout ``axis_<name>``
READOUTS += tuple(
    Readout(
        f"axis_{name}",
        label,
        "cell-cell axes",
        "external",
        "ligand-receptor axis score of the sample (LIANA lr_means of the axis's source and "
        "target populations, resources/therapy_axes.yaml with its trials and references); "
        "mRNA, not surface protein [M]",
    )
    for name, label in _AXES
)


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


def population_log2cpm(
    adata: ad.AnnData,
    populations: Sequence[tuple[np.ndarray, Sequence[str]]],
    *,
    sample_key: str = "sample_id",
    counts: store.CountSource | None = None,
    layer: str | None = "counts",
    min_cells: int = 10,
) -> list[tuple[pd.DataFrame, pd.Series]]:
    """log2(CPM + 1) of each population's genes in its summed raw counts, per sample.

    Counts of a population's cells are summed per sample (:func:`sepsis_sc.data.pseudobulk`,
    every population in the same pass over the counts), the library size is the sum over
    all genes of that pseudobulk, and CPM are taken before selecting the genes
    (:func:`sepsis_sc.data.log2cpm`).

    Parameters
    ----------
    adata
        AnnData with raw counts in ``layers[layer]`` (or an integer-valued ``X``; ``X``
        when ``layer`` is None).
    populations
        ``(cells, genes)`` pairs: a boolean mask of the population and the genes to return
        (absent genes are dropped).
    sample_key
        Sample column.
    counts
        The counts to sum (e.g. :meth:`sepsis_sc.store.FileCounts.matching`, streamed from
        the ``.h5ad``; ``adata`` then needs no matrix). None: ``adata``'s ``layer``.
    layer
        Count layer.
    min_cells
        Samples with fewer cells of the population get NaN.

    Returns
    -------
    list of (values, n_cells)
        Per population: samples x present genes (all samples of ``obs[sample_key]``; NaN
        below ``min_cells``), and the cells of the population per sample.
    """
    samples = adata.obs[sample_key].astype(str).to_numpy()
    all_ids = list(dict.fromkeys(samples))
    out, todo = [], []
    for cells, genes in populations:
        n_cells = pd.Series({s: int((cells & (samples == s)).sum()) for s in all_ids}, dtype=int)
        present = [g for g in genes if g in adata.var_names]
        values = pd.DataFrame(np.nan, index=all_ids, columns=present)
        out.append((values, n_cells))
        keep = [s for s in all_ids if n_cells[s] >= min_cells]
        if keep and present:
            codes = pd.Categorical(samples, categories=keep).codes
            todo.append((values, keep, present, np.where(cells & (codes >= 0), codes, -1)))
    if todo:
        source = store.count_source(adata, counts, layer, check=False)
        sums = pseudobulk(source, [t[3] for t in todo], [len(t[1]) for t in todo])
        for (values, keep, present, _), pb in zip(todo, sums, strict=True):
            idx = adata.var_names.get_indexer(present)
            values.loc[keep, present] = log2cpm(pb)[:, idx]
    return out


def sample_readouts(
    adata: ad.AnnData,
    sample_table: pd.DataFrame | None = None,
    *,
    readouts: Sequence[Readout] = READOUTS,
    sample_key: str = "sample_id",
    counts: store.CountSource | None = None,
    layer: str | None = "counts",
    min_cells: int = 10,
    external: pd.DataFrame | None = None,
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
    sample_key
        Sample column.
    counts
        The raw counts of the pseudobulk readouts (and of the sample table when it is
        computed here), e.g. :meth:`sepsis_sc.store.FileCounts.matching` (streamed from the
        ``.h5ad`` in one pass; ``adata`` then needs no matrix). None: ``adata``'s ``layer``.
    layer
        Raw-count layer.
    min_cells
        Minimum cells of a share's denominator or a pseudobulk population per sample
        (below it the value is NaN and ``reason`` says why).
    external
        Values of the ``"external"`` readouts: long table with ``sample_id``, ``readout``,
        ``value``, ``n_cells`` (e.g. ``da/<contrast>/per_sample.tsv``); an external readout
        it does not hold is left out.

    Returns
    -------
    values
        Samples x readouts (float, NaN where not measurable).
    detail
        Long table: ``sample_id``, ``readout``, ``value``, ``n_cells`` (cells behind the
        value), ``reason`` (empty when valid).
    """
    if sample_table is None:
        from sepsis_sc.stats import sample_table as per_sample_table

        sample_table = per_sample_table(
            adata, sample_key=sample_key, min_cells=min_cells, counts=counts, layer=layer
        )
    samples = adata.obs[sample_key].astype(str).to_numpy()
    ids = list(dict.fromkeys(samples))
    st = sample_table.copy()
    st["sample_id"] = st["sample_id"].astype(str)
    in_pb = [r for r in readouts if r.kind == "pseudobulk"]
    pb = population_log2cpm(
        adata,
        [(_mask(adata.obs, r.cells), r.genes) for r in in_pb],
        sample_key=sample_key,
        counts=counts,
        layer=layer,
        min_cells=min_cells,
    )
    pb_values = dict(zip([r.name for r in in_pb], pb, strict=True))
    rows: list[dict[str, Any]] = []
    for r in readouts:
        if r.kind == "share":
            rows += _share_rows(adata.obs, r, samples, ids, min_cells)
        elif r.kind == "pseudobulk":
            rows += _pseudobulk_rows(r, *pb_values[r.name], ids, min_cells)
        elif r.kind == "state":
            rows += _state_readout_rows(st, r, ids)
        elif r.kind == "external":
            rows += _external_rows(external, r, ids)
        else:
            raise ValueError(f"readout {r.name!r}: unknown kind {r.kind!r}")
    detail = pd.DataFrame(rows)
    values = detail.pivot(index="sample_id", columns="readout", values="value")
    made = set(detail["readout"])
    values = values.reindex(index=ids, columns=[r.name for r in readouts if r.name in made])
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
    r: Readout, vals: pd.DataFrame, n: pd.Series, ids: Sequence[str], min_cells: int
) -> list[dict[str, Any]]:
    """A ``pseudobulk`` readout per sample: log2(CPM + 1) of the gene set's summed CPM, from
    the population's per-gene log2(CPM + 1) ``vals`` and cells ``n``."""
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


def _external_rows(
    external: pd.DataFrame | None, r: Readout, ids: Sequence[str]
) -> list[dict[str, Any]]:
    """An ``external`` readout per sample from the table another stage wrote (none when the
    table does not hold it)."""
    if external is None or r.name not in set(external["readout"]):
        return []
    sub = external[external["readout"] == r.name].copy()
    sub["sample_id"] = sub["sample_id"].astype(str)
    sub = sub.set_index("sample_id")
    rows = []
    for s in ids:
        ok = s in sub.index and np.isfinite(float(sub.loc[s, "value"]))
        rows.append(
            {
                "sample_id": s,
                "readout": r.name,
                "value": float(sub.loc[s, "value"]) if ok else np.nan,
                "n_cells": int(sub.loc[s, "n_cells"]) if s in sub.index else 0,
                "reason": "" if ok else "no value from the stage that computes it (DA, ccc)",
            }
        )
    return rows
