"""Snakemake script (rule ccc): one contrast's sample-level test of every therapy axis,
donors as units (the stats section's design engine)."""

import pandas as pd

from sepsis_sc import ccc, store
from sepsis_sc.config import CCCSettings, StatsSettings
from sepsis_sc.design import Contrast, resolve_design, sample_meta
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

p = snakemake.params
adata = store.read(snakemake.input.h5ad, obsm=False, obsp=False)  # obs only: no matrix
meta = sample_meta(adata)
spec = dict(p.contrast)
design = resolve_design(meta, Contrast(**spec), spec["design"], paired=spec["paired"])
per_sample = pd.read_csv(snakemake.input.per_sample, sep="\t", dtype={"sample_id": str})
axes = ccc.test_axes(
    per_sample,
    StatsSettings.from_config(p.stats),
    axes=CCCSettings.from_config(p.ccc).axes_file,
    meta=meta,
    design=design,
)
write_table(axes, snakemake.output.axes, digits=4)
