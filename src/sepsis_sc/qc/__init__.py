"""Per-sample quality control to current best practice, with care for low-RNA immune cells.

The recipe follows Heumos et al. 2023 (Nat Rev Genet, "Best practices for single-cell
analysis across modalities") and its online book; :func:`run_qc` (:mod:`~sepsis_sc.qc.run`)
chains the steps on one sample with the settings of the config section ``qc``
(:class:`sepsis_sc.config.QCSettings`, ``QCSettings.from_config(config["qc"])``; keyword
overrides by field name):

1. **Gene flags and metrics** (:mod:`~sepsis_sc.qc.metrics`: :func:`flag_genes`,
   :func:`qc_metrics`): mitochondrial, ribosomal and haemoglobin genes are flagged in
   ``var`` and :func:`scanpy.pp.calculate_qc_metrics` is run on the raw counts.
2. **Adaptive thresholds per sample** (:mod:`~sepsis_sc.qc.thresholds`:
   :func:`adaptive_thresholds`, :func:`flag_outliers`): a cell is an outlier when a metric
   lies more than *k* median absolute deviations (MAD) from the sample's median: both sides
   for log counts and log genes (k = 5), the upper side only for the mitochondrial
   percentage (k = 3). Thresholds are computed per sample, never on pooled samples, because
   sequencing depth differs between libraries. Optional hard floors and ceilings from the
   config (``min_counts``, ``min_genes``, ``max_pct_mt`` ...) tighten them. The MAD is
   unscaled (``scipy.stats.median_abs_deviation`` with ``scale=1``), as in the
   best-practice book; 5 unscaled MADs are about 3.4 standard deviations.
3. **Ambient RNA and blood** (:mod:`~sepsis_sc.qc.ambient`: first-pass lineage, SoupX soup
   profile, contamination, correction, soup-only droplets; :mod:`~sepsis_sc.qc.blood`:
   upper count/gene cuts per lineage, platelet-monocyte aggregates).
4. **Doublets per sample** (:mod:`~sepsis_sc.qc.doublets`: :func:`detect_doublets`):
   Scrublet (Wolock et al. 2019) via :func:`scanpy.pp.scrublet`, run on each sample
   separately, with the expected doublet rate derived from the number of cells recovered
   (10x rule of thumb: about 0.8 % per 1,000 cells recovered) or loaded.
5. **Low-RNA immune rescue** (:mod:`~sepsis_sc.qc.rescue`: :func:`rescue_low_rna_immune`):
   neutrophils (in sepsis PBMC the low-density neutrophils) carry few UMIs and genes and
   fall under a lower threshold set by lymphocytes and monocytes; a cell that fails *only*
   the lower count/gene thresholds is kept, and marked ``obs["low_rna_immune"] = True``,
   when its mitochondrial share is low and its UMIs carry a clear immune identity.
6. **Reasons and summary** (:func:`run_qc`): ``obs["qc_outlier"]`` (True = removed) and
   ``obs["qc_reason"]`` (``"pass"`` or the semicolon-joined reasons such as
   ``"low_counts;low_genes"``, ``"high_mt"``, ``"doublet"``), plus a one-row-per-sample
   table of what was removed and why, with the thresholds used.
7. **Merge and normalise** (:mod:`~sepsis_sc.qc.merge`: :func:`select_samples`,
   :func:`merge_samples`, :func:`merge_samples_to_file`, :func:`normalize`): outer join of
   the filtered samples (absent genes are zero), gene filter on the merged object,
   ``X = log1p(CP10k)`` from ``layers["counts"]``.

Slots written (see ``docs/architecture.md``): ``var["mt"|"ribo"|"hb"]``; ``obs`` columns
``total_counts``, ``n_genes_by_counts``, ``log1p_total_counts``, ``log1p_n_genes_by_counts``,
``pct_counts_mt|ribo|hb``, ``doublet_score``, ``predicted_doublet``, ``qc_outlier``,
``qc_reason``, ``low_rna_immune``; ``uns["qc"]`` (parameters, thresholds, summary).
"""

from sepsis_sc.qc.ambient import (
    LINEAGE_MARKERS,
    LINEAGE_NEGATIVES,
    LINEAGES,
    NON_EXPRESSED_SETS,
    correct_counts,
    estimate_contamination,
    estimate_soup,
    first_pass_lineage,
    flag_soup_droplets,
)
from sepsis_sc.qc.blood import PLATELET_GENES, flag_platelet_monocyte, lineage_upper_flags
from sepsis_sc.qc.doublets import (
    DOUBLET_RATE_PER_1000,
    EXACT_KNN_MAX_CELLS,
    detect_doublets,
    expected_doublet_rate,
)
from sepsis_sc.qc.merge import (
    filter_cells_qc,
    merge_samples,
    merge_samples_to_file,
    normalize,
    select_samples,
)
from sepsis_sc.qc.metrics import flag_genes, qc_metrics
from sepsis_sc.qc.rescue import RESCUE_MARKERS, rescue_low_rna_immune
from sepsis_sc.qc.run import QC_REASONS, run_qc
from sepsis_sc.qc.thresholds import DEFAULT_NMADS, adaptive_thresholds, flag_outliers

__all__ = [
    "DEFAULT_NMADS",
    "RESCUE_MARKERS",
    "QC_REASONS",
    "flag_genes",
    "qc_metrics",
    "adaptive_thresholds",
    "flag_outliers",
    "expected_doublet_rate",
    "detect_doublets",
    "rescue_low_rna_immune",
    "lineage_upper_flags",
    "flag_platelet_monocyte",
    "DOUBLET_RATE_PER_1000",
    "EXACT_KNN_MAX_CELLS",
    "PLATELET_GENES",
    "run_qc",
    "filter_cells_qc",
    "select_samples",
    "merge_samples",
    "merge_samples_to_file",
    "normalize",
    "LINEAGE_MARKERS",
    "LINEAGE_NEGATIVES",
    "LINEAGES",
    "NON_EXPRESSED_SETS",
    "first_pass_lineage",
    "estimate_soup",
    "estimate_contamination",
    "correct_counts",
    "flag_soup_droplets",
]
