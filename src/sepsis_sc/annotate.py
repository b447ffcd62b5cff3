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

from .resources import load_yaml, resource_path

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
                    "source": str(s.get("source", "")),
                }
            )
        return out

    return {
        "organism": raw.get("organism", organism),
        "aliases": {str(k): [str(v) for v in vs] for k, vs in (raw.get("aliases") or {}).items()},
        "lineage_sets": _sets("lineage_sets", "lineage"),
        "subset_sets": _sets("subset_sets", "cell_type"),
        "source_file": source_file,
    }


# --------------------------------------------------------------------------------------------
# input helpers
# --------------------------------------------------------------------------------------------
def _is_integer_matrix(X: Any, n_check: int = 100_000) -> bool:
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    data = np.asarray(data[:n_check])
    if data.size == 0:
        return True
    return bool(np.all(data >= 0) and np.all(np.equal(np.mod(data, 1), 0)))


def _get_counts(adata: AnnData, layer: str | None) -> sp.csr_matrix:
    """Raw counts as CSR float32 (a new matrix; the caller's data are untouched)."""
    if layer is not None and layer in adata.layers:
        X = adata.layers[layer]
        where = f"layers[{layer!r}]"
    elif _is_integer_matrix(adata.X):
        X = adata.X
        where = "X (integer-valued)"
        if layer is not None:
            logger.info("layers[%r] absent; using integer-valued X as raw counts", layer)
    else:
        raise ValueError(
            f"No raw counts found: layers[{layer!r}] is absent and X is not integer-valued. "
            "Keep raw UMI counts in adata.layers['counts'] (as ingest does) or pass "
            "layer=<name of the raw-count layer>."
        )
    if not _is_integer_matrix(X):
        raise ValueError(
            f"{where} does not hold raw integer counts (found negative or fractional values). "
            "Annotation normalises counts itself; pass the raw-count layer."
        )
    X = sp.csr_matrix(X, dtype=np.float32)
    return X


def _marker_symbols(markers: Mapping[str, Any]) -> set[str]:
    genes: set[str] = set()
    for key in ("lineage_sets", "subset_sets"):
        for s in markers[key]:
            genes.update(s["up"])
            genes.update(s["down"])
    return genes


def _detect_organism(var_names: Sequence[str]) -> tuple[str | None, dict[str, int]]:
    """Guess human/mouse from marker symbols present (CD3E vs Cd3e)."""
    names = set(map(str, var_names))
    counts = {}
    for org in ("human", "mouse"):
        probe = _marker_symbols(load_markers(None, org))
        counts[org] = len(probe & names)
    h, m = counts["human"], counts["mouse"]
    if max(h, m) < 5:
        return None, counts
    if h >= 3 * max(m, 1):
        return "human", counts
    if m >= 3 * max(h, 1):
        return "mouse", counts
    return None, counts


def _resolve_organism(
    adata: AnnData, organism: Organism, expected_organism: str | None
) -> tuple[str, str | None]:
    if organism not in ("auto", "human", "mouse"):
        raise ValueError(f"organism must be 'auto', 'human' or 'mouse', not {organism!r}.")
    if expected_organism not in (None, "human", "mouse"):
        raise ValueError(
            f"expected_organism must be 'human', 'mouse' or None, not {expected_organism!r}."
        )
    detected, counts = _detect_organism(adata.var_names)
    if detected is None and organism == "auto":
        raise ValueError(
            "Cannot tell the organism from var_names (marker symbols found: "
            f"human {counts['human']}, mouse {counts['mouse']}). var_names must be gene symbols "
            "(use sepsis_sc.io.ensure_symbols for Ensembl IDs), or pass organism='human'/'mouse'."
        )
    chosen = detected if organism == "auto" else organism
    if detected is not None and organism != "auto" and detected != organism:
        raise ValueError(
            f"organism={organism!r} but the gene symbols look {detected} (marker symbols found: "
            f"human {counts['human']}, mouse {counts['mouse']}). Check the input data or the "
            "organism setting."
        )
    if expected_organism is not None and chosen != expected_organism:
        raise ValueError(
            f"The data look {chosen} (marker symbols found: human {counts['human']}, mouse "
            f"{counts['mouse']}) but the config expects organism {expected_organism!r}. "
            "Check the sample sheet / input files, or fix the organism key of the config."
        )
    assert chosen is not None
    return chosen, detected


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


