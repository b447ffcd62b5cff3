"""Are two runs' results the same? Tables byte for byte, the final AnnData's obs and obsm.

Used to check that a refactoring changed nothing a user sees: run the demo (or any config)
with the old and the new code into two results folders, then::

    python benchmarks/compare_runs.py results/demo_before results/demo_after

Every table (``.tsv``, ``.tsv.gz``, ``.csv``) and record (``.yaml``) under the first folder is
compared with the file of the same path under the second: byte for byte, and where the bytes
differ, cell by cell, so that a column that records wall-clock time (``seconds``) is reported
as such and not as a difference in results. For each ``.h5ad`` the ``obs`` table (values and
dtypes) and every ``obsm`` matrix are compared exactly. Logs, benchmark timings, figures and
the provenance record (dates, versions) are not compared: they differ between any two runs.

Prints one line per file and a summary; exits 1 when any compared output differs (or is
missing on one side) beyond the time columns.
"""

from __future__ import annotations

import argparse
import gzip
import io
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

#: folders and files that record the run, not its results
SKIP_PARTS = {"logs", "benchmarks", "figures", "cards", ".snakemake"}
SKIP_NAMES = {"provenance.yaml"}
#: table columns that hold wall-clock times (differ between any two runs)
TIME_COLUMNS = {"seconds", "train_seconds", "runtime_s"}
#: keys of YAML records that hold wall-clock times, dates or package versions
TIME_KEYS = ("seconds", "time", "date", "versions", "started", "finished")
TABLES = (".tsv", ".tsv.gz", ".csv")


def _is_table(p: Path) -> bool:
    return p.name.endswith(TABLES)


def _wanted(rel: Path) -> bool:
    return not (set(rel.parts) & SKIP_PARTS) and rel.name not in SKIP_NAMES


def _read_bytes(p: Path) -> bytes:
    data = p.read_bytes()
    return gzip.decompress(data) if p.name.endswith(".gz") else data


def compare_table(a: Path, b: Path) -> str:
    """``"identical"``, ``"time columns only"`` or a description of the first differences."""
    ba, bb = _read_bytes(a), _read_bytes(b)
    if ba == bb:
        return "identical"
    sep = "," if a.name.endswith(".csv") else "\t"
    ta = pd.read_csv(io.BytesIO(ba), sep=sep, dtype=str, keep_default_na=False)
    tb = pd.read_csv(io.BytesIO(bb), sep=sep, dtype=str, keep_default_na=False)
    if list(ta.columns) != list(tb.columns):
        return f"DIFFERS: columns {list(ta.columns)} vs {list(tb.columns)}"
    if ta.shape != tb.shape:
        return f"DIFFERS: shape {ta.shape} vs {tb.shape}"
    diff = ta != tb
    cols = [c for c in ta.columns if diff[c].any()]
    real = [c for c in cols if c not in TIME_COLUMNS]
    if not real:
        return f"time columns only ({', '.join(cols)})"
    c = real[0]
    i = int(np.flatnonzero(diff[c].to_numpy())[0])
    return (
        f"DIFFERS in {len(real)} column(s) {real[:6]}: e.g. row {i} {c}: "
        f"{ta.loc[i, c]!r} vs {tb.loc[i, c]!r} ({int(diff[real].to_numpy().sum())} cells)"
    )


def _strip_times(text: str) -> list[str]:
    return [
        line for line in text.splitlines() if not any(k in line.split(":")[0] for k in TIME_KEYS)
    ]


def compare_record(a: Path, b: Path) -> str:
    ta, tb = a.read_text(), b.read_text()
    if ta == tb:
        return "identical"
    if _strip_times(ta) == _strip_times(tb):
        return "time keys only"
    la, lb = _strip_times(ta), _strip_times(tb)
    first = next(
        (i for i, (x, y) in enumerate(zip(la, lb, strict=False)) if x != y), min(len(la), len(lb))
    )
    return f"DIFFERS at line {first}: {la[first] if first < len(la) else '<end>'!r} vs {lb[first] if first < len(lb) else '<end>'!r}"


def compare_h5ad(a: Path, b: Path) -> str:
    """obs (values and dtypes) and every obsm matrix, exactly."""
    from anndata.io import read_elem

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        oa, ob = read_elem(fa["obs"]), read_elem(fb["obs"])
        ka = sorted(fa["obsm"].keys()) if "obsm" in fa else []
        kb = sorted(fb["obsm"].keys()) if "obsm" in fb else []
        if ka != kb:
            return f"DIFFERS: obsm keys {ka} vs {kb}"
        for k in ka:
            ma, mb = np.asarray(read_elem(fa["obsm"][k])), np.asarray(read_elem(fb["obsm"][k]))
            if (
                ma.shape != mb.shape
                or ma.dtype != mb.dtype
                or not np.array_equal(ma, mb, equal_nan=True)
            ):
                return f"DIFFERS: obsm[{k!r}]"
    if list(oa.columns) != list(ob.columns):
        return f"DIFFERS: obs columns {sorted(set(oa.columns) ^ set(ob.columns))}"
    try:
        pd.testing.assert_frame_equal(oa, ob, check_exact=True)
    except AssertionError as err:
        return "DIFFERS: obs " + " ".join(str(err).split())[:300]
    return f"identical (obs {oa.shape[0]} x {oa.shape[1]}, obsm {', '.join(ka)})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args(argv)
    files = sorted(
        p.relative_to(args.before)
        for p in args.before.rglob("*")
        if p.is_file() and _wanted(p.relative_to(args.before))
    )
    after = {
        p.relative_to(args.after)
        for p in args.after.rglob("*")
        if p.is_file() and _wanted(p.relative_to(args.after))
    }
    n_same = n_diff = 0
    for rel in files:
        a, b = args.before / rel, args.after / rel
        if _is_table(a):
            kind = compare_table
        elif a.suffix == ".yaml":
            kind = compare_record
        elif a.suffix == ".h5ad":
            kind = compare_h5ad
        else:
            continue
        verdict = "MISSING in after" if not b.exists() else kind(a, b)
        bad = verdict.startswith(("DIFFERS", "MISSING"))
        n_diff += bad
        n_same += not bad
        print(f"{'!!' if bad else 'ok'}  {rel}: {verdict}")
    for rel in sorted(after - set(files)):
        if _is_table(rel) or rel.suffix in (".yaml", ".h5ad"):
            print(f"!!  {rel}: only in after")
            n_diff += 1
    print(f"\n{n_same} outputs the same, {n_diff} different or missing")
    return 1 if n_diff else 0


if __name__ == "__main__":
    sys.exit(main())
