"""Snakemake script (rule score): therapy-target state scores within parent populations."""

from sepsis_sc import store
from sepsis_sc.data import counts_layer
from sepsis_sc.score import score_states
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

p = snakemake.params
ref = p.reference  # {column, value} of the control cells, or None
src = snakemake.input.h5ad
layer = counts_layer(store.layer_names(src), snakemake.params.counts_layer)
adata = store.read(src)  # obs, var, uns: the counts are streamed from the file
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
    layer=layer,
    counts_file=src,
    control=ref["value"] if ref is not None else None,
    condition_key=ref["column"] if ref is not None else "condition",
)
write_table(rules, snakemake.output.rules, index=True)
store.write(adata, snakemake.output.h5ad, source=src, link=store.matrix_keys(src))
