"""Hierarchical, marker-based immune cell-type annotation (offline).

The annotation follows the controlled vocabulary of ``resources/cell_types.yaml`` and the
marker sets of ``resources/markers/{human,mouse}.yaml`` and works in two levels:

1. **Lineage** (T, NK, B, Plasma, Monocyte, Macrophage, DC, Neutrophil, Platelet, Erythroid,
   Progenitor). Each cell gets a signed marker score per lineage set (mean of the capped,
   normalised expression of the ``up`` genes minus that of the ``down`` genes). Cell-level
   scores are sparse-data noisy, so they are combined with the mean score of the cell's
   (over-)cluster: ``(1 - cluster_weight) * cell + cluster_weight * cluster``. The best lineage
   wins when its combined score reaches ``min_score`` and beats the runner-up by
   ``min_margin``; otherwise the cell stays ``Unassigned`` (doublets, debris, cell types outside
   the vocabulary such as basophils, which are scored as decoys).
2. **Subset within lineage** (e.g. CD4 naive T vs Treg). Subset sets are scored the same way,
   but only against the sibling subsets of the cell's lineage. A per-set baseline (the lowest
   cluster mean of each gene inside the lineage) is removed first, so genes expressed by every
   cell of the lineage (TMSB10, LDHB, IL32 in the Azimuth T-cell sets) do not favour the sets
   that happen to list them. Where a lineage has a ``default_subset`` (Classical monocyte,
   Mature neutrophil, NK CD56dim, Macrophage), a specific subset is only called when its
   absolute score reaches ``subset_min_score``; otherwise the cell gets the default.

Expression is log1p(CP10k) of the raw counts (``layers["counts"]``, or integer ``X``) computed
on a copy restricted to the marker genes, so ``X`` of the caller is never modified and the
full matrix is never densified. Each gene is scaled by its highest cluster mean (at least
``1`` log-unit) and capped at 1, so a score of 1 means "every up-marker at the level of its
positive population, no down-marker".

Also here: an optional CellTypist reference path (:func:`annotate_celltypist`, model given by
path, no downloads) and :func:`annotation_agreement` to compare two annotations. The
figures (marker dot plot, UMAP by cell type) are in :mod:`sepsis_sc.pl.annotate`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .data import check_counts, counts_csr, log_normalise, organism_evidence, resolve_organism
from .resources import load_yaml, resource_path
from .store import CountSource, FileCounts

logger = logging.getLogger(__name__)

__all__ = [
    "Vocabulary",
    "load_vocabulary",
    "load_markers",
    "annotate",
    "annotate_celltypist",
    "annotation_agreement",
]

UNASSIGNED = "Unassigned"
LINEAGES: tuple[str, ...] = (
    "T",
    "NK",
    "B",
    "Plasma",
    "Monocyte",
    "Macrophage",
    "DC",
    "Neutrophil",
    "Platelet",
    "Erythroid",
    "Progenitor",
)
_SCALE_FLOOR = 1.0  # log1p(CP10k) units: a gene's "positive level" is never taken below this
_OBS_KEYS = (
    "lineage",
    "cell_type",
    "cell_type_ontology_term_id",
    "annotation_confidence",
    "annotation_source",
)

Organism = Literal["auto", "human", "mouse"]


# --------------------------------------------------------------------------------------------
# vocabulary and markers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Vocabulary:
    """The controlled vocabulary: ``lineages`` and ``cell_types`` tables.

    Attributes
    ----------
    lineages
        One row per lineage (index), columns ``cl``, ``cl_name``, ``definition``,
        ``default_subset`` (label or ``None``).
    cell_types
        One row per ``cell_type`` label (index, ``Unassigned`` included), columns ``lineage``,
        ``cl``, ``cl_name``, ``parent``, ``definition``, ``cl_exact``.
    """

    lineages: pd.DataFrame
    cell_types: pd.DataFrame

    def lineage_of(self, cell_type: str) -> str:
        """Lineage of a vocabulary label (``Unassigned`` for unknown labels)."""
        if cell_type in self.cell_types.index:
            return str(self.cell_types.at[cell_type, "lineage"])
        return UNASSIGNED

    def subsets_of(self, lineage: str) -> list[str]:
        """Subset labels of a lineage, in vocabulary order."""
        ct = self.cell_types
        return list(ct.index[ct["lineage"] == lineage])


def load_vocabulary(path: str | PathLike[str] | None = None) -> Vocabulary:
    """Load and check the controlled cell-type vocabulary.

    Parameters
    ----------
    path
        YAML file; default ``resources/cell_types.yaml``.

    Returns
    -------
    Vocabulary
        ``lineages`` and ``cell_types`` tables.

    Raises
    ------
    ValueError
        If a label points at an unknown lineage, a CL identifier is malformed or a lineage's
        ``default_subset`` is not one of its subsets.
    """
    path = Path(path) if path is not None else resource_path("cell_types.yaml")
    raw = load_yaml(path)
    if not isinstance(raw, dict) or "lineages" not in raw or "cell_types" not in raw:
        raise ValueError(f"{path}: expected top-level keys 'lineages' and 'cell_types'.")
    lin = pd.DataFrame.from_dict(raw["lineages"], orient="index")
    if "default_subset" not in lin:
        lin["default_subset"] = None
    lin["default_subset"] = lin["default_subset"].where(lin["default_subset"].notna(), None)
    ct = pd.DataFrame.from_dict(raw["cell_types"], orient="index")
    if "cl_exact" not in ct:
        ct["cl_exact"] = True
    ct["cl_exact"] = [v is not False for v in ct["cl_exact"]]
    cl_ok = re.compile(r"^CL:\d{7}$")
    for label, row in ct.iterrows():
        if label != UNASSIGNED and row["lineage"] not in lin.index:
            raise ValueError(f"{path}: cell type {label!r} has unknown lineage {row['lineage']!r}.")
        if label != UNASSIGNED and not cl_ok.match(str(row["cl"])):
            raise ValueError(f"{path}: cell type {label!r} has malformed CL id {row['cl']!r}.")
    for lineage, row in lin.iterrows():
        d = row["default_subset"]
        if d is not None and (d not in ct.index or ct.at[d, "lineage"] != lineage):
            raise ValueError(
                f"{path}: default_subset {d!r} of lineage {lineage!r} is not one of its subsets."
            )
    if UNASSIGNED not in ct.index:
        raise ValueError(f"{path}: the vocabulary must contain {UNASSIGNED!r}.")
    if "cl_ancestors" not in ct:
        ct["cl_ancestors"] = [[] for _ in range(len(ct))]
    ct["cl_ancestors"] = [list(v) if isinstance(v, list) else [] for v in ct["cl_ancestors"]]
    for label, row in ct.drop(index=UNASSIGNED).iterrows():
        lin_cl = lin.at[row["lineage"], "cl"]
        if lin_cl != row["cl"] and lin_cl not in row["cl_ancestors"]:
            raise ValueError(
                f"{path}: cell type {label!r} ({row['cl']}) is not its lineage's term {lin_cl} "
                "nor a descendant of it (cl_ancestors); fix the CL term of the label or lineage."
            )
    return Vocabulary(lineages=lin, cell_types=ct)


def load_markers(
    markers: str | PathLike[str] | Mapping[str, Any] | None = None,
    organism: Literal["human", "mouse"] = "human",
    *,
    vocabulary: Vocabulary | None = None,
) -> dict[str, Any]:
    """Load and validate lineage and subset marker sets.

    Parameters
    ----------
    markers
        ``None`` for the packaged ``resources/markers/<organism>.yaml``, a path to a YAML file
        of the same layout, or an already-loaded mapping with keys ``lineage_sets`` and
        ``subset_sets`` (lists of sets with ``name``, ``up``, ``down``, ``source`` and
        ``lineage`` or ``cell_type``) and optional ``aliases``.
    organism
        Which packaged file to load when ``markers`` is ``None``.
    vocabulary
        Vocabulary to check labels against (default: the packaged one).

    Returns
    -------
    dict
        ``{"organism", "aliases", "lineage_sets", "subset_sets", "source_file"}``; each set is a
        dict with ``name``, ``target`` (lineage or cell type), ``up``, ``down``, ``source``.

    Raises
    ------
    ValueError
        If a set lacks a key, has no up-genes or names a label outside the vocabulary.
    """
    vocab = vocabulary or load_vocabulary()
    if markers is None:
        source_file = str(resource_path("markers", f"{organism}.yaml"))
        raw = load_yaml(source_file)
    elif isinstance(markers, Mapping):
        source_file = "<dict>"
        raw = dict(markers)
    else:
        source_file = str(markers)
        if not Path(markers).exists():
            raise FileNotFoundError(f"marker file {markers} does not exist.")
        raw = load_yaml(markers)
    if not isinstance(raw, Mapping) or "lineage_sets" not in raw:
        raise ValueError(
            f"markers {source_file}: expected a mapping with 'lineage_sets' (and 'subset_sets')."
        )

    def _sets(key: str, target_key: str) -> list[dict[str, Any]]:
        out = []
        for i, s in enumerate(raw.get(key) or []):
            name = s.get("name", f"{key}[{i}]")
            for k in ("up", target_key):
                if k not in s:
                    raise ValueError(f"markers {source_file}: set {name!r} lacks key {k!r}.")
            up = [str(g) for g in s.get("up") or []]
            down = [str(g) for g in s.get("down") or []]
            core = [str(g) for g in s.get("core") or []]
            if set(core) - set(up):
                raise ValueError(
                    f"markers {source_file}: set {name!r} lists core genes that are not up "
                    f"genes: {sorted(set(core) - set(up))}."
                )
            if not up:
                raise ValueError(f"markers {source_file}: set {name!r} has no 'up' genes.")
            target = str(s[target_key])
            if target_key == "lineage":
                if target != UNASSIGNED and target not in vocab.lineages.index:
                    raise ValueError(
                        f"markers {source_file}: set {name!r} names unknown lineage {target!r}; "
                        f"use one of {list(vocab.lineages.index)} or {UNASSIGNED!r} (decoy)."
                    )
            elif target not in vocab.cell_types.index or target == UNASSIGNED:
                raise ValueError(
                    f"markers {source_file}: set {name!r} names unknown cell_type {target!r}; "
                    "labels must come from resources/cell_types.yaml."
                )
            out.append(
                {
                    "name": str(name),
                    "target": target,
                    "up": up,
                    "down": down,
                    "core": core or list(up),
                    "source": str(s.get("source", "")),
                }
            )
        return out

    out = {
        "organism": raw.get("organism", organism),
        "aliases": {str(k): [str(v) for v in vs] for k, vs in (raw.get("aliases") or {}).items()},
        "lineage_sets": _sets("lineage_sets", "lineage"),
        "subset_sets": _sets("subset_sets", "cell_type"),
        "state_genes": dict(raw.get("state_genes") or {}),
        "subset_gates": _gates(raw.get("subset_gates") or [], vocab, source_file),
        "source_file": source_file,
    }
    _check_state_genes(out, vocab)
    return out


def _gates(
    raw: Sequence[Mapping[str, Any]], vocab: Vocabulary, source_file: str
) -> list[dict[str, Any]]:
    """Validated two-group subset gates (``name``, ``lineage``, ``groups`` of ``up`` genes and
    ``cell_types``)."""
    out = []
    for g in raw:
        name = str(g.get("name", "gate"))
        groups = list(g.get("groups") or [])
        if g.get("lineage") not in vocab.lineages.index or len(groups) != 2:
            raise ValueError(f"markers {source_file}: gate {name!r} needs a lineage and 2 groups.")
        for grp in groups:
            bad = [c for c in grp.get("cell_types", []) if vocab.lineage_of(c) != g["lineage"]]
            if bad or not grp.get("up"):
                raise ValueError(
                    f"markers {source_file}: gate {name!r}: each group needs up genes and "
                    f"cell types of lineage {g['lineage']!r} (bad: {bad})."
                )
        out.append(
            {
                "name": name,
                "lineage": str(g["lineage"]),
                "groups": [
                    {"up": [str(x) for x in grp["up"]], "cell_types": list(grp["cell_types"])}
                    for grp in groups
                ],
                "source": str(g.get("source", "")),
            }
        )
    return out


def _check_state_genes(mk: Mapping[str, Any], vocab: Vocabulary) -> None:
    """No set uses the genes of a state measured within its own lineage (issue #16 item 4).

    ``state_genes`` maps a state to ``lineages`` and ``genes``: those genes must not be up or
    down genes of a set of those lineages (or their subsets), nor down genes of any set.
    """
    for state, spec in mk["state_genes"].items():
        genes = set(map(str, spec.get("genes") or []))
        lineages = set(map(str, spec.get("lineages") or []))
        for s in mk["lineage_sets"] + mk["subset_sets"]:
            t = s["target"]
            lin = t if t in vocab.lineages.index else vocab.lineage_of(t)
            used = genes & set(s["down"])
            if lin in lineages:
                used |= genes & set(s["up"])
            if used:
                raise ValueError(
                    f"markers {mk['source_file']}: set {s['name']!r} uses {sorted(used)}, genes of "
                    f"the state {state!r} measured within {sorted(lineages)}; identity evidence "
                    "must not depend on a state that is measured in that population."
                )


# --------------------------------------------------------------------------------------------
# input helpers
# --------------------------------------------------------------------------------------------
def _marker_symbols(markers: Mapping[str, Any]) -> set[str]:
    genes: set[str] = set()
    for key in ("lineage_sets", "subset_sets"):
        for s in markers[key]:
            genes.update(s["up"])
            genes.update(s["down"])
    return genes


def _resolve_organism(
    adata: AnnData, organism: Organism, expected_organism: str | None
) -> tuple[str, str | None]:
    """The organism to annotate as (:func:`sepsis_sc.data.resolve_organism`: mismatches with
    ``organism`` or the config's ``expected_organism`` raise) and the one the genes show."""
    evidence = organism_evidence(adata.var_names)
    if sum(evidence.ensembl.values()) > 0.5 * max(evidence.n_genes, 1):
        raise ValueError(
            "var_names are Ensembl IDs; marker annotation needs gene symbols: make them the "
            "var_names with sepsis_sc.io.ensure_symbols (ingest does this when the input has "
            "a symbol column)."
        )
    chosen = resolve_organism(
        adata.var_names, organism, expected=expected_organism, what="the annotation input"
    )
    return chosen, evidence.organism


def _resolve_genes(
    genes: Sequence[str], var_index: pd.Index, aliases: Mapping[str, Sequence[str]]
) -> dict[str, int]:
    """Map marker symbols to column positions (exact symbol first, then older aliases)."""
    pos: dict[str, int] = {}
    lookup = pd.Series(np.arange(len(var_index)), index=var_index)
    lookup = lookup[~lookup.index.duplicated(keep="first")]
    for g in genes:
        if g in lookup.index:
            pos[g] = int(lookup[g])
            continue
        for alt in aliases.get(g, ()):
            if alt in lookup.index:
                pos[g] = int(lookup[alt])
                break
    return pos


def _group_matrix(codes: np.ndarray, n_groups: int) -> sp.csr_matrix:
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


def _leiden_labels(work: AnnData, resolution: float, seed: int) -> None:
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
    from .cluster import knn_method

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

    from .cluster import neighbors

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
    _leiden_labels(work, resolution, seed)
    return work.obs["_oc"].to_numpy()


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
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


def _weight_matrix(
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


def _lineage_coverage(report: Sequence[Mapping[str, Any]], targets: Sequence[str]) -> pd.DataFrame:
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


def _max_by_target(
    scores: np.ndarray, sets: Sequence[Mapping[str, Any]], kept: Sequence[int], targets: list[str]
) -> np.ndarray:
    """Per target (lineage or label) the best score of its sets; -inf where none."""
    out = np.full((scores.shape[0], len(targets)), -np.inf, dtype=np.float32)
    index = {t: i for i, t in enumerate(targets)}
    for j in kept:
        t = index[sets[j]["target"]]
        out[:, t] = np.maximum(out[:, t], scores[:, j])
    return out


def _top2(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """argmax, best and second-best value per row (second = best when one column)."""
    if M.shape[1] == 1:
        best = M[:, 0]
        return np.zeros(M.shape[0], dtype=int), best, np.full_like(best, -np.inf)
    order = np.argsort(-M, axis=1)[:, :2]
    rows = np.arange(M.shape[0])
    return order[:, 0], M[rows, order[:, 0]], M[rows, order[:, 1]]


@dataclass
class _Clusters:
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
    ) -> _Clusters:
        cat = pd.Categorical(labels)
        codes = np.asarray(cat.codes)
        n = len(cat.categories)
        G = _group_matrix(codes, n)
        return cls(labels, source, codes, G, np.bincount(codes, minlength=n), knn)

    def smooth(self, M: np.ndarray, weight: float) -> np.ndarray:
        """``(1 - weight) * M + weight * neighbourhood mean of M``: the mean over two kNN
        steps where a graph is set (lineage re-embedding), else the cluster mean."""
        if self.knn is not None:
            return (1.0 - weight) * M + weight * np.asarray(self.knn @ (self.knn @ M))
        return (1.0 - weight) * M + weight * np.asarray(self.G @ M)[self.codes]


@dataclass
class _Markers:
    """Scaled, capped marker expression (cells x marker genes) and gene lookups."""

    V: sp.csr_matrix
    gene_pos: dict[str, int]
    gene_order: dict[str, int]


def _annotation_clusters(
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
) -> _Clusters:
    """Cluster evidence: ``obs[cluster_key]``, a reusable Leiden run or an own over-clustering."""
    if cluster_key is not None:
        if cluster_key not in adata.obs:
            raise KeyError(
                f"cluster_key {cluster_key!r} not in adata.obs; run clustering first or pass "
                "cluster_key=None to let annotate over-cluster the data itself."
            )
        return _Clusters.from_labels(adata.obs[cluster_key].astype(str).to_numpy(), cluster_key)
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
    return _Clusters.from_labels(labels, source)


def _marker_expression(
    counts: CountSource,
    var_names: pd.Index,
    mk: Mapping[str, Any],
    clusters: _Clusters,
    min_cluster_size: int,
    organism: str,
) -> _Markers:
    """log1p(CP10k) of the marker genes, scaled by the highest cluster mean and capped at 1."""
    all_sets = mk["lineage_sets"] + mk["subset_sets"]
    wanted = {g for s in all_sets for g in s["up"] + s["down"]}
    wanted |= {
        g for gate in mk.get("subset_gates", []) for grp in gate["groups"] for g in grp["up"]
    }
    wanted = sorted(wanted)
    gene_pos = _resolve_genes(wanted, var_names, mk["aliases"])
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
    return _Markers(V=V, gene_pos=gene_pos, gene_order={g: i for i, g in enumerate(genes)})


@dataclass
class _LineageCalls:
    call: np.ndarray
    source: np.ndarray
    quality: np.ndarray
    scores: np.ndarray
    targets: list[str]
    report: list[dict[str, Any]]


def _call_lineages(
    expr: _Markers,
    mk: Mapping[str, Any],
    clusters: _Clusters,
    *,
    min_score: float,
    min_margin: float,
    cluster_weight: float,
    down_weight: float,
    min_genes: int,
) -> _LineageCalls:
    """Level 1: best lineage by combined (cell + cluster) score, else Unassigned with a reason."""
    sets = mk["lineage_sets"]
    W, kept, report = _weight_matrix(sets, expr.gene_pos, expr.gene_order, down_weight, min_genes)
    targets = list(dict.fromkeys(sets[j]["target"] for j in kept))
    if not any(t != UNASSIGNED for t in targets):
        raise ValueError("No lineage marker set has enough genes in the data to score.")
    L = clusters.smooth(_max_by_target(np.asarray(expr.V @ W), sets, kept, targets), cluster_weight)
    arg, best, second = _top2(L)
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
    return _LineageCalls(call, source, q, L, targets, report)


def _cluster_supported(
    call: np.ndarray, best_call: np.ndarray, candidate: np.ndarray, clusters: _Clusters
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


#: lineages with more cells choose their re-embedding HVGs on a seeded sample of this many
LINEAGE_HVG_CELLS = 50_000


def _hvg_columns(
    counts: CountSource, idx: np.ndarray, var_names: pd.Index, hvg_var: pd.DataFrame
) -> AnnData:
    """Rows ``idx`` of ``counts``, log1p(CP10k) with size factors from all genes, in the HVG
    columns of ``hvg_var`` only (its ``highly_variable`` genes), as an AnnData for the PCA."""
    from anndata.utils import make_index_unique

    genes = hvg_var.index[hvg_var["highly_variable"].to_numpy(dtype=bool)]
    unique = make_index_unique(pd.Index(var_names))  # the names the HVG table carries
    cols = np.sort(unique.get_indexer(genes))
    totals = counts.totals[idx]
    x = sp.csr_matrix(counts.columns(cols)[idx], dtype=np.float32)
    scale = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    x = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ x)
    x.data = np.log1p(x.data)
    var = pd.DataFrame({"highly_variable": True}, index=unique[cols])
    return AnnData(X=x, var=var)


def _lineage_graph(
    counts: CountSource,
    var_names: pd.Index,
    idx: np.ndarray,
    *,
    resolution: float,
    n_neighbors: int,
    seed: int,
    min_cells: int,
    n_top_genes: int = 500,
    n_pcs: int = 20,
    max_hvg_cells: int | None = None,
) -> _Clusters | None:
    """Re-embedding of one lineage's cells on their own HVGs and PCA (issue #16 item 1).

    Subsets differ in a few genes that a whole-PBMC embedding spends little variance on (CD4
    vs CD8 T, naive vs memory); the lineage's own 500 most variable genes put them on top.
    Returns Leiden clusters (for per-gene baselines) and the row-normalised kNN graph (for
    smoothing scores over each cell's neighbours, which survives RNA dropout of CD4 / CD8A
    better than cluster means). ``None`` for lineages with fewer than ``min_cells`` cells.
    """
    import scanpy as sc

    from .cluster import neighbors

    if idx.size < min_cells:
        return None
    # HVGs from at most max_hvg_cells of the lineage (all of them below that); above it a
    # seeded sample picks the genes and the PCA reads only their columns for every cell, so
    # a lineage of 400,000 cells never holds copies of its counts (atlas scale)
    pick = idx
    max_hvg_cells = max_hvg_cells or LINEAGE_HVG_CELLS
    if idx.size > max_hvg_cells:
        pick = np.sort(np.random.default_rng(seed).choice(idx, max_hvg_cells, replace=False))
    # a row selection is a new matrix already: normalising it in place leaves counts alone
    work = AnnData(X=counts.rows(pick), var=pd.DataFrame(index=var_names.astype(str)))
    work.var_names_make_unique()
    log_normalise(work)
    work = work[:, np.asarray((work.X > 0).sum(axis=0)).ravel() >= 3].copy()
    sc.pp.highly_variable_genes(work, n_top_genes=int(min(n_top_genes, work.n_vars)))
    if pick is not idx:
        work = _hvg_columns(counts, idx, pd.Index(var_names.astype(str)), work.var)
    n_comps = int(max(2, min(n_pcs, work.n_obs - 1, int(work.var["highly_variable"].sum()) - 1)))
    sc.pp.pca(work, n_comps=n_comps, mask_var="highly_variable", random_state=seed)
    neighbors(work, n_neighbors=int(min(n_neighbors, work.n_obs - 1)), use_rep="X_pca", seed=seed)
    _leiden_labels(work, resolution, seed)
    C = sp.csr_matrix(work.obsp["connectivities"] + sp.eye(work.n_obs, format="csr"))
    D = sp.csr_matrix(sp.diags(1.0 / np.asarray(C.sum(axis=1)).ravel()) @ C)
    return _Clusters.from_labels(work.obs["_oc"].to_numpy(), "lineage re-embedding", knn=D)


def _apply_gates(
    R: np.ndarray,
    scored: list[str],
    V_l: sp.csr_matrix,
    local: _Clusters,
    gates: Sequence[Mapping[str, Any]],
    expr: _Markers,
    cluster_weight: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask subsets of the losing side of a two-group gate (e.g. CD4 vs CD8 T; issue #16).

    Each group's module score (mean scaled expression of its genes, e.g. CD4 + CD40LG vs
    CD8A + CD8B), smoothed over the lineage's neighbourhood, decides the group; the other
    group's subsets are pushed down by 10. Cells with no evidence either way keep all subsets.
    Where a group has none of its genes in the data (a panel without CD4 / CD8A), the gate
    cannot be decided: the returned mask flags the cells whose best subset belongs to it, and
    they get the lineage's default (``T unresolved``) rather than a guess.
    """
    R = R.copy()
    col = {lab: k for k, lab in enumerate(scored)}
    undecided = np.zeros(R.shape[0], dtype=bool)
    for gate in gates:
        mods = []
        for grp in gate["groups"]:
            genes = [expr.gene_order[g] for g in grp["up"] if g in expr.gene_order]
            mods.append(genes)
        if any(len(g) == 0 for g in mods):
            gated = [col[lab] for grp in gate["groups"] for lab in grp["cell_types"] if lab in col]
            undecided |= np.isin(R.argmax(axis=1), gated)
            logger.warning(
                "gate %s: genes of one side absent from the data; its subsets are not called "
                "(cells get the lineage default)",
                gate["name"],
            )
            continue
        m = [np.asarray(V_l[:, g].mean(axis=1)).ravel() for g in mods]
        d = local.smooth((m[0] - m[1])[:, None], cluster_weight).ravel()
        for sign, grp in ((1, gate["groups"][1]), (-1, gate["groups"][0])):
            lose = [col[lab] for lab in grp["cell_types"] if lab in col]
            if lose:
                R[np.ix_(sign * d > 0, lose)] -= 10.0
    return R, undecided


def _is_unresolved(label: str | None) -> bool:
    return label is not None and label.endswith(" unresolved")


def _subset_scores(
    V_l: sp.csr_matrix,
    local: _Clusters,
    sets_l: Sequence[Mapping[str, Any]],
    W_l: np.ndarray,
    scored: list[str],
    *,
    min_cluster_size: int,
    cluster_weight: float,
    subset_cluster_weight: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Absolute (``A``) and baseline-removed (``R``) subset scores, cluster-smoothed.

    The baseline is the lowest cluster mean of each gene inside the lineage (>= 2 sizeable
    clusters), so genes every cell of the lineage expresses do not favour the sets listing them.
    """
    A_sets = np.asarray(V_l @ W_l)
    big = local.sizes >= min_cluster_size
    if big.sum() >= 2:
        gmeans = np.asarray((local.G @ V_l).todense())[big]
        offset = gmeans.min(axis=0) @ W_l
    else:
        offset = np.zeros(W_l.shape[1], dtype=np.float32)
    ids = list(range(len(sets_l)))
    A = local.smooth(_max_by_target(A_sets, sets_l, ids, scored), subset_cluster_weight)
    R = local.smooth(_max_by_target(A_sets - offset, sets_l, ids, scored), cluster_weight)
    return A, R


def _subset_graph(
    counts: CountSource,
    var_names: pd.Index,
    idx: np.ndarray,
    clusters: _Clusters,
    p: Mapping[str, Any],
) -> tuple[_Clusters, str]:
    """The graph a lineage's subsets are called on, and its description: the lineage's own
    re-embedding (HVGs + PCA + kNN, Leiden baselines) when ``subset_reembed`` and the lineage
    is large enough, else the annotation clusters restricted to its cells."""
    if p["subset_reembed"]:
        local = _lineage_graph(
            counts,
            var_names,
            idx,
            resolution=p["subset_resolution"],
            n_neighbors=p["subset_n_neighbors"],
            seed=p["seed"],
            min_cells=p["subset_min_cells"],
        )
        if local is not None:
            return local, "own HVGs + PCA: kNN smoothing, Leiden baselines"
    return _Clusters.from_labels(clusters.codes[idx].astype(str), clusters.source), clusters.source


def _subset_calls(
    A: np.ndarray,
    R: np.ndarray,
    scored: list[str],
    default: str | None,
    undecided: np.ndarray,
    source: np.ndarray,
    idx: np.ndarray,
    p: Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray]:
    """Best subset per cell and its confidence (margin over the runner-up); undecided gates
    and weak evidence take the lineage's default subset (``source`` records why)."""
    s_arg, s_best, s_second = _top2(R)
    call = np.array(scored, dtype=object)[s_arg]
    if default is not None and undecided.any():
        call[undecided] = default
        source[idx[undecided]] = "markers:unresolved_subset"
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (s_best - s_second) / (np.abs(s_best) + np.abs(s_second))
    q = np.clip(np.nan_to_num(q, nan=0.0, posinf=1.0), 0.0, 1.0)
    if len(scored) == 1 and default is None:
        q = np.ones_like(q)
    if default is not None:
        floor = p["unresolved_min_score"] if _is_unresolved(default) else p["subset_min_score"]
        a_best = A[np.arange(idx.size), s_arg]
        weak = (call != default) & (a_best < floor)
        call[weak] = default
        q[weak] = np.clip(1.0 - a_best[weak] / floor, 0.0, 1.0)
        source[idx[weak]] = (
            "markers:unresolved_subset" if _is_unresolved(default) else "markers:default_subset"
        )
    return call, q


def _call_subsets(
    expr: _Markers,
    lin: _LineageCalls,
    mk: Mapping[str, Any],
    vocab: Vocabulary,
    clusters: _Clusters,
    counts: CountSource,
    var_names: pd.Index,
    p: Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]], dict[str, str]]:
    """Level 2: subset within each lineage, on the lineage's own clusters; weak evidence gets
    the lineage's default subset (a program-free state or an explicit ``<lineage> unresolved``).
    """
    sets = mk["subset_sets"]
    W, kept, report = _weight_matrix(
        sets, expr.gene_pos, expr.gene_order, p["down_weight"], p["min_genes"]
    )
    n = lin.call.size
    cell_type = np.full(n, UNASSIGNED, dtype=object)
    q_sub = np.ones(n, dtype=np.float64)
    sub_source: dict[str, str] = {}
    for lineage in vocab.lineages.index:
        idx = np.flatnonzero(lin.call == lineage)
        if idx.size == 0:
            continue
        labels = vocab.subsets_of(lineage)
        default = vocab.lineages.at[lineage, "default_subset"]
        set_idx = [j for j in kept if sets[j]["target"] in labels]
        scored = list(dict.fromkeys(sets[j]["target"] for j in set_idx))
        if not scored:
            cell_type[idx] = default or labels[0]
            if default is None and len(labels) > 1:
                logger.warning("lineage %s: no subset set scored; cells get %s", lineage, labels[0])
            continue
        local, sub_source[lineage] = _subset_graph(counts, var_names, idx, clusters, p)
        A, R = _subset_scores(
            expr.V[idx],
            local,
            [sets[j] for j in set_idx],
            W[:, set_idx],
            scored,
            min_cluster_size=p["min_cluster_size"],
            cluster_weight=p["cluster_weight"],
            subset_cluster_weight=p["subset_cluster_weight"],
        )
        gates = [g for g in mk.get("subset_gates", []) if g["lineage"] == lineage]
        R, undecided = _apply_gates(R, scored, expr.V[idx], local, gates, expr, p["cluster_weight"])
        call, q = _subset_calls(A, R, scored, default, undecided, lin.source, idx, p)
        cell_type[idx] = call
        q_sub[idx] = q
    return cell_type, q_sub, report, sub_source


def _write_annotation(
    adata: AnnData,
    prefix: str,
    vocab: Vocabulary,
    lin: _LineageCalls,
    cell_type: np.ndarray,
    conf: np.ndarray,
    uns: dict[str, Any],
) -> None:
    ct_tab = vocab.cell_types
    lin_levels = list(vocab.lineages.index) + [UNASSIGNED]
    adata.obs[f"{prefix}lineage"] = pd.Categorical(lin.call, categories=lin_levels)
    adata.obs[f"{prefix}cell_type"] = pd.Categorical(cell_type, categories=list(ct_tab.index))
    adata.obs[f"{prefix}cell_type_ontology_term_id"] = pd.Categorical(
        ct_tab["cl"].reindex(cell_type).to_numpy()
    )
    adata.obs[f"{prefix}annotation_confidence"] = conf.astype(np.float32)
    adata.obs[f"{prefix}annotation_source"] = pd.Categorical(lin.source)
    adata.obsm[f"{prefix}annotation_lineage_scores"] = pd.DataFrame(
        lin.scores, index=adata.obs_names, columns=lin.targets
    )
    adata.uns[f"{prefix}annotation"] = uns


def _cluster_summary(
    clusters: _Clusters, lin: _LineageCalls, cell_type: np.ndarray, conf: np.ndarray
) -> pd.DataFrame:
    """One row per cluster: majority lineage / cell type, confidence, mean lineage scores."""
    df = pd.DataFrame(
        {"cluster": clusters.labels, "lineage": lin.call, "cell_type": cell_type, "conf": conf}
    )
    rows = []
    for cl, sub in df.groupby("cluster", sort=True, observed=True):
        lin_vc = sub["lineage"].value_counts()
        ct_vc = sub["cell_type"].value_counts()
        row = {
            "cluster": cl,
            "n_cells": len(sub),
            "lineage": lin_vc.index[0],
            "frac_lineage": lin_vc.iloc[0] / len(sub),
            "cell_type": ct_vc.index[0],
            "frac_cell_type": ct_vc.iloc[0] / len(sub),
            "mean_confidence": float(sub["conf"].mean()),
            "frac_unassigned": float((sub["lineage"] == UNASSIGNED).mean()),
        }
        means = lin.scores[sub.index.to_numpy()].mean(axis=0)
        row.update({f"score_{t}": float(v) for t, v in zip(lin.targets, means, strict=True)})
        rows.append(row)
    return pd.DataFrame(rows)


def annotate(
    adata: AnnData,
    *,
    organism: Organism = "auto",
    expected_organism: str | None = None,
    cluster_key: str | None = None,
    markers: str | PathLike[str] | Mapping[str, Any] | None = None,
    layer: str | None = "counts",
    counts_file: str | PathLike[str] | None = None,
    min_score: float = 0.2,
    min_margin: float = 0.05,
    subset_min_score: float = 0.2,
    cluster_weight: float = 0.5,
    subset_cluster_weight: float = 0.25,
    down_weight: float = 1.0,
    min_genes: int = 1,
    min_cluster_size: int = 10,
    use_rep: str | None = None,
    resolution: float = 2.0,
    n_pcs: int = 30,
    n_neighbors: int = 15,
    seed: int = 0,
    key_added: str | None = None,
    subset_reembed: bool = True,
    subset_resolution: float = 2.0,
    subset_n_neighbors: int = 20,
    subset_min_cells: int = 100,
    unresolved_min_score: float = 0.05,
) -> pd.DataFrame:
    """Annotate immune lineages and subsets from marker genes (hierarchical, offline).

    Parameters
    ----------
    adata
        Cells x genes with gene symbols as ``var_names`` and raw counts in ``layers[layer]``
        (or integer counts in ``X``). ``X`` is not modified.
    organism
        ``"human"``, ``"mouse"`` or ``"auto"`` (detected from marker symbols, CD3E vs Cd3e).
        An explicit value that contradicts the symbols raises.
    expected_organism
        Organism the config expects; a mismatch with the data raises ``ValueError``.
    cluster_key
        ``obs`` column with (preferably over-) clusters used as cluster-level evidence, e.g.
        ``"leiden"``. ``None``: Leiden at ``resolution`` on a PCA of a normalised copy (or on
        ``obsm[use_rep]``), stored in ``obs["<prefix>annotation_cluster"]``.
    markers
        Marker sets: ``None`` (packaged file for the organism), a YAML path or a mapping (see
        :func:`load_markers`).
    layer
        Layer with raw counts; ``X`` is used when the layer is absent and ``X`` is integer.
    counts_file
        Read the counts from ``layers[layer]`` of this ``.h5ad`` in row chunks instead of from
        ``adata`` (which then needs no matrix: obs, var and the embedding are enough; the
        cells and genes must be the file's). At a million cells the annotation then never
        holds the count matrix (the workflow's rule ``annotate`` does this).
    min_score
        Minimum combined lineage score (0-1 scale) for a lineage call.
    min_margin
        Minimum lead of the best lineage over the runner-up; below it the cell is ambiguous.
    subset_min_score
        Minimum absolute score for a specific subset in lineages whose default subset is a
        program-free state (e.g. Non-classical vs the default Classical monocyte).
    cluster_weight
        Weight of the cluster mean in ``(1 - w) * cell + w * cluster`` for lineages
        (0 = per cell only); also used for the choice among sibling subsets.
    subset_cluster_weight
        Cluster weight for the absolute score that gates a specific subset against the
        lineage's default (rare subsets often share a cluster with their siblings).
    down_weight
        Weight of the negative markers relative to the positive ones.
    min_genes
        Sets with fewer up-genes present are left out; sets with few genes present are
        down-weighted (coverage reported in ``uns``), not skipped.
    min_cluster_size
        Clusters smaller than this do not set gene scales or subset baselines.
    use_rep
        ``obsm`` key of an embedding (e.g. ``"X_scVI"``) for the own over-clustering.
    resolution, n_pcs, n_neighbors
        Own over-clustering: Leiden resolution, PCs, neighbours.
    seed
        Random seed of PCA, neighbours and Leiden.
    key_added
        Prefix of the written ``obs`` columns (``"<key_added>_lineage"`` ...); default none.
    subset_reembed
        Call subsets on clusters of each lineage's own re-embedding (HVGs + PCA of its cells)
        instead of the global clusters.
    subset_resolution, subset_n_neighbors, subset_min_cells
        Leiden resolution (baselines) and neighbours (score smoothing) of the lineage
        re-embedding; lineages with fewer cells use the global clusters.
    unresolved_min_score
        Minimum absolute subset score in lineages whose default is ``<lineage> unresolved``
        (T, B, DC); weaker cells get that label instead of a sibling subset.

    Returns
    -------
    pandas.DataFrame
        One row per cluster: ``n_cells``, majority ``lineage`` and ``cell_type`` with their
        fractions, ``mean_confidence``, ``frac_unassigned`` and the mean combined score of
        every lineage (``score_<lineage>``).

    Notes
    -----
    Writes ``obs``: ``lineage``, ``cell_type``, ``cell_type_ontology_term_id``,
    ``annotation_confidence`` (0-1; relative lineage margin x (0.5 + 0.5 x relative subset
    margin); 0 for Unassigned) and ``annotation_source`` (``markers``,
    ``markers:default_subset``, ``markers:unresolved_subset``, ``markers:unassigned_low_score``,
    ``markers:unassigned_ambiguous``, ``markers:unassigned_other_type``); ``obsm``:
    ``<prefix>annotation_lineage_scores`` (combined lineage scores, DataFrame); ``uns``:
    ``<prefix>annotation`` (parameters, organism, marker-set coverage, lineage coverage).
    """
    params = {k: v for k, v in locals().items() if k not in ("adata", "markers", "key_added")}
    for name in ("cluster_weight", "subset_cluster_weight"):
        if not 0.0 <= params[name] <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {params[name]}.")
    if adata.n_obs == 0:
        raise ValueError("adata has no cells.")
    prefix = f"{key_added}_" if key_added else ""
    vocab = load_vocabulary()
    org, detected = _resolve_organism(adata, organism, expected_organism)
    mk = load_markers(markers, org, vocabulary=vocab)
    counts = _count_source(adata, layer, counts_file)
    clusters = _annotation_clusters(
        adata,
        counts,
        cluster_key=cluster_key,
        use_rep=use_rep,
        resolution=resolution,
        n_pcs=n_pcs,
        n_neighbors=n_neighbors,
        seed=seed,
        prefix=prefix,
    )
    expr = _marker_expression(counts, adata.var_names, mk, clusters, min_cluster_size, org)
    lin = _call_lineages(
        expr,
        mk,
        clusters,
        min_score=min_score,
        min_margin=min_margin,
        cluster_weight=cluster_weight,
        down_weight=down_weight,
        min_genes=min_genes,
    )
    cell_type, q_sub, rep_sub, sub_source = _call_subsets(
        expr, lin, mk, vocab, clusters, counts, adata.var_names, params
    )
    conf = np.where(lin.call == UNASSIGNED, 0.0, lin.quality * (0.5 + 0.5 * q_sub))
    coverage = _lineage_coverage(lin.report, [s["target"] for s in mk["lineage_sets"]])
    _log_coverage(coverage)
    set_report = pd.DataFrame(lin.report + rep_sub)
    params.update(
        organism=org,
        organism_detected=detected or "undetermined",
        cluster_source=clusters.source,
        markers=mk["source_file"],
    )
    uns = {
        "params": {k: v for k, v in params.items() if v is not None},
        "marker_sets": {c: set_report[c].to_numpy() for c in set_report.columns},
        "lineage_coverage": {c: coverage[c].to_numpy() for c in coverage.columns},
        "subset_clusters": sub_source,
    }
    _write_annotation(adata, prefix, vocab, lin, cell_type, conf, uns)
    logger.info(
        "annotated %d cells (%s, clusters from %s): %d lineages, %d cell types, %.1f%% Unassigned",
        adata.n_obs,
        org,
        clusters.source,
        len(set(lin.call) - {UNASSIGNED}),
        len(set(cell_type) - {UNASSIGNED}),
        100 * float((lin.call == UNASSIGNED).mean()),
    )
    return _cluster_summary(clusters, lin, cell_type, conf)


def _count_source(
    adata: AnnData, layer: str | None, counts_file: str | PathLike[str] | None
) -> CountSource:
    """The raw counts the annotation reads: ``adata``'s (checked), or streamed from
    ``counts_file`` (its first chunk checked; cells and genes must match ``adata``)."""
    if counts_file is None:
        return CountSource(counts_csr(adata, layer))
    src = FileCounts.matching(counts_file, layer or "X", adata)
    from .store import iter_rows

    _, _, first = next(iter_rows(counts_file, layer or "X", chunk_rows=20_000))
    check_counts(first, source=f"{counts_file}:{layer}")
    return src


def _log_coverage(coverage: pd.DataFrame) -> None:
    low = coverage[(coverage["lineage"] != UNASSIGNED) & (coverage["best_coverage"] < 0.5)]
    if len(low):
        logger.warning(
            "marker coverage below 50%% for lineages %s (scores down-weighted, not skipped)",
            ", ".join(f"{r.lineage} {r.best_coverage:.0%}" for r in low.itertuples()),
        )


# --------------------------------------------------------------------------------------------
# reference-based path (CellTypist) and agreement
# --------------------------------------------------------------------------------------------
# Keyword rules that map foreign labels (CellTypist Immune_All_*, Azimuth, author labels) to
# lineages; first match wins. Only used for labels outside the vocabulary and ``label_map``.
_LINEAGE_KEYWORDS: tuple[tuple[str, str], ...] = (
    (r"plasma|plasmablast", "Plasma"),
    (r"\bpdc\b|plasmacytoid|\bdc\b|\bdcs\b|dendritic|cdc\d|\bmigdc|\bdc\d", "DC"),
    (r"macrophage|kupffer|microglia|\bmac\b", "Macrophage"),
    (r"monocyte|\bmono\b|\bmnp\b", "Monocyte"),
    (r"neutrophil|granulocyte", "Neutrophil"),
    (r"megakaryocyte|platelet", "Platelet"),
    (r"erythro|\bery", "Erythroid"),
    (r"\bhsc\b|hspc|progenitor|\bmpp\b|\bcmp\b|\bgmp\b|\bmep\b|\bhsc|cd34", "Progenitor"),
    (r"\bnk\b|natural killer|\bilc", "NK"),
    (r"\bb cell|\bb\b|\bb_|^b |b cells|naive b|memory b|germinal", "B"),
    (
        r"t cell|\bt\b|t_cd|\btreg|\bmait|\bgd|gamma|t\(|\btem\b|\btcm\b|\btrm\b|cd4|cd8|thymocyte",
        "T",
    ),
)


def _label_lineages(
    labels: pd.Series, vocab: Vocabulary, label_map: Mapping[str, str] | None
) -> pd.Series:
    """Lineage of each label: vocabulary label, lineage name, ``label_map``, or keywords."""
    label_map = dict(label_map or {})
    out: dict[str, str] = {}
    for lab in pd.unique(labels.astype(str)):
        target = label_map.get(lab, lab)
        if target in vocab.cell_types.index:
            out[lab] = vocab.lineage_of(target)
        elif target in vocab.lineages.index:
            out[lab] = target
        else:
            low = target.lower()
            out[lab] = next(
                (lin for pat, lin in _LINEAGE_KEYWORDS if re.search(pat, low)), UNASSIGNED
            )
    return labels.astype(str).map(out)


def annotate_celltypist(
    adata: AnnData,
    model_path: str | PathLike[str],
    *,
    layer: str | None = "counts",
    majority_voting: bool = False,
    over_clustering: str | None = None,
    label_map: Mapping[str, str] | None = None,
    key_added: str = "celltypist",
) -> pd.DataFrame:
    """Reference-based labels with a CellTypist model file (no downloads).

    Parameters
    ----------
    adata
        Cells x genes with symbols as ``var_names`` and raw counts in ``layers[layer]`` (or
        integer ``X``); CellTypist gets a log1p(CP10k) copy, ``adata.X`` is not modified.
    model_path
        Path of a CellTypist ``.pkl`` model (e.g. ``Immune_All_Low.pkl`` fetched beforehand by
        a workflow rule with internet, or a locally trained model).
    layer
        Layer with raw counts.
    majority_voting
        Refine labels by majority voting within ``over_clustering`` (CellTypist's own
        over-clustering when ``over_clustering`` is None).
    over_clustering
        ``obs`` column used for majority voting.
    label_map
        Optional mapping of model labels to vocabulary labels or lineages, used to fill the
        lineage column (labels neither in the vocabulary nor mapped fall back to keyword rules
        for common CellTypist/Azimuth names, else ``Unassigned``).
    key_added
        Prefix of the written ``obs`` columns.

    Returns
    -------
    pandas.DataFrame
        One row per predicted label: ``n_cells``, ``lineage``, ``mean_probability``.

    Notes
    -----
    Writes ``obs``: ``<key_added>_label`` (majority-voted when requested),
    ``<key_added>_probability`` (probability of the best-match label) and
    ``<key_added>_lineage``. The main ``lineage``/``cell_type`` columns are not touched;
    compare both with :func:`annotation_agreement`.

    Raises
    ------
    ImportError
        If CellTypist is not installed (``pip install celltypist``).
    FileNotFoundError
        If ``model_path`` does not exist.
    """
    try:
        import celltypist
        from celltypist import models as ct_models
    except ImportError as err:  # pragma: no cover - exercised only without celltypist
        raise ImportError(
            "annotate_celltypist needs the optional package 'celltypist' "
            "(pip install celltypist); the marker-based annotate() works without it."
        ) from err
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(
            f"CellTypist model {model_path} not found. Models are never downloaded here: fetch "
            "one (e.g. Immune_All_Low.pkl) on a machine with internet and pass its path."
        )
    if over_clustering is not None and over_clustering not in adata.obs:
        raise KeyError(f"over_clustering column {over_clustering!r} not in adata.obs.")
    X = log_normalise(counts_csr(adata, layer))
    query = AnnData(X=X, obs=pd.DataFrame(index=adata.obs_names.copy()))
    query.var_names = adata.var_names.astype(str)
    query.var_names_make_unique()
    oc = None if over_clustering is None else adata.obs[over_clustering].astype(str).to_numpy()
    model = ct_models.Model.load(str(model_path))
    res = celltypist.annotate(
        query, model=model, majority_voting=majority_voting, over_clustering=oc
    )
    pred = res.predicted_labels
    col = "majority_voting" if majority_voting else "predicted_labels"
    labels = pred[col].astype(str).reindex(adata.obs_names)
    prob = res.probability_matrix.max(axis=1).reindex(adata.obs_names).to_numpy()
    vocab = load_vocabulary()
    lineages = _label_lineages(labels, vocab, label_map)
    adata.obs[f"{key_added}_label"] = pd.Categorical(labels)
    adata.obs[f"{key_added}_probability"] = prob.astype(np.float32)
    adata.obs[f"{key_added}_lineage"] = pd.Categorical(lineages)
    summary = _label_summary(labels, lineages, prob)
    logger.info(
        "CellTypist model %s: %d labels over %d cells", model_path.name, len(summary), adata.n_obs
    )
    return summary


def _label_summary(labels: pd.Series, lineages: pd.Series, prob: np.ndarray) -> pd.DataFrame:
    """Cells and mean probability per transferred label (CellTypist, scANVI), largest first."""
    return (
        pd.DataFrame({"label": labels.to_numpy(), "lineage": lineages.to_numpy(), "p": prob})
        .groupby(["label", "lineage"], observed=True)
        .agg(n_cells=("p", "size"), mean_probability=("p", "mean"))
        .reset_index()
        .sort_values("n_cells", ascending=False, ignore_index=True)
    )


def annotation_agreement(
    adata: AnnData,
    key_a: str,
    key_b: str,
    *,
    label_map: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Agreement of two annotations: lineage-level accuracy and per-label confusion.

    Parameters
    ----------
    adata
        AnnData with both label columns in ``obs``.
    key_a, key_b
        ``obs`` columns with labels (vocabulary labels, lineages or foreign labels such as
        CellTypist's); ``key_a`` is treated as the reference.
    label_map
        Mapping of foreign labels to vocabulary labels or lineages (see
        :func:`annotate_celltypist`).

    Returns
    -------
    pandas.DataFrame
        One row per label of ``key_a``: ``n_cells``, ``lineage``, ``best_match`` (most frequent
        label of ``key_b``), ``frac_best_match`` and ``lineage_agreement`` (fraction of its
        cells whose ``key_b`` lineage is the same). ``.attrs`` holds ``lineage_accuracy``
        (over cells with a lineage in ``key_a``), ``label_accuracy`` (exact label match) and
        ``confusion`` (the full label x label count table).
    """
    for k in (key_a, key_b):
        if k not in adata.obs:
            raise KeyError(f"{k!r} not in adata.obs.")
    vocab = load_vocabulary()
    a = adata.obs[key_a].astype(str)
    b = adata.obs[key_b].astype(str)
    lin_a = _label_lineages(a, vocab, label_map)
    lin_b = _label_lineages(b, vocab, label_map)
    conf = pd.crosstab(a, b)
    rows = []
    for lab, row in conf.iterrows():
        mask = (a == lab).to_numpy()
        rows.append(
            {
                "label": lab,
                "n_cells": int(row.sum()),
                "lineage": lin_a[mask].iloc[0],
                "best_match": row.idxmax(),
                "frac_best_match": float(row.max() / row.sum()),
                "lineage_agreement": float((lin_a[mask] == lin_b[mask]).mean()),
            }
        )
    out = pd.DataFrame(rows).sort_values("n_cells", ascending=False, ignore_index=True)
    has = (lin_a != UNASSIGNED).to_numpy()
    out.attrs["lineage_accuracy"] = (
        float((lin_a[has] == lin_b[has]).mean()) if has.any() else np.nan
    )
    out.attrs["label_accuracy"] = float((a == b).mean())
    out.attrs["confusion"] = conf
    logger.info(
        "agreement %s vs %s: lineage accuracy %.3f, label accuracy %.3f",
        key_a,
        key_b,
        out.attrs["lineage_accuracy"],
        out.attrs["label_accuracy"],
    )
    return out
