"""Snakemake script (rule report_tables): every table of the report as an HTML page."""

from pathlib import Path

import pandas as pd

from sepsis_sc.report import table_html
from sepsis_sc.utils import atomic_path, setup_logging

setup_logging(snakemake.log[0])

for specs, outdir in (
    (snakemake.params.cohort, snakemake.output.cohort),
    (snakemake.params.contrasts, snakemake.output.contrasts),
):
    Path(outdir).mkdir(parents=True, exist_ok=True)
    for spec in specs:
        table = pd.read_csv(spec["path"], sep="\t", low_memory=False)
        where = Path(outdir) / spec["section"] / spec["contrast"] / f"{spec['title']}.html"
        where.parent.mkdir(parents=True, exist_ok=True)
        page = table_html(
            table,
            title=spec["title"] + (f", {spec['contrast']}" if spec["contrast"] else ""),
            description=Path(spec["caption"]).read_text(),
            source=spec["path"],
        )
        with atomic_path(where) as tmp:
            Path(tmp).write_text(page)
