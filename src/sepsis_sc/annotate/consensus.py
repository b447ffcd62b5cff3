"""Two opinions, one label (issue #32 item 2): the marker route and the reference classifier.

Per cell, with ``m`` the marker lineage (:func:`sepsis_sc.annotate.lineage.call_lineages`)
and ``r`` the reference lineage (:func:`sepsis_sc.annotate.correlation.classify`), and
"supported" meaning that no specific evidence contradicts a lineage
(:func:`sepsis_sc.annotate.specific.supported`: genes that separate it from a competitor):

* ``agree`` -- ``m == r``: two opinions, one over hundreds of genes, the label stands,
  confidence ``1 - (1 - c_m) * (1 - c_r)``;
* ``not_in_reference`` -- ``m`` is a lineage the reference has no profile of (neutrophils,
  platelets ...): the marker call stands, confidence unchanged;
* ``reference_only`` -- the markers left the cell Unassigned for weak or ambiguous evidence
  (not a decoy such as basophils), ``r`` is supported and the reference margin reaches
  ``min_delta``: ``r`` (``reference:marker_unassigned``), confidence ``c_r / 2``;
* ``disagree`` -- ``m != r``, both reference lineages. The marker call stands when it is
  supported and its specific genes against ``r`` outweigh those of ``r`` in the cell or in
  its neighbourhood (``max(own, smoothed D(m, r)) >= disagree_margin``; a pair without
  specific genes in the data cannot be weighed and keeps the marker call), confidence
  ``c_m * (1 - c_r) / 2``. Else ``r`` when the marker call is contradicted (not
  supported: it rested on genes the two lineages share, the case of issue #32) while ``r``
  is supported, its specific genes lead by ``disagree_margin`` and its margin reaches
  ``min_delta`` (``reference:disagreement``), confidence ``c_r * (1 - c_m) / 2``. Else
  ``Unassigned`` (``consensus:disagreement``): two opinions that neither side's specific
  genes can settle give no label;
* ``unassigned`` -- neither opinion gives a label; ``no_reference`` -- no reference opinion
  (mouse data, too few reference genes, or switched off).

``c_r`` is the reference's lineage margin scaled to 0-1 (``min(1, lineage_delta / 0.1)``:
the best correlation of the chosen lineage's labels over that of any other lineage).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sepsis_sc.annotate.correlation import Opinion
from sepsis_sc.annotate.lineage import LineageCalls
from sepsis_sc.annotate.markers import UNASSIGNED
from sepsis_sc.annotate.specific import PairEvidence, supported

logger = logging.getLogger(__name__)

__all__ = ["Consensus", "combine", "agreement_table", "opinion_table", "AGREEMENT_LEVELS"]

AGREEMENT_LEVELS = (
    "agree",
    "disagree",
    "reference_only",
    "not_in_reference",
    "unassigned",
    "no_reference",
)


@dataclass
class Consensus:
    """Final lineage calls (``lin``), the agreement of each cell and the confidence."""

    lin: LineageCalls
    agreement: np.ndarray
    confidence: np.ndarray


def combine(
    lin: LineageCalls,
    opinion: Opinion,
    ev: PairEvidence | None,
    *,
    min_delta: float = 0.02,
    disagree_margin: float = 0.05,
    tol: float = 0.1,
) -> Consensus:
    """Combine the marker calls with the reference opinion (rules in the module docstring)."""
    m = lin.call.astype(object)
    r = opinion.lineage.astype(object)
    ref_lins = set(opinion.known) or set(opinion.lineage)
    c_m = lin.quality.astype(np.float64)
    margin = opinion.lineage_delta if opinion.lineage_delta is not None else opinion.delta
    c_r = np.clip(margin / 0.1, 0.0, 1.0)
    call = m.copy()
    source = lin.source.copy()
    conf = c_m.copy()
    agreement = np.full(m.size, "unassigned", dtype=object)

    def d_best(a: np.ndarray, b: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """D(a, b) of each cell of ``rows`` or of its neighbourhood, whichever is higher;
        +inf where the pair has no specific genes in the data (nothing to weigh)."""
        out = np.zeros(rows.size)
        if ev is None:
            return out + np.inf
        for i, x in enumerate(ev.lineages):
            for j, y in enumerate(ev.lineages):
                sel = np.flatnonzero((a == x) & (b == y))
                if i == j or not sel.size:
                    continue
                if not (ev.genes[(x, y)] or ev.genes[(y, x)]):
                    out[sel] = np.inf
                else:
                    cells = rows[sel]
                    out[sel] = np.maximum(ev.own[cells, i, j], ev.smoothed[cells, i, j])
        return out

    agree = (m == r) & (m != UNASSIGNED)
    agreement[agree] = "agree"
    conf[agree] = 1.0 - (1.0 - c_m[agree]) * (1.0 - c_r[agree])

    outside = (m != UNASSIGNED) & ~np.isin(m, list(ref_lins))
    agreement[outside] = "not_in_reference"
    weak = (m == UNASSIGNED) & np.isin(
        lin.source, ["markers:unassigned_low_score", "markers:unassigned_ambiguous"]
    )
    rows = np.flatnonzero(weak & (margin >= min_delta))
    take = rows if ev is None else rows[supported(ev, r[rows], rows, tol)]
    call[take] = r[take]
    source[take] = "reference:marker_unassigned"
    conf[take] = c_r[take] / 2
    agreement[take] = "reference_only"
    dis = np.flatnonzero((m != r) & (m != UNASSIGNED) & np.isin(m, list(ref_lins)))
    agreement[dis] = "disagree"
    if ev is None:
        sup_m = np.ones(dis.size, dtype=bool)
        sup_r = np.ones(dis.size, dtype=bool)
    else:
        sup_m = supported(ev, m[dis], dis, tol)
        sup_r = supported(ev, r[dis], dis, tol)
    keep = sup_m & (d_best(m[dis], r[dis], dis) >= disagree_margin)
    to_r = (
        ~sup_m
        & sup_r
        & (d_best(r[dis], m[dis], dis) >= disagree_margin)
        & (margin[dis] >= min_delta)
    )
    conf[dis[keep]] = c_m[dis[keep]] * (1.0 - c_r[dis[keep]]) / 2
    call[dis[to_r]] = r[dis[to_r]]
    source[dis[to_r]] = "reference:disagreement"
    conf[dis[to_r]] = c_r[dis[to_r]] * (1.0 - c_m[dis[to_r]]) / 2
    drop = dis[~keep & ~to_r]
    call[drop] = UNASSIGNED
    source[drop] = "consensus:disagreement"
    conf[call == UNASSIGNED] = 0.0
    logger.info(
        "consensus: %s",
        ", ".join(f"{k} {int((agreement == k).sum())}" for k in AGREEMENT_LEVELS),
    )
    out = LineageCalls(call, source, conf, lin.scores, lin.targets, lin.report)
    return Consensus(out, agreement, np.clip(conf, 0.0, 1.0))


def agreement_table(
    marker: np.ndarray,
    reference: np.ndarray,
    final: np.ndarray,
    agreement: np.ndarray,
) -> pd.DataFrame:
    """One row per (marker lineage, reference label): cells, the agreement and the final
    lineage they got (the table ``annotate/agreement.tsv``)."""
    df = pd.DataFrame(
        {
            "marker_lineage": marker.astype(str),
            "reference_label": reference.astype(str),
            "agreement": agreement.astype(str),
            "final_lineage": final.astype(str),
        }
    )
    out = (
        df.groupby(
            ["marker_lineage", "reference_label", "agreement", "final_lineage"], observed=True
        )
        .size()
        .rename("n_cells")
        .reset_index()
        .sort_values("n_cells", ascending=False, ignore_index=True)
    )
    out["share"] = (out["n_cells"] / max(len(df), 1)).round(4)
    return out


def opinion_table(uns: Mapping[str, Any]) -> pd.DataFrame:
    """The agreement of the two opinions from ``uns["annotation"]`` (what
    :func:`sepsis_sc.annotate.annotate` recorded), for ``annotate/agreement.tsv``: one row per
    (marker lineage, reference label, agreement, final lineage), or one row saying why there
    was no reference opinion."""
    ref = uns.get("reference") or {}
    if not ref.get("used"):
        reason = ref.get("reason") or (
            "no reference profiles (annotation.reference_profiles null, or a non-human organism)"
        )
        return pd.DataFrame({"agreement": ["no_reference"], "reason": [str(reason)]})
    return pd.DataFrame({k: np.asarray(v) for k, v in ref["agreement"].items()})
