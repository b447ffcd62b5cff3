"""Linear models of the resolved design with empirical-Bayes moderated variances (limma).

:func:`linear_test` fits ``values ~ design`` to many features at once (labels of a
composition table, states x metrics) and tests the case-vs-control coefficient with the
moderated t of Smyth 2004 (DOI 10.2202/1544-6115.1027); :func:`squeeze_var` is limma's
``squeezeVar`` (the prior of the residual variances across features).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats

from sepsis_sc.design.contrasts import COEF
from sepsis_sc.design.model import SampleDesign, feature_design


def _trigamma_inverse(x: float) -> float:
    """Solve trigamma(y) = x by Newton's method (limma's trigammaInverse)."""
    x = float(x)
    if x > 1e7:
        return 1 / np.sqrt(x)
    if x < 1e-6:
        return 1 / x
    y = 0.5 + 1 / x
    for _ in range(50):
        tri = special.polygamma(1, y)
        dif = tri * (1 - tri / x) / special.polygamma(2, y)
        y += dif
        if -dif / y < 1e-8:
            break
    return y


def squeeze_var(s2: np.ndarray, df: np.ndarray | float) -> tuple[np.ndarray, float]:
    """Empirical-Bayes moderated variances (limma ``squeezeVar`` without covariate).

    ``df`` may differ per feature (features with NA samples have fewer residual degrees of
    freedom). Returns the posterior variances and the prior degrees of freedom ``d0``
    (``inf`` when the sample variances are no more spread than chance: all shrink to the
    common value). With fewer than 3 features nothing is moderated (``d0 = 0``).
    """
    s2 = np.maximum(np.asarray(s2, dtype=float), 1e-12)
    df = np.broadcast_to(np.asarray(df, dtype=float), s2.shape)
    n = s2.size
    if n < 3:
        return s2.copy(), 0.0
    z = np.log(s2)
    e = z - special.digamma(df / 2) + np.log(df / 2)
    emean = e.mean()
    evar = np.sum((e - emean) ** 2) / (n - 1) - np.mean(special.polygamma(1, df / 2))
    if evar > 0:
        d0 = 2 * _trigamma_inverse(evar)
        s0 = np.exp(emean + special.digamma(d0 / 2) - np.log(d0 / 2))
        return (d0 * s0 + df * s2) / (d0 + df), float(d0)
    return np.full_like(s2, np.exp(emean)), float("inf")


def linear_test(
    design: SampleDesign,
    values: pd.DataFrame,
    *,
    moderate: bool = True,
    level: float = 0.95,
) -> pd.DataFrame:
    """Fit ``values ~ design`` per feature and test the case-vs-control coefficient.

    Parameters
    ----------
    design
        From :func:`resolve_design`.
    values
        Units x features (index = ``design.units`` index), on the test scale; NaN = no value
        for that unit (e.g. too few cells). A feature uses the units where it has a value;
        its design is then the design's rows for those units (pairing is kept only for donors
        with both units present; a covariate that becomes constant is dropped).
    moderate
        Moderate the residual variances across features (limma eBayes; needs >= 3 features).
    level
        Confidence level of the interval.

    Returns
    -------
    pandas.DataFrame
        Index = features: ``effect`` (coefficient), ``se``, ``ci_low``, ``ci_high``, ``t``,
        ``df`` (residual + prior), ``pvalue``, ``n_case``, ``n_control`` (units used),
        ``df_resid``, ``d0``, ``note``.
    """
    values = values.reindex(design.units.index)
    rows: list[dict[str, Any]] = []
    fits = []
    for feat in values.columns:
        row, fit = _fit_feature(design, feat, values[feat].to_numpy(float))
        if fit is not None:
            fits.append((len(rows), *fit))
        rows.append(row)
    out = pd.DataFrame(rows).set_index("feature") if rows else pd.DataFrame()
    for c in ("se", "ci_low", "ci_high", "t", "df", "pvalue", "d0"):
        out[c] = np.nan
    if fits:
        _moderated_t(out, fits, moderate=moderate, level=level)
    cols = [
        "effect",
        "se",
        "ci_low",
        "ci_high",
        "t",
        "df",
        "pvalue",
        "n_case",
        "n_control",
        "df_resid",
        "d0",
        "note",
    ]
    return out[cols]


def _fit_feature(
    design: SampleDesign, feat: Any, y: np.ndarray
) -> tuple[dict[str, Any], tuple[float, int, float] | None]:
    """Least-squares fit of one feature on the units where it has a value.

    Returns the feature's row (``effect``, units used, ``df_resid``, ``note``) and, when a
    residual degree of freedom is left, ``(residual variance, df_resid, unscaled variance of
    the coefficient)`` for :func:`_moderated_t`; else None (effect only, or the plain
    difference of group means when the design cannot estimate the contrast on those units).
    """
    X_all = design.matrix
    ok = np.isfinite(y)
    X, note = feature_design(design, ok)
    n_case = int(X[COEF].sum()) if X is not None else int((X_all[COEF].to_numpy()[ok]).sum())
    n_ctrl = int(ok.sum()) - n_case
    row = {"feature": feat, "n_case": n_case, "n_control": n_ctrl, "note": note}
    yy = y[ok]
    if X is None or n_case == 0 or n_ctrl == 0:
        a, b = yy[X_all[COEF].to_numpy()[ok] == 1], yy[X_all[COEF].to_numpy()[ok] == 0]
        row["effect"] = float(a.mean() - b.mean()) if a.size and b.size else np.nan
        row["df_resid"] = 0
        return row, None
    xm = X.to_numpy()
    xtx_inv = np.linalg.pinv(xm.T @ xm)
    beta = xtx_inv @ xm.T @ yy
    resid = yy - xm @ beta
    j = list(X.columns).index(COEF)
    df_res = xm.shape[0] - xm.shape[1]
    row["effect"] = float(beta[j])
    row["df_resid"] = df_res
    if df_res >= 1:
        return row, (float(resid @ resid) / df_res, df_res, float(xtx_inv[j, j]))
    if not row["note"]:
        row["note"] = "no residual degree of freedom: effect size only, no p-value"
    return row, None


def _moderated_t(
    out: pd.DataFrame, fits: list[tuple[int, float, int, float]], *, moderate: bool, level: float
) -> None:
    """Fill ``se``, ``t``, ``df``, CI, ``pvalue`` and ``d0`` of the fitted rows of ``out``.

    ``fits`` holds ``(row position, residual variance, df_resid, unscaled variance)``; the
    variances are moderated across features (:func:`squeeze_var`) when ``moderate``.
    """
    idx = [f[0] for f in fits]
    s2 = np.array([f[1] for f in fits])
    dfr = np.array([f[2] for f in fits], dtype=float)
    unscaled = np.array([f[3] for f in fits])
    if moderate:
        post, d0 = squeeze_var(s2, dfr)
    else:
        post, d0 = s2, 0.0
    df_tot = dfr + d0 if np.isfinite(d0) else np.full_like(dfr, 1e6)
    se = np.sqrt(post * unscaled)
    eff = out["effect"].to_numpy()[idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = eff / se
    tcrit = stats.t.ppf(0.5 + level / 2, df_tot)
    names = out.index[idx]
    out.loc[names, "se"] = se
    out.loc[names, "t"] = t
    out.loc[names, "df"] = df_tot
    out.loc[names, "ci_low"] = eff - tcrit * se
    out.loc[names, "ci_high"] = eff + tcrit * se
    out.loc[names, "pvalue"] = 2 * stats.t.sf(np.abs(t), df_tot)
    out.loc[names, "d0"] = d0
