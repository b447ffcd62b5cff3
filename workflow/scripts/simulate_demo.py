"""Snakemake script (rule simulate_demo): write the simulated demo cohort as 10x HDF5 files,
and the overlap between the genes each planted state moves and the genes its signature
scores (``planted_vs_scored_genes.tsv``: how far the demo's answers are in its data)."""

from sepsis_sc.config import DemoSettings
from sepsis_sc.score import load_signatures
from sepsis_sc.sim import planted_vs_scored, write_demo_cohort
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

p = snakemake.params
demo = DemoSettings.from_config(p.demo)
write_demo_cohort(
    p.sheet.reset_index(drop=True),
    truth_dir=snakemake.output.truth.rsplit("/", 1)[0],
    fmt="10x_h5",
    cells_per_sample=demo.cells_per_sample,
    n_genes=demo.n_genes,
    effects=demo.effects,
    organism=p.organism,
    case=p.case,
    control=p.control,
    seed=p.seed,
)
write_table(
    planted_vs_scored(load_signatures(p.organism), organism=p.organism),
    snakemake.output.overlap,
    digits=3,
)
