"""Therapy-target state scoring: rank-based signed signature scores per cell.

Each state of ``resources/signatures/<organism>.yaml`` (TREM2-high macrophage, T-cell
exhaustion, HLA-DR-low monocyte, ...) is scored only inside its parent population (the cell
type it was defined in) with a UCell score (Andreatta & Carmona 2021, CSBJ,
DOI 10.1016/j.csbj.2021.06.043), and states marked ``discrete`` get a per-cell call.

Slots written by :func:`score_states` (docs/architecture.md):

* ``obs["<state>_score"]``: float, NaN outside the parent population;
* ``obs["<state>"]``: nullable bool call (discrete states only), ``<NA>`` outside the call
  population;
* ``uns["state_rules"]``: per state, the genes used and missing, the parent population, the
  call rule and threshold (the same content as the returned table).

Per-cell scores are for visualisation and state calling; inference is done at the sample
level by :mod:`sepsis_sc.stats` (never with cells as replicates).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sepsis_sc.data import get_counts, resolve_organism
from sepsis_sc.resources import load_yaml, resource_path

logger = logging.getLogger(__name__)

__all__ = [
    "load_signatures",
    "ucell_scores",
    "score_states",
    "base_state",
    "DEFAULT_CALL_RULE",
    "STRATUM_SEP",
]

#: Default rule for discrete calls: above the 95th percentile of the control samples' cells of
#: the call population (a flow-cytometry-style gate set on healthy controls).
DEFAULT_CALL_RULE: dict[str, Any] = {"method": "control_quantile", "quantile": 0.95}

_REQUIRED_KEYS = ("name", "up", "down", "source", "parent")

#: Separator between a state and its stratum in the names of stratified states
#: (``per: lineage`` or ``per: cell_type`` in the signature file): ``cytokine_storm.monocyte``.
STRATUM_SEP = "."
_PER_FIELDS = ("lineage", "cell_type")
_UNASSIGNED = "Unassigned"  # = sepsis_sc.annotate.UNASSIGNED; scoring does not need annotate


def base_state(name: str) -> str:
    """The signature a (possibly stratified) state name comes from.

    ``base_state("cytokine_storm.monocyte") == "cytokine_storm"``; unstratified names are
    returned unchanged. Therapy-target entries and primary metrics are keyed by the base.
    """
    return str(name).split(STRATUM_SEP, 1)[0]


def _slug(value: str) -> str:
    """A stratum label as a name part: ``"CD8 effector/memory T"`` -> ``cd8_effector_memory_t``."""
    return re.sub(r"[^0-9a-z]+", "_", str(value).lower()).strip("_")


# --------------------------------------------------------------------------------------
# signatures
# --------------------------------------------------------------------------------------
def load_signatures(organism: str, path: str | Path | None = None) -> list[dict[str, Any]]:
    """Load and validate the therapy-target state signatures.

    Parameters
    ----------
    organism
        ``"human"`` or ``"mouse"``; selects ``resources/signatures/<organism>.yaml`` and is
        checked against each entry's ``organism`` field.
    path
        Optional YAML file with the same layout (a list of mappings with ``name``, ``up``,
        ``down``, ``source``, ``parent`` and optionally ``label``, ``call_within``,
        ``discrete``, ``min_genes``, ``expected``) to use instead of the packaged resource.

    Returns
    -------
    list of dict
        One dict per state with defaults filled in (``label`` = name, ``discrete`` = False,
        ``min_genes`` = 3, ``call_within`` = None, ``expected`` = ``"unclear"``).

    Raises
    ------
    ValueError
        If the organism is unknown, a required key is missing, a name is repeated, or a set
        has no genes.
    """
    if organism not in ("human", "mouse"):
        raise ValueError(f"organism must be 'human' or 'mouse', got {organism!r}")
    p = Path(path) if path is not None else resource_path("signatures", f"{organism}.yaml")
    raw = load_yaml(p)
    if not isinstance(raw, list):
        raise ValueError(
            f"{p}: expected a YAML list of signature mappings, got {type(raw).__name__}"
        )
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{p}: entry {i} is not a mapping")
        missing = [k for k in _REQUIRED_KEYS if k not in entry]
        if missing:
            raise ValueError(f"{p}: signature {entry.get('name', i)!r} lacks key(s) {missing}")
        name = str(entry["name"])
        if name in seen:
            raise ValueError(f"{p}: signature name {name!r} appears twice")
        seen.add(name)
        org = entry.get("organism", organism)
        if org != organism:
            raise ValueError(f"{p}: signature {name!r} is for {org!r}, not {organism!r}")
        sig = _normalise_signature(name, entry)
        sig["organism"] = organism
        out.append(sig)
    return out


def _normalise_signature(name: str, entry: Mapping[str, Any] | Sequence[str]) -> dict[str, Any]:
    """Fill defaults; accept a bare gene list as an up-only set scored in all cells."""
    if isinstance(entry, Mapping):
        sig = dict(entry)
    else:
        sig = {"up": list(entry), "down": []}
    base = str(sig.get("base_state") or name)
    if not (sig.get("stratum") and name.startswith(base + STRATUM_SEP)):  # not an expansion
        sig["base_state"], sig["stratum"] = name, ""
        if STRATUM_SEP in name:
            raise ValueError(
                f"signature name {name!r} contains {STRATUM_SEP!r}, which separates a state "
                "from its stratum (per: lineage / cell_type); rename it"
            )
    sig["name"] = name
    per = sig.get("per")
    if per is not None and per not in _PER_FIELDS:
        raise ValueError(
            f"signature {name!r}: per must be one of {list(_PER_FIELDS)} (one state per "
            f"lineage or per cell type of the parent), got {per!r}"
        )
    sig["per"] = per
    sig["up"] = [str(g) for g in (sig.get("up") or [])]
    sig["down"] = [str(g) for g in (sig.get("down") or [])]
    if not sig["up"] and not sig["down"]:
        raise ValueError(f"signature {name!r} has neither 'up' nor 'down' genes")
    sig.setdefault("label", name)
    sig.setdefault("source", "")
    sig.setdefault("parent", {"all": True})
    sig.setdefault("call_within", None)
    sig["discrete"] = bool(sig.get("discrete", False))
    sig["min_genes"] = int(sig.get("min_genes", 3))
    sig.setdefault("expected", "unclear")
    return sig


def _as_signature_list(
    signatures: Sequence[Mapping[str, Any]] | Mapping[str, Any],
) -> list[dict[str, Any]]:
    if isinstance(signatures, Mapping):
        return [_normalise_signature(str(k), v) for k, v in signatures.items()]
    out = []
    for s in signatures:
        if not isinstance(s, Mapping) or "name" not in s:
            raise ValueError("each signature in a list must be a mapping with a 'name'")
        out.append(_normalise_signature(str(s["name"]), s))
    return out


# --------------------------------------------------------------------------------------
# UCell
# --------------------------------------------------------------------------------------
def _chunk_ranks(block: sp.csr_matrix, query: np.ndarray, max_rank: int) -> np.ndarray:
    """Per-cell descending ranks (ties averaged, as UCell) of the ``query`` gene columns.

    Only the non-zero entries of each row are sorted; zeros tie at the bottom with the
    average rank ``nnz + (n_genes - nnz + 1) / 2``. Ranks above ``max_rank`` become
    ``max_rank + 1``.
    """
    block = sp.csr_matrix(block, copy=True)
    block.sum_duplicates()
    block.eliminate_zeros()
    n_rows, n_genes = block.shape
    data = block.data
    if data.size and data.min() < 0:
        raise ValueError(
            "negative values in the matrix used for ranking; UCell needs counts or "
            "log-normalised expression, not scaled/centred data (use layer='counts')."
        )
    nnz = np.diff(block.indptr)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), nnz)
    qvals = block[:, query].toarray()  # n_rows x n_query, small
    if data.size and np.all(data == np.round(data)) and data.max() < 2**40:
        codes = data.astype(np.int64)
        n_codes = int(codes.max()) + 1 if codes.size else 1
        qcodes = np.round(qvals).astype(np.int64)
    else:
        uniq, codes = np.unique(data, return_inverse=True)
        n_codes = max(len(uniq), 1)
        qcodes = np.searchsorted(uniq, qvals)
        qcodes = np.minimum(qcodes, n_codes - 1)
    # key sorts rows ascending, values descending inside a row
    keys = np.sort(rows * n_codes + (n_codes - 1 - codes))
    qrow = np.arange(n_rows, dtype=np.int64)[:, None]
    qkeys = qrow * n_codes + (n_codes - 1 - qcodes)
    left = np.searchsorted(keys, qkeys, side="left")
    right = np.searchsorted(keys, qkeys, side="right")
    start = block.indptr[:-1].astype(np.int64)[:, None]
    rank_nz = (left - start) + (right - left + 1) / 2.0
    rank_zero = nnz[:, None] + (n_genes - nnz[:, None] + 1) / 2.0
    ranks = np.where(qvals > 0, rank_nz, np.broadcast_to(rank_zero, qvals.shape))
    return np.where(ranks > max_rank, max_rank + 1.0, ranks)


def _u_score(ranks: np.ndarray, max_rank: int) -> np.ndarray:
    """UCell's normalised Mann-Whitney U (1 = all genes at the top, 0 = none in max_rank)."""
    n = ranks.shape[1]
    u = ranks.sum(axis=1) - n * (n + 1) / 2.0
    auc = 1.0 - u / (n * max_rank)
    auc[np.all(ranks > max_rank, axis=1)] = 0.0
    return auc


