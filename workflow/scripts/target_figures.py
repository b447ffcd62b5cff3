"""Snakemake script (rule target_figures): one contrast's forest plot, per-sample points,
composition and therapy-target summary."""

import pandas as pd

from sepsis_sc import store
from sepsis_sc.pl.stats import composition, forest, sample_values, therapy_targets
from sepsis_sc.pl.style import savefig, set_style
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])
set_style()

c = snakemake.params.contrast
case, control, column = c["case"], c["control"], c["column"]
alpha = snakemake.params.alpha
adata = store.read(snakemake.input.h5ad, obsm=False, obsp=False)  # obs only: no matrix
effects = pd.read_csv(snakemake.input.effects, sep="\t")
table = pd.read_csv(snakemake.input.sample_table, sep="\t", dtype={"sample_id": str})
targets = pd.read_csv(snakemake.input.targets, sep="\t")
# the per-sample table's "condition" is the sheet's condition; colour by the contrast column
levels = adata.obs[["sample_id", column]].astype(str).drop_duplicates("sample_id")
table["condition"] = table["sample_id"].map(levels.set_index("sample_id")[column])

out = snakemake.output
savefig(forest(effects, case=case, control=control, alpha=alpha, primary_only=True), out.forest)
savefig(sample_values(table, case=case, control=control), out.points)
savefig(composition(adata, case=case, control=control, condition_key=column), out.composition)
savefig(therapy_targets(targets, alpha=alpha), out.targets)
