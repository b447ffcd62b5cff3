"""Snakemake script (rule stats): sample-level tables, condition effects, composition, targets."""

import anndata as ad
import pandas as pd

from sepsis_sc.stats import composition_test, condition_effects, sample_table, therapy_targets
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

p = snakemake.params
case, control, column = p.contrast["case"], p.contrast["control"], p.contrast["column"]
adata = ad.read_h5ad(snakemake.input[0])
paired = {"auto": "auto", "yes": True, "no": False}[p.stats["paired"]]

table = sample_table(adata, condition_key=column, min_cells=p.stats["min_cells"])
effects = condition_effects(
    table, case=case, control=control, paired=paired, alpha=p.stats["alpha"], test=p.stats["test"]
)
composition = pd.concat(
    [
        composition_test(adata, case=case, control=control, level=level, condition_key=column,
                         alpha=p.stats["alpha"])
        for level in ("lineage", "cell_type")
    ],
    ignore_index=True,
)
write_table(table, snakemake.output.sample_table)
write_table(effects, snakemake.output.effects)
write_table(composition, snakemake.output.composition)
write_table(therapy_targets(effects, alpha=p.stats["alpha"]), snakemake.output.targets)
