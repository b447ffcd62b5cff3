"""The sample-level metrics of a state, and which one is its pre-specified readout.

* :data:`EFFECT_TYPE` and :data:`METRIC_UNIT`: what each metric's effect size is, in words
  (tables and figure axes);
* :func:`primary_metrics`: the primary metric of each state, fixed before looking at the
  data (``primary_metric`` in ``resources/therapy_targets.yaml``, :func:`load_targets`);
  :func:`primary_rows`: a state's primary row(s) of an effects table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from sepsis_sc.resources import load_yaml, resource_path
from sepsis_sc.score import base_state

#: the unit of each metric's effect (the ``unit`` column of effects and targets tables)
METRIC_UNIT = {
    "fraction": "log2 ratio",
    "mean_score": "score difference (UCell)",
    "pseudobulk_score": "score difference (UCell)",
    "pseudobulk_expression": "log2 CPM difference",
}

#: what each metric's effect size is, in words (tables and figure axes)
EFFECT_TYPE = {
    "fraction": "log2 ratio of geometric-mean fractions (case/control)",
    "mean_score": "difference in mean score (case - control)",
    "pseudobulk_score": "difference in mean pseudobulk score (case - control)",
    "pseudobulk_expression": "difference in pseudobulk log2 CPM, up - down genes (case - control)",
}


def load_targets(targets: Mapping[str, Any] | str | Path | None) -> Mapping[str, Any]:
    """The therapy-target entries: as given, from a YAML path, or the packaged resource."""
    if targets is None or isinstance(targets, str | Path):
        return load_yaml(Path(targets) if targets else resource_path("therapy_targets.yaml"))
    return targets


def primary_metrics(
    states: Sequence[str],
    discrete: Mapping[str, bool] | None = None,
    targets: Mapping[str, Any] | str | Path | None = None,
) -> dict[str, str]:
    """The pre-specified primary sample-level metric of each state.

    From ``primary_metric`` in ``resources/therapy_targets.yaml`` (or ``targets``); a
    stratified state (``cytokine_storm.monocyte``) takes its base state's entry; a state
    without an entry takes ``fraction`` when it has discrete calls, else ``mean_score``. The
    primary metric is fixed before looking at the data: FDR is taken over the primary tests,
    and no other metric replaces it when it is missing (no metric shopping).
    """
    targets = load_targets(targets)
    discrete = discrete or {}
    out = {}
    for s in states:
        t = targets.get(s) or targets.get(base_state(s)) or {}
        out[s] = str(
            t.get("primary_metric") or ("fraction" if discrete.get(s, False) else "mean_score")
        )
    return out


def primary_rows(sub: pd.DataFrame, t: Mapping[str, Any]) -> pd.DataFrame:
    """One state's pre-specified primary row(s) of ``effects``: ``role == "primary"``, or
    (tables without roles) the metric its therapy-target entry ``t`` names. The one
    definition of a state's readout, shared by :func:`therapy_targets` and the demo check."""
    if "role" in sub:
        return sub[sub["role"] == "primary"]
    return sub[sub["metric"] == (t.get("primary_metric") or t.get("metric", "mean_score"))]
