"""Checks of the integration inputs and the one-batch-level decisions every step shares.

* :func:`require_obs`, :func:`require_hvgs`: the ``obs`` columns and the HVG flags a step
  needs, with messages that say how to fix them;
* :func:`batch_levels`, :func:`one_batch_note`, :func:`one_level_batch`: a batch key with
  one level (one sequencing run; ``sample_id`` with one sample) is decided from
  ``obs[batch_key]`` and recorded with a ``note`` (:data:`ONE_BATCH_NOTE`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = [
    "ONE_BATCH_NOTE",
    "require_obs",
    "require_hvgs",
    "batch_levels",
    "one_batch_note",
    "one_level_batch",
]

#: Note written where a batch step or metric is skipped because the batch key has one level.
ONE_BATCH_NOTE = "skipped: one batch level"


def require_obs(adata: ad.AnnData, keys: Sequence[str], what: str) -> None:
    """Raise unless each ``obs[key]`` exists and has no missing values.

    ``what`` says what the column is for (named in the message). ``KeyError`` for a missing
    column (the available ones listed), ``ValueError`` for missing values.
    """
    for key in keys:
        if key not in adata.obs:
            raise KeyError(
                f"obs column {key!r} ({what}) not found; available columns: "
                f"{', '.join(map(str, adata.obs.columns))}. Set the config key to an existing column."
            )
        if adata.obs[key].isna().any():
            raise ValueError(
                f"obs column {key!r} ({what}) has {int(adata.obs[key].isna().sum())} missing "
                "values; fill them (e.g. 'unknown') or drop those cells."
            )


def require_hvgs(adata: ad.AnnData) -> np.ndarray:
    """The ``var["highly_variable"]`` mask (at least two genes), or a ``KeyError`` saying to
    run :func:`sepsis_sc.integrate.select_hvgs`."""
    if "highly_variable" not in adata.var:
        raise KeyError(
            "var['highly_variable'] is missing; run sepsis_sc.integrate.select_hvgs(adata) first."
        )
    mask = adata.var["highly_variable"].to_numpy(dtype=bool)
    if mask.sum() < 2:
        raise ValueError(f"only {int(mask.sum())} highly variable genes flagged; need at least 2.")
    return mask


def batch_levels(adata: ad.AnnData, keys: Sequence[str]) -> list[str]:
    """Distinct values of ``obs[keys]`` among the cells (combinations for several keys)."""
    obs = adata.obs[list(keys)].astype(str)
    values = obs.iloc[:, 0] if len(keys) == 1 else obs.agg(" | ".join, axis=1)
    return sorted(pd.unique(values.to_numpy()))


def one_batch_note(
    keys: Sequence[str], levels: Sequence[str], what: str, prefix: str = ONE_BATCH_NOTE
) -> str:
    """``"<prefix> ('<level>' in obs['<key>']): <what>"``, the note of a one-level batch key."""
    cols = ", ".join(f"obs[{k!r}]" for k in keys)
    level = repr(levels[0]) if levels else "none"
    return f"{prefix} ({level} in {cols}): {what}"


def one_level_batch(
    adata: ad.AnnData, batch_key: str, what: str, log: str, extra: dict | None = None
) -> tuple[str | None, dict]:
    """``(batch_key, {})`` when ``obs[batch_key]`` has two or more levels; else ``None`` and
    the record's one-batch entries.

    The entries are ``batch_key_requested``, ``n_batches``, then ``extra``, then a ``note``
    saying ``what`` is done instead; ``log`` (formatted with the key and its one level) is
    logged.
    """
    levels = batch_levels(adata, [batch_key])
    if len(levels) >= 2:
        return batch_key, {}
    one_batch = {
        "batch_key_requested": batch_key,
        "n_batches": len(levels),
        **(extra or {}),
        "note": one_batch_note([batch_key], levels, what, prefix="one batch level"),
    }
    logger.info(log, batch_key, levels[0] if levels else None)
    return None, one_batch
