"""Snakemake script (rule score): therapy-target state scores within parent populations."""

import anndata as ad

from sepsis_sc.score import score_states
from sepsis_sc.utils import setup_logging, write_h5ad, write_table

setup_logging(snakemake.log[0])

p = snakemake.params
adata = ad.read_h5ad(snakemake.input.h5ad)
rules = score_states(
    adata,
    organism=p.organism,
    signatures=snakemake.input.signatures,
    min_genes_fraction=p.scoring["min_genes_fraction"],
    min_cells_parent=p.min_cells,
    call_rules={"method": p.scoring["call_rule"], "quantile": p.scoring["call_quantile"]},
    max_rank=p.scoring["max_rank"],
    control=p.contrast["control"],
    condition_key=p.contrast["column"],
)
write_table(rules, snakemake.output.rules, index=True)
write_h5ad(adata, snakemake.output.h5ad)
