"""Simulated cohorts with planted truth: the demo, whole blood, and sample-level nulls.

* :func:`simulate_cohort` / :func:`write_demo_cohort`: PBMC-like samples from real cell-type
  profiles with planted sepsis effects (the demo run), :func:`check_planted_effects` and
  :func:`oracle_tests` to grade a run against them; :func:`cohort_adata` the same cohort as
  one log-normalised AnnData, optionally with a PCA, and :func:`two_arm_sheet` a sepsis vs
  control sheet for it (what the DA and therapy-axis tests and calibrations read);
* :func:`simulate_blood_cohort`: whole blood (neutrophils, erythrocyte ambient RNA, raw
  droplets);
* :func:`simulate_state_table`, :func:`simulate_cells`, :func:`repeated_sheet`: sample-level
  null and planted designs for calibrating the statistics.

Modules: :mod:`~sepsis_sc.sim.profiles` (cell types, fitted and literature constants, state
programmes and rates), :mod:`~sepsis_sc.sim.counts` (the count model of one sample),
:mod:`~sepsis_sc.sim.cohort` (the cohort model, :func:`simulate_cohort`, writing the demo),
:mod:`~sepsis_sc.sim.truth` (planted effects, oracle and grading), :mod:`~sepsis_sc.sim.blood`
(whole blood), :mod:`~sepsis_sc.sim.designs` (sample-level designs).
"""

from sepsis_sc.sim.blood import BLOOD_SOUP_GENES, blood_soup_profile, simulate_blood_cohort
from sepsis_sc.sim.cohort import (
    cohort_adata,
    simulate_cohort,
    targeted_panel,
    two_arm_sheet,
    write_demo_cohort,
)
from sepsis_sc.sim.designs import (
    BASE_LOGIT,
    DOMINANT_THREE_PROPORTIONS,
    LABELS,
    SEPSIS_PBMC_PROPORTIONS,
    dirichlet_multinomial_cells,
    label_volatility,
    patient_level_truth,
    repeated_sheet,
    simulate_cells,
    simulate_state_table,
    state_values_of_unlike_scale,
)
from sepsis_sc.sim.profiles import STATES, UNNAMED_STATES, cell_type_table
from sepsis_sc.sim.truth import (
    PLANTED_EFFECTS,
    check_planted_effects,
    null_calibration,
    oracle_tests,
    planted_programmes,
    planted_vs_scored,
)

__all__ = [
    "simulate_cohort",
    "cohort_adata",
    "two_arm_sheet",
    "write_demo_cohort",
    "cell_type_table",
    "check_planted_effects",
    "oracle_tests",
    "null_calibration",
    "PLANTED_EFFECTS",
    "STATES",
    "UNNAMED_STATES",
    "planted_programmes",
    "planted_vs_scored",
    "targeted_panel",
    "BLOOD_SOUP_GENES",
    "simulate_blood_cohort",
    "blood_soup_profile",
    "LABELS",
    "BASE_LOGIT",
    "SEPSIS_PBMC_PROPORTIONS",
    "DOMINANT_THREE_PROPORTIONS",
    "label_volatility",
    "dirichlet_multinomial_cells",
    "state_values_of_unlike_scale",
    "repeated_sheet",
    "simulate_cells",
    "patient_level_truth",
    "simulate_state_table",
]
