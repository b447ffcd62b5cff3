"""Snakemake script (rule stats): one contrast's condition effects and composition tests."""

import pandas as pd

from sepsis_sc import store
from sepsis_sc.config import StatsSettings
from sepsis_sc.design import Contrast, resolve_design, sample_meta
from sepsis_sc.stats import composition_test, condition_effects
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

p = snakemake.params
settings = StatsSettings.from_config(p.stats)
adata = store.read(snakemake.input.h5ad, obsm=False, obsp=False)  # obs and uns: no matrix
spec = dict(p.contrast)
design = resolve_design(sample_meta(adata), Contrast(**spec), spec["design"], paired=spec["paired"])
table = pd.read_csv(snakemake.input.sample_table, sep="\t", dtype={"sample_id": str, "donor": str})
effects = condition_effects(table, settings, design=design)
composition = pd.concat(
    [composition_test(adata, settings, design=design, level=lv) for lv in ("lineage", "cell_type")],
    ignore_index=True,
)
# samples left out at qc_merge (too few cells after QC) are named in the composition table
left_out = dict(adata.uns.get("excluded_samples", {}))
composition["samples_left_out"] = "; ".join(f"{s} ({why})" for s, why in sorted(left_out.items()))
write_table(effects, snakemake.output.effects, digits=3)
write_table(composition, snakemake.output.composition, digits=3)
