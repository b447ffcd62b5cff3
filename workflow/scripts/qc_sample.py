"""Snakemake script (rule qc_sample): read one sample's raw counts and label its cells from the
sheet (ingest), then adaptive QC and doublets."""

from sepsis_sc.io import ingest_sample
from sepsis_sc.qc import filter_cells_qc, run_qc
from sepsis_sc.utils import setup_logging, write_h5ad, write_table

setup_logging(snakemake.log[0])

q = snakemake.params.qc
adata = ingest_sample(
    snakemake.input[0],
    snakemake.params.record,
    organism=snakemake.params.organism,
    min_cells=snakemake.params.min_cells,
)
sample_id = snakemake.wildcards.sample
cells_loaded = adata.obs["cells_loaded"].iloc[0] if "cells_loaded" in adata.obs else None
summary = run_qc(
    adata,
    sample_id=sample_id,
    organism=snakemake.params.organism,
    nmads={
        "log1p_total_counts": q["nmads_counts"],
        "log1p_n_genes_by_counts": q["nmads_genes"],
        "pct_counts_mt": q["nmads_mt"],
    },
    min_counts=q["min_counts"],
    min_genes=q["min_genes"],
    max_pct_mt=q["max_pct_mt"],
    mt_threshold_floor=q["mt_threshold_floor"],
    doublet_threshold=q["doublet_threshold"],
    doublet_method=q["doublet_method"],
    remove_doublets=q["remove_doublets"],
    expected_doublet_rate=q["expected_doublet_rate"],
    cells_loaded=float(cells_loaded) if cells_loaded not in (None, "") else None,
    rescue_low_rna_immune=q["rescue_low_rna_immune"],
    seed=snakemake.params.seed,
    on_empty=q["on_empty"],
)
write_table(adata.obs, snakemake.output.cells, index=True)
write_table(summary, snakemake.output.summary)
write_h5ad(filter_cells_qc(adata), snakemake.output.h5ad)
