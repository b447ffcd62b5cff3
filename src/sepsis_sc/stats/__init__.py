"""Sample-level statistics for therapy-target states and cell-type composition.

The sample (donor) is the unit of replication: per-cell scores and calls from
:func:`sepsis_sc.score.score_states` are first aggregated per sample, and every p-value comes
from a test on those sample values (Squair et al. 2021 Nat Commun,
DOI 10.1038/s41467-021-25960-2). Repeated samples of one donor are averaged within a
condition, and donors seen in both conditions are compared with a paired test.

* :func:`sample_table`: per sample x state, the fraction of the discrete state in its call
  population, the mean per-cell score and a pseudobulk-then-score value (long format).
* :func:`condition_effects`: case vs control per state x metric (effect, 95% CI, Welch or
  paired t-test, BH-FDR, plain-language meaning).
* :func:`composition_test`: propeller-style differential abundance of lineages or subsets
  (Phipson et al. 2022 Bioinformatics, DOI 10.1093/bioinformatics/btac582).
* :func:`therapy_targets`: ranked summary linking states to therapeutic ideas.

Figures of these tables are in :mod:`sepsis_sc.pl.stats`.

Modules:

* :mod:`~sepsis_sc.stats.samples`: :func:`sample_table`, per-sample values of every state;
* :mod:`~sepsis_sc.stats.effects`: :func:`condition_effects`, :func:`bh_fdr`,
  :func:`welch_test`;
* :mod:`~sepsis_sc.stats.composition`: :func:`composition_test`;
* :mod:`~sepsis_sc.stats.metrics`: what each metric's effect is (:data:`EFFECT_TYPE`) and
  the pre-specified primary metric of each state (:func:`primary_metrics`,
  :func:`primary_rows`, :func:`load_targets`);
* :mod:`~sepsis_sc.stats.targets`: :func:`therapy_targets`.

The tests take the config's ``stats`` section
(:class:`~sepsis_sc.config.StatsSettings`) with keyword overrides.
"""

from sepsis_sc.stats.composition import composition_test
from sepsis_sc.stats.effects import bh_fdr, condition_effects, welch_test
from sepsis_sc.stats.metrics import EFFECT_TYPE, load_targets, primary_metrics, primary_rows
from sepsis_sc.stats.samples import sample_table
from sepsis_sc.stats.targets import therapy_targets

__all__ = [
    "sample_table",
    "condition_effects",
    "composition_test",
    "therapy_targets",
    "primary_metrics",
    "primary_rows",
    "load_targets",
    "welch_test",
    "bh_fdr",
    "EFFECT_TYPE",
]
