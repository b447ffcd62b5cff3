"""Control reference ranges and the z-score, percentile and flag of every sample x readout.

* :func:`reference_ranges`: robust centre (median) and spread (max of 1.4826 x MAD and SD)
  over **one value per control donor**, range = centre +/- :func:`flag_multiplier` x spread.
* :func:`score_samples`: z-score, empirical percentile and flag (below / within / above)
  per sample; control samples are scored **leave-one-out** (their donor left out of their
  own reference); or against a saved reference file (:func:`read_reference`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sstats

__all__ = [
    "FLAGS",
    "NOT_ASSESSED",
    "REFERENCE_COLUMNS",
    "InsufficientReferenceError",
    "flag_multiplier",
    "reference_ranges",
    "read_reference",
    "score_samples",
]

FLAGS = ("below", "within", "above")
NOT_ASSESSED = "not assessed"
_MAD_TO_SD = 1.4826


class InsufficientReferenceError(ValueError):
    """Too few control donors to build a reference range (no flags are made)."""


#: columns of :func:`reference_ranges` (``patients/reference.tsv``)
REFERENCE_COLUMNS = [
    "readout",
    "centre",
    "spread",
    "low",
    "high",
    "k",
    "n",
    "z_threshold",
    "reference",
    "source_run",
]


def _centre_spread(x: np.ndarray) -> tuple[float, float]:
    """Median and spread = max(1.4826 x MAD, SD) of the reference values (NaN when 0).

    The median keeps one outlying control from moving the centre. The spread takes the
    larger of the MAD-based and the ordinary SD: with the 3-10 control donors of a typical
    cohort the MAD alone is so noisy that about 1 in 7 healthy samples would be flagged
    (simulated normal data, 5 controls, |z| > 3.1); the larger estimate errs towards fewer
    flags (an outlying control widens the range instead of narrowing it).
    """
    c = float(np.median(x))
    s = _MAD_TO_SD * float(np.median(np.abs(x - c)))
    if x.size > 1:
        s = max(s, float(np.std(x, ddof=1)))
    return c, (s if s > 0 else np.nan)


def flag_multiplier(n: int, z_threshold: float = 2.0) -> float:
    """Half-width of the reference range in spread units, for ``n`` reference donors.

    A new sample from the reference population falls outside ``centre +/- k * spread``
    with the two-sided tail probability of ``z_threshold`` under a normal model (4.6 %
    for 2) once the uncertainty of centre and spread is included: the prediction-interval
    multiplier ``k = t(1 - p/2, n - 1) * sqrt(1 + 1/n)`` (5.2 for 3 donors, 3.1 for 5, 2.6
    for 8, 2.1 for 30, -> ``z_threshold`` for many donors). Checked by simulation: with the
    spread of :func:`_centre_spread`, 3.7-4.3 % of normal reference samples fall outside.

    Parameters
    ----------
    n
        Reference donors with a value.
    z_threshold
        Normal-scale threshold that sets the tail probability.

    Returns
    -------
    float
        ``k`` (NaN for ``n < 2``).
    """
    if n < 2:
        return np.nan
    p = 2.0 * float(sstats.norm.sf(z_threshold))
    return float(sstats.t.ppf(1.0 - p / 2.0, n - 1) * np.sqrt(1.0 + 1.0 / n))


def _donor_values(values: pd.DataFrame, donors: pd.Series) -> pd.DataFrame:
    """One value per donor: the mean of the donor's samples (repeated samples count once)."""
    return values.groupby(donors.reindex(values.index).to_numpy(), sort=False).mean()


def reference_ranges(
    values: pd.DataFrame,
    donors: pd.Series,
    *,
    min_controls: int = 3,
    z_threshold: float = 2.0,
    source_run: str = "",
    reference: str = "",
) -> pd.DataFrame:
    """Control reference range per readout, from one value per control donor.

    Parameters
    ----------
    values
        Reference samples x readouts (only the control samples).
    donors
        Donor of each sample (index = sample id); a donor's samples are averaged first.
    min_controls
        Minimum control donors; fewer raises :class:`InsufficientReferenceError`, and a
        readout with fewer donors holding a value gets NaN centre / spread.
    z_threshold
        The range is centre +/- ``k`` x spread, ``k`` = :func:`flag_multiplier` (n,
        z_threshold): wider with few control donors.
    source_run, reference
        Recorded in the table (run name; which samples form the reference).

    Returns
    -------
    pandas.DataFrame
        ``readout``, ``centre`` (median), ``spread`` (max of 1.4826 x MAD and SD), ``low``,
        ``high``, ``k`` (range half-width in spread units), ``n`` (control donors with a
        value), ``z_threshold``,
        ``reference``, ``source_run`` - the layout :func:`read_reference` accepts.
    """
    dv = _donor_values(values, donors)
    if len(dv) < min_controls:
        raise InsufficientReferenceError(
            f"only {len(dv)} control donor(s) ({', '.join(map(str, dv.index)) or 'none'}); at "
            f"least min_controls={min_controls} are needed for a reference range, so no sample "
            "is flagged. Add controls, or pass a saved reference file (patients/reference.tsv "
            "of a run with enough controls)."
        )
    rows = []
    for r in values.columns:
        x = dv[r].dropna().to_numpy(dtype=float)
        c, s = _centre_spread(x) if x.size >= min_controls else (np.nan, np.nan)
        k = flag_multiplier(x.size, z_threshold)
        rows.append(
            {
                "readout": r,
                "centre": c,
                "spread": s,
                "low": c - k * s,
                "high": c + k * s,
                "k": k,
                "n": int(x.size),
                "z_threshold": z_threshold,
                "reference": reference,
                "source_run": source_run,
            }
        )
    return pd.DataFrame(rows)


