"""Snakemake script (rule annotate): hierarchical marker-based immune annotation."""

import anndata as ad

from sepsis_sc.annotate import annotate
from sepsis_sc.data import counts_layer
from sepsis_sc.utils import setup_logging, write_h5ad, write_table

setup_logging(snakemake.log[0])

a = snakemake.params.annotation
adata = ad.read_h5ad(snakemake.input.h5ad)
layer = counts_layer(adata, snakemake.params.counts_layer)
summary = annotate(
    adata,
    organism="auto",
    expected_organism=snakemake.params.organism,
    cluster_key=a["cluster_key"],
    markers=snakemake.input.markers,
    use_rep=snakemake.params.use_rep,
    resolution=a["resolution"],
    min_score=a["min_score"],
    min_margin=a["min_margin"],
    subset_min_score=a["subset_min_score"],
    cluster_weight=a["cluster_weight"],
    layer=layer,
    seed=snakemake.params.seed,
)
if a["celltypist_model"]:
    from sepsis_sc.annotate import annotate_celltypist, annotation_agreement

    annotate_celltypist(adata, a["celltypist_model"], layer=layer)
    agreement = annotation_agreement(adata, "cell_type", "celltypist_label")
    write_table(agreement, snakemake.output.agreement)
if a["reference"]:
    from sepsis_sc.reference import annotation_consensus, transfer_labels

    if not a["reference_label_key"]:
        raise ValueError("annotation.reference is set: annotation.reference_label_key is needed.")
    transfer_labels(adata, snakemake.input.reference, label_key=a["reference_label_key"],
                    layer=layer, seed=snakemake.params.seed)  # fmt: skip
    table = annotation_consensus(adata)
    write_table(table.reset_index(), snakemake.output.reference_agreement)
write_table(summary, snakemake.output.table, digits=3)
write_h5ad(adata, snakemake.output.h5ad)
