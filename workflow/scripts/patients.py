"""Snakemake script (rule patients): per-sample immune profiles, state calls, endotype scores."""

import pandas as pd

from sepsis_sc import store
from sepsis_sc.data import counts_layer
from sepsis_sc.patients import profile
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

p = snakemake.params.patients
ref = snakemake.params.reference
inp = snakemake.input
layer = counts_layer(store.layer_names(inp.h5ad), snakemake.params.counts_layer)
adata = store.read(inp.h5ad, obsm=False, obsp=False)  # no matrix: the counts are streamed
sample_table = pd.read_csv(inp.sample_table, sep="\t", keep_default_na=True)
sample_table["reason"] = sample_table["reason"].fillna("")
res = profile(
    adata,
    sample_table,
    reference_column=ref["column"] if ref else p["reference_column"],
    reference_value=ref["value"] if ref else None,
    reference_file=inp.get("reference_file"),
    min_controls=p["min_controls"],
    z_threshold=p["z_threshold"],
    min_cells=snakemake.params.min_cells,
    timepoint_column=p["timepoint_column"],
    endotypes=p["endotypes"],
    run_name=snakemake.params.run_name,
    layer=layer,
    counts_file=inp.h5ad,
)
for note in res.notes:
    print(f"sepsis-sc patients: {note}")
out = snakemake.output
write_table(res.profiles, out.profiles)
write_table(res.states, out.states, digits=3)
reference = res.reference
if res.status == "reference_file":
    from sepsis_sc.patients import read_reference

    reference = read_reference(inp.reference_file)  # record the ranges this run used
elif reference.empty:
    reference = pd.DataFrame(
        columns=[
            "readout",
            "centre",
            "spread",
            "low",
            "high",
            "k",
            "n",
            "z_threshold",
            "reference",
            "source_run",
        ]
    )
write_table(reference, out.reference)
write_table(res.endotypes, out.endotypes)
write_table(res.trajectories, out.trajectories)
