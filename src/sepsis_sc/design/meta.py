"""The per-sample sheet recovered from ``obs``: :func:`sample_meta`.

The workflow copies every sample-sheet column into ``obs``; the design of a contrast, the
sample table and the patient profiles read their per-sample metadata back from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


def sample_meta(
    adata: Any,
    sample_key: str = "sample_id",
    *,
    columns: Sequence[str] | None = None,
    donor_key: str | None = "donor",
    obs_order: bool = False,
) -> pd.DataFrame:
    """Per-sample sheet columns from ``adata.obs``: the one per-sample metadata builder.

    The workflow copies every sample-sheet column into ``obs``; this recovers the sheet (index
    = sample IDs, values as text) so that the design can be resolved inside a job or a
    notebook, and gives :mod:`sepsis_sc.stats` and :mod:`sepsis_sc.patients` their condition
    and donor per sample.

    Parameters
    ----------
    adata
        AnnData (or anything with ``obs``) holding ``obs[sample_key]``.
    sample_key
        obs column of the sample IDs.
    columns
        None: every obs column that is constant within every sample (columns of floats are
        per-cell measurements and are skipped). Otherwise exactly these columns (absent ones
        skipped), which must be constant within each sample (``ValueError`` names the ones
        that are not); the result then starts with ``donor``: ``obs[donor_key]``, or the
        sample ID when ``donor_key`` is None or not in obs (each sample its own donor).
    donor_key
        obs column of the donors (used with ``columns``).
    obs_order
        Rows in order of first appearance in obs (default: sorted by sample ID).
    """
    obs = adata.obs
    if sample_key not in obs:
        raise KeyError(f"obs[{sample_key!r}] is missing; it comes from the sample sheet")
    codes = obs[sample_key].astype(str).to_numpy()
    if columns is None:
        keep = _constant_columns(obs, sample_key, codes)
    else:
        keep = _checked_columns(obs, sample_key, codes, columns, donor_key)
    meta = obs[keep].astype(str).groupby(codes, observed=True, sort=not obs_order).first()
    meta.index.name = sample_key
    if columns is None:
        return meta
    if donor_key is not None and donor_key in obs:
        return meta.rename(columns={donor_key: "donor"})
    meta.insert(0, "donor", meta.index)
    return meta


def _varies(values: pd.Series, codes: np.ndarray) -> bool:
    """Whether a column takes more than one value (as text) within some sample."""
    return bool(values.astype(str).groupby(codes, observed=True).nunique().max() > 1)


def _constant_columns(obs: pd.DataFrame, sample_key: str, codes: np.ndarray) -> list[str]:
    """The obs columns that are sheet columns: text, constant within every sample."""
    keep = []
    for c in obs.columns:
        if c == sample_key:
            continue
        s = obs[c]
        if s.dtype.kind in "fc":  # per-cell measurements, never sheet columns (those are text)
            continue
        if not _varies(s, codes):
            keep.append(c)
    return keep


def _checked_columns(
    obs: pd.DataFrame,
    sample_key: str,
    codes: np.ndarray,
    columns: Sequence[str],
    donor_key: str | None,
) -> list[str]:
    """The donor column and ``columns`` present in obs; error when one varies in a sample."""
    donor = [donor_key] if donor_key is not None and donor_key in obs else []
    cols = [c for c in dict.fromkeys(columns) if c in obs and c not in (sample_key, donor_key)]
    keep = donor + cols
    bad = [c for c in keep if _varies(obs[c], codes)]
    if bad:
        raise ValueError(
            f"obs column(s) {bad} vary within a sample; sample-sheet columns such as condition "
            f"and donor must be constant per {sample_key} (fix the sample sheet)"
        )
    return keep
