"""Trajectories of donors sampled more than once (e.g. T0 / T6): :func:`trajectories`."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["trajectories"]


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
