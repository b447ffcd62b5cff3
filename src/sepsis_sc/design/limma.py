"""Linear models of the resolved design with empirical-Bayes moderated variances (limma).

:func:`linear_test` fits ``values ~ design`` to many features at once (labels of a
composition table, states x metrics) and tests the case-vs-control coefficient with the
moderated t of Smyth 2004 (DOI 10.2202/1544-6115.1027). :func:`squeeze_var` is limma's
``squeezeVar``: the residual variances of the features are taken as draws from a scaled
inverse chi-square prior whose scale ``var_prior`` and degrees of freedom ``df_prior`` are
estimated from all features (:func:`fit_f_dist`, moment matching of log variances), and each
feature's variance is replaced by its posterior mean. Two options of limma change the prior:

* ``covariate`` (limma ``trend=TRUE``): the prior scale follows a natural-spline trend of a
  covariate (e.g. mean abundance), so rare, volatile labels are not shrunk towards the
  variance of abundant, stable ones;
* ``robust`` (limma ``robust=TRUE``, Phipson et al. 2016, DOI 10.1214/16-AOAS920):
  :func:`fit_f_dist_robustly` estimates the prior from Winsorized log variances and gives
  each feature whose variance is an outlier above the prior a smaller ``df_prior`` of its own,
  so it keeps more of its own variance.

The algorithms follow limma's published R code (``fitFDist``, ``fitFDistRobustly``,
``squeezeVar``; limma 3.x, the equal-``df1`` path), reimplemented here; the tests check them
against values computed with limma on fixed inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, special, stats

from sepsis_sc.design.contrasts import COEF
from sepsis_sc.design.model import SampleDesign, feature_design

__all__ = [
    "Prior",
    "MODERATION",
    "fit_f_dist",
    "fit_f_dist_robustly",
    "squeeze_var",
    "linear_test",
    "trigamma_inverse",
]


#: config ``stats.moderation`` -> (moderate, robust, trend in the feature mean)
MODERATION: dict[str, tuple[bool, bool, bool]] = {
    "robust_trend": (True, True, True),
    "robust": (True, True, False),
    "trend": (True, False, True),
    "plain": (True, False, False),
    "none": (False, False, False),
}


def trigamma_inverse(x: float) -> float:
    """Solve trigamma(y) = x by Newton's method (limma's ``trigammaInverse``)."""
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


def _logmdigamma(x: np.ndarray | float) -> np.ndarray | float:
    """log(x) - digamma(x)."""
    return np.log(x) - special.digamma(x)


@dataclass
class Prior:
    """The fitted prior of the residual variances (and, from :func:`squeeze_var`, the
    posterior variances).

    Attributes
    ----------
    var_prior
        Prior scale: one value, or one per feature with a covariate trend.
    df_prior
        Prior degrees of freedom: one value, or one per feature with ``robust`` (outliers
        get smaller values); ``inf`` when the variances are no more spread than chance.
    var_post
        Posterior variances (``None`` from the ``fit_*`` functions).
    df2
        The prior degrees of freedom before the robust per-feature shrinkage.
    """

    var_prior: np.ndarray | float
    df_prior: np.ndarray | float
    var_post: np.ndarray | None = None
    df2: float = np.nan


def _ns_basis(x: np.ndarray, df: int) -> np.ndarray:
    """A basis of the natural cubic splines with ``df`` knots (boundary knots at the range,
    ``df - 2`` interior knots at quantiles of ``x``), intercept included: the column space
    of R's ``splines::ns(x, df=df, intercept=TRUE)``, so least-squares fits are the same."""
    lo, hi = float(np.min(x)), float(np.max(x))
    n_inner = df - 2
    if n_inner <= 0 or lo == hi:
        return np.column_stack([np.ones_like(x), x])[:, :df]
    inner = np.quantile(x, np.linspace(0, 1, n_inner + 2)[1:-1])
    knots = np.concatenate([[lo], inner, [hi]])

    def d(k: float) -> np.ndarray:
        return (np.maximum(x - k, 0) ** 3 - np.maximum(x - hi, 0) ** 3) / (hi - k)

    last = d(knots[-2])
    cols = [np.ones_like(x), x] + [d(k) - last for k in knots[:-2]]
    return np.column_stack(cols)


