"""Snakemake script (rule patients): per-sample immune profiles, state calls, endotype scores."""

import pandas as pd

from sepsis_sc import store
from sepsis_sc.config import PatientSettings
from sepsis_sc.data import counts_layer
from sepsis_sc.patients import REFERENCE_COLUMNS, profile, read_reference
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

inp = snakemake.input
settings = PatientSettings.from_config(snakemake.params.patients).with_overrides(
    reference_file=inp.get("reference_file")  # set only when configured
)
ref = snakemake.params.reference  # {column, value} of the reference samples, or None
if ref:
    settings = settings.with_overrides(reference_column=ref["column"], reference_value=ref["value"])
layer = counts_layer(store.layer_names(inp.h5ad), snakemake.params.counts_layer)
adata = store.read(inp.h5ad, obsm=False, obsp=False)  # no matrix: the counts are streamed
sample_table = pd.read_csv(inp.sample_table, sep="\t", keep_default_na=True)
sample_table["reason"] = sample_table["reason"].fillna("")
external = [pd.read_csv(getattr(inp, k), sep="\t") for k in ("da", "ccc") if k in inp.keys()]
res = profile(
    adata,
    sample_table,
    settings,
    min_cells=snakemake.params.min_cells,
    run_name=snakemake.params.run_name,
    counts=store.FileCounts.matching(inp.h5ad, layer, adata),
    layer=layer,
    # cells in neighbourhoods that moved with the first contrast and that nothing named;
    # the therapy axes' scores per sample
    external=pd.concat(external) if external else None,
)
for note in res.notes:
    print(f"sepsis-sc patients: {note}")
out = snakemake.output
write_table(res.profiles, out.profiles)
write_table(res.states, out.states, digits=3)
reference = res.reference
if res.status == "reference_file":
    reference = read_reference(inp.reference_file)  # record the ranges this run used
elif reference.empty:
    reference = pd.DataFrame(columns=REFERENCE_COLUMNS)
write_table(reference, out.reference)
write_table(res.endotypes, out.endotypes)
write_table(res.trajectories, out.trajectories)
