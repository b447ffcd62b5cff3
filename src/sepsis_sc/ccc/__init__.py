"""Therapy axes between cells: ligand-receptor communication per sample for the checkpoints
and cytokines that sepsis trials target.

Most immunotherapies tried in sepsis act on a signal between cells (anti-PD-1 / anti-PD-L1,
IL-7, GM-CSF, IFN-gamma, anakinra, cytokine adsorption). The axes are data
(``resources/therapy_axes.yaml``: ligand-receptor pairs in LIANA+'s notation, human and
mouse, source and target populations, therapy, trial, references, caveats); each sample gets
one score per axis, and the scores are tested with donors as the units through the same
design engine as the state tests (:func:`sepsis_sc.stats.condition_effects`): never a
cell-level p-value.

* :mod:`~sepsis_sc.ccc.axes`: :func:`load_axes`, :func:`axis_pairs`, :func:`axis_genes`;
* :mod:`~sepsis_sc.ccc.scores`: :func:`axis_scores` (LIANA's ``lr_means`` on the pooled
  source and target cells of each sample: the tested value), :func:`liana_by_sample`
  (LIANA+'s rank aggregate per sample, the axis pairs' magnitude and specificity ranks),
  :func:`add_liana_ranks`, :func:`resource_genes`;
* :mod:`~sepsis_sc.ccc.effects`: :func:`test_axes` (per contrast, FDR over the axes),
  :func:`axis_z` (each sample against the controls).

The stage functions take the config's ``ccc`` section
(:class:`~sepsis_sc.config.CCCSettings`); the tests take the ``stats`` section.
"""

from sepsis_sc.ccc.axes import AXIS_KEYS, axis_genes, axis_pairs, load_axes
from sepsis_sc.ccc.effects import AXES_COLUMNS, AXIS_METRIC, axis_z, test_axes
from sepsis_sc.ccc.scores import (
    READOUT_PREFIX,
    SCORE_COLUMNS,
    add_liana_ranks,
    axis_scores,
    liana_by_sample,
    population_mask,
    resource_genes,
)
from sepsis_sc.config import CCCSettings

__all__ = [
    "CCCSettings",
    "load_axes",
    "axis_pairs",
    "axis_genes",
    "axis_scores",
    "liana_by_sample",
    "add_liana_ranks",
    "resource_genes",
    "population_mask",
    "test_axes",
    "axis_z",
    "AXIS_KEYS",
    "AXES_COLUMNS",
    "AXIS_METRIC",
    "SCORE_COLUMNS",
    "READOUT_PREFIX",
]
