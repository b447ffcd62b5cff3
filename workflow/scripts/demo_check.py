"""Snakemake script (rule demo_check): the demo's results against its planted truth.

With planted effects: one row per planted effect (detected at FDR <= alpha in the planted
direction?). Without (demo.effects false): the false-positive summary of all tests.
"""

import pandas as pd

from sepsis_sc.simulate import check_planted_effects, null_calibration
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

effects = pd.read_csv(snakemake.input.effects, sep="\t")
composition = pd.read_csv(snakemake.input.composition, sep="\t")
alpha = snakemake.params.alpha
if snakemake.params.effects:
    table = check_planted_effects(effects, composition, alpha=alpha)
else:
    table = pd.DataFrame([null_calibration(effects, composition, alpha=alpha)])
write_table(table, snakemake.output[0])
