"""Per-cell calls of the discrete states: call rules and thresholds.

A discrete state is called in its call population where its score is above a threshold
set by its rule: a quantile of the control (reference) cells (``control_quantile``, the
default: a flow-cytometry-style gate set on healthy controls), Otsu's threshold over all
cells (``otsu``, condition-blind), the valley of a two-component mixture (``bimodal``, for
subsets common in health; a signature asks for it with its own ``call_rule``), a fixed
score (``fixed``) or no call (``none``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from sepsis_sc.config import ScoringSettings
from sepsis_sc.score.signatures import population_mask

logger = logging.getLogger(__name__)


#: Default rule for discrete calls (config ``scoring.call_rule`` and ``call_quantile``): above
#: the 95th percentile of the control samples' cells of the call population (a
#: flow-cytometry-style gate set on healthy controls).
DEFAULT_CALL_RULE: dict[str, Any] = {
    "method": ScoringSettings().call_rule,
    "quantile": ScoringSettings().call_quantile,
}


def call_rules(spec: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per-state call rules with a ``"default"``: ``spec`` is one rule dict (it applies to
    every state), ``{"default": rule, "<state>": rule}``, or None (:data:`DEFAULT_CALL_RULE`)."""
    if spec is None:
        spec = {}
    elif "method" in spec:
        spec = {"default": spec}
    rules = {str(k): dict(v) for k, v in spec.items()}
    rules.setdefault("default", dict(DEFAULT_CALL_RULE))
    return rules


def rule_for(s: Mapping[str, Any], rules: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A state's call rule: ``rules[<state>]`` or ``[<base state>]`` when given, else the
    signature's own ``call_rule`` (its ``fallback`` = the default rule), else the default."""
    for key in (s["name"], s["base_state"]):
        if key in rules:
            return dict(rules[key])
    if s.get("call_rule"):
        return {"fallback": dict(rules["default"]), **dict(s["call_rule"])}
    return dict(rules["default"])


def _needs_control(rule: Mapping[str, Any]) -> bool:
    """A control-quantile rule, or a bimodal one that falls back to it."""
    method = rule.get("method", "control_quantile")
    if method == "bimodal":
        return _needs_control(rule.get("fallback") or DEFAULT_CALL_RULE)
    return method == "control_quantile"


def control_cells(adata: ad.AnnData, control: str | None, condition_key: str) -> np.ndarray | None:
    """Boolean mask of the control (reference) cells, None without ``control``."""
    if control is None:
        return None
    if condition_key not in adata.obs:
        raise KeyError(f"obs[{condition_key!r}] missing; needed to find control={control!r} cells")
    is_control = (adata.obs[condition_key].astype(str) == str(control)).to_numpy()
    if not is_control.any():
        raise ValueError(
            f"no cells with {condition_key} == {control!r}; conditions present: "
            f"{sorted(adata.obs[condition_key].astype(str).unique())}"
        )
    return is_control


def require_reference(
    to_score: Sequence[Mapping[str, Any]],
    rules: Mapping[str, Mapping[str, Any]],
    is_control: np.ndarray | None,
) -> None:
    """Refuse state calls that need control cells when no control reference was given.

    Thresholds taken from the cells being judged (Otsu) call a share of any data set by
    construction (healthy PBMC then show 60% "HLA-DR-low" monocytes), so a control-quantile
    call without a reference is an error rather than a silent switch.
    """
    if is_control is not None:
        return
    need = [s["name"] for s in to_score if s["discrete"] and _needs_control(rule_for(s, rules))]
    if need:
        raise ValueError(
            f"state calls for {', '.join(need)} need a control reference (cells above the "
            f"{rules['default'].get('quantile', 0.95):.0%} quantile of control cells): pass "
            "control=<label of the control/reference samples in obs[condition_key]> (and "
            "condition_key=), or calls=False for scores only. Condition-blind thresholds "
            "must be asked for: call_rule='otsu', or a signature's own call_rule such as "
            "{'method': 'fixed', 'threshold': ...}."
        )


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[1:][np.argmax(between)])