def fit_f_dist(
    x: np.ndarray, df1: np.ndarray | float, covariate: np.ndarray | None = None
) -> Prior:
    """Moment estimates of a scaled F distribution for variances ``x`` on ``df1`` degrees of
    freedom (limma ``fitFDist``): the prior scale (a natural-spline trend in ``covariate``
    when given) and the prior degrees of freedom."""
    x = np.asarray(x, dtype=float)
    n = x.size
    df1 = np.broadcast_to(np.asarray(df1, dtype=float), x.shape)
    if n == 1:
        return Prior(var_prior=x.copy(), df_prior=0.0, df2=0.0)
    ok = np.isfinite(df1) & (df1 > 1e-15) & np.isfinite(x) & (x > -1e-15)
    nok = int(ok.sum())
    if nok <= 1:
        return Prior(var_prior=x.copy(), df_prior=0.0, df2=0.0)
    xs, d1 = np.maximum(x[ok], 0.0), df1[ok]
    m = float(np.median(xs)) or 1.0
    xs = np.maximum(xs, 1e-5 * m)
    e = np.log(xs) + _logmdigamma(d1 / 2)
    trend = covariate is not None
    if trend:
        cov = np.asarray(covariate, dtype=float)[ok]
        spline_df = min(1 + (nok >= 3) + (nok >= 6) + (nok >= 30), np.unique(cov).size)
        trend = spline_df >= 2
    if trend:
        basis = _ns_basis(cov, spline_df)
        coef, *_ = np.linalg.lstsq(basis, e, rcond=None)
        emean = basis @ coef
        rank = np.linalg.matrix_rank(basis)
        evar = float(np.sum((e - emean) ** 2) / (nok - rank)) if nok > rank else 0.0
    else:
        emean = float(e.mean())
        evar = float(np.sum((e - emean) ** 2) / (nok - 1))
    evar -= float(np.mean(special.polygamma(1, d1 / 2)))
    if evar > 0:
        df2 = 2 * trigamma_inverse(evar)
        s20 = np.exp(emean - _logmdigamma(df2 / 2))
    else:
        df2 = np.inf
        # no covariate: the pooled variance, the MLE of the scale in this case (limma >= 2017)
        s20 = np.exp(emean) if trend else float(xs.mean())
    if trend and nok < n:  # features without a usable variance: the trend interpolated
        full = np.interp(
            np.asarray(covariate, float), cov[np.argsort(cov)], np.asarray(s20)[np.argsort(cov)]
        )
        full[ok] = s20
        s20 = full
    elif trend:
        s20 = np.asarray(s20)
    return Prior(var_prior=s20, df_prior=df2, df2=df2)


def _winsorized_moments(df1: float, df2: float, tail: tuple[float, float]) -> tuple[float, float]:
    """Mean and variance of log F(df1, df2) Winsorized at the ``tail`` probabilities, by
    128-point Gauss-Legendre quadrature on the scale F / (1 + F) (limma's inner function)."""
    nodes, weights = np.polynomial.legendre.leggauss(128)
    nodes, weights = (nodes + 1) / 2, weights / 2  # uniform on [0, 1]
    fq = (
        stats.chi2.ppf([tail[0], 1 - tail[1]], df1) / df1
        if np.isinf(df2)
        else stats.f.ppf([tail[0], 1 - tail[1]], df1, df2)
    )
    zq = np.log(fq)
    q = fq / (1 + fq)
    qn = q[0] + (q[1] - q[0]) * nodes
    fn = qn / (1 - qn)
    zn = np.log(fn)
    dens = (stats.chi2.pdf(df1 * fn, df1) * df1 if np.isinf(df2) else stats.f.pdf(fn, df1, df2)) / (
        1 - qn
    ) ** 2
    width = q[1] - q[0]
    tails = np.asarray(tail)
    mean = width * np.sum(weights * dens * zn) + np.sum(zq * tails)
    var = width * np.sum(weights * dens * (zn - mean) ** 2) + np.sum((zq - mean) ** 2 * tails)
    return float(mean), float(var)


def _f_logsf(f: np.ndarray, df1: np.ndarray | float, df2: float) -> np.ndarray:
    return stats.chi2.logsf(f * df1, df1) if np.isinf(df2) else stats.f.logsf(f, df1, df2)


def _f_logcdf(f: np.ndarray, df1: np.ndarray | float, df2: float) -> np.ndarray:
    return stats.chi2.logcdf(f * df1, df1) if np.isinf(df2) else stats.f.logcdf(f, df1, df2)


