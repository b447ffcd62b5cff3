"""Snakemake script (rule sample_table): per-sample state values and the contrast overview."""

import pandas as pd

from sepsis_sc import store
from sepsis_sc.config import StatsSettings
from sepsis_sc.data import counts_layer
from sepsis_sc.stats import sample_table
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

src = snakemake.input[0]
layer = counts_layer(store.layer_names(src), snakemake.params.counts_layer)
adata = store.read(src, obsm=False, obsp=False)  # no matrix: the counts are streamed
settings = StatsSettings.from_config(snakemake.params.stats)
counts = store.FileCounts.matching(src, layer, adata)
table = sample_table(adata, settings, counts=counts, layer=layer)
write_table(table, snakemake.output.sample_table)
write_table(pd.DataFrame(snakemake.params.contrasts), snakemake.output.contrasts)
