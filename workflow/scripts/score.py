"""Snakemake script (rule score): therapy-target state scores within parent populations."""

import anndata as ad

from sepsis_sc.data import counts_layer
from sepsis_sc.score import score_states
from sepsis_sc.utils import setup_logging, write_h5ad, write_table

setup_logging(snakemake.log[0])

p = snakemake.params
ref = p.reference  # {column, value} of the control cells, or None
adata = ad.read_h5ad(snakemake.input.h5ad)
rules = score_states(
    adata,
    organism=p.organism,
    signatures=snakemake.input.signatures,
    min_genes_fraction=p.scoring["min_genes_fraction"],
    min_cells_parent=p.min_cells,
    # without control samples (one condition, no scoring.reference) no state is called:
    # thresholds from the cells being judged would call a share of them by construction
    calls=ref is not None or p.scoring["call_rule"] != "control_quantile",
    call_rules={"method": p.scoring["call_rule"], "quantile": p.scoring["call_quantile"]},
    max_rank=p.scoring["max_rank"],
    layer=counts_layer(adata, snakemake.params.counts_layer),
    control=ref["value"] if ref is not None else None,
    condition_key=ref["column"] if ref is not None else "condition",
)
write_table(rules, snakemake.output.rules, index=True)
write_h5ad(adata, snakemake.output.h5ad)
