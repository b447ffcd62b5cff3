"""Snakemake script (rule score_figures): state scores on the UMAP (no contrast needed)."""

from sepsis_sc import store
from sepsis_sc.pl.stats import score_umaps
from sepsis_sc.pl.style import savefig, set_style
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])
set_style()
adata = store.read(snakemake.input.h5ad, obsp=False)  # obs + obsm only
savefig(score_umaps(adata), snakemake.output.umaps)