def _ucell_params(adata: ad.AnnData, max_rank: int, chunk_size: int) -> int:
    """Check the UCell settings and the gene names; return ``max_rank`` capped at n_genes."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not pd.Index(adata.var_names).is_unique:
        raise ValueError("adata.var_names are not unique; call adata.var_names_make_unique()")
    if max_rank > adata.n_vars:
        logger.info(
            "max_rank %d > number of genes %d; using %d", max_rank, adata.n_vars, adata.n_vars
        )
        return adata.n_vars
    return max_rank


def _ranking_matrix(adata: ad.AnnData, layer: str | None) -> Any:
    """The matrix ranked: ``X`` when ``layer`` is None, else the raw counts.

    Raw counts come from ``layers[layer]`` or, when that layer is absent, an integer-valued
    ``X`` (:func:`sepsis_sc.data.get_counts`), so counts in ``X`` work as in a layer.
    """
    return adata.X if layer is None else get_counts(adata, layer, check=False)[0]


def _signature_columns(
    sigs: Sequence[Mapping[str, Any]], var_names: pd.Index
) -> tuple[np.ndarray, dict[str, tuple[list[int], list[int]]]]:
    """Gene columns to rank (the union over sets) and each set's up/down positions in them.

    Genes absent from ``var_names`` are dropped; a repeated gene counts once.
    """
    var_index = pd.Index(var_names)
    present: dict[str, int] = {}
    parts: dict[str, tuple[list[int], list[int]]] = {}
    for s in sigs:
        cols = []
        for key in ("up", "down"):
            genes = [g for g in dict.fromkeys(s[key]) if g in var_index]
            for g in genes:
                present.setdefault(g, len(present))
            cols.append([present[g] for g in genes])
        parts[s["name"]] = (cols[0], cols[1])
    return var_index.get_indexer(list(present)), parts


def _signed_scores(
    ranks: np.ndarray,
    sigs: Sequence[Mapping[str, Any]],
    parts: Mapping[str, tuple[list[int], list[int]]],
    max_rank: int,
    w_neg: float,
    clip: bool,
) -> np.ndarray:
    """``U(up) - w_neg * U(down)`` per cell and set (NaN for a set with no genes present)."""
    out = np.full((ranks.shape[0], len(sigs)), np.nan)
    for j, s in enumerate(sigs):
        up, down = parts[s["name"]]
        if not up and not down:
            continue
        score = _u_score(ranks[:, up], max_rank) if up else np.zeros(ranks.shape[0])
        if down:
            score = score - w_neg * _u_score(ranks[:, down], max_rank)
        if clip:
            score = np.maximum(score, 0.0)
        out[:, j] = score
    return out


def ucell_scores(
    adata: ad.AnnData,
    signatures: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    *,
    max_rank: int = 1500,
    w_neg: float = 1.0,
    layer: str | None = "counts",
    clip: bool = False,
    chunk_size: int = 2000,
    mask: np.ndarray | None = None,
    counts_file: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Per-cell signed UCell scores.

    For each cell, genes are ranked by expression (highest = 1, ties averaged); ranks above
    ``max_rank`` are set to ``max_rank + 1``. A set's score is the normalised Mann-Whitney U
    statistic ``1 - (sum(ranks) - n(n+1)/2) / (n * max_rank)`` over its ``n`` genes found in
    the data (UCell). A signed set scores ``U(up) - w_neg * U(down)``. Ranks inside a cell do
    not change under per-cell scaling, so the score is the same on raw counts and on
    log1p(CP10k), and robust to library size. Ranking is done on the sparse matrix, chunk by
    chunk: only non-zero entries are sorted; zeros tie at the bottom.

    Parameters
    ----------
    adata
        AnnData with gene symbols as ``var_names``.
    signatures
        Mapping ``name -> {"up": [...], "down": [...]}`` (or ``name -> [genes]``), or a list
        of signature dicts with a ``name`` (as returned by :func:`load_signatures`).
    max_rank
        UCell ``maxRank``: genes ranked below it count as absent (default 1500, as UCell).
    w_neg
        Weight of the ``down`` score (UCell ``w_neg``, default 1).
    layer
        Raw-count layer to rank (default ``"counts"``; when absent, an integer-valued ``X``
        is used). ``None`` ranks ``adata.X`` whatever it holds. Must be non-negative.
    clip
        If True, clip signed scores at 0 as UCell does. Default False keeps the signed
        score (range ``[-w_neg, 1]``): clipping piles cells at 0 and discards exactly the
        loss of ``down`` genes that defines states such as HLA-DR-low monocytes.
    chunk_size
        Cells ranked at a time (memory ~ 24 bytes x non-zeros of a chunk).
    mask
        Optional boolean vector over cells; other cells get NaN and are not ranked.
    counts_file
        Rank ``layers[layer]`` of this ``.h5ad``, streamed in row chunks, instead of
        ``adata``'s matrix (``adata`` then needs only obs and var; the cells and genes must be
        the file's). The scores are the same: each cell is ranked on its own.

    Returns
    -------
    pandas.DataFrame
        Cells x signatures (index ``adata.obs_names``). Genes absent from ``var_names`` are
        dropped from a set; a set with no genes present scores NaN. Nothing is written to
        ``adata``.
    """
    max_rank = _ucell_params(adata, max_rank, chunk_size)
    sigs = _as_signature_list(signatures)
    query_idx, parts = _signature_columns(sigs, adata.var_names)
    cells = np.arange(adata.n_obs) if mask is None else np.flatnonzero(np.asarray(mask, bool))
    out = np.full((adata.n_obs, len(sigs)), np.nan)
    if query_idx.size and cells.size:
        for idx, block in _ranked_blocks(adata, layer, cells, chunk_size, counts_file):
            ranks = _chunk_ranks(block, query_idx, max_rank)
            out[idx] = _signed_scores(ranks, sigs, parts, max_rank, w_neg, clip)
    return pd.DataFrame(out, index=adata.obs_names, columns=[s["name"] for s in sigs])


