"""Snakemake script (rule annotation_figures): UMAP by cell type and marker dot plot."""

from sepsis_sc import store
from sepsis_sc.annotate import dotplot_markers
from sepsis_sc.config import AnnotationSettings
from sepsis_sc.data import counts_layer
from sepsis_sc.pl.annotate import marker_dotplot, umap_cell_types
from sepsis_sc.pl.style import savefig, set_style
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])
set_style()

settings = AnnotationSettings.from_config(snakemake.params.annotation)
src = snakemake.input[0]
layer = counts_layer(store.layer_names(src), snakemake.params.counts_layer)
adata = store.read(src, obsp=False)  # no matrix: the dot plot streams its genes' counts
savefig(umap_cell_types(adata, key="cell_type"), snakemake.output.umap)
table = dotplot_markers(
    adata,
    groupby="cell_type",
    markers=settings.markers,
    organism=snakemake.params.organism,
    counts=store.FileCounts.matching(src, layer, adata),
    layer=layer,
)
savefig(marker_dotplot(table), snakemake.output.dotplot)
