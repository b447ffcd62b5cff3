"""Scaling benchmark: the pipeline against a one-process scanpy reference, 10k to 1M cells.

For each cohort size the demo simulator writes ``size / cells_per_sample`` samples (half
sepsis, half control, two batches) as 10x HDF5 files under ``--workdir``; then

* the pipeline runs on them (``snakemake --cores N`` with a benchmark config: scVI for a fixed
  number of epochs, no early stopping, no integration-metrics side table); wall time and the
  peak resident memory of its largest job come from ``/usr/bin/time``-style ``wait4``
  accounting of the Snakemake process tree, per-stage figures from the rules' own
  ``benchmark:`` files;
* the reference (``benchmarks/reference_scanpy.py``: the same steps in one scanpy process,
  no intermediate files) runs on the same files with the same epochs.

Results go to ``<workdir>/scaling.tsv`` (one row per size and tool) and
``<workdir>/stages.tsv``; ``benchmarks/report.py`` turns them into ``docs/benchmarks.md`` and
its plot (run at the end unless ``--no-report``). Simulation time is not counted.

Usage (the numbers in docs/benchmarks.md)::

    python benchmarks/scaling.py --sizes 10000 50000 100000 200000 --epochs 5
    # atlas scale, pipeline only (the reference does not fit in memory there)
    python benchmarks/scaling.py --sizes 500000 1000000 --epochs 5 --skip reference

CI runs ``python benchmarks/scaling.py --sizes 2000 --cells-per-sample 500 --epochs 2
--no-report`` to prove the benchmark works; that is not a timing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]


def _run_measured(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS in GB of its largest process).

    ``os.wait4`` gives the rusage of the child; ``ru_maxrss`` of RUSAGE_CHILDREN-style
    accounting is the maximum over every descendant that was waited for (Linux), i.e. the
    largest single job, the same quantity ``/usr/bin/time -v`` prints.
    """
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(cmd)} exited {code}; log {log}:\n{tail}")
    return wall, usage.ru_maxrss / 1024**2


def _today() -> str:
    """The UTC date of a measurement: the machine's speed varies between days, so the page
    says when each row was measured."""
    return time.strftime("%Y-%m-%d", time.gmtime())


def make_cohort(size: int, cells_per_sample: int, workdir: Path, seed: int) -> Path:
    """Simulate the cohort once (reused across runs); return its sample sheet."""
    from sepsis_sc.sim import write_demo_cohort

    cohort = workdir / f"cohort_{size}"
    sheet_path = cohort / "samples.tsv"
    if sheet_path.exists():
        return sheet_path
    n = max(4, round(size / cells_per_sample))
    n += n % 2
    rows = []
    for i in range(n):
        cond = "sepsis" if i % 2 == 0 else "control"
        sid = f"B{i + 1:03d}_{cond}"
        rows.append(
            {
                "sample_id": sid,
                "condition": cond,
                "donor": f"D{i + 1:03d}",
                "batch": f"batch{1 + (i // 2) % 2}",
                "path": str(cohort / sid / "filtered_feature_bc_matrix.h5"),
            }
        )
    sheet = pd.DataFrame(rows)
    t0 = time.perf_counter()
    write_demo_cohort(
        sheet,
        truth_dir=cohort,
        fmt="10x_h5",
        seed=seed,
        cells_per_sample=round(size / n),
        n_genes=12000,
    )
    print(f"simulated {size} cells in {n} samples: {time.perf_counter() - t0:.0f} s", flush=True)
    return sheet_path