def _ranked_blocks(
    adata: ad.AnnData,
    layer: str | None,
    cells: np.ndarray,
    chunk_size: int,
    counts_file: str | os.PathLike[str] | None,
):
    """``(cell positions, CSR rows)`` blocks of at most ``chunk_size`` of the given cells,
    from ``adata`` or streamed from ``counts_file`` (one pass over the file)."""
    if counts_file is None:
        mat = _ranking_matrix(adata, layer)
        for start in range(0, cells.size, chunk_size):
            idx = cells[start : start + chunk_size]
            block = mat[idx]
            yield idx, sp.csr_matrix(block) if not sp.issparse(block) else block.tocsr()
        return
    from sepsis_sc import store

    store.FileCounts.matching(counts_file, layer or "X", adata)
    wanted = np.zeros(adata.n_obs, bool)
    wanted[cells] = True
    for start, stop, chunk in store.iter_rows(counts_file, layer or "X", rows=wanted):
        idx = cells[(cells >= start) & (cells < stop)]
        for lo in range(0, idx.size, chunk_size):
            yield idx[lo : lo + chunk_size], chunk[lo : lo + chunk_size]


# --------------------------------------------------------------------------------------
# state scoring and calls
# --------------------------------------------------------------------------------------
def _population_mask(
    adata: ad.AnnData, spec: Mapping[str, Any] | None, lineage_key: str, cell_type_key: str
) -> np.ndarray:
    if spec is None or spec.get("all"):
        return np.ones(adata.n_obs, bool)
    mask = np.zeros(adata.n_obs, bool)
    for field, key in (("lineage", lineage_key), ("cell_type", cell_type_key)):
        labels = spec.get(field)
        if not labels:
            continue
        if key not in adata.obs:
            raise KeyError(
                f"obs[{key!r}] is needed to find the population {dict(spec)} but is missing; "
                "run sepsis_sc.annotate.annotate first or pass lineage_key=/cell_type_key="
            )
        mask |= adata.obs[key].astype(str).isin([str(x) for x in labels]).to_numpy()
    return mask