def _f_isf_log(logp: np.ndarray, df1: float, df2: float, upper: bool) -> np.ndarray:
    """The F(df1, df2) quantile of log probability ``logp`` in the upper or lower tail."""
    p = np.exp(logp)
    if np.isinf(df2):
        q = stats.chi2.isf(p, df1) if upper else stats.chi2.ppf(p, df1)
        return q / df1
    return stats.f.isf(p, df1, df2) if upper else stats.f.ppf(p, df1, df2)


def _common_df1(x: np.ndarray, df1: np.ndarray, plain: Prior) -> tuple[np.ndarray, float]:
    """Variances on fewer residual df mapped to the largest df by matching their F tail
    probability under the non-robust prior (limma's step for unequal ``df1``)."""
    top = float(df1.max())
    low = df1 < top - 1e-14
    if not low.any():
        return x, top
    x = x.copy()
    scale = np.broadcast_to(np.asarray(plain.var_prior, float), x.shape)[low]
    f = x[low] / scale
    up = _f_logsf(f, df1[low], plain.df2)
    down = _f_logcdf(f, df1[low], plain.df2)
    use_up = up < down
    f = np.where(
        use_up,
        _f_isf_log(up, top, plain.df2, upper=True),
        _f_isf_log(down, top, plain.df2, upper=False),
    )
    x[low] = f * scale
    return x, top


def fit_f_dist_robustly(
    x: np.ndarray,
    df1: np.ndarray | float,
    covariate: np.ndarray | None = None,
    winsor_tail_p: tuple[float, float] = (0.05, 0.1),
) -> Prior:
    """Robust estimates of the scaled F distribution (limma ``fitFDistRobustly``).

    The prior degrees of freedom are matched to the variance of the Winsorized log
    variances (so a few outlying features do not inflate the spread), and each feature gets
    its own ``df_prior``: the prior's, weighted down by the probability that the feature is
    an outlier above the prior (its F tail probability against the empirical one), so an
    outlying variance is shrunk less. With a ``covariate`` the scale follows a lowess trend.
    Variances on fewer residual degrees of freedom are first mapped to the largest ``df1``.
    """
    x = np.asarray(x, dtype=float).copy()
    n = x.size
    df1 = np.broadcast_to(np.asarray(df1, dtype=float), x.shape)
    if n < 3:
        p = fit_f_dist(x, df1, covariate)
        return Prior(p.var_prior, np.full(n, p.df_prior), df2=p.df2)
    m = float(np.median(x))
    if m <= 0:
        raise ValueError("variances are mostly <= 0")
    x = np.maximum(x, m * 1e-12)
    plain = fit_f_dist(x, df1, covariate)
    tail = (float(winsor_tail_p[0]), float(winsor_tail_p[1]))
    if all(t < 1 / n for t in tail):
        return Prior(plain.var_prior, np.full(n, plain.df_prior), df2=plain.df2)
    x, d1 = _common_df1(x, df1, plain)
    z = np.log(x)
    if covariate is None:
        ztrend = float(stats.trim_mean(z, tail[1]))
    else:
        from statsmodels.nonparametric.smoothers_lowess import lowess

        cov = np.asarray(covariate, dtype=float)
        ztrend = lowess(
            z, cov, frac=0.4, it=3, delta=0.01 * float(np.ptp(cov)), return_sorted=False
        )
    zresid = z - ztrend
    q_lo, q_hi = np.quantile(zresid, [tail[0], 1 - tail[1]])
    zw = np.clip(zresid, q_lo, q_hi)
    zwmean = float(zw.mean())
    zwvar = float(np.mean((zw - zwmean) ** 2) * n / (n - 1))
    inf_mean, inf_var = _winsorized_moments(d1, np.inf, tail)
    if np.log(zwvar / inf_var) <= 0:  # no more spread than sampling: df2 = inf
        s20 = np.exp(ztrend + zwmean - inf_mean)
        fstat = np.exp(z - np.log(s20))
        tail_p = stats.chi2.sf(fstat * d1, d1)
        r = stats.rankdata(fstat)
        not_outlier = np.minimum(tail_p / ((n - r + 0.5) / n), 1)
        shrunk = np.full(n, np.inf)
        out = not_outlier < 1
        if out.any():
            shrunk[out] = not_outlier[out] * n * d1
            o = np.argsort(tail_p, kind="stable")
            shrunk[o] = np.maximum.accumulate(shrunk[o])
        return Prior(s20, shrunk, df2=np.inf)
    if not np.isfinite(plain.df2):
        return Prior(plain.var_prior, np.full(n, plain.df2), df2=plain.df2)

    at_inf = float(np.log(zwvar / inf_var))

    def excess(link: float) -> float:
        if link >= 1.0:
            return at_inf
        return float(np.log(zwvar / _winsorized_moments(d1, link / (1 - link), tail)[1]))

    low = plain.df2 / (1 + plain.df2)  # the non-robust df2 is the lower bound
    if excess(low) >= 0:
        df2 = plain.df2
    else:
        root = optimize.brentq(excess, low, 1.0, xtol=1e-8)
        df2 = root / (1 - root) if root < 1.0 else np.inf
    ztc = ztrend + zwmean - _winsorized_moments(d1, df2, tail)[0]
    s20 = np.exp(ztc)
    fstat = np.exp(z - ztc)
    log_tail = _f_logsf(fstat, d1, df2)
    r = stats.rankdata(fstat)
    log_not = np.minimum(log_tail - (np.log(n - r + 0.5) - np.log(n)), 0)
    if not (log_not < 0).any():
        return Prior(s20, np.full(n, df2), df2=df2)
    not_outlier, outlier = np.exp(log_not), -np.expm1(log_not)
    min_log = float(log_tail.min())
    if min_log == -np.inf:
        shrunk = not_outlier * df2
    else:  # the df that puts the largest F at the median of its distribution
        df2_out = np.log(0.5) / min_log * df2
        df2_out = np.log(0.5) / float(_f_logsf(np.array([fstat.max()]), d1, df2_out)[0]) * df2_out
        shrunk = not_outlier * df2 + outlier * df2_out
    o = np.argsort(log_tail, kind="stable")  # monotonic in the tail probability
    ordered = shrunk[o]
    running = np.cumsum(ordered) / np.arange(1, n + 1)
    imin = int(np.argmin(running))
    ordered[: imin + 1] = running[imin]
    shrunk[o] = np.maximum.accumulate(ordered)
    return Prior(s20, shrunk, df2=df2)


