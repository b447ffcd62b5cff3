"""Snakemake script (rule demo_check): the demo's results against its planted truth.

With planted effects: one row per planted effect (detected at FDR <= alpha in the planted
direction?), beside the same effect tested on the simulator's true labels (the design's own
power). Without (demo.effects false): the false-positive summary of all tests.
"""

import pandas as pd

from sepsis_sc.config import DemoSettings, StatsSettings
from sepsis_sc.sim import check_planted_effects, null_calibration
from sepsis_sc.utils import setup_logging, write_table

setup_logging(snakemake.log[0])

p = snakemake.params
demo = DemoSettings.from_config(p.demo)
stats = StatsSettings.from_config(p.stats)
effects = pd.read_csv(snakemake.input.effects, sep="\t")
composition = pd.read_csv(snakemake.input.composition, sep="\t")
truth = pd.read_csv(snakemake.input.truth, sep="\t")
labels = {"case": p.contrast["case"], "control": p.contrast["control"]}
if demo.effects:
    table = check_planted_effects(
        effects, composition, alpha=stats.alpha, truth=truth, min_cells=stats.min_cells, **labels
    )
else:
    table = pd.DataFrame(
        [null_calibration(effects, composition, alpha=stats.alpha, truth=truth, **labels)]
    )
write_table(table, snakemake.output[0], digits=3)
