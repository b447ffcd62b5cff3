"""Snakemake script (rule annotation_figures): UMAP by cell type and marker dot plot."""

import anndata as ad

from sepsis_sc.pl.annotate import marker_dotplot, umap_cell_types
from sepsis_sc.pl.style import set_style
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])
set_style()

adata = ad.read_h5ad(snakemake.input[0])
umap_cell_types(adata, snakemake.output.umap, key="cell_type")
marker_dotplot(
    adata,
    snakemake.output.dotplot,
    groupby="cell_type",
    markers=snakemake.params.annotation["markers"],
    organism=snakemake.params.organism,
)
