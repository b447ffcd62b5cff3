"""Snakemake script (rule da): one contrast's neighbourhood differential abundance (Milo,
donors as units) and which significant neighbourhoods no named cell type or state explains."""

import pandas as pd

from sepsis_sc import da, store
from sepsis_sc.config import DASettings
from sepsis_sc.design import Contrast, resolve_design, sample_meta
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

p = snakemake.params
settings = DASettings.from_config(p.da)
# obs and the embeddings only: the matrices stay on disk
adata = store.read(snakemake.input.h5ad, obsp=False, obsm=[p.use_rep, "X_umap"])
spec = dict(p.contrast)
design = resolve_design(sample_meta(adata), Contrast(**spec), spec["design"], paired=spec["paired"])
da.make_nhoods(adata, settings, use_rep=p.use_rep, seed=p.seed)
states = [s for s in adata.uns.get("state_rules", {}) if s in adata.obs]  # called states
desc = da.describe_nhoods(adata, states=states)
tested = da.test_nhoods(adata, design, settings, n_cpus=snakemake.threads)
nhoods = da.explain_nhoods(
    desc.join(tested.set_index("nhood")),
    composition=pd.read_csv(snakemake.input.composition, sep="\t"),
    effects=pd.read_csv(snakemake.input.effects, sep="\t"),
    min_fraction=settings.min_fraction,
)
write_table(nhoods, snakemake.output.nhoods, index=True, digits=4)
write_table(da.unexplained_per_sample(adata, nhoods), snakemake.output.per_sample, digits=4)