def squeeze_var(
    s2: np.ndarray,
    df: np.ndarray | float,
    *,
    covariate: np.ndarray | None = None,
    robust: bool = False,
    winsor_tail_p: tuple[float, float] = (0.05, 0.1),
) -> Prior:
    """Empirical-Bayes moderated variances (limma ``squeezeVar``).

    ``df`` may differ per feature (features with NA units have fewer residual degrees of
    freedom); ``covariate`` gives the prior scale a trend (limma ``trend``); ``robust`` uses
    :func:`fit_f_dist_robustly`. With fewer than 3 features nothing is moderated
    (``df_prior = 0``).
    """
    s2 = np.asarray(s2, dtype=float)
    df = np.broadcast_to(np.asarray(df, dtype=float), s2.shape)
    if s2.size < 3:
        return Prior(var_prior=s2.copy(), df_prior=0.0, var_post=s2.copy(), df2=0.0)
    if robust:
        prior = fit_f_dist_robustly(s2, df, covariate, winsor_tail_p)
    else:
        prior = fit_f_dist(s2, df, covariate)
    d0 = np.broadcast_to(np.asarray(prior.df_prior, dtype=float), s2.shape)
    v0 = np.broadcast_to(np.asarray(prior.var_prior, dtype=float), s2.shape)
    with np.errstate(invalid="ignore"):
        post = np.where(np.isinf(d0), v0, (d0 * v0 + df * s2) / (d0 + df))
    prior.var_post = post
    return prior


