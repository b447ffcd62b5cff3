"""Immune-state calls from the readout flags (:func:`call_states`), by the rules in
``resources/patient_states.yaml`` (each with threshold, source and therapy *hypotheses*;
:func:`load_state_rules`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sepsis_sc.patients.readouts import READOUTS
from sepsis_sc.patients.reference import FLAGS, NOT_ASSESSED
from sepsis_sc.resources import load_yaml, resource_path

__all__ = ["load_state_rules", "call_states"]


def load_state_rules(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Load and check the immune-state rules (default ``resources/patient_states.yaml``).

    Parameters
    ----------
    path
        YAML list of rules (see the header of the packaged file).

    Returns
    -------
    list of dict
        One dict per rule with ``all_of``, ``any_of``, ``support``, ``hypotheses``,
        ``therapy_targets`` defaulted to empty lists and ``tissue_only`` to False.

    Raises
    ------
    ValueError
        When a rule lacks name, label, threshold or source, has neither ``all_of`` nor
        ``any_of``, names an unknown readout or flag, or a therapy target that is not in
        ``resources/therapy_targets.yaml``.
    """
    p = Path(path) if path is not None else resource_path("patient_states.yaml")
    raw = load_yaml(p)
    if not isinstance(raw, list):
        raise ValueError(f"{p}: expected a list of state rules")
    targets = set(load_yaml(resource_path("therapy_targets.yaml")) or {})
    known = {r.name for r in READOUTS}
    out, seen = [], set()
    for i, rule in enumerate(raw):
        rule = dict(rule)
        name = rule.get("name", f"#{i}")
        for key in ("name", "label", "threshold", "source"):
            if not rule.get(key):
                raise ValueError(f"{p}: state rule {name!r} has no {key!r}")
        if name in seen:
            raise ValueError(f"{p}: state rule {name!r} is repeated")
        seen.add(name)
        for key in ("all_of", "any_of", "support", "hypotheses", "therapy_targets"):
            rule[key] = list(rule.get(key) or [])
        rule["tissue_only"] = bool(rule.get("tissue_only", False))
        if bool(rule["all_of"]) == bool(rule["any_of"]):
            raise ValueError(f"{p}: state rule {name!r} needs exactly one of all_of / any_of")
        for cond in rule["all_of"] + rule["any_of"] + rule["support"]:
            if cond.get("readout") not in known:
                raise ValueError(
                    f"{p}: state rule {name!r}: unknown readout {cond.get('readout')!r}"
                )
            if cond.get("flag") not in ("below", "above"):
                raise ValueError(f"{p}: state rule {name!r}: flag must be below / above")
        bad = set(rule["therapy_targets"]) - targets
        if bad:
            raise ValueError(f"{p}: state rule {name!r}: therapy target(s) {sorted(bad)} unknown")
        out.append(rule)
    return out


def _fmt(readout: str, row: pd.Series | None) -> str:
    if row is None or not np.isfinite(row["z"]):
        return f"{readout} {NOT_ASSESSED}"
    return f"{readout} z={row['z']:.1f} ({row['flag']})"


def call_states(
    scored: pd.DataFrame,
    rules: Sequence[Mapping[str, Any]] | None = None,
    *,
    note: str = "",
    z_probable: float | None = 2.0,
) -> pd.DataFrame:
    """Immune-state call per sample x rule from the readout flags.

    Parameters
    ----------
    scored
        Output of :func:`score_samples` (long, with ``flag`` and ``z``).
    rules
        State rules (default :func:`load_state_rules`).
    note
        When set (no reference range), every call is ``not assessed`` with this evidence.
    z_probable
        ``probable`` call: the primary readout(s) are not beyond the (small-sample,
        conservative) flag threshold but at least ``z_probable`` robust SDs out in the rule's
        direction, *and* at least one supporting readout is flagged in its direction. Two
        independent lines of evidence replace one extreme one (None: no probable calls).

    Returns
    -------
    pandas.DataFrame
        ``sample_id``, ``state``, ``label``, ``call`` (yes / probable / no /
        not assessable / not assessed), ``n_support`` (supporting flags that hold), ``n_support_total``,
        ``evidence``, ``threshold``, ``source``, ``therapy_targets``, ``hypotheses``.
        ``all_of``: yes when every listed flag holds, not assessable when one is missing.
        ``any_of``: yes when one holds, not assessable when none is assessable.
    """
    rules = list(rules) if rules is not None else load_state_rules()
    by = (
        {(s, r): row for (s, r), row in scored.set_index(["sample_id", "readout"]).iterrows()}
        if len(scored)
        else {}
    )
    rows = []
    for sid in dict.fromkeys(scored["sample_id"]):
        for rule in rules:
            prim = rule["all_of"] or rule["any_of"]
            got = [by.get((sid, c["readout"])) for c in prim]
            ok = [g is not None and g["flag"] in FLAGS for g in got]
            hit = [o and g["flag"] == c["flag"] for o, g, c in zip(ok, got, prim)]
            if note:
                call = NOT_ASSESSED
            elif rule["all_of"]:
                call = "not assessable" if not all(ok) else ("yes" if all(hit) else "no")
            else:
                call = "yes" if any(hit) else ("no" if any(ok) else "not assessable")
            sup = [(c, by.get((sid, c["readout"]))) for c in rule["support"]]
            n_sup = sum(1 for c, g in sup if g is not None and g["flag"] == c["flag"])
            if call == "no" and z_probable is not None and n_sup >= 1:
                need = (
                    prim
                    if rule["all_of"]
                    else [c for c, g in zip(prim, got) if g is not None and g["flag"] in FLAGS]
                )
                zs = {c["readout"]: by.get((sid, c["readout"])) for c in need}
                near = [
                    g is not None
                    and np.isfinite(float(g["z"]))
                    and (
                        float(g["z"]) <= -z_probable
                        if c["flag"] == "below"
                        else float(g["z"]) >= z_probable
                    )
                    for c, g in ((c, zs[c["readout"]]) for c in need)
                ]
                if near and (all(near) if rule["all_of"] else any(near)):
                    call = "probable"
            if note:
                evidence = note
            else:
                evidence = "; ".join(_fmt(c["readout"], g) for c, g in zip(prim, got)) + (
                    ""
                    if not sup
                    else " | support: " + ", ".join(_fmt(c["readout"], g) for c, g in sup)
                )
                if call == "not assessable" and rule["tissue_only"]:
                    evidence += " | tissue-only state: too few or no cells of the population"
            rows.append(
                {
                    "sample_id": sid,
                    "state": rule["name"],
                    "label": rule["label"],
                    "call": call,
                    "n_support": n_sup if not note else 0,
                    "n_support_total": len(sup),
                    "evidence": evidence,
                    "threshold": " ".join(str(rule["threshold"]).split()),
                    "source": " ".join(str(rule["source"]).split()),
                    "therapy_targets": ", ".join(rule["therapy_targets"]),
                    "hypotheses": " / ".join(rule["hypotheses"]),
                }
            )
    return pd.DataFrame(rows)
