"""Snakemake script (rule score): therapy-target state scores within parent populations."""

from sepsis_sc import store
from sepsis_sc.config import ScoringSettings
from sepsis_sc.data import counts_layer
from sepsis_sc.score import score_states
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

p = snakemake.params
ref = p.reference  # {column, value} of the control cells, or None
settings = ScoringSettings.from_config(p.scoring).with_overrides(reference=ref)
src = snakemake.input.h5ad
layer = counts_layer(store.layer_names(src), p.counts_layer)
adata = store.read(src)  # obs, var, uns: the counts are streamed from the file
rules = score_states(
    adata,
    settings,
    organism=p.organism,
    signatures=snakemake.input.signatures,
    min_cells_parent=p.min_cells,
    # without control samples (one condition, no scoring.reference) no state is called:
    # thresholds from the cells being judged would call a share of them by construction
    calls=ref is not None or settings.call_rule != "control_quantile",
    counts=store.FileCounts.matching(src, layer, adata),
    layer=layer,
)
write_table(rules, snakemake.output.rules, index=True)
store.write(adata, snakemake.output.h5ad, source=src, link=store.matrix_keys(src))