def _mixture_split(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Two-component normal mixture of ``values``: the score where the two posteriors are
    equal (between the means), and Ashman's D = sqrt(2) |m1 - m2| / sqrt(s1^2 + s2^2)
    (D > 2: two populations cleanly apart; one normal population gives D < 1)."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(values, dtype=float).reshape(-1, 1)
    if x.shape[0] < 10 or np.ptp(x) == 0:
        return float(np.nanmax(x)) if x.size else np.nan, 0.0
    gm = GaussianMixture(n_components=2, random_state=seed).fit(x)
    m = gm.means_.ravel()
    sd = np.sqrt(gm.covariances_.ravel())
    d = float(np.sqrt(2) * abs(m[0] - m[1]) / np.sqrt(sd[0] ** 2 + sd[1] ** 2))
    lo, hi = int(np.argmin(m)), int(np.argmax(m))
    grid = np.linspace(m[lo], m[hi], 512).reshape(-1, 1)
    post = gm.predict_proba(grid)[:, hi]
    return float(grid[int(np.argmax(post >= 0.5)), 0]), d


def _threshold(
    scores: np.ndarray, is_control: np.ndarray | None, rule: Mapping[str, Any]
) -> tuple[float, str]:
    method = rule.get("method", "control_quantile")
    if method == "fixed":
        if "threshold" not in rule:
            raise ValueError("call rule method 'fixed' needs a 'threshold'")
        return float(rule["threshold"]), f"score > {float(rule['threshold']):.4g} (fixed)"
    if method == "control_quantile":
        q = float(rule.get("quantile", 0.95))
        if not 0 < q < 1:
            raise ValueError(f"call rule quantile must be in (0, 1), got {q}")
        if is_control is None or not is_control.any():
            raise ValueError(
                "call rule 'control_quantile' needs control cells: pass control=<label of "
                "the control condition> (and condition_key=), or use {'method': 'otsu'}"
            )
        thr = float(np.nanquantile(scores[is_control], q))
        return thr, f"score > {q:.0%} quantile of control cells ({thr:.4g})"
    if method == "otsu":
        thr = _otsu(scores[np.isfinite(scores)])
        return thr, f"score > Otsu threshold over all cells of the call population ({thr:.4g})"
    if method == "bimodal":
        # a subset-like state that is common in health (TREM2-high macrophages): the
        # control-quantile gate would call only the top 5 % of control cells and miss a
        # change in the subset's share; split at the valley when the scores have one
        thr, d = _mixture_split(scores[np.isfinite(scores)])
        need = float(rule.get("min_separation", 2.0))
        if d >= need:
            return thr, (
                f"score > the valley of a two-component normal mixture ({thr:.4g}; "
                f"bimodal, Ashman's D {d:.1f})"
            )
        fallback = dict(rule.get("fallback") or DEFAULT_CALL_RULE)
        thr, text = _threshold(scores, is_control, fallback)
        return thr, f"{text} (not bimodal: Ashman's D {d:.1f} < {need:.1f})"
    raise ValueError(
        f"unknown call rule method {method!r}; use control_quantile, otsu, bimodal or fixed"
    )


def call_population(
    adata: ad.AnnData,
    s: Mapping[str, Any],
    parent: np.ndarray,
    table: pd.DataFrame,
    lineage_key: str,
    cell_type_key: str,
) -> np.ndarray:
    """Cells a discrete call is made in: the parent, narrowed by ``call_within`` if labelled."""
    if not s["call_within"]:
        return parent
    try:
        return parent & population_mask(adata, s["call_within"], lineage_key, cell_type_key)
    except KeyError as err:
        logger.warning("state %s: %s; calling in the whole parent instead", s["name"], err)
        table.loc[s["name"], "call_population"] = table.loc[s["name"], "parent"]
        return parent


def call_state(
    adata: ad.AnnData,
    table: pd.DataFrame,
    name: str,
    col: np.ndarray,
    call_pop: np.ndarray,
    rule: Mapping[str, Any],
    is_control: np.ndarray | None,
    calls: bool,
) -> None:
    """Threshold one state's scores in its call population; write ``obs[name]`` and the row.

    No call (a ``reason`` instead) with ``calls=False``, rule ``none``, or an empty call
    population.
    """
    if not calls:
        table.loc[name, "reason"] = "not called: no control reference (calls=False); scores only"
        return
    if rule.get("method") == "none":
        table.loc[name, "reason"] = (
            "not called: no control reference (call rule 'none'); scores only"
        )
        return
    if call_pop.sum() == 0:
        table.loc[name, "reason"] = "no cells in the call population; no call made"
        return
    ctrl = None if is_control is None else is_control[call_pop]
    thr, text = _threshold(col[call_pop], ctrl, rule)
    call = pd.array(np.full(adata.n_obs, pd.NA), dtype="boolean")
    call[call_pop] = col[call_pop] > thr
    adata.obs[name] = pd.Series(call, index=adata.obs_names)
    n_called = int((col[call_pop] > thr).sum())
    table.loc[name, ["rule", "threshold", "n_called", "fraction_called"]] = [
        text,
        thr,
        n_called,
        n_called / call_pop.sum(),
    ]
    logger.info("state %s: %d of %d cells called (%s)", name, n_called, call_pop.sum(), text)
