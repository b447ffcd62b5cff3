"""One design engine for every sample-level test: composition, state metrics, pseudobulk DE.

Every condition effect in sepsis-sc is estimated from *units of replication*, never from cells.
This module decides, once and for every test, what a unit is and which model compares them:

1. **Contrast** (:class:`Contrast`): a sample-sheet column and two of its values (``case`` vs
   ``control``), e.g. ``condition: sepsis vs control``, ``timepoint: T6 vs T0`` or
   ``outcome: nonsurvivor vs survivor``. Samples with other values are not part of it.
2. **Units** (:func:`resolve_design`): samples of one donor at one level of the contrast are
   *aggregated* into one unit (their metric values averaged, their counts summed). A patient
   sampled at T0 and T6 is one septic unit in "sepsis vs control", never two independent
   ones: counting repeated samples as donors treats within-patient variation as if it were
   between-patient variation, which inflates false positives (58 % of null p-values below 0.05
   on a 5-patients x 2-time-points design, before this module) and can reverse the sign.
   Aggregation was chosen over a donor random effect or limma's ``duplicateCorrelation``
   because it is exact for the question asked (a between-donor contrast has one observation
   per donor), needs no variance-component estimate from 3-10 donors (unstable at that size),
   and is the same operation for proportions, scores and counts; Crowell et al. 2020
   (DOI 10.1038/s41467-020-19894-4) and Squair et al. 2021 (DOI 10.1038/s41467-021-25960-2)
   recommend it for pseudobulk. The null calibration is tested (``tests/test_design.py``).
3. **Pairing**: donors with a unit at *both* levels (e.g. T6 vs T0 in the same patients) are
   compared within donor: donor blocks enter the model (``~ donor + ... + contrast``), which is
   the paired t-test for two levels, and donors seen at one level only are left out with a
   note. ``paired="auto"`` pairs when at least two donors are seen at both levels.
4. **Covariates**: a model formula (``stats.design``, default ``~ condition``) written with
   sample-sheet columns and parsed by `formulaic <https://matthewwardrop.github.io/formulaic/>`_;
   the contrast column's term is replaced by the case-vs-control indicator (coefficient
   ``case_vs_control``), other terms are covariates (numbers when every value parses as one,
   categories otherwise). Covariates constant within the contrast's units (or absorbed by the
   donor blocks of a paired design) are dropped with a note; a covariate that makes the
   design rank deficient, or that is confounded with the contrast, is an error that names it.

:func:`linear_test` fits the resolved design to many features at once (labels of a
composition table, states x metrics) with limma-style empirical-Bayes variance moderation
(Smyth 2004, DOI 10.2202/1544-6115.1027) and returns effect, moderated-t CI and p per feature.

Modules:

* :mod:`~sepsis_sc.design.contrasts`: :class:`Contrast`, :func:`parse_contrasts`, the
  formula's terms and columns, :data:`COEF` and :class:`DesignError`;
* :mod:`~sepsis_sc.design.meta`: :func:`sample_meta`, the per-sample sheet from ``obs``;
* :mod:`~sepsis_sc.design.model`: :class:`SampleDesign`, :func:`resolve_design` (units,
  pairing, covariates, estimability), :func:`check_designs` and :class:`ContrastArgs`;
* :mod:`~sepsis_sc.design.limma`: :func:`linear_test` and :func:`squeeze_var` (limma's
  empirical Bayes: plain, robust, trend).
* :mod:`~sepsis_sc.design.weights`: :func:`unit_weights` (units that average different
  numbers of samples).

The package imports neither scanpy nor anndata: :mod:`sepsis_sc.config` resolves every
contrast with it when it reads the sample sheet.
"""

from sepsis_sc.design.contrasts import (
    COEF,
    Contrast,
    DesignError,
    formula_columns,
    parse_contrasts,
)
from sepsis_sc.design.limma import MODERATION, Prior, linear_test, squeeze_var
from sepsis_sc.design.meta import sample_meta
from sepsis_sc.design.model import ContrastArgs, SampleDesign, check_designs, resolve_design
from sepsis_sc.design.weights import unit_weights

__all__ = [
    "DesignError",
    "sample_meta",
    "Contrast",
    "SampleDesign",
    "ContrastArgs",
    "parse_contrasts",
    "formula_columns",
    "resolve_design",
    "check_designs",
    "linear_test",
    "squeeze_var",
    "Prior",
    "MODERATION",
    "unit_weights",
    "COEF",
]
