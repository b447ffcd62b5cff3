"""Snakemake script (rule sample_table): per-sample state values and the contrast overview."""

import anndata as ad
import pandas as pd

from sepsis_sc.data import counts_layer
from sepsis_sc.stats import sample_table
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

adata = ad.read_h5ad(snakemake.input[0])
table = sample_table(adata, min_cells=snakemake.params.stats["min_cells"],
                     layer=counts_layer(adata, snakemake.params.counts_layer))
write_table(table, snakemake.output.sample_table)
write_table(pd.DataFrame(snakemake.params.contrasts), snakemake.output.contrasts)
