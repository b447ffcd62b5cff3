"""Snakemake script (rule provenance): config, versions, scVI device and seeds of the run."""

import yaml

from sepsis_sc.utils import dump_yaml, provenance, setup_logging

setup_logging(snakemake.log[0])

with open(snakemake.input.record) as fh:
    record = yaml.safe_load(fh)
dump_yaml(provenance(snakemake.params.config, record), snakemake.output[0])
