"""Snakemake script (rule targets): one contrast's therapy-target table, from the state
effects and, when neighbourhood DA ran, the changes no named cell type or state explains,
and when the therapy axes ran, each axis under its therapy."""

import pandas as pd

from sepsis_sc.config import StatsSettings
from sepsis_sc.stats import therapy_targets
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

effects = pd.read_csv(snakemake.input.effects, sep="\t")
nhoods = None
if "nhoods" in snakemake.input.keys():
    nhoods = pd.read_csv(snakemake.input.nhoods, sep="\t", index_col=0)
    nhoods["unexplained"] = nhoods["unexplained"].astype(str).str.lower() == "true"
axes = None
if "axes" in snakemake.input.keys():  # the therapy axes between cells (rule ccc)
    axes = pd.read_csv(snakemake.input.axes, sep="\t")
targets = therapy_targets(
    effects, StatsSettings.from_config(snakemake.params.stats), nhoods=nhoods, axes=axes
)
write_table(targets, snakemake.output.targets, digits=3)
