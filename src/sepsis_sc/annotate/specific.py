"""Calls from specific evidence (issue #32 item 1): a lineage only on genes that separate it
from its competitors.

A marker set lists genes a lineage expresses, not genes only it expresses: NK cells and
monocytes share TYROBP and FCER1G, cytotoxic T and NK cells NKG7 and GNLY. Once an assay
drops a lineage's own genes, the shared ones carry the call to the wrong lineage. Here the
specificity of every up gene of the lineage sets is read from data, the reference profiles
(:mod:`sepsis_sc.annotate.correlation`, mean expression per lineage over labelled real
PBMC): for a pair of lineages (a, b), the genes specific to a against b are a's up genes at
least ``min_lfc`` log1p(CP10k) units and ``min_ratio``-fold higher in a's mean profile than
in b's highest one (so NKG7, high in cytotoxic CD8 T cells, is no NK evidence against T).
Per cell,
``e(a|b)`` is the mean scaled expression of those genes and ``D(a, b) = e(a|b) - e(b|a)``
the pairwise evidence, cluster-smoothed like the lineage scores.

:func:`supported` tells whether any pair contradicts a lineage for a cell: against every
other reference lineage M whose pair has specific genes in the data, the cell's own
``D(L, M)`` must reach ``-own_tol`` and the smoothed one ``-tol``, so smoothing cannot turn a
cell's missing evidence into a call against its own genes. The consensus with the
reference opinion (:func:`sepsis_sc.annotate.consensus.combine`) keeps a contested marker
call only when it is supported and its specific genes lead; a call both opinions make
stands. Pairs with no specific genes in the data (a panel without MS4A1 / CD79A: B against
monocytes) cannot be judged and are skipped: there the marker sets' own negatives decide.
Lineages without reference profiles
(neutrophils, plasma cells, platelets, erythroid cells, progenitors, macrophages: no labelled
data for them here) are called by their marker sets alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sepsis_sc.annotate.correlation import ReferenceProfiles
from sepsis_sc.annotate.lineage import Clusters, MarkerExpression

logger = logging.getLogger(__name__)

__all__ = ["PairEvidence", "pairwise_evidence", "supported"]


@dataclass
class PairEvidence:
    """Pairwise specific evidence among ``lineages``: ``own`` and ``smoothed`` arrays of
    ``D(a, b)`` (cells x K x K) and the genes behind each ordered pair."""

    lineages: list[str]
    own: np.ndarray
    smoothed: np.ndarray
    genes: dict[tuple[str, str], list[str]]

    def index(self, lineage: str) -> int:
        return self.lineages.index(lineage)

    def table(self) -> pd.DataFrame:
        """One row per ordered pair: the genes specific to ``a`` against ``b``."""
        return pd.DataFrame(
            [
                {"lineage": a, "against": b, "n_genes": len(g), "genes": ",".join(g)}
                for (a, b), g in self.genes.items()
            ]
        )


def pairwise_evidence(
    expr: MarkerExpression,
    mk: Mapping[str, Any],
    ref: ReferenceProfiles,
    clusters: Clusters,
    *,
    cluster_weight: float,
    min_lfc: float = 0.5,
    min_ratio: float = 2.0,
) -> PairEvidence | None:
    """``D(a, b)`` for every pair of lineages that have marker sets and reference profiles.

    A gene is specific to ``a`` against ``b`` when ``a``'s mean profile exceeds the highest
    profile of ``b`` (any of its labels, any source: cytotoxic CD8 T cells for T) by
    ``min_lfc`` log1p(CP10k) units and is at least ``min_ratio`` times it (the difference
    alone would pass genes both express highly, the ratio alone noise at low levels).
    ``None`` when fewer than two lineages have both.
    """
    lineage_profiles = ref.lineage_profiles("mean")
    top = ref.lineage_profiles("max")
    up: dict[str, list[str]] = {}
    for s in mk["lineage_sets"]:
        if s["target"] in lineage_profiles.columns:
            up.setdefault(s["target"], [])
            up[s["target"]] += [g for g in s["up"] if g in expr.gene_order]
    lineages = [lin for lin in lineage_profiles.columns if up.get(lin)]
    if len(lineages) < 2:
        return None
    prof = lineage_profiles
    k = len(lineages)
    n = expr.V.shape[0]
    e = np.zeros((n, k, k), dtype=np.float32)
    genes: dict[tuple[str, str], list[str]] = {}
    for i, a in enumerate(lineages):
        for j, b in enumerate(lineages):
            if i == j:
                continue
            cand = [g for g in dict.fromkeys(up[a]) if g in prof.index]
            diff = prof.loc[cand, a] - top.loc[cand, b]
            ratio = prof.loc[cand, a] / np.maximum(top.loc[cand, b], 1e-3)
            sel = [
                g
                for g in cand
                if np.isfinite(diff[g]) and diff[g] >= min_lfc and ratio[g] >= min_ratio
            ]
            genes[(a, b)] = sel
            if sel:
                cols = [expr.gene_order[g] for g in sel]
                e[:, i, j] = np.asarray(expr.V[:, cols].mean(axis=1)).ravel()
    own = e - np.transpose(e, (0, 2, 1))
    flat = own.reshape(n, k * k)
    smoothed = clusters.smooth(flat, cluster_weight).reshape(n, k, k)
    thin = [f"{a}>{b}" for (a, b), g in genes.items() if not g]
    if thin:
        logger.info("no specific marker genes in the data for pairs: %s", ", ".join(thin))
    return PairEvidence(lineages, own, smoothed, genes)


def supported(
    ev: PairEvidence, lineage: np.ndarray, rows: np.ndarray, tol: float, own_tol: float = 0.3
) -> np.ndarray:
    """Cells (of ``rows``) whose ``lineage`` (one per row; lineages outside ``ev`` pass) no
    specific evidence contradicts: against every other reference lineage whose pair has
    specific genes in the data, smoothed ``D >= -tol`` and the cell's own ``D >= -own_tol``
    (one cell's few UMIs, ambient ones included, swing a mean of two or three genes by more
    than a neighbourhood's). Pairs without such genes cannot be judged and are skipped."""
    ok = np.ones(rows.size, dtype=bool)
    for i, x in enumerate(ev.lineages):
        sel = np.flatnonzero(lineage == x)
        if not sel.size:
            continue
        sub = rows[sel]
        for j, y in enumerate(ev.lineages):
            if i == j or not (ev.genes[(x, y)] or ev.genes[(y, x)]):
                continue
            bad = (ev.own[sub, i, j] < -own_tol) | (ev.smoothed[sub, i, j] < -tol)
            ok[sel[bad]] = False
    return ok
