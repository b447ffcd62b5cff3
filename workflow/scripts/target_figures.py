"""Snakemake script (rule target_figures): forest plot, per-sample points, score UMAPs,
composition and the therapy-target summary."""

import anndata as ad
import pandas as pd

from sepsis_sc.plotting import savefig, set_style
from sepsis_sc.stats import (
    plot_composition,
    plot_forest,
    plot_sample_values,
    plot_score_umaps,
    plot_therapy_targets,
)
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])
set_style()

case, control = snakemake.params.contrast["case"], snakemake.params.contrast["control"]
column = snakemake.params.contrast["column"]
alpha = snakemake.params.alpha
adata = ad.read_h5ad(snakemake.input.h5ad, backed="r")  # obs + obsm only: X stays on disk
effects = pd.read_csv(snakemake.input.effects, sep="\t")
table = pd.read_csv(snakemake.input.sample_table, sep="\t")
targets = pd.read_csv(snakemake.input.targets, sep="\t")

out = snakemake.output
savefig(plot_forest(effects, case=case, control=control, alpha=alpha), out.forest)
savefig(plot_sample_values(table, case=case, control=control), out.points)
savefig(plot_score_umaps(adata), out.umaps)
savefig(plot_composition(adata, case=case, control=control, condition_key=column), out.composition)
savefig(plot_therapy_targets(targets, alpha=alpha), out.targets)