def _lognorm_columns(counts: sp.csr_matrix, cols: np.ndarray) -> sp.csr_matrix:
    """log1p(CP10k) of selected columns, with size factors from all genes (sparse)."""
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    sub = counts[:, cols].tocsr().astype(np.float32)
    sub = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ sub)
    sub.data = np.log1p(sub.data)
    return sub


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
    counts: sp.csr_matrix,
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

    work = AnnData(X=counts.copy(), var=pd.DataFrame(index=var_names.astype(str)))
    work.var_names_make_unique()
    if embedding is None:
        sc.pp.normalize_total(work, target_sum=1e4)
        sc.pp.log1p(work)
        keep = np.asarray((work.X > 0).sum(axis=0)).ravel() >= 3
        work = work[:, keep].copy()
        n_top = int(min(2000, work.n_vars))
        sc.pp.highly_variable_genes(work, n_top_genes=n_top, flavor="seurat")
        n_comps = int(
            max(2, min(n_pcs, work.n_obs - 1, int(work.var["highly_variable"].sum()) - 1))
        )
        sc.pp.pca(work, n_comps=n_comps, mask_var="highly_variable", random_state=seed)
        rep = "X_pca"
    else:
        work.obsm["X_emb"] = np.asarray(embedding, dtype=np.float32)
        rep = "X_emb"
    neighbors(  # the same kNN search as sepsis_sc.cluster.leiden_multi
        work,
        n_neighbors=int(min(n_neighbors, max(2, work.n_obs - 1))),
        use_rep=rep,
        seed=seed,
    )
    sc.tl.leiden(
        work,
        resolution=resolution,
        flavor="igraph",
        n_iterations=2,
        directed=False,
        random_state=seed,
        key_added="_oc",
    )
    return work.obs["_oc"].to_numpy()


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
def _weight_matrix(
    sets: Sequence[Mapping[str, Any]],
    gene_pos: Mapping[str, int],
    gene_order: Mapping[str, int],
    down_weight: float,
    min_genes: int,
) -> tuple[np.ndarray, list[int], list[dict[str, Any]]]:
    """Genes x sets signed weights: +1/n_up per up-gene, -down_weight/n_down per down-gene.

    ``n_up`` is the number of up-genes found, but at least half of the set's size: a set of
    which most genes are missing from the data (gene panel, filtered genes) is shrunk towards
    0 instead of being represented by its few generic genes (e.g. S100A8/9 for neutrophils).
    """
    W = np.zeros((len(gene_order), len(sets)), dtype=np.float32)
    kept: list[int] = []
    report = []
    skipped = []
    for j, s in enumerate(sets):
        up = [g for g in dict.fromkeys(s["up"]) if g in gene_pos]
        down = [g for g in dict.fromkeys(s["down"]) if g in gene_pos and g not in up]
        n_up_total = len(dict.fromkeys(s["up"]))
        report.append(
            {
                "set": s["name"],
                "target": s["target"],
                "n_up": n_up_total,
                "n_up_found": len(up),
                "n_down": len(s["down"]),
                "n_down_found": len(down),
                "missing": ",".join(g for g in s["up"] + s["down"] if g not in gene_pos),
            }
        )
        if len(up) < min_genes:
            skipped.append(f"{s['name']} ({len(up)}/{n_up_total})")
            continue
        denom = max(len(up), int(np.ceil(0.5 * n_up_total)))
        for g in up:
            W[gene_order[g], j] += 1.0 / denom
        for g in down:
            W[gene_order[g], j] -= down_weight / len(down)
        kept.append(j)
    if skipped:
        logger.warning(
            "%d marker sets skipped, fewer than %d up-genes in the data: %s",
            len(skipped),
            min_genes,
            ", ".join(skipped),
        )
    return W, kept, report


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


