"""Level 1 of the annotation: cluster evidence, marker expression and lineage calls.

* :func:`annotation_clusters`: the (over-)clusters whose mean scores back each cell's own:
  ``obs[cluster_key]``, a reusable :func:`sepsis_sc.cluster.leiden_multi` partition, or an own
  Leiden over-clustering (:class:`Clusters`, with :func:`group_matrix` for group means);
* :func:`marker_expression`: log1p(CP10k) of the marker genes, scaled by their highest
  cluster mean and capped at 1 (:class:`MarkerExpression`);
* :func:`weight_matrix`: signed gene x set weights with the coverage factor of partial sets,
  :func:`lineage_coverage` its per-lineage report;
* :func:`call_lineages`: the best lineage by combined (cell + cluster) score, else
  ``Unassigned`` with a reason, low-score cells kept by cluster support
  (:class:`LineageCalls`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from sepsis_sc.annotate.markers import UNASSIGNED, resolve_genes
from sepsis_sc.data import log_normalise
from sepsis_sc.store import CountSource

logger = logging.getLogger(__name__)

__all__ = [
    "Clusters",
    "MarkerExpression",
    "LineageCalls",
    "group_matrix",
    "leiden_labels",
    "annotation_clusters",
    "marker_expression",
    "weight_matrix",
    "lineage_coverage",
    "max_by_target",
    "top2",
    "call_lineages",
]

_SCALE_FLOOR = 1.0  # log1p(CP10k) units: a gene's "positive level" is never taken below this


def group_matrix(codes: np.ndarray, n_groups: int) -> sp.csr_matrix:
    """Row-normalised (groups x cells) indicator: ``G @ X`` gives group means."""
    n = codes.size
    ok = codes >= 0
    G = sp.csr_matrix(
        (np.ones(ok.sum(), dtype=np.float64), (codes[ok], np.flatnonzero(ok))),
        shape=(n_groups, n),
    )
    sizes = np.asarray(G.sum(axis=1)).ravel()
    inv = np.divide(1.0, sizes, out=np.zeros_like(sizes), where=sizes > 0)
    return sp.csr_matrix(sp.diags(inv) @ G)


def leiden_labels(work: AnnData, resolution: float, seed: int) -> None:
    """Leiden on ``work``'s kNN graph (igraph flavour, 2 iterations, as in
    :func:`sepsis_sc.cluster.leiden_multi`) into ``work.obs["_oc"]``."""
    import scanpy as sc

    sc.tl.leiden(
        work,
        resolution=resolution,
        flavor="igraph",
        n_iterations=2,
        directed=False,
        random_state=seed,
        key_added="_oc",
    )


def _reusable_leiden(
    adata: AnnData, use_rep: str | None, resolution: float, n_neighbors: int, seed: int
) -> str | None:
    """``obs`` key of a :func:`sepsis_sc.cluster.leiden_multi` partition equal to the
    over-clustering :func:`annotate` would compute (same embedding, neighbours, seed and
    resolution), or ``None``. Saves a second kNN graph on large cohorts."""
    from sepsis_sc.cluster import knn_method

    run = adata.uns.get("leiden_multi")
    if use_rep is None or not isinstance(run, Mapping):
        return None
    key = f"leiden_r{float(resolution)}"  # sepsis_sc.cluster.leiden_key
    same = (
        run.get("use_rep") == use_rep
        and int(run.get("n_neighbors", -1)) == int(n_neighbors)
        and int(run.get("seed", -1)) == int(seed)
        and run.get("flavor", "igraph") == "igraph"
        and int(run.get("n_iterations", 2)) == 2
        and run.get("knn", "approx") == knn_method(adata.n_obs)
        and any(np.isclose(float(r), float(resolution)) for r in run.get("resolutions", []))
    )
    return key if same and key in adata.obs else None


def _overcluster(
    counts: CountSource,
    var_names: pd.Index,
    *,
    resolution: float,
    n_pcs: int,
    n_neighbors: int,
    seed: int,
    embedding: np.ndarray | None = None,
) -> np.ndarray:
    """Leiden over-clustering on a PCA (or a given embedding) of a normalised copy."""
    import scanpy as sc

    from sepsis_sc.cluster import neighbors

    if embedding is None:
        work = AnnData(X=counts.full(), var=pd.DataFrame(index=var_names.astype(str)))
        work.var_names_make_unique()
        log_normalise(work)
        keep = np.asarray((work.X > 0).sum(axis=0)).ravel() >= 3
        work = work[:, keep].copy()
        n_top = int(min(2000, work.n_vars))
        sc.pp.highly_variable_genes(work, n_top_genes=n_top, flavor="seurat")
        n_comps = int(
            max(2, min(n_pcs, work.n_obs - 1, int(work.var["highly_variable"].sum()) - 1))
        )
        sc.pp.pca(work, n_comps=n_comps, mask_var="highly_variable", random_state=seed)
        rep = "X_pca"
    else:  # the embedding alone: no copy of the counts (a million cells: ~9 GB)
        work = AnnData(obs=pd.DataFrame(index=pd.RangeIndex(counts.shape[0]).astype(str)))
        work.obsm["X_emb"] = np.asarray(embedding, dtype=np.float32)
        rep = "X_emb"
    neighbors(  # the same kNN search as sepsis_sc.cluster.leiden_multi
        work,
        n_neighbors=int(min(n_neighbors, max(2, work.n_obs - 1))),
        use_rep=rep,
        seed=seed,
    )
    leiden_labels(work, resolution, seed)
    return work.obs["_oc"].to_numpy()


def _set_weights(n_found: int, n_core_found: int, n_total: int) -> float:
    """Total weight of a set's up-genes found in the data (issue #16 item 3).

    A set scores from the genes present. With at least half of its genes present it has full
    weight; with fewer it degrades as ``sqrt(n_found / ceil(n_total / 2))`` (one gene of 8:
    0.5) instead of being skipped, provided one of its ``core`` genes (those specific enough to
    stand alone, e.g. MS4A1 for B cells) is among them: a set represented only by generic or
    induced genes (XBP1 for plasma cells, IRF7 after interferon for pDCs, S100A8/9 for
    neutrophils) is no evidence and gets weight 0.
    """
    half = max(1, int(np.ceil(0.5 * n_total)))
    if n_found >= half:
        return 1.0
    if n_core_found == 0:
        return 0.0
    return float(np.sqrt(n_found / half))


def weight_matrix(
    sets: Sequence[Mapping[str, Any]],
    gene_pos: Mapping[str, int],
    gene_order: Mapping[str, int],
    down_weight: float,
    min_genes: int,
) -> tuple[np.ndarray, list[int], list[dict[str, Any]]]:
    """Genes x sets signed weights: ``+f/n_found`` per up-gene, ``-down_weight/n_down`` per
    down-gene, ``f`` the coverage factor of :func:`_set_weights`. Sets with fewer than
    ``min_genes`` up-genes present, or weight 0, are left out (logged)."""
    W = np.zeros((len(gene_order), len(sets)), dtype=np.float32)
    kept: list[int] = []
    report = []
    skipped = []
    for j, s in enumerate(sets):
        up = [g for g in dict.fromkeys(s["up"]) if g in gene_pos]
        down = [g for g in dict.fromkeys(s["down"]) if g in gene_pos and g not in up]
        n_up_total = len(dict.fromkeys(s["up"]))
        core = set(s.get("core") or s["up"])
        f = _set_weights(len(up), len([g for g in up if g in core]), n_up_total)
        report.append(
            {
                "set": s["name"],
                "target": s["target"],
                "n_up": n_up_total,
                "n_up_found": len(up),
                "coverage": len(up) / max(n_up_total, 1),
                "weight": f,
                "n_down": len(s["down"]),
                "n_down_found": len(down),
                "missing": ",".join(g for g in s["up"] + s["down"] if g not in gene_pos),
            }
        )
        if len(up) < max(min_genes, 1) or f == 0.0:
            skipped.append(f"{s['name']} ({len(up)}/{n_up_total})")
            continue
        for g in up:
            W[gene_order[g], j] += f / len(up)
        for g in down:
            W[gene_order[g], j] -= down_weight / len(down)
        kept.append(j)
    if skipped:
        logger.info(
            "%d marker sets without enough up-genes in the data (need %d): %s",
            len(skipped),
            min_genes,
            ", ".join(skipped),
        )
    return W, kept, report


def lineage_coverage(report: Sequence[Mapping[str, Any]], targets: Sequence[str]) -> pd.DataFrame:
    """Per lineage: best set coverage and weight, and the sets scored (issue #16 item 3)."""
    rep = pd.DataFrame(report)
    rows = []
    for t in dict.fromkeys(targets):
        sub = rep[rep["target"] == t]
        rows.append(
            {
                "lineage": t,
                "n_sets": len(sub),
                "best_coverage": float(sub["coverage"].max()) if len(sub) else 0.0,
                "best_weight": float(sub["weight"].max()) if len(sub) else 0.0,
                "genes_found": int(sub["n_up_found"].sum()),
            }
        )
    return pd.DataFrame(rows)


def max_by_target(
    scores: np.ndarray, sets: Sequence[Mapping[str, Any]], kept: Sequence[int], targets: list[str]
) -> np.ndarray:
    """Per target (lineage or label) the best score of its sets; -inf where none."""
    out = np.full((scores.shape[0], len(targets)), -np.inf, dtype=np.float32)
    index = {t: i for i, t in enumerate(targets)}
    for j in kept:
        t = index[sets[j]["target"]]
        out[:, t] = np.maximum(out[:, t], scores[:, j])
    return out


def top2(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """argmax, best and second-best value per row (second = best when one column)."""
    if M.shape[1] == 1:
        best = M[:, 0]
        return np.zeros(M.shape[0], dtype=int), best, np.full_like(best, -np.inf)
    order = np.argsort(-M, axis=1)[:, :2]
    rows = np.arange(M.shape[0])
    return order[:, 0], M[rows, order[:, 0]], M[rows, order[:, 1]]


@dataclass
class Clusters:
    """Cluster evidence: labels, codes, row-normalised indicator and sizes."""

    labels: np.ndarray
    source: str
    codes: np.ndarray
    G: sp.csr_matrix
    sizes: np.ndarray
    knn: sp.csr_matrix | None = None  # row-normalised kNN graph with self-loops, if any

    @classmethod
    def from_labels(
        cls, labels: np.ndarray, source: str, knn: sp.csr_matrix | None = None
    ) -> Clusters:
        cat = pd.Categorical(labels)
        codes = np.asarray(cat.codes)
        n = len(cat.categories)
        G = group_matrix(codes, n)
        return cls(labels, source, codes, G, np.bincount(codes, minlength=n), knn)

    def smooth(self, M: np.ndarray, weight: float) -> np.ndarray:
        """``(1 - weight) * M + weight * neighbourhood mean of M``: the mean over two kNN
        steps where a graph is set (lineage re-embedding), else the cluster mean."""
        if self.knn is not None:
            return (1.0 - weight) * M + weight * np.asarray(self.knn @ (self.knn @ M))
        return (1.0 - weight) * M + weight * np.asarray(self.G @ M)[self.codes]


@dataclass
class MarkerExpression:
    """Scaled, capped marker expression (cells x marker genes) and gene lookups."""

    V: sp.csr_matrix
    gene_pos: dict[str, int]
    gene_order: dict[str, int]


def annotation_clusters(
    adata: AnnData,
    counts: CountSource,
    *,
    cluster_key: str | None,
    use_rep: str | None,
    resolution: float,
    n_pcs: int,
    n_neighbors: int,
    seed: int,
    prefix: str,
) -> Clusters:
    """Cluster evidence: ``obs[cluster_key]``, a reusable Leiden run or an own over-clustering."""
    if cluster_key is not None:
        if cluster_key not in adata.obs:
            raise KeyError(
                f"cluster_key {cluster_key!r} not in adata.obs; run clustering first or pass "
                "cluster_key=None to let annotate over-cluster the data itself."
            )
        return Clusters.from_labels(adata.obs[cluster_key].astype(str).to_numpy(), cluster_key)
    reused = _reusable_leiden(adata, use_rep, resolution, n_neighbors, seed)
    if reused is not None:  # the clustering stage already ran Leiden on the same kNN graph
        labels = adata.obs[reused].astype(str).to_numpy()
        source = f"{reused} (leiden_multi on {use_rep}, reused)"
    else:
        emb = None
        if use_rep is not None:
            if use_rep not in adata.obsm:
                raise KeyError(f"use_rep {use_rep!r} not in adata.obsm ({list(adata.obsm)}).")
            emb = np.asarray(adata.obsm[use_rep])
        labels = _overcluster(
            counts,
            adata.var_names,
            resolution=resolution,
            n_pcs=n_pcs,
            n_neighbors=n_neighbors,
            seed=seed,
            embedding=emb,
        )
        source = f"leiden(resolution={resolution}, rep={use_rep or 'pca'})"
    adata.obs[f"{prefix}annotation_cluster"] = pd.Categorical(labels)
    return Clusters.from_labels(labels, source)


def marker_expression(
    counts: CountSource,
    var_names: pd.Index,
    mk: Mapping[str, Any],
    clusters: Clusters,
    min_cluster_size: int,
    organism: str,
) -> MarkerExpression:
    """log1p(CP10k) of the marker genes, scaled by the highest cluster mean and capped at 1."""
    all_sets = mk["lineage_sets"] + mk["subset_sets"]
    wanted = {g for s in all_sets for g in s["up"] + s["down"]}
    wanted |= {
        g for gate in mk.get("subset_gates", []) for grp in gate["groups"] for g in grp["up"]
    }
    wanted = sorted(wanted)
    gene_pos = resolve_genes(wanted, var_names, mk["aliases"])
    if not gene_pos:
        raise ValueError(
            "None of the marker genes were found in var_names; var_names must be gene symbols "
            f"of the {organism} genome (use sepsis_sc.io.ensure_symbols)."
        )
    genes = list(gene_pos)
    E = log_normalise(counts.columns(np.array([gene_pos[g] for g in genes])), totals=counts.totals)
    big = clusters.sizes >= min_cluster_size
    if not big.any():
        big = clusters.sizes > 0
    cl_means = np.asarray((clusters.G @ E).todense())  # clusters x genes
    scale = np.maximum(cl_means[big].max(axis=0), _SCALE_FLOOR).astype(np.float32)
    V = sp.csr_matrix(E @ sp.diags(1.0 / scale))
    np.minimum(V.data, 1.0, out=V.data)
    return MarkerExpression(V=V, gene_pos=gene_pos, gene_order={g: i for i, g in enumerate(genes)})


@dataclass
class LineageCalls:
    """Level-1 result per cell: ``call`` (lineage or Unassigned), ``source`` (why),
    ``quality`` (relative margin, 0-1), combined ``scores`` (cells x ``targets``) and the
    per-set coverage ``report``."""

    call: np.ndarray
    source: np.ndarray
    quality: np.ndarray
    scores: np.ndarray
    targets: list[str]
    report: list[dict[str, Any]]


def call_lineages(
    expr: MarkerExpression,
    mk: Mapping[str, Any],
    clusters: Clusters,
    *,
    min_score: float,
    min_margin: float,
    cluster_weight: float,
    down_weight: float,
    min_genes: int,
) -> LineageCalls:
    """Level 1: best lineage by combined (cell + cluster) score, else Unassigned with a reason."""
    sets = mk["lineage_sets"]
    W, kept, report = weight_matrix(sets, expr.gene_pos, expr.gene_order, down_weight, min_genes)
    targets = list(dict.fromkeys(sets[j]["target"] for j in kept))
    if not any(t != UNASSIGNED for t in targets):
        raise ValueError("No lineage marker set has enough genes in the data to score.")
    L = clusters.smooth(max_by_target(np.asarray(expr.V @ W), sets, kept, targets), cluster_weight)
    arg, best, second = top2(L)
    call = np.array(targets, dtype=object)[arg]
    margin = best - second
    source = np.full(L.shape[0], "markers", dtype=object)
    low = best < min_score
    ambiguous = ~low & (margin < min_margin)
    decoy = ~low & ~ambiguous & (call == UNASSIGNED)
    source[low] = "markers:unassigned_low_score"
    source[ambiguous] = "markers:unassigned_ambiguous"
    source[decoy] = "markers:unassigned_other_type"
    best_call = call.copy()
    call[low | ambiguous | decoy] = UNASSIGNED
    rescued = _cluster_supported(call, best_call, low & (best >= 0.5 * min_score), clusters)
    call[rescued] = best_call[rescued]
    source[rescued] = "markers:low_score_cluster_support"
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.where(best > 0, margin / best, 0.0), 0.0, 1.0)
    q = np.nan_to_num(q, nan=0.0, posinf=1.0)
    return LineageCalls(call, source, q, L, targets, report)


def _cluster_supported(
    call: np.ndarray, best_call: np.ndarray, candidate: np.ndarray, clusters: Clusters
) -> np.ndarray:
    """Low-score cells whose own best lineage is the clear majority of their cluster.

    Low-depth cells (fewer UMIs, e.g. interferon-stimulated or panel data) keep their best
    lineage when its score is at least half of ``min_score`` and more than half of their
    cluster's cells were called that lineage with full evidence; evidence is weak, not absent.
    """
    out = np.zeros(call.size, dtype=bool)
    if not candidate.any():
        return out
    df = pd.DataFrame({"cl": clusters.codes, "call": call})
    major = df.groupby("cl")["call"].agg(lambda x: x.value_counts().index[0])
    frac = df.groupby("cl")["call"].agg(lambda x: x.value_counts().iloc[0] / len(x))
    maj = major.reindex(clusters.codes).to_numpy()
    ok = (maj != UNASSIGNED) & (frac.reindex(clusters.codes).to_numpy() > 0.5)
    out[candidate & ok & (maj == best_call)] = True
    return out
