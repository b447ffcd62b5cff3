"""Snakemake script (rule demo_check): the demo's results against its planted truth.

With planted effects: one row per planted effect (detected at FDR <= alpha in the planted
direction?), beside the same effect tested on the simulator's true labels (the design's own
power). Without (demo.effects false): the false-positive summary of all tests.
"""

import pandas as pd

from sepsis_sc.sim import check_planted_effects, null_calibration
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

effects = pd.read_csv(snakemake.input.effects, sep="\t")
composition = pd.read_csv(snakemake.input.composition, sep="\t")
truth = pd.read_csv(snakemake.input.truth, sep="\t")
alpha = snakemake.params.alpha
contrast = snakemake.params.contrast
if snakemake.params.effects:
    table = check_planted_effects(
        effects,
        composition,
        alpha=alpha,
        truth=truth,
        case=contrast["case"],
        control=contrast["control"],
        min_cells=snakemake.params.min_cells,
    )
else:
    table = pd.DataFrame(
        [
            null_calibration(
                effects,
                composition,
                alpha=alpha,
                truth=truth,
                case=contrast["case"],
                control=contrast["control"],
            )
        ]
    )
write_table(table, snakemake.output[0], digits=3)
