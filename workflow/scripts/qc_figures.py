"""Snakemake script (rule qc_figures): per-sample QC distributions, scatter, removed cells."""

import pandas as pd

from sepsis_sc.plotting import set_style
from sepsis_sc.qc import plot_qc_removed, plot_qc_scatter, plot_qc_violins
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])
set_style()

cells = pd.concat([pd.read_csv(p, sep="\t", index_col=0) for p in snakemake.input.cells])
summary = pd.read_csv(snakemake.input.summary, sep="\t")
plot_qc_violins(cells, summary, snakemake.output.violins)
plot_qc_scatter(cells, snakemake.output.scatter)
plot_qc_removed(summary, snakemake.output.removed)
