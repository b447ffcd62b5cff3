"""The therapy-target state signatures and the cell populations they are scored in.

* :func:`load_signatures`: ``resources/signatures/<organism>.yaml`` (or a file of the same
  layout) validated, defaults filled in; :func:`signature_list` does the same for signatures
  given as dicts;
* :func:`state_signatures`: the signatures a run scores, stratified ones (``per: lineage`` /
  ``per: cell_type``) expanded into one state per stratum present (:func:`strata_present`);
  :func:`base_state` maps a stratified name back to its signature;
* :func:`population_mask` and :func:`describe_population`: a signature's ``parent`` /
  ``call_within`` population as a cell mask and in words.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from sepsis_sc.resources import load_yaml, resource_path

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


def signature_list(
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


def state_signatures(
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
        sigs = signature_list(signatures)
    sigs = [e for s in sigs for e in _expand(s, strata)]
    if states is not None:
        known = {s["name"] for s in sigs} | {s["base_state"] for s in sigs}
        unknown = set(states) - known
        if unknown:
            raise ValueError(f"unknown state(s) {sorted(unknown)}; known: {sorted(known)}")
        want = set(states)
        sigs = [s for s in sigs if s["name"] in want or s["base_state"] in want]
    return sigs


def strata_present(adata: ad.AnnData, lineage_key: str, cell_type_key: str) -> dict[str, list[str]]:
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


def population_mask(
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


def describe_population(spec: Mapping[str, Any] | None) -> str:
    if spec is None or spec.get("all"):
        return "all cells"
    return "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in spec.items() if v)
