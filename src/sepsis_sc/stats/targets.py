"""The ranked therapy-target summary: :func:`therapy_targets`.

Each state's pre-specified primary effect (:func:`sepsis_sc.stats.metrics.primary_rows`) is
classified against the therapeutic idea behind it (``resources/therapy_targets.yaml``):
supported, opposite, not significant or not tested. Hypotheses for follow-up, not
treatment advice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sepsis_sc.config import StatsSettings
from sepsis_sc.score import base_state
from sepsis_sc.stats.metrics import METRIC_UNIT, load_targets, primary_rows

logger = logging.getLogger(__name__)


def therapy_targets(
    effects: pd.DataFrame,
    settings: StatsSettings | None = None,
    *,
    targets: Mapping[str, Any] | str | Path | None = None,
    nhoods: pd.DataFrame | None = None,
    axes: pd.DataFrame | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Rank the therapeutic ideas behind each state by the evidence in ``effects``.

    For each state with an entry in ``resources/therapy_targets.yaml`` (or ``targets``; a
    stratified state such as ``cytokine_storm.monocyte`` uses its base state's entry and gets
    one row per stratum), the state's **primary** row of ``effects`` (``role == "primary"``:
    the metric fixed in advance by ``primary_metric``, see :func:`primary_metrics`) is
    classified as ``supported`` (FDR <= alpha in the target direction), ``opposite`` (FDR <=
    alpha, other direction), ``not significant`` or ``not tested``; when the primary metric
    could not be computed the row says ``not tested`` and no other metric stands in for it.

    The table reads per therapy, not per stratum: every row has a ``group`` (a state's base
    state, e.g. all ``ifn_response.*`` strata under ``ifn_response``; a therapy axis under the
    first of its ``states``; an unexplained DA change on its own), groups are ordered by their
    best row and, within a group, tested rows come first. Rows are ranked by evidence
    (supported first), then FDR, then the size of the effect relative to its CI width.

    Parameters
    ----------
    effects
        Output of :func:`condition_effects`.
    settings
        The config's ``stats`` section (:class:`~sepsis_sc.config.StatsSettings`), its fields
        overridden by keyword (``**overrides``); used here: ``alpha``, the FDR level.
    targets
        Mapping ``state -> {target_direction, primary_metric, therapy, rationale, caveat,
        references}``, a YAML path, or None for the packaged resource.
    nhoods
        The neighbourhood DA table of the same contrast (:func:`sepsis_sc.da.explain_nhoods`):
        significant neighbourhoods that no named cell type or state explains add a row
        ``unexplained_expansion`` / ``unexplained_depletion`` (evidence ``unnamed change``),
        so a reader sees that something no signature names moved.
    axes
        The therapy-axis tests of the same contrast (:func:`sepsis_sc.ccc.test_axes`): one
        row per axis (``state`` ``axis:<name>``, metric ``lr_means``, its own evidence for
        its therapy), listed under its first state's group, with ``context``: the evidence of
        the states of its source and target cells in this table.

    Returns
    -------
    pandas.DataFrame
        ``rank``, ``state``, ``label``, ``therapy``, ``evidence``, ``metric``, ``unit``,
        ``effect``, ``ci_low``, ``ci_high``, ``fdr``, ``direction``, ``target_direction``,
        ``rationale``, ``caveat`` (what a blood readout cannot say), ``references``,
        ``meaning``, ``kind`` (``state``, ``axis`` or ``unnamed``), ``group``, ``context``.
        Hypotheses for follow-up, not treatment advice.
    """
    alpha = (settings or StatsSettings()).with_overrides(overrides).alpha
    targets = load_targets(targets)
    rows = []
    bases = effects["state"].map(base_state)
    for base, t in targets.items():
        # a stratified state gives one row per stratum (cytokine_storm.monocyte, ...)
        for state, sub in effects[bases == base].groupby("state", sort=False):
            rows.append(_target_row(str(state), t, sub, alpha))
    for r in rows:
        r.update(kind="state", group=base_state(r["state"]), context="")
    if nhoods is not None:
        rows += [
            {**r, "kind": "unnamed", "group": r["state"], "context": ""}
            for r in unexplained_rows(nhoods)
        ]
    if axes is not None and not axes.empty:
        rows += axis_rows(axes, rows)
    out = pd.DataFrame(rows)
    if out.empty:
        logger.warning("no state in effects has a therapy-target entry")
        return out
    return _rank_by_group(out)


#: evidence in rank order
EVIDENCE_ORDER = {
    "supported": 0,
    "unnamed change": 1,
    "opposite": 2,
    "not significant": 3,
    "not tested": 4,
}


def _rank_by_group(out: pd.DataFrame) -> pd.DataFrame:
    """Rows ranked within their group (evidence, FDR, strength), groups by their best row."""
    out = out.copy()
    out["_ev"] = out["evidence"].map(EVIDENCE_ORDER)
    out["_fdr"] = out["fdr"].fillna(2.0)
    out = out.sort_values(["_ev", "_fdr", "_strength"], ascending=[True, True, False])
    first = {g: i for i, g in reversed(list(enumerate(out["group"])))}
    out["_g"] = out["group"].map(first)
    out = out.sort_values("_g", kind="stable")
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out.drop(columns=["_ev", "_fdr", "_strength", "_g"]).reset_index(drop=True)


