"""The scoring stage: :func:`score_states` scores every state in its parent population.

Slots written (docs/architecture.md):

* ``obs["<state>_score"]``: float, NaN outside the parent population;
* ``obs["<state>"]``: nullable bool call (discrete states only), ``<NA>`` outside the call
  population;
* ``uns["state_rules"]``: per state, the genes used and missing, the parent population, the
  call rule and threshold (the same content as the returned table), and
  ``uns["state_rules_params"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from sepsis_sc.config import ScoringSettings, StatsSettings
from sepsis_sc.data import resolve_organism
from sepsis_sc.score.calls import (
    call_population,
    call_rules,
    call_state,
    control_cells,
    require_reference,
    rule_for,
)
from sepsis_sc.score.signatures import (
    describe_population,
    population_mask,
    state_signatures,
    strata_present,
)
from sepsis_sc.score.ucell import ucell_scores
from sepsis_sc.store import CountSource

logger = logging.getLogger(__name__)


def _state_row(
    s: Mapping[str, Any],
    var_index: pd.Index,
    parent: np.ndarray,
    min_genes: int | None,
    min_genes_fraction: float,
    min_cells_parent: int,
) -> dict[str, Any]:
    """One row of the rules table: genes found and missing, and whether the state is scored.

    A state is skipped (``status = "skipped"`` with a ``reason``) when fewer genes than
    ``max(min_genes, ceil(min_genes_fraction * n_genes))`` are present, or when its parent
    population has fewer than ``min_cells_parent`` cells.
    """
    up_found = [g for g in s["up"] if g in var_index]
    down_found = [g for g in s["down"] if g in var_index]
    missing = [g for g in s["up"] + s["down"] if g not in var_index]
    n_total = len(s["up"]) + len(s["down"])
    need = int(min_genes if min_genes is not None else s["min_genes"])
    need = max(need, int(np.ceil(min_genes_fraction * n_total)))
    row = {
        "state": s["name"],
        "base_state": s["base_state"],
        "stratum": s["stratum"],
        "label": s["label"],
        "parent": describe_population(s["parent"]),
        "call_population": describe_population(s["call_within"] or s["parent"])
        if s["discrete"]
        else "",
        "n_genes_up": len(s["up"]),
        "n_found_up": len(up_found),
        "n_genes_down": len(s["down"]),
        "n_found_down": len(down_found),
        "genes_up": ";".join(up_found),
        "genes_down": ";".join(down_found),
        "genes_missing": ";".join(missing),
        "min_genes": need,
        "n_cells_parent": int(parent.sum()),
        "status": "scored",
        "reason": "",
        "discrete": s["discrete"],
        "rule": "",
        "threshold": np.nan,
        "n_called": np.nan,
        "fraction_called": np.nan,
        "source": s["source"],
    }
    if len(up_found) + len(down_found) < need:
        row["status"] = "skipped"
        row["reason"] = (
            f"only {len(up_found) + len(down_found)} of {n_total} genes found (min_genes={need})"
        )
    elif parent.sum() < min_cells_parent:
        row["status"] = "skipped"
        row["reason"] = (
            f"parent population ({row['parent']}) has {int(parent.sum())} cells "
            f"(< min_cells_parent={min_cells_parent})"
        )
    if row["status"] == "skipped":
        logger.warning("state %s skipped: %s", s["name"], row["reason"])
    return row


def _parent_scores(
    adata: ad.AnnData,
    to_score: Sequence[Mapping[str, Any]],
    parents: Mapping[str, np.ndarray],
    ucell: Mapping[str, Any],
) -> pd.DataFrame | None:
    """Signed (unclipped) UCell scores of the states, ranking only cells of some parent."""
    if not to_score:
        return None
    union = np.logical_or.reduce([parents[s["name"]] for s in to_score])
    return ucell_scores(adata, to_score, clip=False, mask=union, **ucell)


def _write_score(
    adata: ad.AnnData, name: str, scores: pd.DataFrame | None, parent: np.ndarray
) -> np.ndarray:
    """Write ``obs["<name>_score"]`` (NaN outside the parent population); return it."""
    assert scores is not None
    col = scores[name].to_numpy().copy()
    col[~parent] = np.nan
    adata.obs[f"{name}_score"] = col
    return col


def _record_rules(adata: ad.AnnData, table: pd.DataFrame, params: Mapping[str, Any]) -> None:
    """``uns["state_rules"]`` (the table, NaN as "NA") and ``uns["state_rules_params"]``."""
    table["n_called"] = table["n_called"].astype(float)
    adata.uns["state_rules"] = {
        str(r["state"]): {
            k: (v if not isinstance(v, float) or np.isfinite(v) else "NA")
            for k, v in r.items()
            if k != "state"
        }
        for r in table.to_dict("records")
    }
    adata.uns["state_rules_params"] = dict(params)


def score_states(
    adata: ad.AnnData,
    settings: ScoringSettings | None = None,
    *,
    organism: str = "auto",
    states: Sequence[str] | None = None,
    min_genes: int | None = None,
    min_cells_parent: int = StatsSettings().min_cells,
    calls: bool = True,
    control: str | None = None,
    condition_key: str = "condition",
    lineage_key: str = "lineage",
    cell_type_key: str = "cell_type",
    counts: CountSource | None = None,
    layer: str | None = "counts",
    w_neg: float = 1.0,
    chunk_size: int = 2000,
    **overrides: Any,
) -> pd.DataFrame:
    """Score therapy-target states inside their parent populations and call discrete states.

    Parameters
    ----------
    adata
        Annotated AnnData (``obs[lineage_key]``, ``obs[cell_type_key]``; raw counts in
        ``layers["counts"]`` or an integer-valued ``X``, or given as ``counts``).
    settings
        The config's ``scoring`` section (:class:`~sepsis_sc.config.ScoringSettings`;
        default: the schema's defaults). Its fields can be overridden by keyword
        (``**overrides``):

        ``signatures``: None (packaged ``resources/signatures/<organism>.yaml``), a path to
        such a YAML, or signature dicts/mapping as accepted by :func:`ucell_scores` (with
        ``parent`` etc.);
        ``min_genes_fraction``: also skip a set when fewer than this fraction of its genes
        (up + down) are present;
        ``call_rule`` and ``call_quantile``: the rule for discrete calls,
        ``"control_quantile"`` (default; call = score above that quantile of the control
        samples' cells of the call population; needs a control reference: without it a
        ``ValueError`` asks for ``control=`` or ``calls=False``) or ``"otsu"``
        (condition-blind: it calls a share of any data set, healthy ones included). A
        signature's own ``call_rule`` (e.g. ``{"method": "bimodal"}``, ``{"method":
        "fixed", "threshold": x}``, ``{"method": "none"}``) is used for that state, with
        this rule as its fallback;
        ``reference``: ``{"column": ..., "value": ...}`` of the control cells, used when
        ``control`` is not given;
        ``max_rank``: UCell ``maxRank``.
    organism
        ``"human"``, ``"mouse"`` or ``"auto"`` (from the gene names,
        :func:`sepsis_sc.data.resolve_organism`; genes that contradict a given organism are
        an error).
    states
        Subset of state names to score (default: all).
    min_genes
        Overrides every set's ``min_genes``: a set with fewer genes present in
        ``var_names`` is skipped and reported (``status = "skipped"``).
    min_cells_parent
        A state whose parent population has fewer cells in the whole data set is skipped
        (the workflow passes config ``stats.min_cells``).
    calls
        Make the per-cell calls of discrete states (default). ``False``: scores only, for
        data without control (reference) samples.
    control
        Label of the control (reference) condition in ``obs[condition_key]`` (default: the
        settings' ``reference``).
    condition_key, lineage_key, cell_type_key
        obs columns holding condition, lineage and subset labels.
    counts, layer, w_neg, chunk_size
        Passed to :func:`ucell_scores` (scores are kept signed, not clipped).

    Returns
    -------
    pandas.DataFrame
        One row per state (index ``state``): label, parent, call population, genes used
        and missing, ``n_cells_parent``, ``status`` (scored / skipped) and ``reason``,
        discrete, rule, threshold, ``n_called``, ``fraction_called``, source.

    Writes ``obs["<state>_score"]`` (NaN outside the parent), ``obs["<state>"]`` (nullable
    bool, discrete states, ``<NA>`` outside the call population) and ``uns["state_rules"]``.
    """
    settings = (settings or ScoringSettings()).with_overrides(overrides)
    min_genes_fraction = settings.min_genes_fraction
    if not 0 <= min_genes_fraction <= 1:
        raise ValueError(f"min_genes_fraction must be in [0, 1], got {min_genes_fraction}")
    if control is None and settings.reference:
        control, condition_key = settings.reference["value"], settings.reference["column"]
    organism = resolve_organism(adata.var_names, organism)
    strata = strata_present(adata, lineage_key, cell_type_key)
    sigs = state_signatures(organism, settings.signatures, states, strata)
    rules = call_rules({"method": settings.call_rule, "quantile": settings.call_quantile})
    is_control = control_cells(adata, control, condition_key)

    var_index = pd.Index(adata.var_names)
    parents = {
        s["name"]: population_mask(adata, s["parent"], lineage_key, cell_type_key) for s in sigs
    }
    rows = [
        _state_row(
            s, var_index, parents[s["name"]], min_genes, min_genes_fraction, min_cells_parent
        )
        for s in sigs
    ]
    table = pd.DataFrame(rows).set_index("state", drop=False)
    to_score = [s for s, row in zip(sigs, rows, strict=True) if row["status"] == "scored"]
    if calls:
        require_reference(to_score, rules, is_control)

    ucell = {
        "max_rank": settings.max_rank,
        "w_neg": w_neg,
        "counts": counts,
        "layer": layer,
        "chunk_size": chunk_size,
    }
    scores = _parent_scores(adata, to_score, parents, ucell)
    for s in to_score:
        name = s["name"]
        parent = parents[name]
        col = _write_score(adata, name, scores, parent)
        if s["discrete"]:
            call_pop = call_population(adata, s, parent, table, lineage_key, cell_type_key)
            rule = rule_for(s, rules)
            call_state(adata, table, name, col, call_pop, rule, is_control, calls)

    params = {
        "organism": organism,
        "max_rank": int(settings.max_rank),
        "w_neg": float(w_neg),
        "layer": str(layer),
        "control": "" if control is None else str(control),
        "min_cells_parent": int(min_cells_parent),
        "score": "signed UCell (not clipped)",
    }
    _record_rules(adata, table, params)
    return table.reset_index(drop=True)
