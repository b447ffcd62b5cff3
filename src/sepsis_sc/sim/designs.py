"""Sample-level simulators for checking the statistics on real cohort designs.

Cheap generators of what the statistics stage sees (labelled cells per sample, or per-sample
state values), with donor random effects and within-donor (time-point) noise, for sheets of
the shapes real sepsis cohorts have: repeated samples of a patient, unbalanced groups, paired
time points. Hundreds of null cohorts take seconds, so the false-positive rate of
:mod:`sepsis_sc.design` / :mod:`sepsis_sc.stats` can be measured (``tests/test_design.py``,
``benchmarks/design_calibration.py``). The truth they return is patient level: each donor's
true values averaged over the donor's samples, then case minus control over donors.

For whole single-cell cohorts (counts, QC, annotation) see :mod:`sepsis_sc.sim.cohort`.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

__all__ = [
    "LABELS",
    "BASE_LOGIT",
    "SEPSIS_PBMC_PROPORTIONS",
    "DOMINANT_THREE_PROPORTIONS",
    "repeated_sheet",
    "simulate_cells",
    "label_volatility",
    "dirichlet_multinomial_cells",
    "state_values_of_unlike_scale",
    "patient_level_truth",
    "simulate_state_table",
]

LABELS = ["T", "Monocyte", "B", "NK", "DC", "Neutrophil"]
# DCs at ~4 % (count noise of rarer labels alone exceeds the 0.15 tolerance at 10x sample sizes)
BASE_LOGIT = np.array([0.8, 0.3, -1.0, -1.3, -2.2, 0.0])


#: typical mean shares of PBMC populations in sepsis cohorts (T and NK lower, monocytes,
#: low-density neutrophils, platelets, plasmablasts and erythroid precursors higher than in
#: health; Reyes 2020, Qiu 2021, COMBAT 2022, reference/biology.md); 12 labels of which 6
#: hold 0.5-3 % of cells: the rare, volatile populations sepsis moves
SEPSIS_PBMC_PROPORTIONS: dict[str, float] = {
    "CD4 T": 0.26,
    "CD8 T": 0.11,
    "NK": 0.07,
    "B": 0.07,
    "CD14 monocyte": 0.27,
    "CD16 monocyte": 0.05,
    "DC": 0.01,
    "neutrophil": 0.08,
    "platelet": 0.03,
    "plasmablast": 0.015,
    "erythroid precursor": 0.02,
    "CMP": 0.015,
}
#: three labels, one dominant (the design where T alone was anti-conservative)
DOMINANT_THREE_PROPORTIONS: dict[str, float] = {"T": 0.7, "monocyte": 0.15, "B": 0.15}


def label_volatility(
    proportions: dict[str, float], sd_abundant: float = 0.25, rare_factor: float = 4.0
) -> dict[str, float]:
    """Between-donor SD of each label's log share: ``sd_abundant`` for the most abundant
    label, rising as the square root of its rarity to ``rare_factor`` times that for a label
    at 1/``rare_factor``**2 of the top share and no further (rare labels 3-5x more volatile,
    as between patients in sepsis blood)."""
    top = max(proportions.values())
    return {
        k: sd_abundant * float(np.clip(np.sqrt(top / p), 1.0, rare_factor))
        for k, p in proportions.items()
    }


def dirichlet_multinomial_cells(
    rng: np.random.Generator,
    sheet: pd.DataFrame,
    proportions: dict[str, float],
    *,
    volatility: dict[str, float] | None = None,
    time_fraction: float = 0.4,
    concentration: float = 300.0,
    cells: tuple[int, int] = (1500, 5000),
    fold: dict[str, float] | None = None,
) -> tuple[ad.AnnData, dict[str, np.ndarray]]:
    """Labelled cells (``obs`` only) of a cohort with realistic composition noise.

    Each donor's shares are the mean ``proportions`` moved on the log scale by a normal
    draw of SD ``volatility[label]`` (:func:`label_volatility` by default: rare labels 3-5x
    more volatile), times ``fold[label]`` in the case group (``condition == "sepsis"``),
    renormalised; each sample of a donor moves again by ``time_fraction`` of that SD (a
    patient's time points are alike, not equal); its cells are Dirichlet-multinomial
    (``concentration``: extra sampling noise of a 10x run) of ``cells`` (uniform range) cells.

    Returns ``(adata, truth_p)``: ``obs`` with ``sample_id``, ``condition``, ``donor``,
    ``timepoint``, ``lineage`` (the label) and each sample's true shares.
    """
    labels = list(proportions)
    base = np.log(np.array([proportions[k] for k in labels], float))
    sd = np.array([(volatility or label_volatility(proportions))[k] for k in labels])
    eff = np.log(np.array([(fold or {}).get(k, 1.0) for k in labels]))
    donors = sheet.drop_duplicates("donor").set_index("donor")["condition"]
    donor_log = {
        d: base + rng.normal(0, 1, len(labels)) * sd + (eff if c == "sepsis" else 0.0)
        for d, c in donors.items()
    }
    obs, truth_p = [], {}
    for sid, row in sheet.iterrows():
        lg = donor_log[row["donor"]] + rng.normal(0, 1, len(labels)) * sd * time_fraction
        p = np.exp(lg - lg.max())
        p /= p.sum()
        truth_p[sid] = p
        n = int(rng.integers(*cells))
        k = rng.multinomial(n, rng.dirichlet(concentration * p))
        obs.append(
            pd.DataFrame(
                {
                    "sample_id": sid,
                    "condition": row["condition"],
                    "donor": row["donor"],
                    "timepoint": row["timepoint"],
                    "lineage": np.repeat(labels, k),
                }
            )
        )
    out = pd.concat(obs, ignore_index=True)
    out.index = out.index.astype(str)
    return ad.AnnData(obs=out), truth_p


def repeated_sheet(n_patients: int = 5, n_controls: int = 3, times=("T0", "T6")) -> pd.DataFrame:
    """A sample sheet: patients sampled at each of ``times``, healthy donors once.

    ``repeated_sheet()`` is the GSE167363 shape (5 patients x T0/T6 vs 3 controls);
    ``repeated_sheet(10, 3, ("T0",))`` an unbalanced one-sample-per-donor design.
    """
    rows = []
    for p in range(n_patients):
        for t in times:
            rows.append(
                {
                    "sample_id": f"P{p}_{t}",
                    "condition": "sepsis",
                    "donor": f"P{p}",
                    "timepoint": t,
                    "batch": "b1",
                }
            )
    for h in range(n_controls):
        rows.append(
            {
                "sample_id": f"H{h}",
                "condition": "control",
                "donor": f"H{h}",
                "timepoint": "none",
                "batch": "b1",
            }
        )
    return pd.DataFrame(rows).set_index("sample_id", drop=False)


def _donor_logits(rng, sheet, effect, donor_sd):
    donors = sheet.drop_duplicates("donor").set_index("donor")["condition"]
    out = {}
    for d, cond in donors.items():
        out[d] = (
            BASE_LOGIT + rng.normal(0, donor_sd, len(LABELS)) + (effect if cond == "sepsis" else 0)
        )
    return out


def simulate_cells(rng, sheet, effect=None, donor_sd=0.5, time_sd=0.15, cells=(800, 2500)):
    """An AnnData of labelled cells (``obs`` only): per-donor label logits (``BASE_LOGIT`` +
    donor effect + ``effect`` in sepsis), per-sample noise, multinomial counts.

    Returns ``(adata, truth_p)``: the true label proportions of each sample.
    """
    effect = np.zeros(len(LABELS)) if effect is None else np.asarray(effect, float)
    logits = _donor_logits(rng, sheet, effect, donor_sd)
    obs, truth_p = [], {}
    for sid, row in sheet.iterrows():
        lg = logits[row["donor"]] + rng.normal(0, time_sd, len(LABELS))
        p = np.exp(lg) / np.exp(lg).sum()
        truth_p[sid] = p
        n = rng.integers(*cells)
        k = rng.multinomial(n, p)
        lab = np.repeat(LABELS, k)
        obs.append(
            pd.DataFrame(
                {
                    "sample_id": sid,
                    "condition": row["condition"],
                    "donor": row["donor"],
                    "timepoint": row["timepoint"],
                    "lineage": lab,
                }
            )
        )
    obs = pd.concat(obs, ignore_index=True)
    obs.index = obs.index.astype(str)
    return ad.AnnData(obs=obs), truth_p


def patient_level_truth(truth_p, sheet):
    """Patient-level truth: each donor's true logit proportions averaged over the donor's
    samples, then case minus control mean over donors (each patient counts once)."""
    lg = pd.DataFrame({s: np.log(p / (1 - p)) for s, p in truth_p.items()}, index=LABELS).T
    per_donor = lg.groupby(sheet.loc[lg.index, "donor"]).mean()
    cond = sheet.drop_duplicates("donor").set_index("donor")["condition"]
    cond = cond.reindex(per_donor.index)
    return per_donor[cond == "sepsis"].mean() - per_donor[cond == "control"].mean()


def _patient_truth(per_sample: dict[str, float], sheet: pd.DataFrame) -> float:
    v = pd.Series(per_sample)
    per_donor = v.groupby(sheet.loc[v.index, "donor"]).mean()
    cond = sheet.drop_duplicates("donor").set_index("donor")["condition"]
    cond = cond.reindex(per_donor.index)
    return float(per_donor[cond == "sepsis"].mean() - per_donor[cond == "control"].mean())


def simulate_state_table(
    rng, sheet, effect=0.0, donor_sd=0.4, time_sd=0.15, n_states=8, n_cells=300
):
    """sample_table-like rows: a discrete state fraction and a mean score per sample; the
    truth is patient level (true values averaged per donor, then case minus control)."""
    donors = sheet.drop_duplicates("donor").set_index("donor")["condition"]
    rows, truth = [], {}
    for j in range(n_states):
        d_logit = {
            d: -2.0 + rng.normal(0, donor_sd) + (effect if c == "sepsis" else 0)
            for d, c in donors.items()
        }
        d_score = {
            d: 0.2 + rng.normal(0, 0.04) + (effect * 0.05 if c == "sepsis" else 0)
            for d, c in donors.items()
        }
        true_f, true_s = {}, {}
        for sid, row in sheet.iterrows():
            p = 1 / (1 + np.exp(-(d_logit[row["donor"]] + rng.normal(0, time_sd))))
            true_f[sid] = np.log2(p)
            k = rng.binomial(n_cells, p)
            base = {
                "sample_id": sid,
                "condition": row["condition"],
                "donor": row["donor"],
                "state": f"s{j}",
                "label": f"s{j}",
                "population": "p",
                "n_cells": n_cells,
                "reason": "",
            }
            rows.append({**base, "metric": "fraction", "value": k / n_cells, "n_called": k})
            true_s[sid] = d_score[row["donor"]] + rng.normal(0, 0.01)
            score = true_s[sid] + rng.normal(0, 0.1) / np.sqrt(n_cells)  # mean of n cells
            rows.append({**base, "metric": "mean_score", "value": score, "n_called": np.nan})
        truth[f"s{j}"] = (_patient_truth(true_f, sheet), _patient_truth(true_s, sheet))
    return pd.DataFrame(rows), truth


def state_values_of_unlike_scale(
    rng: np.random.Generator,
    sheet: pd.DataFrame,
    scales: np.ndarray | list[float],
    *,
    metric: str = "pseudobulk_expression",
    time_fraction: float = 0.4,
    effect: dict[int, float] | None = None,
) -> pd.DataFrame:
    """A sample table of one metric whose states vary on unlike scales (as log2 CPM of
    signatures of different genes do): state ``j``'s donor values have SD ``scales[j]``,
    each sample moves by ``time_fraction`` of it, and ``effect[j]`` (in SDs) is added in the
    case group. Rows as :func:`sepsis_sc.stats.sample_table` writes them."""
    donors = sheet.drop_duplicates("donor").set_index("donor")["condition"]
    rows = []
    for j, sd in enumerate(np.asarray(scales, float)):
        shift = (effect or {}).get(j, 0.0) * sd
        dv = {
            d: 5.0 + rng.normal(0, sd) + (shift if c == "sepsis" else 0.0)
            for d, c in donors.items()
        }
        for sid, row in sheet.iterrows():
            rows.append(
                {
                    "sample_id": sid,
                    "condition": row["condition"],
                    "donor": row["donor"],
                    "state": f"s{j}",
                    "label": f"s{j}",
                    "metric": metric,
                    "population": "p",
                    "value": dv[row["donor"]] + rng.normal(0, sd * time_fraction),
                    "n_cells": 200,
                    "n_called": np.nan,
                    "reason": "",
                }
            )
    return pd.DataFrame(rows)
