"""The planted truth and how a run is graded against it.

What the simulator plants (:func:`planted_programmes`: every gene a state moves;
:data:`PLANTED_EFFECTS`: the sample-level effects and the pre-specified table row that must
detect each), how far the scored signatures see it (:func:`planted_vs_scored`), the same
effects tested on the true labels (:func:`oracle_tests`: the design's own power), and the
grading of a run's tables (:func:`check_planted_effects`; :func:`null_calibration` for a
cohort without effects).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from sepsis_sc.sim.profiles import STATE_PROGRAMMES, TYPE_FOLDS, mouse_symbols

__all__ = [
    "PLANTED_EFFECTS",
    "check_planted_effects",
    "null_calibration",
    "oracle_tests",
    "planted_programmes",
    "planted_vs_scored",
]

#: which planted state each scored signature reads (signature name -> truth flag)
SIGNATURE_STATES = {
    "ms1_monocyte": "ms1_like",
    "mono_hladr_low": "hla_low",
    "dc_tolerogenic": "hla_low",
    "t_exhaustion": "exhausted",
    "cytokine_storm": "cytokine_high",
    "trem2_high_macrophage": "trem2_high",
}


def planted_programmes() -> pd.DataFrame:
    """Every gene a planted state moves: ``state``, ``gene``, ``fold`` (the fold at a cell's
    mean intensity), ``direction``. ``trem2_high`` is a cell type: its programme is what
    separates it from the other macrophages (the lipid-associated genes up, resident genes
    down)."""
    rows = [
        {"state": st, "gene": g, "fold": f, "direction": "up" if f > 1 else "down"}
        for st, prog in STATE_PROGRAMMES.items()
        for g, f in prog.items()
    ]
    for g, f in TYPE_FOLDS["Macrophage"].items():
        rows.append(
            {
                "state": "trem2_high",
                "gene": g,
                "fold": 1 / f,
                "direction": "up" if f < 1 else "down",
            }
        )
    return pd.DataFrame(rows)


def planted_vs_scored(
    signatures: Sequence[Mapping[str, Any]], *, organism: str = "human"
) -> pd.DataFrame:
    """Overlap between the genes each planted state moves and the genes its signature scores.

    Parameters
    ----------
    signatures
        The scorer's signature sets (:func:`sepsis_sc.score.load_signatures`: ``name``,
        ``up``, ``down``). The simulator never reads them itself; a caller passes them in.
    organism
        ``"mouse"`` compares the mouse names the simulator writes (approximate orthologs).

    Returns
    -------
    pandas.DataFrame
        One row per signature of :data:`SIGNATURE_STATES`: ``signature``, ``state``,
        ``n_programme`` (genes the state moves), ``n_signature`` (genes the signature
        scores), ``n_shared`` (scored genes planted in the scored direction),
        ``signature_planted`` (``n_shared / n_signature``), ``programme_scored``
        (``n_shared / n_programme``), ``opposite`` (scored genes planted the other way),
        ``scored_not_planted`` (scored genes the state leaves alone).
    """
    prog = planted_programmes()
    if organism == "mouse":
        prog["gene"] = mouse_symbols(list(prog["gene"]))
        prog = prog.dropna(subset=["gene"])
    rows = []
    for sig in signatures:
        state = SIGNATURE_STATES.get(str(sig["name"]))
        if state is None:
            continue
        mine = prog[prog["state"] == state].set_index("gene")["direction"]
        scored = {g: "up" for g in sig.get("up") or []} | {g: "down" for g in sig.get("down") or []}
        shared = [g for g, d in scored.items() if mine.get(g) == d]
        opposite = [g for g, d in scored.items() if g in mine.index and mine[g] != d]
        absent = [g for g in scored if g not in mine.index]
        rows.append(
            {
                "signature": sig["name"],
                "state": state,
                "n_programme": len(mine),
                "n_signature": len(scored),
                "n_shared": len(shared),
                "signature_planted": round(len(shared) / max(len(scored), 1), 3),
                "programme_scored": round(len(shared) / max(len(mine), 1), 3),
                "opposite": " ".join(opposite),
                "scored_not_planted": " ".join(absent),
            }
        )
    return pd.DataFrame(rows)


#: The sample-level effects the simulator plants in sepsis (``effects=True``), each with the
#: pre-specified table row that must detect it: (source table, level/state, label, expected
#: direction). A state is read from its **primary** row (the metric fixed in
#: ``resources/therapy_targets.yaml``, ``role == "primary"`` in the effects table), the same
#: row :func:`sepsis_sc.stats.therapy_targets` reads, so the demo check and the therapy
#: table cannot disagree on what a state's readout is, and the check cannot pick the
#: luckiest metric.
PLANTED_EFFECTS: tuple[dict[str, str], ...] = (
    {
        "effect": "fewer T cells",
        "table": "composition",
        "level": "lineage",
        "label": "T",
        "direction": "down",
    },
    {
        "effect": "fewer NK cells",
        "table": "composition",
        "level": "lineage",
        "label": "NK",
        "direction": "down",
    },
    {
        "effect": "fewer B cells",
        "table": "composition",
        "level": "lineage",
        "label": "B",
        "direction": "down",
    },
    {
        "effect": "fewer DCs",
        "table": "composition",
        "level": "lineage",
        "label": "DC",
        "direction": "down",
    },
    {
        "effect": "more plasmablasts",
        "table": "composition",
        "level": "cell_type",
        "label": "Plasmablast",
        "direction": "up",
    },
    {
        "effect": "more mature neutrophils",
        "table": "composition",
        "level": "cell_type",
        "label": "Mature neutrophil",
        "direction": "up",
    },
    {
        "effect": "more platelets",
        "table": "composition",
        "level": "lineage",
        "label": "Platelet",
        "direction": "up",
    },
    {
        "effect": "classical monocyte expansion",
        "table": "composition",
        "level": "cell_type",
        "label": "Classical monocyte",
        "direction": "up",
    },
    {
        "effect": "more immature neutrophils",
        "table": "composition",
        "level": "cell_type",
        "label": "Immature neutrophil",
        "direction": "up",
    },
    {
        "effect": "more TREM2-high macrophages",
        "table": "effects",
        "level": "trem2_high_macrophage",
        "label": "primary",
        "direction": "up",
    },
    {
        "effect": "MS1-like monocyte state",
        "table": "effects",
        "level": "ms1_monocyte",
        "label": "primary",
        "direction": "up",
    },
    {
        "effect": "HLA class II loss in monocytes",
        "table": "effects",
        "level": "mono_hladr_low",
        "label": "primary",
        "direction": "up",
    },
    {
        "effect": "HLA class II loss in DCs",
        "table": "effects",
        "level": "dc_tolerogenic.cdc2",
        "label": "primary",
        "direction": "up",
    },
    {
        "effect": "T-cell exhaustion programme",
        "table": "effects",
        "level": "t_exhaustion",
        "label": "primary",
        "direction": "up",
    },
    {
        "effect": "monocyte cytokine programme",
        "table": "effects",
        "level": "cytokine_storm.monocyte",
        "label": "primary",
        "direction": "up",
    },
)


#: truth flag and parent cell types behind each state row of :data:`PLANTED_EFFECTS`: the
#: population the pipeline scores the state in (``parent`` in resources/signatures), so the
#: oracle answers the same question (exhaustion within CD8 effector/memory T, the
#: tolerogenic-DC shift within cDC2, the cytokine programme within monocytes)
_ORACLE_STATES = {
    "trem2_high_macrophage": ("trem2_high", ("Macrophage", "TREM2-high macrophage")),
    "ms1_monocyte": ("ms1_like", ("Classical monocyte",)),
    "mono_hladr_low": ("hla_low", ("Classical monocyte", "Non-classical monocyte")),
    "dc_tolerogenic.cdc2": ("hla_low", ("cDC2",)),
    "t_exhaustion": ("exhausted", ("CD8 effector/memory T",)),
    "cytokine_storm.monocyte": ("cytokine_high", ("Classical monocyte", "Non-classical monocyte")),
}


def oracle_tests(
    truth: pd.DataFrame, *, case: str = "sepsis", control: str = "control", min_cells: int = 1
) -> pd.DataFrame:
    """The planted effects tested on the simulator's truth: the design's own power.

    Uses the true cell types and state flags of the intact single cells (no QC, annotation or
    scoring error). Composition rows run the pipeline's own test
    (:func:`sepsis_sc.stats.composition_test`, propeller style) on the true labels; state
    rows compare the per-sample logit fraction of flagged cells within the true parent
    population (0.5-cell pseudo-counts) with a plain Welch t-test (no moderation). BH over
    the planted effects. An effect the oracle misses is beyond the design (too few samples or
    cells); one the oracle finds and the pipeline misses points at the pipeline.

    Parameters
    ----------
    truth
        The truth table the simulator writes (``truth.tsv.gz``).
    case, control
        Condition labels.
    min_cells
        A sample whose true parent population has fewer cells gives no value for that state
        (the pipeline's pre-specified ``stats.min_cells`` rule, so the oracle's power is the
        design's under the same analysis rule; default 1: every sample with a parent cell).

    Returns
    -------
    pandas.DataFrame
        One row per entry of :data:`PLANTED_EFFECTS`: ``oracle_effect`` (case minus control
        mean of the sample values), ``oracle_pvalue`` and ``oracle_fdr``.
    """
    from sepsis_sc.stats import bh_fdr, composition_test, welch_test

    cells = truth[~truth["is_doublet"].astype(bool) & ~truth["is_low_quality"].astype(bool)]
    cells = cells.reset_index(drop=True)
    cond = cells.groupby("sample_id", observed=True)["condition"].first().astype(str)
    n_all = cells.groupby("sample_id", observed=True).size()
    obs = cells[["sample_id", "condition", "donor", "lineage", "cell_type"]].astype(str)
    obs.index = obs.index.astype(str)
    labelled = ad.AnnData(obs=obs)
    comp = {
        level: composition_test(labelled, case=case, control=control, level=level).set_index(
            "label"
        )
        for level in ("lineage", "cell_type")
    }
    rows = []
    for spec in PLANTED_EFFECTS:
        if spec["table"] == "composition":
            tab = comp[spec["level"]]
            hit = tab.loc[spec["label"]] if spec["label"] in tab.index else None
            rows.append(
                {
                    "oracle_effect": float(hit["effect"]) if hit is not None else np.nan,
                    "oracle_pvalue": float(hit["pvalue"]) if hit is not None else np.nan,
                }
            )
            continue
        flag, parents = _ORACLE_STATES[spec["level"]]
        sub = cells[cells["cell_type"].isin(parents)]
        n = sub.groupby("sample_id", observed=True).size().reindex(n_all.index, fill_value=0)
        k = sub.groupby("sample_id", observed=True)[flag].sum().reindex(n_all.index, fill_value=0)
        value = np.log((k + 0.5) / (n - k + 0.5)).where(n >= max(int(min_cells), 1))
        a = value[cond == case].dropna().to_numpy(float)
        b = value[cond == control].dropna().to_numpy(float)
        pval = (
            welch_test(a, b)[3] if len(a) >= 2 and len(b) >= 2 else np.nan
        )  # unmoderated reference
        effect = float(a.mean() - b.mean()) if len(a) and len(b) else np.nan
        rows.append({"oracle_effect": effect, "oracle_pvalue": pval})
    out = pd.DataFrame(rows)
    out["oracle_fdr"] = bh_fdr(out["oracle_pvalue"].to_numpy())
    return out


def _primary_row(
    effects: pd.DataFrame, state: str, targets: Mapping[str, Any]
) -> tuple[pd.DataFrame, str]:
    """A state's pre-specified primary row of ``effects`` and its metric, chosen as
    :func:`sepsis_sc.stats.therapy_targets` chooses it (``targets``: the therapy-target
    entries)."""
    from sepsis_sc.score import base_state
    from sepsis_sc.stats import primary_rows

    entry = targets.get(state) or targets.get(base_state(state)) or {}
    hit = primary_rows(effects[effects["state"] == state], entry)
    metric = str(hit["metric"].iloc[0]) if len(hit) else "primary metric"
    return hit.head(1), metric


def _oracle(truth: pd.DataFrame | None, oracle_args: Mapping[str, Any]) -> pd.DataFrame | None:
    """:func:`oracle_tests` of ``truth`` with ``oracle_args`` (``case``, ``control``,
    ``min_cells``); None without a truth table. Other keywords are refused, as a signature
    would."""
    unknown = sorted(set(oracle_args) - {"case", "control", "min_cells"})
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    return None if truth is None else oracle_tests(truth, **oracle_args)


def check_planted_effects(
    effects: pd.DataFrame,
    composition: pd.DataFrame,
    *,
    alpha: float = 0.05,
    truth: pd.DataFrame | None = None,
    **oracle_args: Any,
) -> pd.DataFrame:
    """Score a run's sample-level results against the effects the simulator planted.

    Parameters
    ----------
    effects
        ``targets/condition_effects.tsv`` (:func:`sepsis_sc.stats.condition_effects`).
    composition
        ``targets/composition.tsv`` (:func:`sepsis_sc.stats.composition_test`).
    alpha
        FDR level.
    truth, case, control, min_cells
        Optional truth table of the simulated cohort: adds the :func:`oracle_tests` columns
        (``oracle_fdr``, ``oracle_detected``), the same effects tested on the true labels, so
        a miss can be told apart as the design's (oracle misses too) or the pipeline's.
        ``case``, ``control`` (the condition labels) and ``min_cells`` (the run's
        ``stats.min_cells``) go to :func:`oracle_tests`.

    Returns
    -------
    pandas.DataFrame
        One row per entry of :data:`PLANTED_EFFECTS`: the pre-specified row's ``effect_size``,
        ``fdr``, observed ``observed_direction`` and ``detected`` (FDR <= alpha in the planted
        direction). A row missing from the results (e.g. too few cells) is not detected.
    """
    from sepsis_sc.stats import load_targets

    targets = load_targets(None)  # read once: each state's primary metric
    rows = []
    for spec in PLANTED_EFFECTS:
        if spec["table"] == "composition":
            hit = composition[
                (composition["level"] == spec["level"]) & (composition["label"] == spec["label"])
            ]
            where = f"composition {spec['level']} {spec['label']}"
        else:
            hit, metric = _primary_row(effects, spec["level"], targets)
            where = f"state {spec['level']} ({metric}, primary)"
        effect = float(hit["effect"].iloc[0]) if len(hit) else np.nan
        fdr = float(hit["fdr"].iloc[0]) if len(hit) else np.nan
        observed = "up" if effect > 0 else "down" if effect < 0 else "none"
        rows.append(
            {
                "planted_effect": spec["effect"],
                "tested_as": where,
                "expected_direction": spec["direction"],
                "effect_size": effect,
                "fdr": fdr,
                "observed_direction": observed if np.isfinite(effect) else "not tested",
                "detected": bool(
                    np.isfinite(fdr) and fdr <= alpha and observed == spec["direction"]
                ),
            }
        )
    out = pd.DataFrame(rows)
    oracle = _oracle(truth, oracle_args)
    if oracle is not None:
        sign = np.where([spec["direction"] == "up" for spec in PLANTED_EFFECTS], 1.0, -1.0)
        out["oracle_fdr"] = oracle["oracle_fdr"].to_numpy()
        out["oracle_detected"] = (oracle["oracle_fdr"].to_numpy() <= alpha) & (
            np.sign(oracle["oracle_effect"].to_numpy()) == sign
        )
    return out


def null_calibration(
    effects: pd.DataFrame,
    composition: pd.DataFrame,
    *,
    alpha: float = 0.05,
    truth: pd.DataFrame | None = None,
    **oracle_args: Any,
) -> dict[str, float]:
    """False-positive summary for a cohort simulated with ``effects=False``.

    Returns the number of sample-level tests, how many have p < ``alpha`` and FDR <=
    ``alpha``, and the fraction with p < ``alpha`` (expected about ``alpha``). With the truth
    table, also how many of the :func:`oracle_tests` (the planted-effect tests on the true
    labels) have p < ``alpha``: donors differ at random, so a null draw can hold a real chance
    difference between the groups, which the pipeline then reports faithfully. Parameters
    as in :func:`check_planted_effects`.
    """
    p = pd.concat([effects["pvalue"], composition["pvalue"]]).dropna().to_numpy(dtype=float)
    fdr = pd.concat([effects["fdr"], composition["fdr"]]).dropna().to_numpy(dtype=float)
    out: dict[str, Any] = {
        "n_tests": int(p.size),
        "n_p_below_alpha": int((p < alpha).sum()),
        "fraction_p_below_alpha": float((p < alpha).mean()) if p.size else float("nan"),
        "n_fdr_below_alpha": int((fdr <= alpha).sum()),
    }
    oracle = _oracle(truth, oracle_args)
    if oracle is not None:
        below = [
            spec["effect"]
            for spec, pv in zip(PLANTED_EFFECTS, oracle["oracle_pvalue"])
            if np.isfinite(pv) and pv < alpha
        ]
        out["n_oracle_tests"] = len(oracle)
        out["oracle_p_below_alpha"] = "; ".join(below) or "none"
    return out
