"""Snakemake script (rule score_figures): state scores on the UMAP (no contrast needed)."""

import anndata as ad

from sepsis_sc.plotting import savefig, set_style
from sepsis_sc.stats import plot_score_umaps
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])
set_style()
adata = ad.read_h5ad(snakemake.input.h5ad, backed="r")  # obs + obsm only
savefig(plot_score_umaps(adata), snakemake.output.umaps)
