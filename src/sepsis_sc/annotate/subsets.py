"""Level 2 of the annotation: the subset of each cell within its lineage.

Subset sets are scored like lineage sets but only against the sibling subsets of the cell's
lineage, on the lineage's own re-embedding (its HVGs + PCA + kNN; Leiden clusters for the
per-gene baselines) or the annotation clusters. A per-set baseline (the lowest cluster mean
of each gene inside the lineage) is removed first; two-group gates (CD4 vs CD8 T) mask the
losing side; weak evidence gets the lineage's ``default_subset``. :func:`call_subsets` is the
entry point used by :func:`sepsis_sc.annotate.annotate`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from sepsis_sc.annotate.lineage import (
    Clusters,
    LineageCalls,
    MarkerExpression,
    leiden_labels,
    max_by_target,
    top2,
    weight_matrix,
)
from sepsis_sc.annotate.markers import UNASSIGNED, Vocabulary
from sepsis_sc.data import log_normalise
from sepsis_sc.store import CountSource

logger = logging.getLogger(__name__)

__all__ = [
    "call_subsets",
    "SubsetCalls",
    "SUBSET_SOURCES",
    "LINEAGE_HVG_CELLS",
    "GATE_UNDETERMINED",
    "GATE_GENES_ABSENT",
]

#: lineages with more cells choose their re-embedding HVGs on a seeded sample of this many
LINEAGE_HVG_CELLS = 50_000


def _hvg_columns(
    counts: CountSource, idx: np.ndarray, var_names: pd.Index, hvg_var: pd.DataFrame
) -> AnnData:
    """Rows ``idx`` of ``counts``, log1p(CP10k) with size factors from all genes, in the HVG
    columns of ``hvg_var`` only (its ``highly_variable`` genes), as an AnnData for the PCA."""
    from anndata.utils import make_index_unique

    genes = hvg_var.index[hvg_var["highly_variable"].to_numpy(dtype=bool)]
    unique = make_index_unique(pd.Index(var_names))  # the names the HVG table carries
    cols = np.sort(unique.get_indexer(genes))
    totals = counts.totals[idx]
    x = sp.csr_matrix(counts.columns(cols)[idx], dtype=np.float32)
    scale = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    x = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ x)
    x.data = np.log1p(x.data)
    var = pd.DataFrame({"highly_variable": True}, index=unique[cols])
    return AnnData(X=x, var=var)


def _lineage_graph(
    counts: CountSource,
    var_names: pd.Index,
    idx: np.ndarray,
    *,
    resolution: float,
    n_neighbors: int,
    seed: int,
    min_cells: int,
    n_top_genes: int = 500,
    n_pcs: int = 20,
    max_hvg_cells: int | None = None,
) -> Clusters | None:
    """Re-embedding of one lineage's cells on their own HVGs and PCA (issue #16 item 1).

    Subsets differ in a few genes that a whole-PBMC embedding spends little variance on (CD4
    vs CD8 T, naive vs memory); the lineage's own 500 most variable genes put them on top.
    Returns Leiden clusters (for per-gene baselines) and the row-normalised kNN graph (for
    smoothing scores over each cell's neighbours, which survives RNA dropout of CD4 / CD8A
    better than cluster means). ``None`` for lineages with fewer than ``min_cells`` cells.
    """
    import scanpy as sc

    from sepsis_sc.cluster import neighbors

    if idx.size < min_cells:
        return None
    # HVGs from at most max_hvg_cells of the lineage (all of them below that); above it a
    # seeded sample picks the genes and the PCA reads only their columns for every cell, so
    # a lineage of 400,000 cells never holds copies of its counts (atlas scale)
    pick = idx
    max_hvg_cells = max_hvg_cells or LINEAGE_HVG_CELLS
    if idx.size > max_hvg_cells:
        pick = np.sort(np.random.default_rng(seed).choice(idx, max_hvg_cells, replace=False))
    # a row selection is a new matrix already: normalising it in place leaves counts alone
    work = AnnData(X=counts.rows(pick), var=pd.DataFrame(index=var_names.astype(str)))
    work.var_names_make_unique()
    log_normalise(work)
    work = work[:, np.asarray((work.X > 0).sum(axis=0)).ravel() >= 3].copy()
    sc.pp.highly_variable_genes(work, n_top_genes=int(min(n_top_genes, work.n_vars)))
    if pick is not idx:
        work = _hvg_columns(counts, idx, pd.Index(var_names.astype(str)), work.var)
    n_comps = int(max(2, min(n_pcs, work.n_obs - 1, int(work.var["highly_variable"].sum()) - 1)))
    sc.pp.pca(work, n_comps=n_comps, mask_var="highly_variable", random_state=seed)
    neighbors(work, n_neighbors=int(min(n_neighbors, work.n_obs - 1)), use_rep="X_pca", seed=seed)
    leiden_labels(work, resolution, seed)
    C = sp.csr_matrix(work.obsp["connectivities"] + sp.eye(work.n_obs, format="csr"))
    D = sp.csr_matrix(sp.diags(1.0 / np.asarray(C.sum(axis=1)).ravel()) @ C)
    return Clusters.from_labels(work.obs["_oc"].to_numpy(), "lineage re-embedding", knn=D)


def _per_detection(module: np.ndarray, local: Clusters, min_size: int = 10) -> np.ndarray:
    """A gate module divided by its mean in the lineage cluster where it is highest: what a
    pure population of that side shows, so a side whose genes are detected less often (CD4
    and CD40LG in fewer CD4 T cells than CD8A / CD8B in CD8 T cells) weighs the same in a
    mixed neighbourhood, and T cells without side UMIs no longer drift to the better-detected
    side (issue #32)."""
    big = local.sizes >= min_size
    if not big.any():
        return module
    means = np.asarray(local.G @ module).ravel()[big]
    top = float(means.max()) if means.size else 0.0
    return module / top if top > 0 else module


def _undecidable(gate: Mapping[str, Any], expr: MarkerExpression) -> bool:
    """A gate one of whose sides has none of its genes in the data (a panel without CD4 /
    CD40LG or without CD8A / CD8B): it cannot be decided."""
    return any(not [g for g in grp["up"] if g in expr.gene_order] for grp in gate["groups"])


GATE_UNDETERMINED = "undetermined"
GATE_GENES_ABSENT = "genes_absent"

#: why a cell got its subset (``obs["annotation_subset_source"]``); the lineage's own reason
#: stays in ``obs["annotation_source"]``
SUBSET_SOURCES = {
    "markers": "its subset's markers won against the sibling subsets",
    "coarse_markers": (
        "a gate's genes are absent (CD4 / CD8A / CD8B), so its markers were read at the coarser "
        "level (naive T vs memory T)"
    ),
    "default_subset": "weak subset evidence: the lineage's default subset",
    "unresolved_subset": "weak subset evidence: the lineage's '<lineage> unresolved' label",
    "genes_absent": (
        "the genes that tell the lineage's subsets apart are not in the data: it keeps its "
        "lineage call"
    ),
    "single_subset": "the lineage has one subset",
    "none": "no lineage (Unassigned)",
}


def _apply_gates(
    R: np.ndarray,
    scored: list[str],
    V_l: sp.csr_matrix,
    local: Clusters,
    gates: Sequence[Mapping[str, Any]],
    expr: MarkerExpression,
    cluster_weight: float,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Mask subsets of the losing side of a two-group gate (e.g. CD4 vs CD8 T; issue #16).

    Each group's module score (mean scaled expression of its genes, e.g. CD4 + CD40LG vs
    CD8A + CD8B), smoothed over the lineage's neighbourhood, decides the group; the other
    group's subsets are pushed down by 10. Cells with no evidence either way keep all subsets.
    Gates that cannot be decided (:func:`_undecidable`) are left to :func:`_collapse`.

    Also returns, per gate name, the side each cell of the lineage was given (the group's
    ``name``, :data:`GATE_UNDETERMINED` without evidence either way, or
    :data:`GATE_GENES_ABSENT` when one side's genes are not in the data), whatever subset
    the cell is called in the end: a MAIT or gamma-delta T cell, or a ``T unresolved`` one,
    still has a co-receptor side.
    """
    R = R.copy()
    col = {lab: k for k, lab in enumerate(scored)}
    sides: dict[str, np.ndarray] = {}
    for gate in gates:
        side = np.full(R.shape[0], GATE_GENES_ABSENT, dtype=object)
        sides[gate["name"]] = side
        if _undecidable(gate, expr):
            continue
        mods = [
            [expr.gene_order[g] for g in grp["up"] if g in expr.gene_order]
            for grp in gate["groups"]
        ]
        m = [_per_detection(np.asarray(V_l[:, g].mean(axis=1)).ravel(), local) for g in mods]
        d = local.smooth((m[0] - m[1])[:, None], cluster_weight).ravel()
        side[:] = np.where(
            d > 0,
            gate["groups"][0]["name"],
            np.where(d < 0, gate["groups"][1]["name"], GATE_UNDETERMINED),
        )
        for sign, grp in ((1, gate["groups"][1]), (-1, gate["groups"][0])):
            lose = [col[lab] for lab in grp["cell_types"] if lab in col]
            if lose:
                R[np.ix_(sign * d > 0, lose)] -= 10.0
    return R, sides


def _collapse(
    A: np.ndarray,
    R: np.ndarray,
    scored: list[str],
    gates: Sequence[Mapping[str, Any]],
    coarse: Mapping[str, str],
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Resolve what the genes allow (issue #32 item 3): the subsets of undecidable gates are
    merged into their ``coarse`` labels (CD4 / CD8 naive -> naive T CL:0000898, CD4 / CD8
    memory -> memory T CL:0000813), each scoring the best of its members, so T cells of a
    panel without CD4 / CD8 genes still get naive vs memory; subsets without a coarse label
    (Treg, MAIT, gamma-delta T) stay as they are."""
    gated = {lab for g in gates for grp in g["groups"] for lab in grp["cell_types"]}
    target = [coarse.get(lab, lab) if lab in gated else lab for lab in scored]
    out = list(dict.fromkeys(target))
    A_c = np.full((A.shape[0], len(out)), -np.inf)
    R_c = np.full((R.shape[0], len(out)), -np.inf)
    for k, lab in enumerate(target):
        j = out.index(lab)
        A_c[:, j] = np.maximum(A_c[:, j], A[:, k])
        R_c[:, j] = np.maximum(R_c[:, j], R[:, k])
    return A_c, R_c, out


def _label(table: pd.DataFrame, row: str, column: str) -> str | None:
    if column not in table.columns:
        return None
    value = table.at[row, column]
    return value if isinstance(value, str) and value else None


def _default_is_a_guess(
    default: str | None, scored: list[str], labels: list[str], unresolved: str | None
) -> bool:
    """A program-free default (Classical monocyte, NK CD56dim) is a guess when no other
    subset of the lineage can be scored: nothing could have told the cells apart."""
    if default is None or unresolved is None or _is_unresolved(default):
        return False
    others = [lab for lab in labels if lab not in (default, unresolved)]
    return bool(others) and not any(lab in scored for lab in others)


def _is_unresolved(label: str | None) -> bool:
    return label is not None and label.endswith(" unresolved")


def _subset_scores(
    V_l: sp.csr_matrix,
    local: Clusters,
    sets_l: Sequence[Mapping[str, Any]],
    W_l: np.ndarray,
    scored: list[str],
    *,
    min_cluster_size: int,
    cluster_weight: float,
    subset_cluster_weight: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Absolute (``A``) and baseline-removed (``R``) subset scores, cluster-smoothed.

    The baseline is the lowest cluster mean of each gene inside the lineage (>= 2 sizeable
    clusters), so genes every cell of the lineage expresses do not favour the sets listing them.
    """
    A_sets = np.asarray(V_l @ W_l)
    big = local.sizes >= min_cluster_size
    if big.sum() >= 2:
        gmeans = np.asarray((local.G @ V_l).todense())[big]
        offset = gmeans.min(axis=0) @ W_l
    else:
        offset = np.zeros(W_l.shape[1], dtype=np.float32)
    ids = list(range(len(sets_l)))
    A = local.smooth(max_by_target(A_sets, sets_l, ids, scored), subset_cluster_weight)
    R = local.smooth(max_by_target(A_sets - offset, sets_l, ids, scored), cluster_weight)
    return A, R


def _subset_graph(
    counts: CountSource,
    var_names: pd.Index,
    idx: np.ndarray,
    clusters: Clusters,
    p: Mapping[str, Any],
) -> tuple[Clusters, str]:
    """The graph a lineage's subsets are called on, and its description: the lineage's own
    re-embedding (HVGs + PCA + kNN, Leiden baselines) when ``subset_reembed`` and the lineage
    is large enough, else the annotation clusters restricted to its cells."""
    if p["subset_reembed"]:
        local = _lineage_graph(
            counts,
            var_names,
            idx,
            resolution=p["subset_resolution"],
            n_neighbors=p["subset_n_neighbors"],
            seed=p["seed"],
            min_cells=p["subset_min_cells"],
        )
        if local is not None:
            return local, "own HVGs + PCA: kNN smoothing, Leiden baselines"
    return Clusters.from_labels(clusters.codes[idx].astype(str), clusters.source), clusters.source


def _subset_calls(
    A: np.ndarray,
    R: np.ndarray,
    scored: list[str],
    default: str | None,
    p: Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best subset per cell, its confidence (margin over the runner-up) and why
    (:data:`SUBSET_SOURCES`); weak evidence takes the lineage's default subset."""
    s_arg, s_best, s_second = top2(R)
    call = np.array(scored, dtype=object)[s_arg]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (s_best - s_second) / (np.abs(s_best) + np.abs(s_second))
    q = np.clip(np.nan_to_num(q, nan=0.0, posinf=1.0), 0.0, 1.0)
    if len(scored) == 1 and default is None:
        q = np.ones_like(q)
    why = np.full(call.size, "markers", dtype=object)
    if default is not None:
        floor = p["unresolved_min_score"] if _is_unresolved(default) else p["subset_min_score"]
        a_best = A[np.arange(call.size), s_arg]
        weak = (call != default) & (a_best < floor)
        call[weak] = default
        q[weak] = np.clip(1.0 - a_best[weak] / floor, 0.0, 1.0)
        why[weak] = "unresolved_subset" if _is_unresolved(default) else "default_subset"
    return call, q, why


@dataclass
class SubsetCalls:
    """Level-2 result: ``cell_type`` per cell, its subset confidence ``quality``, the
    per-set coverage ``report``, how each lineage's subsets were clustered (``clusters``)
    and, per two-group gate, the side each cell of the gate's lineage was given
    (``gate_sides``; ``None`` outside the lineage) and why each cell got its subset
    (``source``, :data:`SUBSET_SOURCES`)."""

    cell_type: np.ndarray
    quality: np.ndarray
    report: list[dict[str, Any]]
    clusters: dict[str, str]
    gate_sides: dict[str, np.ndarray]
    source: np.ndarray


def call_subsets(
    expr: MarkerExpression,
    lin: LineageCalls,
    mk: Mapping[str, Any],
    vocab: Vocabulary,
    clusters: Clusters,
    counts: CountSource,
    var_names: pd.Index,
    p: Mapping[str, Any],
) -> SubsetCalls:
    """Level 2: subset within each lineage, on the lineage's own clusters; weak evidence gets
    the lineage's default subset (a program-free state or an explicit ``<lineage> unresolved``).
    """
    sets = mk["subset_sets"]
    W, kept, report = weight_matrix(
        sets, expr.gene_pos, expr.gene_order, p["down_weight"], p["min_genes"]
    )
    n = lin.call.size
    cell_type = np.full(n, UNASSIGNED, dtype=object)
    q_sub = np.ones(n, dtype=np.float64)
    why = np.full(n, "none", dtype=object)
    sub_source: dict[str, str] = {}
    gate_sides: dict[str, np.ndarray] = {}
    for lineage in vocab.lineages.index:
        idx = np.flatnonzero(lin.call == lineage)
        if idx.size == 0:
            continue
        labels = vocab.subsets_of(lineage)
        default = vocab.lineages.at[lineage, "default_subset"]
        set_idx = [j for j in kept if sets[j]["target"] in labels]
        scored = list(dict.fromkeys(sets[j]["target"] for j in set_idx))
        unresolved = _label(vocab.lineages, lineage, "unresolved")
        if len(labels) == 1:
            cell_type[idx] = labels[0]
            why[idx] = "single_subset"
            continue
        if not scored or _default_is_a_guess(default, scored, labels, unresolved):
            # without the genes that tell its subsets apart a lineage keeps its lineage call
            cell_type[idx] = unresolved or default or labels[0]
            for gate in mk.get("subset_gates", []):
                if gate["lineage"] == lineage:
                    gate_sides.setdefault(gate["name"], np.full(n, None, dtype=object))[idx] = (
                        GATE_GENES_ABSENT
                    )
            why[idx] = "genes_absent"
            logger.warning(
                "lineage %s: the genes that tell its subsets apart are not in the data; its "
                "cells get %s",
                lineage,
                cell_type[idx[0]],
            )
            continue
        local, sub_source[lineage] = _subset_graph(counts, var_names, idx, clusters, p)
        A, R = _subset_scores(
            expr.V[idx],
            local,
            [sets[j] for j in set_idx],
            W[:, set_idx],
            scored,
            min_cluster_size=p["min_cluster_size"],
            cluster_weight=p["cluster_weight"],
            subset_cluster_weight=p["subset_cluster_weight"],
        )
        gates = [g for g in mk.get("subset_gates", []) if g["lineage"] == lineage]
        R, sides = _apply_gates(R, scored, expr.V[idx], local, gates, expr, p["cluster_weight"])
        for name, side in sides.items():
            gate_sides.setdefault(name, np.full(n, None, dtype=object))[idx] = side
        stuck = [g for g in gates if _undecidable(g, expr)]
        if stuck:
            coarse = vocab.cell_types["coarse"].dropna().to_dict()
            A, R, scored = _collapse(A, R, scored, stuck, coarse)
            logger.warning(
                "gate %s: genes of one side absent from the data; its subsets fall back to "
                "their coarser labels (%s)",
                ", ".join(g["name"] for g in stuck),
                ", ".join(sorted({coarse[x] for x in coarse if vocab.lineage_of(x) == lineage})),
            )
        call, q, why[idx] = _subset_calls(A, R, scored, default, p)
        if stuck:
            why[idx] = np.where(why[idx] == "markers", "coarse_markers", why[idx])
        cell_type[idx] = call
        q_sub[idx] = q
    return SubsetCalls(cell_type, q_sub, report, sub_source, gate_sides, why)
