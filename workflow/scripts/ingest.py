"""Snakemake script (rule ingest): read one sample's raw counts and label it from the sheet."""

from sepsis_sc.io import ingest_sample
from sepsis_sc.utils import setup_logging, write_h5ad

setup_logging(snakemake.log[0])

adata = ingest_sample(
    snakemake.input[0],
    snakemake.params.record,
    organism=snakemake.params.organism,
    min_cells=snakemake.params.min_cells,
)
write_h5ad(adata, snakemake.output[0])
