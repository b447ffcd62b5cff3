"""Snakemake script (rule qc_sample): read one sample's raw counts and label its cells from the
sheet (ingest), then adaptive QC and doublets."""

from sepsis_sc.config import QCSettings
from sepsis_sc.io import ingest_sample, read_raw_droplets
from sepsis_sc.qc import filter_cells_qc, run_qc
from sepsis_sc.utils import setup_logging, write_h5ad, write_table

setup_logging(snakemake.log[0])

adata = ingest_sample(
    snakemake.input[0],
    snakemake.params.record,
    organism=snakemake.params.organism,
    min_cells=snakemake.params.min_cells,
)
sample_id = snakemake.wildcards.sample
cells_loaded = adata.obs["cells_loaded"].iloc[0] if "cells_loaded" in adata.obs else None
raw_path = getattr(snakemake.input, "raw", None)
raw = read_raw_droplets(raw_path, sample_id, adata.var_names) if raw_path else None
chemistry = str(snakemake.params.record.get("chemistry") or "") or None
summary = run_qc(
    adata,
    QCSettings.from_config(snakemake.params.qc),
    sample_id=sample_id,
    organism=snakemake.params.organism,
    cells_loaded=float(cells_loaded) if cells_loaded not in (None, "") else None,
    seed=snakemake.params.seed,
    raw=raw,
    chemistry=chemistry,
)
write_table(adata.obs, snakemake.output.cells, index=True)
write_table(summary, snakemake.output.summary)
kept = filter_cells_qc(adata)
if "counts" in kept.layers and kept.X is not None and (kept.X != kept.layers["counts"]).nnz == 0:
    kept.X = None  # X repeats the raw counts: the file stores them once (layers["counts"])
write_h5ad(kept, snakemake.output.h5ad)
