"""Patient-level immune profiles: "which of my patients has which deficit", per sample and over time.

Cohort statistics (:mod:`sepsis_sc.stats`) ask whether sepsis differs from control on
average. Immunomodulatory trials instead select *patients* by immune state (GM-CSF /
IFN-gamma for low monocyte HLA-DR, anakinra for hyperinflammation, IL-7 / anti-PD-(L)1 for
lymphopenia or exhaustion). This package profiles every sample against a reference range
built from the control samples:

* :mod:`~sepsis_sc.patients.readouts`: :func:`sample_readouts`, one value per sample x
  readout (:data:`READOUTS`): lymphocyte shares, a monocyte mHLA-DR analogue
  (classical-monocyte pseudobulk log2 CPM of HLA-DR genes), MS1 / HLA-DR-low monocytes,
  immature neutrophils, exhausted CD8 T cells, Treg and DC shares, DC HLA class II, cytokine
  and IFN programmes, TREM2-high macrophages.
* :mod:`~sepsis_sc.patients.reference`: :func:`reference_ranges` / :func:`score_samples`,
  robust centre (median) and spread (max of 1.4826 x MAD and SD) over **one value per
  control donor**; z-score, empirical percentile and flag (below / within / above when
  ``|z|`` exceeds a prediction-interval threshold that is ``z_threshold`` for many controls
  and wider for few, see :func:`flag_multiplier`) per sample; control samples are scored
  **leave-one-out** (their donor left out of their own reference).
* :mod:`~sepsis_sc.patients.rules`: :func:`call_states`, immune-state calls from the rules
  in ``resources/patient_states.yaml`` (each with threshold, source and therapy
  *hypotheses*).
* :mod:`~sepsis_sc.patients.endotypes`: :func:`endotype_scores`, published bulk-blood
  endotype scores (SRS, MARS, Sweeney) on whole-sample pseudobulk, with caveats; no endotype
  is called (see ``endotypes.yaml``).
* :mod:`~sepsis_sc.patients.longitudinal`: :func:`trajectories`, donors sampled more than
  once (e.g. T0 / T6).
* :mod:`~sepsis_sc.patients.profiles`: :func:`profile`, all of the above in one call
  (settings :class:`sepsis_sc.config.PatientSettings`; notebook and workflow entry point).

Flow cut-offs used by trials (mHLA-DR < 8,000 antibodies/cell, ALC <= 900/uL, ferritin
> 4,420 ng/mL) are protein or clinical measures: nothing here transfers them to mRNA. Calls
rank patients relative to this run's controls, for research; they are never treatment advice.
"""

from sepsis_sc.config import PatientSettings
from sepsis_sc.design import sample_meta
from sepsis_sc.patients.endotypes import endotype_scores, load_endotypes
from sepsis_sc.patients.longitudinal import trajectories
from sepsis_sc.patients.profiles import PatientProfiles, profile
from sepsis_sc.patients.readouts import READOUTS, Readout, population_log2cpm, sample_readouts
from sepsis_sc.patients.reference import (
    REFERENCE_COLUMNS,
    InsufficientReferenceError,
    flag_multiplier,
    read_reference,
    reference_ranges,
    score_samples,
)
from sepsis_sc.patients.rules import call_states, load_state_rules

__all__ = [
    "READOUTS",
    "REFERENCE_COLUMNS",
    "Readout",
    "PatientProfiles",
    "PatientSettings",
    "InsufficientReferenceError",
    "profile",
    "sample_meta",
    "sample_readouts",
    "population_log2cpm",
    "reference_ranges",
    "flag_multiplier",
    "score_samples",
    "read_reference",
    "load_state_rules",
    "call_states",
    "load_endotypes",
    "endotype_scores",
    "trajectories",
]
