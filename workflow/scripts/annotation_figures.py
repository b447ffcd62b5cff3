"""Snakemake script (rule annotation_figures): UMAP by cell type and marker dot plot."""

from sepsis_sc import store
from sepsis_sc.data import counts_layer
from sepsis_sc.pl.annotate import marker_dotplot, umap_cell_types
from sepsis_sc.pl.style import set_style
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])
set_style()

src = snakemake.input[0]
layer = counts_layer(store.layer_names(src), snakemake.params.counts_layer)
adata = store.read(src, obsp=False)  # no matrix: the dot plot streams its genes' counts
umap_cell_types(adata, snakemake.output.umap, key="cell_type")
marker_dotplot(
    adata,
    snakemake.output.dotplot,
    groupby="cell_type",
    markers=snakemake.params.annotation["markers"],
    organism=snakemake.params.organism,
    layer=layer,
    counts_file=src,
)
