"""Hierarchical, marker-based immune cell-type annotation (offline).

The annotation follows the controlled vocabulary of ``resources/cell_types.yaml`` and the
marker sets of ``resources/markers/{human,mouse}.yaml`` and works in two levels:

1. **Lineage** (T, NK, B, Plasma, Monocyte, Macrophage, DC, Neutrophil, Platelet, Erythroid,
   Progenitor). Each cell gets a signed marker score per lineage set (mean of the capped,
   normalised expression of the ``up`` genes minus that of the ``down`` genes). Cell-level
   scores are sparse-data noisy, so they are combined with the mean score of the cell's
   (over-)cluster: ``(1 - cluster_weight) * cell + cluster_weight * cluster``. The best lineage
   wins when its combined score reaches ``min_score`` and beats the runner-up by
   ``min_margin``; otherwise the cell stays ``Unassigned`` (doublets, debris, cell types outside
   the vocabulary such as basophils, which are scored as decoys).
2. **Subset within lineage** (e.g. CD4 naive T vs Treg). Subset sets are scored the same way,
   but only against the sibling subsets of the cell's lineage. A per-set baseline (the lowest
   cluster mean of each gene inside the lineage) is removed first, so genes expressed by every
   cell of the lineage (TMSB10, LDHB, IL32 in the Azimuth T-cell sets) do not favour the sets
   that happen to list them. Where a lineage has a ``default_subset`` (Classical monocyte,
   Mature neutrophil, NK CD56dim, Macrophage), a specific subset is only called when its
   absolute score reaches ``subset_min_score``; otherwise the cell gets the default.

Expression is log1p(CP10k) of the raw counts (``layers["counts"]``, or integer ``X``) computed
on a copy restricted to the marker genes, so ``X`` of the caller is never modified and the
full matrix is never densified. Each gene is scaled by its highest cluster mean (at least
``1`` log-unit) and capped at 1, so a score of 1 means "every up-marker at the level of its
positive population, no down-marker".

A second, whole-transcriptome opinion (issue #32): a SingleR-style correlation classifier
over ~1,000 genes against reference profiles of labelled real PBMC
(``resources/annotation/human_pbmc_reference.tsv.gz``, rebuilt by
``benchmarks/annotation_reference.py``), per cell and per cluster; the final lineage
combines both opinions on the genes that separate the two candidates
(:mod:`~sepsis_sc.annotate.specific`, :mod:`~sepsis_sc.annotate.consensus`), and
``obs["annotation_agreement"]`` says how.

Also here: reference-based labels, never downloaded: CellTypist with a local model
(:func:`annotate_celltypist`), scANVI / scArches transfer from a user reference
(:func:`transfer_labels`) and its consensus with the markers (:func:`annotation_consensus`);
:func:`annotation_agreement` compares two annotations; :func:`dotplot_markers` picks the
genes of the marker dot plot. The figures (marker dot plot, UMAP by cell type) are drawn by
:mod:`sepsis_sc.pl.annotate`.

Modules
-------
* :mod:`~sepsis_sc.annotate.markers`: vocabulary, marker sets and gates, marker symbols to
  columns, the counts read (:func:`~sepsis_sc.annotate.markers.read_counts`);
* :mod:`~sepsis_sc.annotate.lineage`: cluster evidence (own over-clustering or a reused
  Leiden run), scaled marker expression, lineage scores and calls, cluster support;
* :mod:`~sepsis_sc.annotate.subsets`: subset scores and calls within each lineage (lineage
  re-embedding, baselines, gates, default subsets);
* :mod:`~sepsis_sc.annotate.correlation`: reference profiles (build, load, save) and the
  SingleR-style classifier (:func:`classify`, streamed in row chunks);
* :mod:`~sepsis_sc.annotate.specific`: pairwise specific evidence between lineages;
* :mod:`~sepsis_sc.annotate.consensus`: the two opinions combined, the agreement table;
* :mod:`~sepsis_sc.annotate.arbiter`: the third opinion on cells the two left torn (a
  classifier trained on the cells they agree on, in the same data set);
* :mod:`~sepsis_sc.annotate.core`: :func:`annotate`, its steps and what it writes;
* :mod:`~sepsis_sc.annotate.celltypist`: CellTypist, label-to-lineage rules, agreement;
* :mod:`~sepsis_sc.annotate.reference`: scANVI / scArches label transfer, consensus;
* :mod:`~sepsis_sc.annotate.dotplot`: the dot plot's genes and their per-label expression.
"""

from sepsis_sc.annotate.celltypist import annotate_celltypist, annotation_agreement
from sepsis_sc.annotate.consensus import opinion_table
from sepsis_sc.annotate.core import Organism, annotate
from sepsis_sc.annotate.correlation import (
    ReferenceProfiles,
    build_reference,
    classify,
    load_reference,
    save_reference,
)
from sepsis_sc.annotate.dotplot import dotplot_markers
from sepsis_sc.annotate.markers import (
    LINEAGES,
    UNASSIGNED,
    Vocabulary,
    load_markers,
    load_vocabulary,
    symbol_aliases,
)
from sepsis_sc.annotate.reference import annotation_consensus, transfer_labels
from sepsis_sc.annotate.subsets import LINEAGE_HVG_CELLS  # noqa: F401 - set it in .subsets

__all__ = [
    "Vocabulary",
    "load_vocabulary",
    "load_markers",
    "symbol_aliases",
    "annotate",
    "opinion_table",
    "ReferenceProfiles",
    "build_reference",
    "load_reference",
    "save_reference",
    "classify",
    "annotate_celltypist",
    "annotation_agreement",
    "transfer_labels",
    "annotation_consensus",
    "dotplot_markers",
    "UNASSIGNED",
    "LINEAGES",
    "Organism",
]
