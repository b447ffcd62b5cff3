"""Snakemake script (rule ccc_scores): every sample's therapy-axis scores and, when
ccc.liana is on, LIANA+'s rank aggregate per sample (the axis pairs' ranks)."""

from sepsis_sc import ccc, store
from sepsis_sc.config import CCCSettings
from sepsis_sc.design import sample_meta
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

p = snakemake.params
settings = CCCSettings.from_config(p.ccc)
axes = ccc.load_axes(settings.axes_file)
light = store.read(snakemake.input.h5ad, obsm=False, obsp=False, uns=False)  # obs and var
genes = set(ccc.axis_genes(axes, p.organism))
if settings.liana:
    genes |= set(ccc.resource_genes(settings, organism=p.organism))
# log-normalised X of these genes only, read in row chunks: never the whole matrix
keep = [g for g in light.var_names if g in genes]
adata = store.read(snakemake.input.h5ad, X=True, obsm=False, obsp=False, uns=False, genes=keep)
scores = ccc.axis_scores(adata, settings, axes=axes, organism=p.organism)
ranks = None
if settings.liana:
    ranks = ccc.liana_by_sample(adata, settings, axes=axes, organism=p.organism, seed=p.seed)
table = ccc.add_liana_ranks(scores, ranks)
meta = sample_meta(adata)
for col in ("condition", "donor"):
    if col in meta:
        table.insert(1, col, table["sample_id"].map(meta[col]))
write_table(table, snakemake.output.per_sample, digits=4)
