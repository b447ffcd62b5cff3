"""Neighbourhood differential abundance (Milo) with donors as the units.

Every composition test of the pipeline is on a label someone named. This stage asks which
regions of the integrated kNN graph expand or shrink with the condition, whatever their
label (Dann et al. 2022, DOI 10.1038/s41587-021-01033-z), and ties the answer to the
patient-level design: cells are counted per neighbourhood and sample, a donor's samples at
one level of the contrast are summed into one unit, pairing and covariates enter as the
design engine resolved them (:mod:`sepsis_sc.design`), and the p-values are adjusted with
Milo's spatial FDR.

* :mod:`~sepsis_sc.da.nhoods`: :func:`make_nhoods`, :func:`nhood_counts`,
  :func:`describe_nhoods`;
* :mod:`~sepsis_sc.da.glm`: :func:`test_nhoods`, :func:`spatial_fdr`;
* :mod:`~sepsis_sc.da.explain`: :func:`explain_nhoods` (which significant neighbourhoods a
  named cell type or state explains), :func:`unexplained_per_sample`.

Milo's algorithm is implemented here rather than imported: milopy 0.3.0 on PyPI has no
spatial FDR and tests a patsy formula on samples (no donor units or pairing), and pertpy's
Milo needs R's edgeR or the JAX stack; the negative binomial fit is the pipeline's PyDESeq2
wrapper (:func:`sepsis_sc.de.fit_deseq`).
"""

from sepsis_sc.config import DASettings
from sepsis_sc.da.explain import UNEXPLAINED, explain_nhoods, unexplained_per_sample
from sepsis_sc.da.glm import NHOOD_COLUMNS, spatial_fdr, test_nhoods
from sepsis_sc.da.nhoods import describe_nhoods, make_nhoods, nhood_counts

__all__ = [
    "DASettings",
    "make_nhoods",
    "nhood_counts",
    "describe_nhoods",
    "test_nhoods",
    "spatial_fdr",
    "explain_nhoods",
    "unexplained_per_sample",
    "NHOOD_COLUMNS",
    "UNEXPLAINED",
]
