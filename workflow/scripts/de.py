"""Snakemake script (rule de): pseudobulk DE (PyDESeq2) per label of each annotation level."""

import logging

import pandas as pd

from sepsis_sc import store
from sepsis_sc.config import DESettings
from sepsis_sc.data import counts_layer
from sepsis_sc.de import RESULT_COLUMNS, SUMMARY_COLUMNS, pseudobulk_de
from sepsis_sc.design import Contrast, resolve_design, sample_meta
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])
logger = logging.getLogger("de")

p = snakemake.params
spec = dict(p.contrast)
contrast = Contrast(**spec)
settings = DESettings.from_config(p.de)
if not settings.enabled:
    logger.info("de.enabled is false: writing empty tables")
    write_table(pd.DataFrame(columns=RESULT_COLUMNS), snakemake.output.results)
    write_table(pd.DataFrame(columns=SUMMARY_COLUMNS), snakemake.output.summary)
else:
    src = snakemake.input[0]
    layer = counts_layer(store.layer_names(src), p.counts_layer)
    adata = store.read(src, obsm=False, obsp=False)  # obs and var: the counts are streamed
    design = resolve_design(sample_meta(adata), contrast, spec["design"], paired=spec["paired"])
    logger.info("contrast %s: %s", contrast.label(), design.description())
    for note in design.notes:
        logger.info("design: %s", note)
    results, summary = pseudobulk_de(
        adata,
        design,
        settings,
        counts=store.FileCounts.matching(src, layer, adata),
        layer=layer,
        n_cpus=snakemake.threads,
        alpha=p.stats["alpha"],
    )
    write_table(results, snakemake.output.results)
    write_table(summary, snakemake.output.summary, digits=3)
