"""Annotation robustness on real labelled data, perturbed (issue #32 item 4).

Each labelled set (``benchmarks/annotation_truth.py``: eccite protein gates, SoupX and Kang
author labels) x perturbations:

* ``full`` -- as it is;
* ``drop_<L>`` -- lineage L's 8 most specific genes removed from the matrix (specificity
  read on the set itself with its truth: L's mean log1p(CP10k) minus the highest mean of
  the other truth lineages; the hardest case: exactly the genes that identify L there);
* ``thin50`` / ``thin25`` -- binomial thinning of every count to 50 % / 25 % (depth);
* ``panel`` -- the ~1,300 most frequently detected genes (a targeted-panel stand-in);
* ``old_symbols`` -- current HGNC symbols renamed to their hg19-era names
  (``resources/annotation/human_symbol_aliases.tsv``; Kang is hg19-era already);
* ``no_cd4_cd8`` (eccite) -- CD4, CD8A and CD8B removed.

Every case is annotated three ways: the marker route alone (``reference_profiles=None``),
the reference classifier alone (its cell-level lineage) and the combined call (the
default). The reference is always built WITHOUT the evaluated set (leave one data set out:
``benchmarks/annotation_reference.py``), so no number here comes from a set the reference
was built from. The embedding is a PCA of the (perturbed) counts, as in
``benchmarks/annotation_accuracy.py``.

Usage::

    python benchmarks/annotation_robustness.py [--data ../shared/data] [--sets eccite,soupx,kang]
        [--cases full,thin50,...] [--out table.tsv]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import annotation_reference as build_ref  # noqa: E402
from annotation_truth import TRUTH  # noqa: E402

from sepsis_sc import annotate as an  # noqa: E402
from sepsis_sc.annotate import markers as an_markers  # noqa: E402

NAIVE = {"CD4 naive T", "CD8 naive T", "naive T"}
MEMORY = {"CD4 memory T", "CD8 effector/memory T", "Treg", "memory T"}
CD4 = {"CD4 naive T", "CD4 memory T", "Treg"}
CD8 = {"CD8 naive T", "CD8 effector/memory T"}


# ---------------------------------------------------------------------------------------------
# perturbations
# ---------------------------------------------------------------------------------------------
def specific_genes(adata: ad.AnnData, truth: pd.DataFrame, lineage: str, n: int = 8) -> list[str]:
    """The ``n`` genes most specific to ``lineage`` in this set: its mean log1p(CP10k)
    minus the highest mean among the other truth lineages."""
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    tot = np.asarray(X.sum(axis=1)).ravel()
    X = sp.csr_matrix(sp.diags(1e4 / np.maximum(tot, 1)) @ X)
    X.data = np.log1p(X.data)
    lin = truth["lineage"].to_numpy()
    means = {g: np.asarray(X[lin == g].mean(axis=0)).ravel() for g in set(lin) - {"none"} if g}
    others = np.max([m for g, m in means.items() if g != lineage], axis=0)
    score = means[lineage] - others
    top = np.argsort(-score, kind="stable")[:n]
    return list(adata.var_names[top])


def drop_genes(adata: ad.AnnData, genes: list[str]) -> ad.AnnData:
    keep = ~adata.var_names.isin(genes)
    return adata[:, keep].copy()


def thin(adata: ad.AnnData, p: float, seed: int = 0) -> ad.AnnData:
    X = sp.csr_matrix(adata.X, dtype=np.float32, copy=True)
    X.data = np.random.default_rng(seed).binomial(X.data.astype(np.int64), p).astype(np.float32)
    X.eliminate_zeros()
    out = adata.copy()
    out.X = X
    return out


def panel(adata: ad.AnnData, n: int = 1300) -> ad.AnnData:
    det = np.asarray((sp.csr_matrix(adata.X) > 0).sum(axis=0)).ravel()
    keep = np.sort(np.argsort(-det, kind="stable")[:n])
    return adata[:, keep].copy()


def old_symbols(adata: ad.AnnData) -> ad.AnnData:
    """Current symbols renamed to their previous (hg19-era) ones."""
    new_to_old = {c: ps[0] for c, ps in an_markers.symbol_aliases("human").items()}
    names = pd.Index(adata.var_names).astype(str)
    present = set(names)
    out = adata.copy()
    out.var_names = [
        new_to_old[g] if g in new_to_old and new_to_old[g] not in present else g for g in names
    ]
    return out


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------
def embed(adata: ad.AnnData, seed: int = 0, n_pcs: int = 30) -> None:
    import scanpy as sc

    adata.layers["counts"] = sp.csr_matrix(adata.X, dtype=np.float32)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=min(2000, adata.n_vars), flavor="seurat")
    sc.pp.pca(adata, n_comps=n_pcs, mask_var="highly_variable", random_state=seed)


def annotate(adata: ad.AnnData, reference, seed: int = 0, **overrides) -> None:
    """The benchmark's annotation call; ``overrides`` go to :func:`sepsis_sc.annotate.annotate`
    (e.g. ``third_opinion_min_probability=None``)."""
    kw = {"reference_profiles": None} if reference is None else {"profiles": reference}
    an.annotate(
        adata,
        organism="auto",
        expected_organism="human",
        cluster_key=None,
        use_rep="X_pca",
        resolution=2.0,
        seed=seed,
        **kw,
        **overrides,
    )


def metrics(
    lineage: pd.Series,
    cell_type: pd.Series,
    truth: pd.DataFrame,
    target: str | None,
    gate: pd.Series | None = None,
) -> dict[str, float]:
    """Lineage accuracy (call among the accepted ones), Unassigned share, CD4 vs CD8 and
    naive vs memory (other calls count as wrong; ``*_called``: among the cells given a CD4 /
    CD8 or a naive / memory label), CD4 vs CD8 by the co-receptor gate (``cd4_cd8_gate``:
    every cell called T, MAIT / gamma-delta / unresolved ones included, by the side the gate
    gave it, ``obs["annotation_gate_CD4_vs_CD8"]``; cells not called T or without a side
    count as wrong), and for ``drop_<L>`` L's cells called L or Unassigned and called
    another lineage."""
    lin = lineage.astype(str).to_numpy()
    ct = cell_type.astype(str).to_numpy()
    has = (truth["lineage"] != "none").to_numpy()
    ok = np.array([c in o for c, o in zip(lin, truth["ok"], strict=True)])
    out = {
        "n": int(has.sum()),
        "lineage_acc": float(ok[has].mean()),
        "unassigned": float((lin[has] == "Unassigned").mean()),
        "unassigned_all": float((lin == "Unassigned").mean()),
    }
    side = truth["side"].to_numpy()
    s = side != "none"
    if s.any():
        got = np.where(np.isin(ct, list(CD4)), "CD4", np.where(np.isin(ct, list(CD8)), "CD8", "x"))
        out["cd4_cd8"] = float((got[s] == side[s]).mean())
        called = s & (got != "x")
        out["cd4_cd8_called"] = float((got[called] == side[called]).mean()) if called.any() else 0.0
        out["n_cd4_cd8"] = int(s.sum())
        if gate is not None:
            g = np.where(lin == "T", gate.astype(str).to_numpy(), "x")
            out["cd4_cd8_gate"] = float((g[s] == side[s]).mean())
            out["cd4_cd8_genes_absent"] = bool((g[lin == "T"] == "genes_absent").all())
    nv = truth["naive"].to_numpy()
    m = nv != "none"
    if m.any():
        got = np.where(
            np.isin(ct, list(NAIVE)), "naive", np.where(np.isin(ct, list(MEMORY)), "memory", "x")
        )
        out["naive_memory"] = float((got[m] == nv[m]).mean())
        called = m & (got != "x")
        out["naive_memory_called"] = (
            float((got[called] == nv[called]).mean()) if called.any() else 0.0
        )
        out["n_naive_memory"] = int(m.sum())
    if target is not None:
        cells = truth["lineage"].to_numpy() == target
        mine = np.array(
            [c == "Unassigned" or c in o for c, o in zip(lin, truth["ok"], strict=True)]
        )
        out["target_kept_or_unassigned"] = float(mine[cells].mean())
        out["target_other_lineage"] = float(1 - mine[cells].mean())
        out["target_n"] = int(cells.sum())
    return out


def _gate(adata: ad.AnnData) -> pd.Series | None:
    return adata.obs.get("annotation_gate_CD4_vs_CD8")


def run_case(
    adata: ad.AnnData, truth: pd.DataFrame, reference, target: str | None, seed: int = 0
) -> list[dict]:
    """Marker route, reference alone and combined call on one (perturbed) AnnData."""
    rows = []
    work = adata.copy()
    embed(work, seed)
    t0 = time.perf_counter()
    annotate(work, None, seed)
    rows.append(
        {
            "route": "markers",
            **metrics(work.obs["lineage"], work.obs["cell_type"], truth, target, _gate(work)),
            "seconds": time.perf_counter() - t0,
        }
    )
    t0 = time.perf_counter()
    annotate(work, reference, seed)
    secs = time.perf_counter() - t0
    if "annotation_reference_lineage" in work.obs:
        ref_lin = work.obs["annotation_reference_lineage"]
        rows.append(
            {"route": "reference", **metrics(ref_lin, pd.Series(["-"] * work.n_obs), truth, target)}
        )
    rows.append(
        {
            "route": "combined",
            **metrics(work.obs["lineage"], work.obs["cell_type"], truth, target, _gate(work)),
            "seconds": secs,
        }
    )
    return rows


def cases(
    name: str, adata: ad.AnnData, truth: pd.DataFrame
) -> dict[str, tuple[ad.AnnData, str | None, str]]:
    """Case name -> (perturbed AnnData, target lineage of a dropout or None, genes dropped)."""
    out: dict[str, tuple[ad.AnnData, str | None, str]] = {"full": (adata, None, "")}
    for lin in sorted(set(truth["lineage"]) - {"none"}):
        genes = specific_genes(adata, truth, lin)
        out[f"drop_{lin}"] = (drop_genes(adata, genes), lin, ",".join(genes))
    out["thin50"] = (thin(adata, 0.5), None, "")
    out["thin25"] = (thin(adata, 0.25), None, "")
    out["panel"] = (panel(adata, 1300), None, "")
    out["old_symbols"] = (old_symbols(adata), None, "")
    if name == "eccite":
        genes = ["CD4", "CD8A", "CD8B"]
        out["no_cd4_cd8"] = (drop_genes(adata, genes), None, ",".join(genes))
        out["no_cd4_cd8_thin25"] = (thin(drop_genes(adata, genes), 0.25), None, ",".join(genes))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("SEPSIS_SC_SHARED_DATA", REPO.parent / "shared" / "data")
    p.add_argument("--data", type=Path, default=Path(default))
    p.add_argument("--sets", default="eccite,soupx,kang")
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not args.data.is_dir():
        print(f"{args.data} not found: the real data sets are needed (see its README).")
        return 2
    rows = []
    for name in args.sets.split(","):
        fname, truth_fn = TRUTH[name]
        adata = ad.read_h5ad(args.data / fname)
        truth = truth_fn(adata)
        reference = build_ref.build(args.data, tuple(s for s in build_ref.SETS if s != name))
        for case, (pert, target, genes) in cases(name, adata, truth).items():
            if args.cases and case not in args.cases.split(","):
                continue
            for r in run_case(pert, truth.loc[pert.obs_names], reference, target, args.seed):
                rows.append({"set": name, "case": case, "genes_removed": genes, **r})
                print(
                    {
                        k: (round(v, 3) if isinstance(v, float) else v)
                        for k, v in rows[-1].items()
                        if k != "genes_removed"
                    },
                    flush=True,
                )
    table = pd.DataFrame(rows)
    if args.out:
        table.to_csv(args.out, sep="\t", index=False, float_format="%.3f")
    print(markdown(table))
    return 0


def markdown(table: pd.DataFrame) -> str:
    """The table of docs/annotation.md: one row per set x case, markers / reference /
    combined side by side (lineage accuracy; Unassigned; CD4 vs CD8; naive vs memory; for
    dropouts the target lineage's cells kept or Unassigned / called another lineage)."""

    def f(v: object) -> str:
        return "" if v is None or pd.isna(v) else f"{float(v):.3f}"

    head = (
        "| set | case | lineage: markers / reference / combined | Unassigned (combined) "
        "| CD4 vs CD8: subset label / co-receptor gate (combined) | naive vs memory (combined) "
        "| dropout: kept or Unassigned / other lineage (combined) |\n"
        "|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for (name, case), g in table.groupby(["set", "case"], sort=False):
        g = g.set_index("route")
        comb = g.loc["combined"]
        lin = " / ".join(
            f(g.at[r, "lineage_acc"]) if r in g.index else ""
            for r in ("markers", "reference", "combined")
        )
        drop = ""
        if "target_kept_or_unassigned" in g and not pd.isna(comb.get("target_kept_or_unassigned")):
            drop = f"{f(comb['target_kept_or_unassigned'])} / {f(comb['target_other_lineage'])}"
        side = f(comb.get("cd4_cd8"))
        if str(comb.get("cd4_cd8_genes_absent")) == "True":
            side = "(no CD4 / CD8 genes)"
        elif side and f(comb.get("cd4_cd8_gate")):
            side += f" / {f(comb.get('cd4_cd8_gate'))}"
        lines.append(
            f"| {name} | {case} | {lin} | {f(comb['unassigned'])} | {side} "
            f"| {f(comb.get('naive_memory'))} | {drop} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
