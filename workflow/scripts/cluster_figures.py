"""Snakemake script (rule cluster_figures): resolution summary and cluster UMAPs."""

import pandas as pd

from sepsis_sc import store
from sepsis_sc.pl.cluster import resolutions, umaps
from sepsis_sc.pl.style import savefig, set_style
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])
set_style()

contrast = snakemake.params.contrast
adata = store.read(snakemake.input.h5ad, obsp=False)  # obs and the UMAP: no matrix
table = pd.read_csv(snakemake.input.resolutions, sep="\t")
savefig(resolutions(table, chosen=snakemake.params.resolution), snakemake.output.resolutions)
fig = umaps(
    adata,
    keys=("leiden", "sample_id", "batch", contrast["column"]),
    case=contrast["case"],
    control=contrast["control"],
    condition_key=contrast["column"],
)
savefig(fig, snakemake.output.umap)