def read_reference(path: str | Path) -> pd.DataFrame:
    """Read a saved reference table (``patients/reference.tsv`` of another run).

    Parameters
    ----------
    path
        Tab-separated file with at least ``readout``, ``centre``, ``spread``, ``n``
        (``source_run`` and ``reference`` are kept when present).

    Returns
    -------
    pandas.DataFrame
        The table, ``readout`` as str.
    """
    ref = pd.read_csv(path, sep="\t", keep_default_na=True)
    missing = {"readout", "centre", "spread", "n"} - set(ref.columns)
    if missing:
        raise ValueError(f"reference file {path} lacks column(s) {sorted(missing)}")
    ref["readout"] = ref["readout"].astype(str)
    for col in ("source_run", "reference"):
        if col not in ref:
            ref[col] = ""
        ref[col] = ref[col].fillna("").astype(str)
    return ref


def _flag(z: float, k: float) -> str:
    if not (np.isfinite(z) and np.isfinite(k)):
        return NOT_ASSESSED
    return "below" if z < -k else ("above" if z > k else "within")


def score_samples(
    values: pd.DataFrame,
    meta: pd.DataFrame,
    *,
    is_reference: pd.Series | None = None,
    reference: pd.DataFrame | None = None,
    min_controls: int = 3,
    z_threshold: float = 2.0,
) -> pd.DataFrame:
    """z-score, percentile and flag of every sample x readout against the control range.

    Parameters
    ----------
    values
        Samples x readouts.
    meta
        Per-sample table with ``donor`` (index = sample id).
    is_reference
        Boolean per sample: the in-run control samples. Their own donor is left out of the
        reference they are scored against (leave-one-out); the others use all control donors.
    reference
        Saved reference table (:func:`read_reference`), used when ``is_reference`` is None;
        percentiles then come from the normal approximation ``100 * Phi(z)``.
    min_controls, z_threshold
        As in :func:`reference_ranges`; a readout with fewer reference donors is
        ``not assessed``; flagged when ``|z| > k`` (:func:`flag_multiplier` of the number of
        reference donors behind that sample's range).

    Returns
    -------
    pandas.DataFrame
        Long: ``sample_id``, ``readout``, ``value``, ``ref_centre``, ``ref_spread``,
        ``ref_low``, ``ref_high``, ``ref_k`` (flag threshold on ``|z|``), ``ref_n``, ``ref_basis`` (all controls / leave-one-out /
        file), ``z``, ``percentile``, ``flag`` (below / within / above / not assessed).
    """
    donors = meta["donor"].astype(str)
    if is_reference is not None:
        is_ref = is_reference.reindex(values.index).fillna(False).astype(bool)
        dv = _donor_values(values[is_ref], donors)

        def ref_of(sid: Any, r: str) -> tuple[float, float, int, str, np.ndarray | None]:
            return _control_reference(dv, donors[sid], bool(is_ref[sid]), r, min_controls)
    else:
        assert reference is not None
        rr = reference.set_index("readout")

        def ref_of(sid: Any, r: str) -> tuple[float, float, int, str, np.ndarray | None]:
            return _file_reference(rr, r)

    rows = [
        _score_row(sid, r, float(values.at[sid, r]), *ref_of(sid, r), z_threshold)
        for sid in values.index
        for r in values.columns
    ]
    return pd.DataFrame(rows)


def _control_reference(
    dv: pd.DataFrame, donor: str, own: bool, r: str, min_controls: int
) -> tuple[float, float, int, str, np.ndarray]:
    """Centre, spread, donors, basis and values of the in-run control reference of readout
    ``r`` for one sample (its own donor left out when it is a control)."""
    ref_vals = (dv.drop(index=donor) if own else dv)[r].dropna().to_numpy(float)
    basis = "controls, leave-one-out" if own else "controls"
    if ref_vals.size >= min_controls:
        c, s = _centre_spread(ref_vals)
    else:
        c, s = np.nan, np.nan
        basis += f" ({ref_vals.size} donors with a value < min_controls={min_controls})"
    return c, s, int(ref_vals.size), basis, ref_vals


def _file_reference(rr: pd.DataFrame, r: str) -> tuple[float, float, int, str, None]:
    """Centre, spread, donors and basis of readout ``r`` in a saved reference table."""
    if r not in rr.index:
        return np.nan, np.nan, 0, "readout not in the reference file", None
    run = rr.at[r, "source_run"]
    basis = f"reference file (run {run})" if run else "reference file"
    return float(rr.at[r, "centre"]), float(rr.at[r, "spread"]), int(rr.at[r, "n"]), basis, None


def _score_row(
    sid: Any,
    r: str,
    v: float,
    c: float,
    s: float,
    n: int,
    basis: str,
    ref_vals: np.ndarray | None,
    z_threshold: float,
) -> dict[str, Any]:
    """z, percentile (empirical, else from the normal) and flag of one sample x readout."""
    k = flag_multiplier(n, z_threshold)
    z = (v - c) / s if np.isfinite(v) and np.isfinite(c) and s > 0 else np.nan
    if not np.isfinite(z):
        pct = np.nan
    elif ref_vals is not None:
        pct = 100.0 * (np.sum(ref_vals < v) + 0.5 * np.sum(ref_vals == v)) / ref_vals.size
    else:
        pct = 100.0 * float(sstats.norm.cdf(z))
    return {
        "sample_id": sid,
        "readout": r,
        "value": v,
        "ref_centre": c,
        "ref_spread": s,
        "ref_low": c - k * s,
        "ref_high": c + k * s,
        "ref_k": k,
        "ref_n": n,
        "ref_basis": basis,
        "z": z,
        "percentile": pct,
        "flag": _flag(z, k),
    }
