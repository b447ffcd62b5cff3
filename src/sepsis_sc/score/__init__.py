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

Modules:

* :mod:`~sepsis_sc.score.signatures`: :func:`load_signatures`, stratified states
  (``per: lineage``), parent populations;
* :mod:`~sepsis_sc.score.ucell`: :func:`ucell_scores`, signed UCell scores read from a
  :class:`~sepsis_sc.store.CountSource`;
* :mod:`~sepsis_sc.score.calls`: call rules and thresholds of the discrete states;
* :mod:`~sepsis_sc.score.states`: :func:`score_states`, the stage's entry point.
"""

from sepsis_sc.score.calls import DEFAULT_CALL_RULE
from sepsis_sc.score.signatures import STRATUM_SEP, base_state, load_signatures
from sepsis_sc.score.states import score_states
from sepsis_sc.score.ucell import ucell_scores

__all__ = [
    "load_signatures",
    "ucell_scores",
    "score_states",
    "base_state",
    "DEFAULT_CALL_RULE",
    "STRATUM_SEP",
]
