"""Write docs/benchmarks.md and its plot from the benchmark tables.

Reads ``<workdir>/scaling.tsv`` and ``stages.tsv`` (``benchmarks/scaling.py``) and, when
present, ``scvi_cpu.tsv`` (``benchmarks/scvi_cpu.py``). Usage::

    python benchmarks/report.py [--workdir benchmarks/out] [--docs docs]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"pipeline": "#1f77b4", "reference": "#7f7f7f"}


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |")
    return "\n".join(lines)


def scaling_plot(res: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, col, label in (
        (axes[0], "wall_s", "wall time (s)"),
        (axes[1], "peak_rss_gb", "peak memory (GB)"),
    ):
        for tool, sub in res.groupby("tool"):
            sub = sub.sort_values("cells")
            ax.plot(sub["cells"], sub[col], "o-", color=COLOURS.get(tool), label=tool)
        cells = np.array(sorted(res["cells"].unique()), dtype=float)
        if len(cells) > 1:  # linear-growth guide through the smallest pipeline point
            p0 = res[(res["tool"] == "pipeline")].sort_values("cells")
            if len(p0):
                ax.plot(
                    cells,
                    p0[col].iloc[0] * cells / cells[0],
                    ":",
                    color="#bbbbbb",
                    label="linear in cells",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        kilo = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k")
        # ticks only at the measured sizes (x) and at 1-2-5 steps (y): no crowded minor labels
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(sorted(res["cells"].unique())))
        ax.xaxis.set_major_formatter(kilo)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.tick_params(axis="both", which="major", labelsize=9)
        ax.set_xlabel("cells simulated")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(frameon=False, fontsize=9)
    fig.suptitle("sepsis-sc pipeline vs one-process scanpy reference (2 CPU cores)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def fit_stage_memory(st: pd.DataFrame) -> pd.DataFrame:
    """Per stage, a least-squares line through its peak memory (MB) against cells: the
    ``(MB, MB per 10,000 cells)`` of ``sepsis_sc.store.STAGE_MEMORY`` (slope and intercept
    at least 0; the intercept at most the smallest peak)."""
    rows = []
    for stage, g in st.groupby("stage"):
        x = g["cells"].to_numpy(float) / 1e4
        y = g["max_rss_gb"].to_numpy(float) * 1024
        if len(g) >= 2 and np.ptp(x) > 0:
            slope, fixed = np.polyfit(x, y, 1)
        else:
            slope, fixed = y.max() / max(x.max(), 1e-9), 0.0
        slope = max(slope, 0.0)
        fixed = float(min(max(fixed, 0.0), y.min()))
        slope = max(
            slope, float(((y - fixed) / x).max()) if len(x) else slope
        )  # covers every point
        rows.append({"stage": stage, "fixed_mb": round(fixed), "mb_per_10k_cells": round(slope, 1)})
    return pd.DataFrame(rows)


def _memory_requests(st: pd.DataFrame) -> list[str]:
    """The memory each cohort stage asks SLURM for (sepsis_sc.store.stage_mem_mb) next to
    what it used, at the measured sizes and at 1M cells."""
    sys.path.insert(0, str(REPO / "src"))
    from sepsis_sc.store import MEMORY_FLOOR_MB, MEMORY_MARGIN, STAGE_MEMORY, stage_mem_mb

    sizes = sorted(st["cells"].unique())
    rows = []
    for stage, (fixed, slope) in STAGE_MEMORY.items():
        g = st[st["stage"] == stage].set_index("cells")["max_rss_gb"]
        row = {"stage": stage, "fit (MB + MB per 10k cells)": f"{fixed:g} + {slope:g}"}
        for n in sizes:
            used = g.get(n)
            req = stage_mem_mb(stage, int(n)) / 1024
            row[f"{n:,}: used / asked (GB)"] = "" if used is None else f"{used:.2f} / {req:.1f}"
        row["1,000,000: asked (GB)"] = f"{stage_mem_mb(stage, 1_000_000) / 1024:.1f}"
        rows.append(row)
    return [
        "### Memory requests",
        "",
        "What each cohort-level rule asks the scheduler for (`sepsis_sc.store.stage_mem_mb`: "
        f"{MEMORY_MARGIN}x a line fitted to the stage's measured peaks, at least "
        f"{MEMORY_FLOOR_MB} MB, times the attempt number), against what it used. Refit with "
        "`python benchmarks/report.py --fit-memory` after a scaling run."
        + (
            " The lines were fitted to one cohort size, so they are proportional to cells and "
            "over-ask at larger sizes where part of a streamed stage's peak is fixed (its row "
            "chunks)."
            if len(sizes) < 2
            else ""
        ),
        "",
        _md(pd.DataFrame(rows)),
        "",
    ]


def _scvi_findings(sv: pd.DataFrame) -> list[str]:
    """Sentences comparing the sepsis-sc default rows with scvi-tools' default rows, seed by
    seed (each training seed's speed-up is that seed's scvi-tools time over its sepsis-sc
    time), with the mean and the spread over seeds."""
    sv = sv.copy()
    if "seed" not in sv:
        sv["seed"] = 0
    ours = [s for s in sv["setting"].unique() if s.startswith("sepsis-sc default")]
    if "scvi-tools default" not in set(sv["setting"]) or not ours:
        return []
    cols = ["train_s", "epochs_run", "elbo_validation", "ilisi", "batch_asw", "nmi", "ari"]
    base = sv[sv["setting"] == "scvi-tools default"].set_index("seed")[cols]
    mine = sv[sv["setting"] == ours[0]].set_index("seed")[cols]
    seeds = sorted(set(base.index) & set(mine.index))
    if not seeds:
        return []
    speed = base.loc[seeds, "train_s"] / mine.loc[seeds, "train_s"]
    diff = mine.loc[seeds] - base.loc[seeds]
    first = sv[sv["setting"] == ours[0]].iloc[0]
    per_seed = ", ".join(f"seed {s}: {v:.2f}x" for s, v in speed.items())
    spread = f" (sd {speed.std(ddof=1):.2f})" if len(seeds) > 1 else ""
    lines = [
        f"The sepsis-sc default ({first['layers/latent']} layers/latent, batch "
        f"{int(first['batch_size'])}, early stopping: {first.get('stopping', 'validation ELBO')}) "
        f"trained {speed.mean():.2f}x faster than "
        f"scvi-tools' defaults over {len(seeds)} training seed(s){spread}, {speed.min():.2f}x at "
        f"worst ({per_seed}): {mine.loc[seeds, 'train_s'].mean():.0f} s against "
        f"{base.loc[seeds, 'train_s'].mean():.0f} s, after "
        f"{', '.join(str(int(v)) for v in mine.loc[seeds, 'epochs_run'])} epochs (scvi-tools: "
        f"{', '.join(str(int(v)) for v in base.loc[seeds, 'epochs_run'])}). Validation ELBO, "
        "sepsis-sc minus scvi-tools (higher is better): "
        + ", ".join(f"{v:+.1f}" for v in diff["elbo_validation"])
        + ". Integration metrics, sepsis-sc minus scvi-tools, mean (range over seeds): "
        + ", ".join(
            f"{m} {diff[m].mean():+.3f} ({diff[m].min():+.3f} to {diff[m].max():+.3f})"
            for m in ("ilisi", "batch_asw", "nmi", "ari")
        )
        + "."
    ]
    return lines + [
        "",
        "All rows use 2 torch threads (scvi-tools' row: torch's default, also 2 here). torch "
        "must be imported before numba's OpenMP pool starts (scanpy's HVG, neighbours, UMAP), "
        "or it binds to the system libgomp numba loaded and trains 2-2.5x slower on CPU; "
        "`sepsis_sc.integrate` imports torch first for that reason.",
        "",
    ]


def _measured_on(res: pd.DataFrame) -> pd.Series | None:
    """Per cohort size, the UTC date(s) its rows were measured ("pipeline / reference" when the
    two differ); None for tables written before scaling.py recorded dates."""
    if "date" not in res or res["date"].isna().all():
        return None

    def days(sub: pd.DataFrame) -> str:
        by_tool = sub.sort_values("tool").set_index("tool")["date"].fillna("?").astype(str)
        return by_tool.iloc[0] if by_tool.nunique() == 1 else " / ".join(by_tool)

    return res.groupby("cells")[["tool", "date"]].apply(days)


def _dates_note(res: pd.DataFrame) -> list[str]:
    n_days = res["date"].dropna().nunique() if "date" in res else 0
    if n_days < 2:
        return []
    same_day = res.groupby("cells")["date"].nunique() <= 1
    ratios = (
        "The ratio columns compare the two tools measured on the same day"
        if same_day.all()
        else "Where `measured` shows two dates (pipeline / reference), the ratio compares "
        "runs from different days"
    )
    return [
        f"The rows were measured on {n_days} different days "
        f"(`measured`), and this machine's speed varies from day to day. {ratios}; growth "
        "between sizes measured on different days includes that variation.",
        "",
    ]


def _reference_records(workdir: Path) -> dict[int, dict]:
    """The saved reference records (``reference_<cells>.json``), by cells."""
    files = [f for f in workdir.glob("reference_*.json") if f.stem.split("_", 1)[1].isdigit()]
    records = {int(f.stem.split("_", 1)[1]): json.loads(f.read_text()) for f in files}
    return dict(sorted(records.items()))  # other names (e.g. a saved copy) are not records


def _reference_steps(records: dict[int, dict]) -> list[str]:
    """The reference's seconds per step, one column per cohort size."""
    if not records:
        return []
    cols = {}
    for cells, rec in records.items():
        col = pd.Series(rec["steps"], dtype=float)
        if "de_fits" in rec:
            col["de labels tested"] = rec["de_fits"]
        cols[f"{cells:,} cells (s)"] = col
    t = pd.concat(cols, axis=1, sort=False).round(0).astype("Int64")
    t.index.name = "step"
    return ["### Reference time per step (seconds)", "", _md(t.reset_index()), ""]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks/out")
    ap.add_argument("--docs", type=Path, default=REPO / "docs")
    ap.add_argument(
        "--fit-memory",
        action="store_true",
        help="print the per-stage memory fit for sepsis_sc.store.STAGE_MEMORY and stop",
    )
    args = ap.parse_args(argv)

    if args.fit_memory:
        fit = fit_stage_memory(pd.read_csv(args.workdir / "stages.tsv", sep="\t"))
        print(fit.to_string(index=False))
        print({r.stage: (r.fixed_mb, r.mb_per_10k_cells) for r in fit.itertuples()})
        return
    res = pd.read_csv(args.workdir / "scaling.tsv", sep="\t")
    wide = res.pivot_table(index="cells", columns="tool", values=["wall_s", "peak_rss_gb"])
    table = pd.DataFrame(index=wide.index)
    for tool in ("pipeline", "reference"):
        if ("wall_s", tool) in wide:
            table[f"{tool} time (s)"] = wide[("wall_s", tool)].round(0).astype("Int64")
            table[f"{tool} peak (GB)"] = wide[("peak_rss_gb", tool)].round(2)
    if {("wall_s", "pipeline"), ("wall_s", "reference")} <= set(wide.columns):
        table["time ratio"] = (wide[("wall_s", "pipeline")] / wide[("wall_s", "reference")]).round(
            2
        )
        table["memory ratio"] = (
            wide[("peak_rss_gb", "pipeline")] / wide[("peak_rss_gb", "reference")]
        ).round(2)
    if "results_gb" in res:
        disk = res[res["tool"] == "pipeline"].set_index("cells")["results_gb"]
        table["pipeline results on disk (GB)"] = disk.reindex(table.index)
    days = _measured_on(res)
    if days is not None:
        table["measured"] = days.reindex(table.index)
    table = table.reset_index()
    references = _reference_records(args.workdir)
    ref_has_de = bool(references) and all("de" in r["steps"] for r in references.values())
    plot = args.docs / "img" / "benchmark_scaling.png"
    scaling_plot(res, plot)

    parts = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/scaling.py` (and `benchmarks/scvi_cpu.py`); rerun "
        "them to refresh this page (`python benchmarks/report.py` only rewrites it from the "
        "saved tables). Measured on the 2-core, 24 GB development machine with nothing else "
        "running. These are measurements, not tests: CI runs the benchmark only at a tiny "
        "size to prove it works.",
        "",
        "## Pipeline vs a one-process scanpy script",
        "",
        "Simulated cohorts (the demo simulator: 12,000 genes, 5,000 cells per sample, half "
        "sepsis, two batches). The pipeline runs with `snakemake --cores 2` and scVI for a "
        f"fixed {int(res['epochs'].iloc[0])} epochs (no early stopping, no integration-metrics "
        "side table); the reference `benchmarks/reference_scanpy.py` does the same steps in one "
        "process with no files in between. Time is wall clock including Python start-up and "
        "file reading; memory is the peak resident set of the largest process (the biggest "
        "Snakemake job, or the reference process).",
        "",
        _md(table),
        "",
        *_dates_note(res),
        f"![scaling](img/{plot.name})",
        "",
        (
            ""
            if ref_has_de
            else "**The reference rows here predate its DE "
            "step: rerun `scaling.py --skip pipeline` for a like-for-like time ratio.** "
        )
        + "Both run pseudobulk DE (PyDESeq2 per cell type and lineage, the same gates and "
        "settings: the reference calls `sepsis_sc.de.pseudobulk_de` in its process, on a plain "
        "cell-type call, the best lineage marker set and then the best of its subset sets). "
        "The pipeline does more than the reference: the #17 QC (first-pass lineages that "
        "rescue low-RNA immune cells, ambient RNA, a per-sample doublet threshold), 3 extra "
        "Leiden runs per resolution for the seed-stability column of `cluster/resolutions.tsv`, "
        "detection rates in the marker table, annotation with re-embedded lineages and an "
        "Unassigned outcome, UCell state scores within parent populations, sample-level "
        "statistics, patient profiles, provenance and the figures; and it writes an `.h5ad` "
        "after each stage so a run resumes where it stopped. Its Wilcoxon markers are scanpy's test computed on the non-zero entries "
        "only (`sepsis_sc.cluster.cluster_markers`: the same scores, p-values and fold "
        "changes, checked against `sc.tl.rank_genes_groups` in the tests); the reference "
        "calls `sc.tl.rank_genes_groups`.",
        "",
        "Since issue #23 no cohort-level job holds the whole count matrix: `qc_merge` writes the "
        "merged matrices sample by sample, the stages after it write only what they add and "
        "link the matrices (HDF5 external links; `annotated.h5ad` gets a full copy), and "
        "HVG statistics, markers, annotation, scoring, pseudobulk sums and the dot plot stream "
        "the counts from the file in row chunks or gene blocks (`sepsis_sc.store`, "
        "docs/architecture.md). Peak memory then follows the per-cell tables (obs, embeddings, "
        "the kNN graph), not the matrix.",
        "",
    ]
    parts += _reference_steps(references)
    stages_file = args.workdir / "stages.tsv"
    if stages_file.exists():
        st = pd.read_csv(stages_file, sep="\t")
        if len(st):
            t = st.pivot_table(index="stage", columns="cells", values="s").round(0).astype("Int64")
            m = st.pivot_table(index="stage", columns="cells", values="max_rss_gb").round(2)
            t.columns = [f"{c:,} cells (s)" for c in t.columns]
            m.columns = [f"{c:,} cells (GB)" for c in m.columns]
            parts += [
                "### Pipeline time per stage (seconds; per-sample jobs summed)",
                "",
                _md(t.reset_index()),
                "",
                "### Pipeline peak memory per stage (GB; largest job)",
                "",
                _md(m.reset_index()),
                "",
            ]
            parts += _memory_requests(st)
    scvi_file = args.workdir / "scvi_cpu.tsv"
    if scvi_file.exists():
        sv = pd.read_csv(scvi_file, sep="\t")
        parts += [
            "## scVI on CPU: training settings",
            "",
            f"`python benchmarks/scvi_cpu.py`: one simulated cohort ({int(sv['cells'].iloc[0]):,} "
            "cells, two batches, 2,000 HVGs), scVI trained with each setting on 2 idle cores. "
            "`train_s` is the wall time of `train()`; throughput is training cells x epochs per "
            "second; `elbo_validation` is the ELBO of the same held-out 10 % of cells, computed "
            "after training (higher is better); iLISI, batch ASW, NMI and ARI (against the "
            "planted cell types, Leiden optimised over resolutions) come from "
            "`sepsis_sc.integrate.integration_metrics`.",
            "",
            _md(sv),
            "",
        ]
        parts += _scvi_findings(sv)
    null_file = args.workdir / "null_calibration.tsv"
    if null_file.exists():
        parts += [
            "## False-positive rate over null cohorts",
            "",
            "`python benchmarks/null_calibration.py`: cohorts with the demo design and no planted "
            "effects, true cell types as the annotation, the pipeline's scoring and sample-level "
            "statistics. Expected: about 5 % of p-values below 0.05 and no FDR hits.",
            "",
            _md(pd.read_csv(null_file, sep="\t")),
            "",
        ]
    out = args.docs / "benchmarks.md"
    out.write_text("\n".join(parts))
    print(f"wrote {out} and {plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