def linear_test(
    design: SampleDesign,
    values: pd.DataFrame,
    *,
    moderation: str = "plain",
    weights: pd.Series | None = None,
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
    moderation
        How the residual variances are moderated across features (:data:`MODERATION`, config
        ``stats.moderation``): limma's empirical-Bayes prior (``plain``), robust
        (:func:`fit_f_dist_robustly`), with a trend of the prior variance in the feature's
        mean over units (``trend``; limma ``eBayes(trend=TRUE)``), both, or ``none``. Fewer
        than 3 fitted features are not moderated.
    weights
        Precision weights of the units (index = units; :func:`sepsis_sc.design.unit_weights`
        when units average different numbers of samples): a weighted least-squares fit.
    level
        Confidence level of the interval.

    Returns
    -------
    pandas.DataFrame
        Index = features: ``effect`` (coefficient), ``se``, ``ci_low``, ``ci_high``, ``t``,
        ``df`` (residual + prior), ``pvalue``, ``n_case``, ``n_control`` (units used),
        ``df_resid``, ``d0`` (the feature's prior degrees of freedom), ``s2`` (its residual
        variance), ``s2_prior`` (the prior variance it was shrunk towards), ``note``.
    """
    values = values.reindex(design.units.index)
    rows: list[dict[str, Any]] = []
    fits = []
    w = None if weights is None else weights.reindex(design.units.index).to_numpy(float)
    for feat in values.columns:
        row, fit = _fit_feature(design, feat, values[feat].to_numpy(float), w)
        if fit is not None:
            fits.append((len(rows), *fit))
        rows.append(row)
    out = pd.DataFrame(rows).set_index("feature") if rows else pd.DataFrame()
    for c in ("se", "ci_low", "ci_high", "t", "df", "pvalue", "d0", "s2", "s2_prior"):
        out[c] = np.nan
    if moderation not in MODERATION:
        raise ValueError(f"moderation must be one of {sorted(MODERATION)}, got {moderation!r}")
    moderate, robust, trend = MODERATION[moderation]
    if fits:
        cov = values.mean().reindex(out.index).to_numpy(float) if trend else None
        _moderated_t(out, fits, moderate=moderate, robust=robust, covariate=cov, level=level)
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
        "s2",
        "s2_prior",
        "note",
    ]
    return out[cols]


def _fit_feature(
    design: SampleDesign, feat: Any, y: np.ndarray, weights: np.ndarray | None = None
) -> tuple[dict[str, Any], tuple[float, int, float] | None]:
    """(Weighted) least-squares fit of one feature on the units where it has a value.

    Returns the feature's row (``effect``, units used, ``df_resid``, ``note``) and, when a
    residual degree of freedom is left, ``(residual variance, df_resid, unscaled variance of
    the coefficient)`` for :func:`_moderated_t`; else None (effect only, or the plain
    difference of group means when the design cannot estimate the contrast on those units).
    """
    X_all = design.matrix
    ok = np.isfinite(y)
    X, note = feature_design(design, ok)
    n_used = int(ok.sum()) if X is None else len(X)
    n_case = int(X[COEF].sum()) if X is not None else int((X_all[COEF].to_numpy()[ok]).sum())
    n_ctrl = n_used - n_case
    row = {"feature": feat, "n_case": n_case, "n_control": n_ctrl, "note": note}
    if X is None or n_case == 0 or n_ctrl == 0:
        yy = y[ok]
        a, b = yy[X_all[COEF].to_numpy()[ok] == 1], yy[X_all[COEF].to_numpy()[ok] == 0]
        row["effect"] = float(a.mean() - b.mean()) if a.size and b.size else np.nan
        row["df_resid"] = 0
        return row, None
    rows = design.units.index.get_indexer(X.index)  # a paired design may drop more units
    yy = y[rows]
    sw = np.ones(yy.size) if weights is None else np.sqrt(weights[rows])
    xm, yy = X.to_numpy() * sw[:, None], yy * sw
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
    out: pd.DataFrame,
    fits: list[tuple[int, float, int, float]],
    *,
    moderate: bool,
    robust: bool,
    covariate: np.ndarray | None,
    level: float,
) -> None:
    """Fill ``se``, ``t``, ``df``, CI, ``pvalue``, ``d0``, ``s2`` and ``s2_prior`` of the
    fitted rows of ``out``.

    ``fits`` holds ``(row position, residual variance, df_resid, unscaled variance)``; the
    variances are moderated across features (:func:`squeeze_var`) when ``moderate``.
    """
    idx = [f[0] for f in fits]
    s2 = np.array([f[1] for f in fits])
    dfr = np.array([f[2] for f in fits], dtype=float)
    unscaled = np.array([f[3] for f in fits])
    if moderate:
        cov = None if covariate is None else covariate[idx]
        prior = squeeze_var(s2, dfr, covariate=cov, robust=robust)
        post = prior.var_post
        d0 = np.broadcast_to(np.asarray(prior.df_prior, float), s2.shape)
        s0 = np.broadcast_to(np.asarray(prior.var_prior, float), s2.shape)
    else:
        post, d0, s0 = s2, np.zeros_like(s2), np.full_like(s2, np.nan)
    df_tot = np.where(np.isfinite(d0), dfr + d0, 1e6)
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
    out.loc[names, "s2"] = s2
    out.loc[names, "s2_prior"] = s0
