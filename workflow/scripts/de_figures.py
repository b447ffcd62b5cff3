"""Snakemake script (rule de_figures): volcano small multiples and the top-gene heatmap."""

import pandas as pd

from sepsis_sc import store
from sepsis_sc.config import DESettings
from sepsis_sc.data import counts_layer
from sepsis_sc.de import tested_units
from sepsis_sc.design import Contrast, resolve_design, sample_meta
from sepsis_sc.pl.de import top_genes_heatmap, volcano
from sepsis_sc.pl.style import savefig, set_style
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])
set_style()

p = snakemake.params
spec = dict(p.contrast)
contrast = Contrast(**spec)
results = pd.read_csv(snakemake.input.results, sep="\t")
summary = pd.read_csv(snakemake.input.summary, sep="\t", keep_default_na=False)
for col in ("level", "label"):
    results[col] = results[col].astype(str)
    summary[col] = summary[col].astype(str)
out = snakemake.output
kw = {"case": contrast.case, "control": contrast.control, "alpha": p.stats["alpha"]}
savefig(volcano(results, summary, **kw), out.volcano)

# the heatmap needs the units' pseudobulk counts of the tested labels: recompute them
pb, units = {}, pd.DataFrame(columns=["donor", "level"])
if (summary["status"] == "tested").any():
    src = snakemake.input.h5ad
    layer = counts_layer(store.layer_names(src), p.counts_layer)  # the counts DE tested
    adata = store.read(src, obsm=False, obsp=False)  # the counts are streamed
    design = resolve_design(sample_meta(adata), contrast, spec["design"], paired=spec["paired"])
    units = design.units
    counts = store.FileCounts.matching(src, layer, adata)
    settings = DESettings.from_config(p.de)
    pb = tested_units(adata, design, summary, settings, counts=counts, layer=layer)
savefig(top_genes_heatmap(results, pb, units, **kw), out.heatmap)
