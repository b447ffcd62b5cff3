"""Snakemake script (rule annotate): hierarchical marker-based immune annotation."""

from sepsis_sc import store
from sepsis_sc.annotate import annotate, opinion_table
from sepsis_sc.config import AnnotationSettings
from sepsis_sc.data import counts_layer
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

settings = AnnotationSettings.from_config(snakemake.params.annotation)
src = snakemake.input.h5ad
layer = counts_layer(store.layer_names(src), snakemake.params.counts_layer)
# the marker annotation streams the counts from the file; CellTypist and scANVI need them in memory
in_memory = bool(settings.celltypist_model or settings.reference)
adata = store.read(src, layers=[layer] if in_memory else [])
summary = annotate(
    adata,
    settings,
    organism="auto",
    expected_organism=snakemake.params.organism,
    markers=snakemake.input.markers,
    use_rep=snakemake.params.use_rep,
    layer=layer,
    counts=None if in_memory else store.FileCounts.matching(src, layer, adata),
    seed=snakemake.params.seed,
)
if settings.celltypist_model:
    from sepsis_sc.annotate import annotate_celltypist, annotation_agreement

    annotate_celltypist(adata, settings.celltypist_model, layer=layer)
    agreement = annotation_agreement(adata, "cell_type", "celltypist_label")
    write_table(agreement, snakemake.output.agreement)
if settings.reference:
    from sepsis_sc.annotate import annotation_consensus, transfer_labels

    if not settings.reference_label_key:
        raise ValueError("annotation.reference is set: annotation.reference_label_key is needed.")
    transfer_labels(
        adata,
        snakemake.input.reference,
        label_key=settings.reference_label_key,
        layer=layer,
        seed=snakemake.params.seed,
    )
    table = annotation_consensus(adata)
    write_table(table.reset_index(), snakemake.output.reference_agreement)
write_table(summary, snakemake.output.table, digits=3)
write_table(opinion_table(adata.uns["annotation"]), snakemake.output.agreement_opinions, digits=4)
# annotated.h5ad is the file users take away: whole, its matrices copied from the merged
# file (dataset by dataset, not through memory), not linked
if in_memory:
    del adata.layers[layer]
store.write(adata, snakemake.output.h5ad, source=src, copy=store.matrix_keys(src))
