"""Snakemake script (rule integration_metrics): scib-style metrics and UMAPs per method."""

import pandas as pd

from sepsis_sc import store
from sepsis_sc.config import IntegrationSettings
from sepsis_sc.integrate import EMBEDDING_KEYS, integration_metrics
from sepsis_sc.pl.integrate import embedding_umaps, metrics
from sepsis_sc.pl.style import savefig, set_style
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])
set_style()

p = snakemake.params
settings = IntegrationSettings.from_config(p.integration)
adata = store.read(snakemake.input.h5ad, obsp=False)  # obs and the embeddings only
if snakemake.input.labels:
    labels = pd.read_csv(snakemake.input.labels[0], sep="\t", index_col="cell_id")
    adata.obs[p.label_key] = labels[p.label_key].reindex(adata.obs_names).astype("category")
# methods the integrate rule skipped (Harmony as a comparison with one batch level) get a
# table row with the reason instead of scores
runs = adata.uns.get("integration_runs", {})
skipped = {
    EMBEDDING_KEYS[m]: str(runs[m].get("note", "skipped"))
    for m in p.methods
    if m in runs and bool(runs[m].get("skipped", False))
}
keys = [EMBEDDING_KEYS[m] for m in p.methods if EMBEDDING_KEYS[m] not in skipped]
label_key = p.label_key if p.label_key and p.label_key in adata.obs else None
table = integration_metrics(
    adata,
    settings,
    embed_keys=keys,
    label_key=label_key,
    n_neighbors=p.n_neighbors,
    seed=p.seed,
    skipped=skipped,
)
write_table(table, snakemake.output.table, digits=3)
savefig(metrics(table), snakemake.output.figure)
fig = embedding_umaps(
    adata,
    embed_keys=keys,
    batch_key=settings.batch_key,
    label_key=label_key,
    label_title=p.label_title if label_key else None,
    n_neighbors=p.n_neighbors,
    seed=p.seed,
)
savefig(fig, snakemake.output.umaps)
