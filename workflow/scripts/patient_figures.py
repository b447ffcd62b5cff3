"""Snakemake script (rule patient_figures): cohort heatmap, trajectories, one card per sample."""

import re
from pathlib import Path

import pandas as pd

from sepsis_sc.pl.patients import cohort_heatmap, immune_card, trajectory_plot
from sepsis_sc.pl.style import savefig, set_style
from sepsis_sc.utils import setup_logging

setup_logging(snakemake.log[0])
set_style()

col = snakemake.params.colouring
kw = {"case": col["case"], "control": col["control"], "condition_key": col["column"]}
profiles = pd.read_csv(snakemake.input.profiles, sep="\t", keep_default_na=True)
states = pd.read_csv(snakemake.input.states, sep="\t", keep_default_na=False)
traj = pd.read_csv(snakemake.input.trajectories, sep="\t", keep_default_na=True)
for df in (profiles, states, traj):
    for c in ("sample_id", "donor", col["column"], "timepoint"):
        if c in df:
            df[c] = df[c].astype(str)
if col["column"] not in profiles:  # contrast on another sheet column: colour by condition
    kw = {"condition_key": "condition"}
out = snakemake.output
savefig(cohort_heatmap(profiles, **kw), out.heatmap)
labels = dict(zip(profiles["readout"], profiles["label"]))
savefig(trajectory_plot(traj, labels=labels), out.trajectories)
cards = Path(out.cards)
cards.mkdir(parents=True, exist_ok=True)
for sid in dict.fromkeys(profiles["sample_id"]):
    name = re.sub(r"[^A-Za-z0-9._-]", "_", sid)
    savefig(immune_card(profiles, sid, states, **kw), cards / f"{name}.png")