def bench_config(size: int, sheet: Path, workdir: Path, epochs: int, threads: int) -> Path:
    """The demo config with the benchmark's changes (and nothing else)."""
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    cfg["run_name"] = f"bench_{size}"
    cfg["samples"] = str(sheet)
    cfg["demo"]["simulate"] = False
    cfg["integration"].update(max_epochs=epochs, early_stopping=False, compare=[], metrics=False)
    cfg["resources"]["threads"] = threads
    path = workdir / f"config_{size}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def stage_table(bench_dir: Path, size: int) -> pd.DataFrame:
    """Per-rule seconds and peak RSS from Snakemake's benchmark files (per-sample rules summed
    for time, max for memory)."""
    rows = []
    for f in sorted(bench_dir.rglob("*.tsv")):
        b = pd.read_csv(f, sep="\t")
        stage = f.parent.name if f.parent != bench_dir else f.stem
        rows.append(
            {
                "stage": stage,
                "s": float(b["s"].iloc[-1]),
                "max_rss_gb": float(b["max_rss"].iloc[-1]) / 1024,
            }
        )
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    out = df.groupby("stage").agg(
        s=("s", "sum"), max_rss_gb=("max_rss_gb", "max"), jobs=("s", "size")
    )
    return out.reset_index().assign(cells=size)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000, 200_000])
    ap.add_argument("--cells-per-sample", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks/out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", choices=["pipeline", "reference"], default=None)
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the results folder of an interrupted pipeline run and let Snakemake "
        "continue where it stopped (the wall time is then that of the resumed part)",
    )
    args = ap.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    results_file = args.workdir / "scaling.tsv"
    stages_file = args.workdir / "stages.tsv"
    old = pd.read_csv(results_file, sep="\t") if results_file.exists() else pd.DataFrame()
    old_stages = pd.read_csv(stages_file, sep="\t") if stages_file.exists() else pd.DataFrame()
    env = dict(os.environ, PYTHONHASHSEED="0")
    for size in args.sizes:
        sheet = make_cohort(size, args.cells_per_sample, args.workdir, args.seed)
        rows = []
        if args.skip != "pipeline":
            cfg = bench_config(size, sheet, args.workdir, args.epochs, args.cores)
            results = REPO / "results" / f"bench_{size}"
            if not args.resume:
                subprocess.run(["rm", "-rf", str(results)], check=True)
            wall, peak = _run_measured(
                [
                    sys.executable,
                    "-m",
                    "snakemake",
                    "--cores",
                    str(args.cores),
                    "--configfile",
                    str(cfg),
                    "--quiet",
                    "rules",
                    "--rerun-incomplete",
                ],
                args.workdir / f"pipeline_{size}.log",
                env,
            )
            st = stage_table(results / "benchmarks", size)
            n_cells = (
                int(pd.read_csv(results / "qc" / "qc_summary.tsv", sep="\t")["cells_out"].sum())
                if (results / "qc" / "qc_summary.tsv").exists()
                else None
            )
            disk = sum(f.stat().st_size for f in results.rglob("*") if f.is_file()) / 1e9
            rows.append(
                {
                    "cells": size,
                    "tool": "pipeline",
                    "wall_s": round(wall, 1),
                    "peak_rss_gb": round(peak, 3),
                    "cells_after_qc": n_cells,
                    "epochs": args.epochs,
                    "samples": len(pd.read_csv(sheet, sep="\t")),
                    "results_gb": round(disk, 2),
                    "resumed": bool(args.resume),
                    "date": _today(),
                }
            )
            if len(old_stages):
                old_stages = old_stages[old_stages["cells"] != size]
            old_stages = pd.concat([old_stages, st], ignore_index=True)
            print(f"pipeline {size}: {wall:.0f} s, peak {peak:.2f} GB", flush=True)
        if args.skip != "reference":
            rec_file = args.workdir / f"reference_{size}.json"
            wall, peak = _run_measured(
                [
                    sys.executable,
                    str(REPO / "benchmarks/reference_scanpy.py"),
                    "--config",
                    str(REPO / "config/config.yaml"),
                    "--samples",
                    str(sheet),
                    "--epochs",
                    str(args.epochs),
                    "--threads",
                    str(args.cores),
                    "--out",
                    str(rec_file),
                ],
                args.workdir / f"reference_{size}.log",
                env,
            )
            rec = yaml.safe_load(rec_file.read_text())
            rows.append(
                {
                    "cells": size,
                    "tool": "reference",
                    "wall_s": round(wall, 1),
                    "peak_rss_gb": round(peak, 3),
                    "cells_after_qc": rec["n_cells"],
                    "epochs": args.epochs,
                    "samples": len(pd.read_csv(sheet, sep="\t")),
                    "date": _today(),
                }
            )
            print(f"reference {size}: {wall:.0f} s, peak {peak:.2f} GB", flush=True)
        new = pd.DataFrame(rows)
        if len(old):
            old = old[~(old["cells"].isin(new["cells"]) & old["tool"].isin(new["tool"]))]
        old = pd.concat([old, new], ignore_index=True).sort_values(["cells", "tool"])
        old.to_csv(results_file, sep="\t", index=False)
        old_stages.to_csv(stages_file, sep="\t", index=False)
    print(old.to_string(index=False))
    if not args.no_report:
        subprocess.run(
            [sys.executable, str(REPO / "benchmarks/report.py"), "--workdir", str(args.workdir)],
            check=True,
            cwd=REPO,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
