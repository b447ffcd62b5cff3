"""What the third annotation opinion (:mod:`sepsis_sc.annotate.arbiter`) costs, by cohort size.

For each size, a simulated PBMC cohort (the demo simulator through
:func:`sepsis_sc.sim.cohort_adata`: half sepsis, half control, about 2,000 cells per sample,
a PCA of the 2,000 most variable genes) is annotated twice in fresh processes, with the
third opinion and without it (``third_opinion_min_probability=None``); each run prints its
wall time, the peak resident memory of its process and, with the third opinion, its training cells, genes,
cells asked and decided. The difference of the two is the third opinion's cost (its
training set is capped at 2,000 agreed cells per lineage, so the fit does not grow with the
cohort; the prediction reads the torn cells only).

Usage::

    python benchmarks/annotation_arbiter_cost.py --sizes 20000 100000

Run it on an idle machine: the figures are timings.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CHILD = r"""
import json, sys, time, resource
from sepsis_sc.annotate import annotate
from sepsis_sc.sim import cohort_adata, two_arm_sheet

size, arbiter = int(sys.argv[1]), sys.argv[2] == "on"
n_per = max(1, size // 4000)
adata = cohort_adata(two_arm_sheet(n_per), cells_per_sample=size // (2 * n_per),
                     n_genes=12000, seed=0, effects=True, n_pcs=30)
t0 = time.perf_counter()
annotate(adata, cluster_key=None, use_rep="X_pca",
         third_opinion_min_probability=0.8 if arbiter else None)
wall = time.perf_counter() - t0
rec = adata.uns["annotation"]["reference"].get("classifier", {})
out = {"cells": adata.n_obs, "arbiter": arbiter, "annotate_s": round(wall, 1),
       "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
if rec:
    out.update(n_train=int(sum(rec.get("n_train", {}).values())), n_genes=rec.get("n_genes"),
               n_asked=rec.get("n_asked"), n_decided=rec.get("n_decided"))
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000])
    args = ap.parse_args()
    print("cells\tarbiter\tannotate_s\tpeak_rss_gb\tn_train\tn_genes\tn_asked\tn_decided")
    for size in args.sizes:
        for mode in ("off", "on"):
            res = subprocess.run(
                [sys.executable, "-c", CHILD, str(size), mode],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(res.stdout.strip().splitlines()[-1])
            cols = ("n_train", "n_genes", "n_asked", "n_decided")
            print(
                f"{row['cells']}\t{mode}\t{row['annotate_s']}\t{row['peak_rss_gb']}\t"
                + "\t".join(str(row.get(c, "")) for c in cols),
                flush=True,
            )
    ru = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"# largest child peak RSS {ru:.2f} GB")


if __name__ == "__main__":
    main()