def _describe(spec: Mapping[str, Any] | None) -> str:
    if spec is None or spec.get("all"):
        return "all cells"
    return "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in spec.items() if v)


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


def _state_signatures(
    organism: str,
    signatures: Sequence[Mapping[str, Any]] | Mapping[str, Any] | str | Path | None,
    states: Sequence[str] | None,
    strata: Mapping[str, Sequence[str]],
) -> list[dict[str, Any]]:
    """The signatures to score: packaged/YAML/given ones, stratified signatures expanded
    (:func:`_expand`), limited to ``states`` (base names select all their strata)."""
    if signatures is None or isinstance(signatures, str | Path):
        sigs = load_signatures(organism, signatures)
    else:
        sigs = _as_signature_list(signatures)
    sigs = [e for s in sigs for e in _expand(s, strata)]
    if states is not None:
        known = {s["name"] for s in sigs} | {s["base_state"] for s in sigs}
        unknown = set(states) - known
        if unknown:
            raise ValueError(f"unknown state(s) {sorted(unknown)}; known: {sorted(known)}")
        want = set(states)
        sigs = [s for s in sigs if s["name"] in want or s["base_state"] in want]
    return sigs


def _strata_present(
    adata: ad.AnnData, lineage_key: str, cell_type_key: str
) -> dict[str, list[str]]:
    """Labels of each stratification field present in the data (category order, else sorted),
    ``Unassigned`` and unresolved labels included (they are dropped per state below)."""
    out: dict[str, list[str]] = {}
    for field, key in (("lineage", lineage_key), ("cell_type", cell_type_key)):
        if key not in adata.obs:
            continue
        col = adata.obs[key]
        present = set(col.astype(str).unique())
        order = [str(c) for c in col.cat.categories] if hasattr(col, "cat") else sorted(present)
        out[field] = [c for c in order if c in present]
    return out


