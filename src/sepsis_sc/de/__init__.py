"""Pseudobulk differential expression per cell type and per lineage (PyDESeq2).

Cells are never the unit of a DE test: the raw counts of one label (a subset such as
``Classical monocyte``, or a lineage such as ``Monocyte``) are summed per sample, samples of one
donor at one contrast level are summed into one *unit* (:mod:`sepsis_sc.design`), and the
units are compared with a negative-binomial GLM (DESeq2, Love et al. 2014,
DOI 10.1186/s13059-014-0550-8, in its Python port PyDESeq2, Muzellec et al. 2023,
DOI 10.1093/bioinformatics/btad547). Pseudobulk keeps the false-discovery rate at its
nominal level where cell-level tests do not (Squair et al. 2021,
DOI 10.1038/s41467-021-25960-2; Crowell et al. 2020, DOI 10.1038/s41467-020-19894-4).

* :mod:`~sepsis_sc.de.pseudobulk`: :func:`label_pseudobulk` (raw counts summed per
  sample x label, through :func:`sepsis_sc.data.pseudobulk` over a
  :class:`~sepsis_sc.store.CountSource`), :func:`label_units` (one label's per-sample sums ->
  per-unit sums and the design rows for the units left after the ``min_cells`` gate),
  :func:`tested_units` (the units each tested label was fitted on).
* :mod:`~sepsis_sc.de.fit`: :func:`fit_deseq`, the PyDESeq2 Wald test (and apeGLM shrinkage)
  on units x genes counts with a :class:`~sepsis_sc.design.SampleDesign` matrix.
* :mod:`~sepsis_sc.de.run`: :func:`pseudobulk_de`, all of it for every label of every level
  (settings :class:`sepsis_sc.config.DESettings`), with gating and a summary row per label.

Figures are in :mod:`sepsis_sc.pl.de`.
"""

from sepsis_sc.config import DESettings
from sepsis_sc.de.fit import fit_deseq
from sepsis_sc.de.pseudobulk import label_pseudobulk, label_units, levels_pseudobulk, tested_units
from sepsis_sc.de.run import RESULT_COLUMNS, SUMMARY_COLUMNS, pseudobulk_de

__all__ = [
    "RESULT_COLUMNS",
    "DESettings",
    "SUMMARY_COLUMNS",
    "label_pseudobulk",
    "levels_pseudobulk",
    "label_units",
    "tested_units",
    "fit_deseq",
    "pseudobulk_de",
]
