"""Snakemake script (rule ccc_figures): therapy axes x samples, z against the controls."""

import pandas as pd

from sepsis_sc import store
from sepsis_sc.design import sample_meta
from sepsis_sc.pl.ccc import axes_heatmap
from sepsis_sc.pl.style import savefig, set_style
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])
set_style()

c = snakemake.params.contrast
meta = sample_meta(store.read(snakemake.input.h5ad, obsm=False, obsp=False, uns=False))
per_sample = pd.read_csv(snakemake.input.per_sample, sep="\t", dtype={"sample_id": str})
axes = pd.read_csv(snakemake.input.axes, sep="\t")
groups = meta[c["column"]].astype(str) if c["column"] in meta else meta["condition"].astype(str)
fig = axes_heatmap(
    per_sample,
    axes,
    groups=groups,
    case=c["case"],
    control=c["control"],
    alpha=snakemake.params.alpha,
)
savefig(fig, snakemake.output.heatmap)