def axis_rows(axes: pd.DataFrame, state_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Therapy-table rows of the therapy axes (:func:`sepsis_sc.ccc.test_axes`), each under
    the first of its states that has rows here (else its own group), with the evidence of
    its source and target cells' states as ``context``."""
    by_base: dict[str, list[str]] = {}
    for r in state_rows:
        by_base.setdefault(r["group"], []).append(f"{r['state']}: {r['evidence']}")
    rows = []
    for a in axes.itertuples(index=False):
        states = [s.strip() for s in str(a.states).split(",") if s.strip()]
        group = next((s for s in states if s in by_base), f"axis:{a.axis}")
        effect = float(a.effect)
        width = float(a.ci_high) - float(a.ci_low)
        rows.append(
            {
                "state": f"axis:{a.axis}",
                "label": f"{a.label} (axis)",
                "therapy": a.therapy,
                "evidence": a.evidence,
                "metric": "lr_means",
                "unit": "difference in mean lr_means (log-normalised expression)",
                "effect": effect,
                "ci_low": float(a.ci_low),
                "ci_high": float(a.ci_high),
                "fdr": float(a.fdr),
                "direction": "" if pd.isna(a.direction) else a.direction,
                "target_direction": a.target_direction,
                "rationale": f"{a.pairs}, {a.source} -> {a.target}; trial: {a.trial}",
                "caveat": a.caveat,
                "references": a.references,
                "meaning": a.meaning,
                "kind": "axis",
                "group": group,
                "context": "; ".join(x for s in states for x in by_base.get(s, [])),
                "_strength": abs(effect) / width if np.isfinite(width) and width > 0 else 0.0,
            }
        )
    return rows


def _target_row(
    state: str, t: Mapping[str, Any], sub: pd.DataFrame, alpha: float
) -> dict[str, Any]:
    """One therapy-target row: the state's primary effect classified against the target."""
    r = _primary_effect(sub, t)
    want = str(t.get("target_direction", "up"))
    width = (r["ci_high"] - r["ci_low"]) if np.isfinite(r["ci_high"]) else np.nan
    return {
        "state": state,
        "label": r["label"],
        "therapy": t.get("therapy", ""),
        "evidence": _evidence(r, want, alpha),
        "metric": r["metric"],
        "unit": r.get("unit", METRIC_UNIT.get(str(r["metric"]), "")),
        "effect": r["effect"],
        "ci_low": r["ci_low"],
        "ci_high": r["ci_high"],
        "fdr": r["fdr"],
        "direction": r["direction"],
        "target_direction": want,
        "rationale": t.get("rationale", ""),
        "caveat": t.get("caveat", ""),
        "references": t.get("references", ""),
        "meaning": r["meaning"],
        "_strength": abs(r["effect"]) / width if width and np.isfinite(width) else 0.0,
    }


def _primary_effect(sub: pd.DataFrame, t: Mapping[str, Any]) -> pd.Series:
    """The state's primary row of ``effects``, or an untested stand-in when it is missing."""
    pref = primary_rows(sub, t)
    if not pref.empty:
        return pref.iloc[0]
    metric = str(t.get("primary_metric") or t.get("metric", ""))
    return pd.Series(
        {
            "label": sub["label"].iloc[0],
            "metric": metric,
            "effect": np.nan,
            "ci_low": np.nan,
            "ci_high": np.nan,
            "fdr": np.nan,
            "direction": "",
            "unit": METRIC_UNIT.get(metric, ""),
            "meaning": f"primary metric {metric!r} not computed for this state",
        }
    )


def _evidence(r: pd.Series, want: str, alpha: float) -> str:
    """``supported``, ``opposite``, ``not significant`` or ``not tested``."""
    if not np.isfinite(r["fdr"]):
        return "not tested"
    if r["fdr"] > alpha:
        return "not significant"
    if (r["effect"] > 0) == (want == "up"):
        return "supported"
    return "opposite"


def unexplained_rows(nhoods: pd.DataFrame) -> list[dict[str, Any]]:
    """Therapy-table rows for the significant DA neighbourhoods no named population or state
    explains (``nhoods["unexplained"]``), one per direction: how many, how large a change,
    and the cell types they hold."""
    from sepsis_sc.da import UNEXPLAINED

    rows = []
    if nhoods is None or nhoods.empty or "unexplained" not in nhoods:
        return rows
    for direction, readout in UNEXPLAINED.items():
        sub = nhoods[nhoods["unexplained"].astype(bool) & (nhoods["direction"] == direction)]
        if sub.empty:
            continue
        labels = sub["cell_type"].value_counts() if "cell_type" in sub else pd.Series(dtype=int)
        held = ", ".join(f"{lab} ({n})" for lab, n in labels.items())
        lfc = float(sub["log2fc"].median())
        rows.append(
            {
                "state": readout,
                "label": f"Unexplained {'expansion' if direction == 'expanded' else 'depletion'}",
                "therapy": "",
                "evidence": "unnamed change",
                "metric": "neighbourhood abundance",
                "unit": "log2 fold change (median over neighbourhoods)",
                "effect": lfc,
                "ci_low": np.nan,
                "ci_high": np.nan,
                "fdr": float(sub["spatial_fdr"].min()),
                "direction": direction,
                "target_direction": "",
                "rationale": (
                    f"{len(sub)} neighbourhood(s) of the integrated graph {direction} at spatial "
                    f"FDR <= the DA alpha that no tested cell type or called state explains; "
                    f"majority cell types: {held}"
                ),
                "caveat": (
                    "unnamed by design: look at the neighbourhoods' marker genes "
                    "(da/<contrast>/nhoods.tsv, their index cells) before naming a state"
                ),
                "references": "Dann et al. 2022 Nat Biotechnol (Milo); Reyes et al. 2020 Nat Med",
                "meaning": (
                    f"Cells in {len(sub)} neighbourhood(s) ({held}) are {direction} in this "
                    "contrast but no signature or label of the pipeline names them."
                ),
                "_strength": abs(lfc),
            }
        )
    return rows
