"""Snakemake script (rule qc_merge): leave out samples too small for the sample-level tests,
merge the QC-filtered samples and log-normalise (streamed to the output file)."""

import sys

import pandas as pd

from sepsis_sc.config import QCSettings
from sepsis_sc.qc import merge_samples_to_file, select_samples
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

settings = QCSettings.from_config(snakemake.params.qc)
summary = pd.concat([pd.read_csv(p, sep="\t") for p in snakemake.input.summaries])
summary = select_samples(summary, settings)
for sid, why in zip(summary["sample_id"], summary["excluded_reason"], strict=True):
    if why:
        print(f"sepsis-sc: sample {sid} left out of the cohort: {why}", file=sys.__stderr__)
kept = [p for p, keep in zip(snakemake.input.h5ad, summary["included"], strict=True) if keep]
excluded = {str(s): str(w) for s, w in zip(summary["sample_id"], summary["excluded_reason"]) if w}
# streamed: one sample in memory at a time, the merged matrices written row chunk by chunk
merge_samples_to_file(kept, snakemake.output.h5ad, settings, uns={"excluded_samples": excluded})
write_table(summary, snakemake.output.summary, digits=3)
