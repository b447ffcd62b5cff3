"""Snakemake script (rule annotate): hierarchical marker-based immune annotation."""

from sepsis_sc import store
from sepsis_sc.annotate import annotate
from sepsis_sc.data import counts_layer
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

a = snakemake.params.annotation
src = snakemake.input.h5ad
layer = counts_layer(store.layer_names(src), snakemake.params.counts_layer)
# the marker annotation streams the counts from the file; CellTypist and scANVI need them in memory
in_memory = bool(a["celltypist_model"] or a["reference"])
adata = store.read(src, layers=[layer] if in_memory else [])
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
    counts_file=None if in_memory else src,
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
    transfer_labels(
        adata,
        snakemake.input.reference,
        label_key=a["reference_label_key"],
        layer=layer,
        seed=snakemake.params.seed,
    )
    table = annotation_consensus(adata)
    write_table(table.reset_index(), snakemake.output.reference_agreement)
write_table(summary, snakemake.output.table, digits=3)
# annotated.h5ad is the file users take away: whole, its matrices copied from the merged
# file (dataset by dataset, not through memory), not linked
if in_memory:
    del adata.layers[layer]
store.write(adata, snakemake.output.h5ad, source=src, copy=store.matrix_keys(src))
