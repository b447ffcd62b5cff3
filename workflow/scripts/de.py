"""Snakemake script (rule de): pseudobulk DE (PyDESeq2) per label of each annotation level."""

import logging

import pandas as pd

from sepsis_sc import store
from sepsis_sc.data import counts_layer
from sepsis_sc.de import RESULT_COLUMNS, SUMMARY_COLUMNS, pseudobulk_de
from sepsis_sc.design import Contrast, resolve_design, sample_meta
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])
logger = logging.getLogger("de")

p = snakemake.params
spec = dict(p.contrast)
contrast = Contrast(**spec)
cfg = p.de
if not cfg.get("enabled", True):
    logger.info("de.enabled is false: writing empty tables")
    write_table(pd.DataFrame(columns=RESULT_COLUMNS), snakemake.output.results)
    write_table(pd.DataFrame(columns=SUMMARY_COLUMNS), snakemake.output.summary)
else:
    src = snakemake.input[0]
    layer = counts_layer(store.layer_names(src), snakemake.params.counts_layer)
    adata = store.read(src, obsm=False, obsp=False)  # obs and var: the counts are streamed
    design = resolve_design(sample_meta(adata), contrast, spec["design"], paired=spec["paired"])
    logger.info("contrast %s: %s", contrast.label(), design.description())
    for note in design.notes:
        logger.info("design: %s", note)
    results, summary = pseudobulk_de(
        adata,
        design,
        levels=cfg["levels"],
        min_cells=cfg["min_cells"],
        min_samples_per_group=cfg["min_samples_per_group"],
        min_total_count=cfg["min_total_count"],
        min_count=cfg["min_count"],
        shrink=cfg["shrink"],
        n_cpus=snakemake.threads,
        alpha=p.stats["alpha"],
        layer=layer,
        counts_file=src,
    )
    write_table(results, snakemake.output.results)
    write_table(summary, snakemake.output.summary, digits=3)
