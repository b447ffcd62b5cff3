"""Snakemake script (rule score_figures): state scores on the UMAP (no contrast needed)."""

import anndata as ad

from sepsis_sc.pl.stats import score_umaps
from sepsis_sc.pl.style import savefig, set_style
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])
set_style()
adata = ad.read_h5ad(snakemake.input.h5ad, backed="r")  # obs + obsm only
savefig(score_umaps(adata), snakemake.output.umaps)