def _expand(sig: Mapping[str, Any], strata: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """One signature per stratum for ``per: lineage`` / ``per: cell_type`` signatures.

    A stratified state is scored, called (its own control threshold) and tested within each
    stratum separately, so a shift in the mix of strata between conditions is not read as a
    change of state (cytokine and IFN scores differ between lineages at baseline). Strata:
    the parent's own labels of that field when it lists them (pre-specified), else every label
    of the field present in the data (``Unassigned`` left out). Names are
    ``<state>.<stratum slug>``, labels ``<label> (<stratum>)``.
    """
    per = sig.get("per")
    if not per:
        return [dict(sig)]
    parent = dict(sig["parent"] or {})
    values = parent.get(per)
    if not values:
        if per not in strata:
            raise KeyError(
                f"state {sig['name']!r} is stratified per {per} but the data have no {per} "
                "labels; run sepsis_sc.annotate.annotate first or pass lineage_key=/cell_type_key="
            )
        values = [v for v in strata[per] if v != _UNASSIGNED and "unresolved" not in v]
    out = []
    for v in values:
        e = dict(sig)
        e.update(
            name=f"{sig['name']}{STRATUM_SEP}{_slug(v)}",
            label=f"{sig['label']} ({v})",
            parent={per: [v]},
            base_state=sig["name"],
            stratum=str(v),
            per=None,
        )
        out.append(e)
    return out


def _call_rules(call_rules: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per-state call rules with a ``"default"`` (one rule dict applies to every state)."""
    if call_rules is None:
        call_rules = {}
    elif "method" in call_rules:
        call_rules = {"default": call_rules}
    rules = {str(k): dict(v) for k, v in call_rules.items()}
    rules.setdefault("default", dict(DEFAULT_CALL_RULE))
    return rules


def _rule_for(s: Mapping[str, Any], rules: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A state's call rule: ``call_rules[<state>]`` or ``[<base state>]`` when given, else the
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


def _control_cells(adata: ad.AnnData, control: str | None, condition_key: str) -> np.ndarray | None:
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
        "parent": _describe(s["parent"]),
        "call_population": _describe(s["call_within"] or s["parent"]) if s["discrete"] else "",
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


def _require_reference(
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
    need = [s["name"] for s in to_score if s["discrete"] and _needs_control(_rule_for(s, rules))]
    if need:
        raise ValueError(
            f"state calls for {', '.join(need)} need a control reference (cells above the "
            f"{rules['default'].get('quantile', 0.95):.0%} quantile of control cells): pass "
            "control=<label of the control/reference samples in obs[condition_key]> (and "
            "condition_key=), or calls=False for scores only. Condition-blind thresholds "
            "must be asked for: call_rules={'method': 'otsu'} or {'method': 'fixed', ...}."
        )


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


def _call_population(
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
        return parent & _population_mask(adata, s["call_within"], lineage_key, cell_type_key)
    except KeyError as err:
        logger.warning("state %s: %s; calling in the whole parent instead", s["name"], err)
        table.loc[s["name"], "call_population"] = table.loc[s["name"], "parent"]
        return parent


def _call_state(
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
    *,
    organism: str = "auto",
    signatures: Sequence[Mapping[str, Any]] | Mapping[str, Any] | str | Path | None = None,
    states: Sequence[str] | None = None,
    min_genes: int | None = None,
    min_genes_fraction: float = 0.0,
    min_cells_parent: int = 20,
    calls: bool = True,
    call_rules: Mapping[str, Any] | None = None,
    control: str | None = None,
    condition_key: str = "condition",
    lineage_key: str = "lineage",
    cell_type_key: str = "cell_type",
    layer: str | None = "counts",
    max_rank: int = 1500,
    w_neg: float = 1.0,
    chunk_size: int = 2000,
    counts_file: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Score therapy-target states inside their parent populations and call discrete states.

    Parameters
    ----------
    adata
        Annotated AnnData (``obs[lineage_key]``, ``obs[cell_type_key]``; raw counts in
        ``layers["counts"]`` or an integer-valued ``X``).
    organism
        ``"human"``, ``"mouse"`` or ``"auto"`` (from the gene names,
        :func:`sepsis_sc.data.resolve_organism`; genes that contradict a given organism are
        an error).
    signatures
        None (packaged ``resources/signatures/<organism>.yaml``), a path to such a YAML, or
        signature dicts/mapping as accepted by :func:`ucell_scores` (with ``parent`` etc.).
    states
        Subset of state names to score (default: all).
    min_genes
        Overrides every set's ``min_genes``: a set with fewer genes present in
        ``var_names`` is skipped and reported (``status = "skipped"``).
    min_genes_fraction
        Also skip a set when fewer than this fraction of its genes (up + down) are present
        (config ``scoring.min_genes_fraction``; default 0 = only ``min_genes`` applies).
    min_cells_parent
        A state whose parent population has fewer cells in the whole data set is skipped.
    calls
        Make the per-cell calls of discrete states (default). ``False``: scores only, for
        data without control (reference) samples.
    call_rules
        Rule for discrete calls: one rule dict for all states, or ``{"default": rule,
        "<state>": rule}``. Rules: ``{"method": "control_quantile", "quantile": 0.95}``
        (default; call = score above that quantile of the control samples' cells of the
        call population; needs ``control``: without it a ``ValueError`` asks for
        ``control=`` or ``calls=False``), ``{"method": "otsu"}`` (condition-blind: it
        calls a share of any data set, healthy ones included), ``{"method": "fixed",
        "threshold": x}``, ``{"method": "none"}`` (no calls).
    control
        Label of the control (reference) condition in ``obs[condition_key]``.
    condition_key, lineage_key, cell_type_key
        obs columns holding condition, lineage and subset labels.
    layer, max_rank, w_neg, chunk_size, counts_file
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
    if not 0 <= min_genes_fraction <= 1:
        raise ValueError(f"min_genes_fraction must be in [0, 1], got {min_genes_fraction}")
    organism = resolve_organism(adata.var_names, organism)
    strata = _strata_present(adata, lineage_key, cell_type_key)
    sigs = _state_signatures(organism, signatures, states, strata)
    rules = _call_rules(call_rules)
    is_control = _control_cells(adata, control, condition_key)

    var_index = pd.Index(adata.var_names)
    parents = {
        s["name"]: _population_mask(adata, s["parent"], lineage_key, cell_type_key) for s in sigs
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
        _require_reference(to_score, rules, is_control)

    ucell = {
        "max_rank": max_rank,
        "w_neg": w_neg,
        "layer": layer,
        "chunk_size": chunk_size,
        "counts_file": counts_file,
    }
    scores = _parent_scores(adata, to_score, parents, ucell)
    for s in to_score:
        name = s["name"]
        parent = parents[name]
        col = _write_score(adata, name, scores, parent)
        if s["discrete"]:
            call_pop = _call_population(adata, s, parent, table, lineage_key, cell_type_key)
            rule = _rule_for(s, rules)
            _call_state(adata, table, name, col, call_pop, rule, is_control, calls)

    params = {
        "organism": organism,
        "max_rank": int(max_rank),
        "w_neg": float(w_neg),
        "layer": str(layer),
        "control": "" if control is None else str(control),
        "min_cells_parent": int(min_cells_parent),
        "score": "signed UCell (not clipped)",
    }
    _record_rules(adata, table, params)
    return table.reset_index(drop=True)
