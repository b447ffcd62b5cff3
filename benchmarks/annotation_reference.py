"""Rebuild the packaged reference of the annotation's second opinion (issue #32).

Writes ``resources/annotation/human_pbmc_reference.tsv.gz``: mean log1p(CP10k) profiles per
reference label and source data set (genes: the union of SingleR-style pairwise markers and
every gene of the human marker sets), from the labelled real data in ``../shared/data``
(truth as defined in ``benchmarks/annotation_truth.py``):

* ``eccite_pbmc_citefuse`` -- protein-gated CD4 T, CD8 T, NK and B cells (CC: GPL-3 package
  data of CiteFuse; GEO GSE126310, Mimitou et al. 2019);
* ``soupx_pbmc4k`` -- SoupX's labels with their clusters: CD4 T, CD8 T, NK (cluster 8), B,
  classical (0) and non-classical (9) monocytes, cDC (10), pDC ("?") (SoupX package data,
  GPL-2; 10x Genomics data CC BY 4.0);
* ``kang_ifnb_harmony`` -- the 114 author-labelled cells (harmony package data, GPL-3;
  GEO GSE96583, Kang et al. 2018).

Gene symbols are mapped to current HGNC symbols first (``resources/annotation/
human_symbol_aliases.tsv``). The file holds averaged expression only, no cell-level data.

Usage::

    python benchmarks/annotation_reference.py [--data ../shared/data] [--out PATH]
        [--without SET]   # leave one data set out (benchmarks)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import anndata as ad
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from annotation_truth import REF_LINEAGE, TRUTH  # noqa: E402

from sepsis_sc.annotate import correlation, markers  # noqa: E402

SETS = ("eccite", "soupx", "kang")


def marker_genes() -> list[str]:
    """Every gene the human marker sets and gates name (stored in the reference so that the
    marker route can read each gene's specificity from it)."""
    mk = markers.load_markers(None, "human")
    genes = markers.marker_symbols(mk)
    for gate in mk["subset_gates"]:
        for grp in gate["groups"]:
            genes.update(grp["up"])
    return sorted(genes)


def labelled_sets(
    data: Path, names: tuple[str, ...] = SETS
) -> dict[str, tuple[object, object, np.ndarray]]:
    """Source -> (counts, current symbols, reference labels) for :func:`build_reference`."""
    out = {}
    for name in names:
        fname, truth_fn = TRUTH[name]
        adata = ad.read_h5ad(data / fname)
        truth = truth_fn(adata)
        out[name] = (
            adata.X,
            markers.current_symbols(adata.var_names),
            truth["ref_label"].to_numpy(dtype=object),
        )
    return out


def build(data: Path, names: tuple[str, ...] = SETS) -> correlation.ReferenceProfiles:
    return correlation.build_reference(
        labelled_sets(data, names), REF_LINEAGE, keep_genes=marker_genes()
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("SEPSIS_SC_SHARED_DATA", REPO.parent / "shared" / "data")
    p.add_argument("--data", type=Path, default=Path(default))
    p.add_argument(
        "--out", type=Path, default=REPO.joinpath("resources", *correlation.REFERENCE_FILE)
    )
    p.add_argument("--without", default=None, choices=SETS)
    args = p.parse_args(argv)
    if not args.data.is_dir():
        print(f"{args.data} not found: the real data sets are needed (see its README).")
        return 2
    names = tuple(s for s in SETS if s != args.without)
    ref = build(args.data, names)
    correlation.save_reference(ref, args.out)
    n_markers = len({g for v in ref.markers.values() for g in v})
    print(
        f"{args.out}: {ref.profiles.shape[0]} genes ({n_markers} pairwise markers), "
        f"{ref.profiles.shape[1]} profiles: " + ", ".join(f"{c}" for c in ref.profiles.columns)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
