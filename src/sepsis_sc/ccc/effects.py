"""Case vs control test of every therapy axis with donors as the units: :func:`test_axes`,
and the z of each sample's axis score against the controls: :func:`axis_z`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from sepsis_sc.ccc.axes import load_axes
from sepsis_sc.config import StatsSettings
from sepsis_sc.stats import condition_effects

__all__ = ["test_axes", "axis_z", "AXIS_METRIC", "AXES_COLUMNS"]

#: the metric name of an axis score in the effects machinery
AXIS_METRIC = "lr_means"

#: columns of :func:`test_axes`
AXES_COLUMNS = [
    "contrast",
    "axis",
    "label",
    "pairs",
    "source",
    "target",
    "mean_case",
    "mean_control",
    "effect",
    "ci_low",
    "ci_high",
    "pvalue",
    "fdr",
    "significant",
    "direction",
    "target_direction",
    "evidence",
    "therapy",
    "trial",
    "states",
    "test",
    "design",
    "n_case",
    "n_control",
    "n_pairs",
    "df",
    "prior_df",
    "meaning",
    "caveat",
    "references",
    "note",
]


def _effects_input(per_sample: pd.DataFrame, meta: pd.DataFrame | None) -> pd.DataFrame:
    """The axis scores in the long shape of :func:`sepsis_sc.stats.sample_table`."""
    tab = per_sample.copy()
    tab["sample_id"] = tab["sample_id"].astype(str)
    if meta is not None:
        m = meta.copy()
        m.index = m.index.astype(str)
        for col in ("condition", "donor"):
            if col in m:
                tab[col] = tab["sample_id"].map(m[col].astype(str))
    for col in ("condition", "donor"):
        if col not in tab:
            tab[col] = tab["sample_id"] if col == "donor" else ""
    tab["state"] = tab["axis"]
    tab["metric"] = AXIS_METRIC
    tab["n_called"] = 0
    tab["population"] = tab.get("population", "")
    return tab


def test_axes(
    per_sample: pd.DataFrame,
    settings: StatsSettings | None = None,
    *,
    axes: Mapping[str, Any] | str | None = None,
    meta: pd.DataFrame | None = None,
    **contrast: Any,
) -> pd.DataFrame:
    """Case vs control effect of every axis score (:func:`sepsis_sc.ccc.axis_scores`).

    The scores go through :func:`sepsis_sc.stats.condition_effects`, the design engine of the
    state tests: samples averaged per unit (a donor at one level of the contrast), donor
    blocks when donors are paired, the formula's covariates, the ``stats`` section's
    ``moderation`` across the axes (they share a scale: mean log-normalised expression) and
    ``unit_weights``, Benjamini-Hochberg FDR over the axes. ``settings`` is the ``stats``
    section (:class:`~sepsis_sc.config.StatsSettings`); ``contrast`` holds ``case`` /
    ``control`` / ``contrast`` and stats overrides (``design=`` a resolved
    :class:`~sepsis_sc.design.SampleDesign` or a formula, ``paired``, ``moderation``, ...).

    ``evidence`` classifies each axis against its therapy as the therapy-target table does:
    ``supported`` (FDR <= alpha in ``target_direction``), ``opposite``, ``not significant``,
    ``not tested``.

    Returns
    -------
    pandas.DataFrame
        :data:`AXES_COLUMNS`, one row per axis; ``effect`` is the difference in mean
        ``lr_means`` (case - control, log-normalised expression).
    """
    axes = load_axes(axes)
    tab = _effects_input(per_sample, meta)
    tab = tab[tab["axis"].isin(list(axes))]
    primary = {a: AXIS_METRIC for a in tab["axis"].unique()}
    eff = condition_effects(tab, settings, meta=meta, primary=primary, **contrast)
    if eff.empty:
        return pd.DataFrame(columns=AXES_COLUMNS)
    alpha = float(
        (settings or StatsSettings())
        .with_overrides({k: v for k, v in contrast.items() if k == "alpha"})
        .alpha
    )
    eff = eff.rename(columns={"state": "axis"})
    info = pd.DataFrame(
        {
            name: {
                "pairs": "; ".join(f"{lg} -> {rc}" for lg, rc in a["pairs"]),
                "source": ", ".join(a["source"]),
                "target": ", ".join(a["target"]),
                "target_direction": a["target_direction"],
                "therapy": a["therapy"],
                "trial": a["trial"],
                "states": ", ".join(a["states"]),
                "caveat": a["caveat"],
                "references": a["references"],
                "label": a["label"],
            }
            for name, a in axes.items()
        }
    ).T
    eff = eff.drop(columns=["label"]).join(info, on="axis")
    eff["evidence"] = [
        _evidence(f, e, w, alpha)
        for f, e, w in zip(eff["fdr"], eff["effect"], eff["target_direction"], strict=True)
    ]
    eff["meaning"] = eff["meaning"].str.replace(" score", " axis (lr_means)", n=1, regex=False)
    for c in AXES_COLUMNS:
        if c not in eff:
            eff[c] = np.nan
    order = {name: i for i, name in enumerate(axes)}
    eff = eff.assign(_o=eff["axis"].map(order)).sort_values("_o")
    return eff[AXES_COLUMNS].reset_index(drop=True)


def _evidence(fdr: float, effect: float, want: str, alpha: float) -> str:
    """``supported``, ``opposite``, ``not significant`` or ``not tested``."""
    if not np.isfinite(fdr):
        return "not tested"
    if fdr > alpha:
        return "not significant"
    return "supported" if (effect > 0) == (want == "up") else "opposite"


def axis_z(per_sample: pd.DataFrame, controls: pd.Index | list[str]) -> pd.DataFrame:
    """Axes x samples: each sample's axis score as a z against the control samples (mean and
    SD of the controls; a control is scored leave-one-out, so it is not compared with
    itself). NaN where the score is NA or fewer than three other controls have one."""
    wide = per_sample.pivot_table(index="axis", columns="sample_id", values="value", dropna=False)
    ctrl = [c for c in wide.columns if c in set(map(str, controls))]
    z = pd.DataFrame(np.nan, index=wide.index, columns=wide.columns)
    for sid in wide.columns:
        ref = wide[[c for c in ctrl if c != sid]]
        n = ref.notna().sum(axis=1)
        mu, sd = ref.mean(axis=1), ref.std(axis=1, ddof=1)
        zz = (wide[sid] - mu) / sd.where(sd > 0)
        z[sid] = zz.where(n >= 3)
    return z