def annotate(
    adata: AnnData,
    *,
    organism: Organism = "auto",
    expected_organism: str | None = None,
    cluster_key: str | None = None,
    markers: str | PathLike[str] | Mapping[str, Any] | None = None,
    layer: str | None = "counts",
    min_score: float = 0.2,
    min_margin: float = 0.05,
    subset_min_score: float = 0.2,
    cluster_weight: float = 0.5,
    subset_cluster_weight: float = 0.25,
    down_weight: float = 1.0,
    min_genes: int = 2,
    min_cluster_size: int = 10,
    use_rep: str | None = None,
    resolution: float = 2.0,
    n_pcs: int = 30,
    n_neighbors: int = 15,
    seed: int = 0,
    key_added: str | None = None,
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
    min_score
        Minimum combined lineage score (0-1 scale) for a lineage call.
    min_margin
        Minimum lead of the best lineage over the runner-up; below it the cell is ambiguous.
    subset_min_score
        Minimum absolute score for a specific subset in lineages that have a default subset
        (e.g. Non-classical vs the default Classical monocyte; TREM2-high vs Macrophage).
    cluster_weight
        Weight of the cluster mean in ``(1 - w) * cell + w * cluster`` for lineages
        (0 = per cell only).
    subset_cluster_weight
        Cluster weight for the absolute score that gates a specific subset against the
        lineage's default (lower than ``cluster_weight``, because rare subsets such as
        TREM2-high macrophages or CD56bright NK often share a cluster with their siblings).
        The choice among sibling subsets uses ``cluster_weight``.
    down_weight
        Weight of the negative markers relative to the positive ones.
    min_genes
        Sets with fewer up-genes present in the data are skipped (logged).
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
    ``markers:default_subset``, ``markers:unassigned_low_score``,
    ``markers:unassigned_ambiguous``, ``markers:unassigned_other_type``); ``obsm``:
    ``<prefix>annotation_lineage_scores`` (combined lineage scores, DataFrame); ``uns``:
    ``<prefix>annotation`` (parameters, organism, marker genes found per set).
    """
    for name, w in (
        ("cluster_weight", cluster_weight),
        ("subset_cluster_weight", subset_cluster_weight),
    ):
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {w}.")
    if adata.n_obs == 0:
        raise ValueError("adata has no cells.")
    prefix = f"{key_added}_" if key_added else ""
    vocab = load_vocabulary()
    org, detected = _resolve_organism(adata, organism, expected_organism)
    mk = load_markers(markers, org, vocabulary=vocab)
    counts = _get_counts(adata, layer)
    n = adata.n_obs

    # ---- clusters -------------------------------------------------------------------------
    if cluster_key is not None:
        if cluster_key not in adata.obs:
            raise KeyError(
                f"cluster_key {cluster_key!r} not in adata.obs; run clustering first or pass "
                "cluster_key=None to let annotate over-cluster the data itself."
            )
        clusters = adata.obs[cluster_key].astype(str).to_numpy()
        cluster_source = cluster_key
    elif (reused := _reusable_leiden(adata, use_rep, resolution, n_neighbors, seed)) is not None:
        # the clustering stage already ran Leiden at this resolution on the same kNN graph
        clusters = adata.obs[reused].astype(str).to_numpy()
        cluster_source = f"{reused} (leiden_multi on {use_rep}, reused)"
        adata.obs[f"{prefix}annotation_cluster"] = pd.Categorical(clusters)
    else:
        emb = None
        if use_rep is not None:
            if use_rep not in adata.obsm:
                raise KeyError(f"use_rep {use_rep!r} not in adata.obsm ({list(adata.obsm)}).")
            emb = np.asarray(adata.obsm[use_rep])
        clusters = _overcluster(
            counts,
            adata.var_names,
            resolution=resolution,
            n_pcs=n_pcs,
            n_neighbors=n_neighbors,
            seed=seed,
            embedding=emb,
        )
        cluster_source = f"leiden(resolution={resolution}, rep={use_rep or 'pca'})"
        adata.obs[f"{prefix}annotation_cluster"] = pd.Categorical(clusters)
    cl_cat = pd.Categorical(clusters)
    cl_codes = np.asarray(cl_cat.codes)
    n_cl = len(cl_cat.categories)
    G = _group_matrix(cl_codes, n_cl)
    cl_sizes = np.bincount(cl_codes, minlength=n_cl)

    # ---- marker expression ----------------------------------------------------------------
    all_sets = mk["lineage_sets"] + mk["subset_sets"]
    wanted = sorted({g for s in all_sets for g in s["up"] + s["down"]})
    gene_pos = _resolve_genes(wanted, adata.var_names, mk["aliases"])
    if not gene_pos:
        raise ValueError(
            "None of the marker genes were found in var_names; var_names must be gene symbols "
            f"of the {org} genome (use sepsis_sc.io.ensure_symbols)."
        )
    genes = list(gene_pos)
    gene_order = {g: i for i, g in enumerate(genes)}
    E = _lognorm_columns(counts, np.array([gene_pos[g] for g in genes]))
    big = cl_sizes >= min_cluster_size
    if not big.any():
        big = cl_sizes > 0
    cl_means = np.asarray((G @ E).todense())  # clusters x genes
    scale = np.maximum(cl_means[big].max(axis=0), _SCALE_FLOOR).astype(np.float32)
    V = sp.csr_matrix(E @ sp.diags(1.0 / scale))
    np.minimum(V.data, 1.0, out=V.data)

    # ---- level 1: lineage ---------------------------------------------------------------------
    lin_sets = mk["lineage_sets"]
    W_lin, kept_lin, rep_lin = _weight_matrix(
        lin_sets, gene_pos, gene_order, down_weight, min_genes
    )
    S_lin = np.asarray(V @ W_lin)
    lin_targets = list(dict.fromkeys(lin_sets[j]["target"] for j in kept_lin))
    if not any(t != UNASSIGNED for t in lin_targets):
        raise ValueError("No lineage marker set has enough genes in the data to score.")
    L_cell = _max_by_target(S_lin, lin_sets, kept_lin, lin_targets)
    L_clu = np.asarray(G @ L_cell)[cl_codes]
    L = (1.0 - cluster_weight) * L_cell + cluster_weight * L_clu
    arg, best, second = _top2(L)
    lin_call = np.array(lin_targets, dtype=object)[arg]
    margin = best - second
    source = np.full(n, "markers", dtype=object)
    low = best < min_score
    ambiguous = ~low & (margin < min_margin)
    decoy = ~low & ~ambiguous & (lin_call == UNASSIGNED)
    source[low] = "markers:unassigned_low_score"
    source[ambiguous] = "markers:unassigned_ambiguous"
    source[decoy] = "markers:unassigned_other_type"
    unassigned = low | ambiguous | decoy
    lin_call[unassigned] = UNASSIGNED
    with np.errstate(divide="ignore", invalid="ignore"):
        q_lin = np.clip(np.where(best > 0, margin / best, 0.0), 0.0, 1.0)
    q_lin = np.nan_to_num(q_lin, nan=0.0, posinf=1.0)

    # ---- level 2: subsets within lineage ----------------------------------------------------
    sub_sets = mk["subset_sets"]
    W_sub, kept_sub, rep_sub = _weight_matrix(
        sub_sets, gene_pos, gene_order, down_weight, min_genes
    )
    cell_type = np.full(n, UNASSIGNED, dtype=object)
    q_sub = np.ones(n, dtype=np.float64)
    for lineage in vocab.lineages.index:
        idx = np.flatnonzero(lin_call == lineage)
        if idx.size == 0:
            continue
        labels = vocab.subsets_of(lineage)
        default = vocab.lineages.at[lineage, "default_subset"]
        set_idx = [j for j in kept_sub if sub_sets[j]["target"] in labels]
        scored = list(dict.fromkeys(sub_sets[j]["target"] for j in set_idx))
        if not scored:
            fallback = default or (labels[0] if len(labels) == 1 else None)
            if fallback is None:
                logger.warning(
                    "lineage %s: no subset set could be scored; cells get the "
                    "first subset label %s",
                    lineage,
                    labels[0],
                )
                fallback = labels[0]
            cell_type[idx] = fallback
            continue
        V_l = V[idx]
        sub_codes = cl_codes[idx]
        uniq, local = np.unique(sub_codes, return_inverse=True)
        G_l = _group_matrix(local, len(uniq))
        grp_sizes = np.bincount(local, minlength=len(uniq))
        sets_l = [sub_sets[j] for j in set_idx]
        W_l = W_sub[:, set_idx]
        A_sets = np.asarray(V_l @ W_l)  # absolute set scores
        # baseline: lowest cluster mean of each gene within the lineage (>= 2 sizeable groups)
        big_l = grp_sizes >= min_cluster_size
        if big_l.sum() >= 2:
            gmeans = np.asarray((G_l @ V_l).todense())[big_l]
            offset = gmeans.min(axis=0) @ W_l
        else:
            offset = np.zeros(len(set_idx), dtype=np.float32)
        R_sets = A_sets - offset
        kept_local = list(range(len(set_idx)))
        A_cell = _max_by_target(A_sets, sets_l, kept_local, scored)
        R_cell = _max_by_target(R_sets, sets_l, kept_local, scored)
        w = subset_cluster_weight
        A = (1 - w) * A_cell + w * np.asarray(G_l @ A_cell)[local]
        R = (1 - cluster_weight) * R_cell + cluster_weight * np.asarray(G_l @ R_cell)[local]
        s_arg, s_best, s_second = _top2(R)
        call = np.array(scored, dtype=object)[s_arg]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = (s_best - s_second) / (np.abs(s_best) + np.abs(s_second))
        q = np.clip(np.nan_to_num(q, nan=0.0, posinf=1.0), 0.0, 1.0)
        if len(scored) == 1 and default is None:
            q = np.ones_like(q)
        if default is not None:
            a_best = A[np.arange(idx.size), s_arg]
            weak = (call != default) & (a_best < subset_min_score)
            call[weak] = default
            q[weak] = np.clip(1.0 - a_best[weak] / subset_min_score, 0.0, 1.0)
            source[idx[weak]] = "markers:default_subset"
        cell_type[idx] = call
        q_sub[idx] = q

    conf = np.where(lin_call == UNASSIGNED, 0.0, q_lin * (0.5 + 0.5 * q_sub))
    ct_tab = vocab.cell_types
    cl_ids = ct_tab["cl"].reindex(cell_type).to_numpy()

    # ---- write ------------------------------------------------------------------------------
    lin_levels = list(vocab.lineages.index) + [UNASSIGNED]
    adata.obs[f"{prefix}lineage"] = pd.Categorical(lin_call, categories=lin_levels)
    adata.obs[f"{prefix}cell_type"] = pd.Categorical(cell_type, categories=list(ct_tab.index))
    adata.obs[f"{prefix}cell_type_ontology_term_id"] = pd.Categorical(cl_ids)
    adata.obs[f"{prefix}annotation_confidence"] = conf.astype(np.float32)
    adata.obs[f"{prefix}annotation_source"] = pd.Categorical(source)
    lin_scores = pd.DataFrame(L, index=adata.obs_names, columns=lin_targets)
    adata.obsm[f"{prefix}annotation_lineage_scores"] = lin_scores
    params = {
        "organism": org,
        "organism_detected": detected or "undetermined",
        "cluster_source": cluster_source,
        "markers": mk["source_file"],
        "min_score": min_score,
        "min_margin": min_margin,
        "subset_min_score": subset_min_score,
        "cluster_weight": cluster_weight,
        "subset_cluster_weight": subset_cluster_weight,
        "down_weight": down_weight,
        "min_genes": min_genes,
        "min_cluster_size": min_cluster_size,
        "seed": seed,
        "layer": layer,
    }
    set_report = pd.DataFrame(rep_lin + rep_sub)
    adata.uns[f"{prefix}annotation"] = {
        "params": params,
        "marker_sets": {c: set_report[c].to_numpy() for c in set_report.columns},
    }

    # ---- summary ---------------------------------------------------------------------------
    df = pd.DataFrame(
        {"cluster": clusters, "lineage": lin_call, "cell_type": cell_type, "conf": conf}
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
        means = L[sub.index.to_numpy()].mean(axis=0)
        row.update({f"score_{t}": float(v) for t, v in zip(lin_targets, means, strict=True)})
        rows.append(row)
    summary = pd.DataFrame(rows)
    frac_un = float(unassigned.mean())
    logger.info(
        "annotated %d cells (%s, clusters from %s): %d lineages, %d cell types, %.1f%% Unassigned",
        n,
        org,
        cluster_source,
        len(set(lin_call) - {UNASSIGNED}),
        len(set(cell_type) - {UNASSIGNED}),
        100 * frac_un,
    )
    return summary


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
    counts = _get_counts(adata, layer)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    sf = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    X = sp.csr_matrix(sp.diags(sf.astype(np.float32)) @ counts)
    X.data = np.log1p(X.data)
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
    summary = (
        pd.DataFrame({"label": labels.to_numpy(), "lineage": lineages.to_numpy(), "p": prob})
        .groupby(["label", "lineage"], observed=True)
        .agg(n_cells=("p", "size"), mean_probability=("p", "mean"))
        .reset_index()
        .sort_values("n_cells", ascending=False, ignore_index=True)
    )
    logger.info(
        "CellTypist model %s: %d labels over %d cells", model_path.name, len(summary), adata.n_obs
    )
    return summary


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
