"""Snakemake script (rule da_figures): one contrast's DA beeswarm and neighbourhood UMAP."""

import numpy as np
import pandas as pd

from sepsis_sc import store
from sepsis_sc.pl.da import beeswarm, nhood_umap
from sepsis_sc.pl.style import savefig, set_style
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])
set_style()

c, alpha = snakemake.params.contrast, snakemake.params.alpha
nhoods = pd.read_csv(snakemake.input.nhoods, sep="\t", index_col=0, keep_default_na=True)
nhoods["unexplained"] = nhoods["unexplained"].astype(str).str.lower() == "true"
adata = store.read(snakemake.input.h5ad, obsp=False, obsm=["X_umap"], uns=False)
cells = np.asarray(adata.obsm["X_umap"]) if "X_umap" in adata.obsm else None
kw = {"case": c["case"], "control": c["control"], "alpha": alpha}
savefig(beeswarm(nhoods, **kw), snakemake.output.beeswarm)
savefig(nhood_umap(nhoods, cells, **kw), snakemake.output.umap)
