"""Snakemake script (rule qc_figures): per-sample QC distributions, scatter, removed cells."""

import pandas as pd

from sepsis_sc.pl.qc import contamination, removed, removed_by_lineage, scatter, violins
from sepsis_sc.pl.style import savefig, set_style
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])
set_style()

cells = pd.concat([pd.read_csv(p, sep="\t", index_col=0) for p in snakemake.input.cells])
summary = pd.read_csv(snakemake.input.summary, sep="\t")
savefig(violins(cells, summary), snakemake.output.violins)
savefig(scatter(cells), snakemake.output.scatter)
savefig(removed(summary), snakemake.output.removed)
savefig(removed_by_lineage(summary), snakemake.output.lineage)
savefig(contamination(summary), snakemake.output.contamination)
