"""The annotation run: :func:`annotate` in named steps, and what it writes.

Organism and vocabulary, marker sets, the counts (:func:`sepsis_sc.annotate.markers.read_counts`),
cluster evidence and marker expression (:mod:`~sepsis_sc.annotate.lineage`), lineage calls,
subset calls (:mod:`~sepsis_sc.annotate.subsets`), confidence, then ``obs`` / ``obsm`` /
``uns`` and the per-cluster summary.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from sepsis_sc.annotate.arbiter import arbitrate
from sepsis_sc.annotate.consensus import AGREEMENT_LEVELS, agreement_table, combine
from sepsis_sc.annotate.correlation import ReferenceProfiles, classify, load_reference
from sepsis_sc.annotate.lineage import (
    Clusters,
    LineageCalls,
    MarkerExpression,
    annotation_clusters,
    call_lineages,
    lineage_coverage,
    marker_expression,
)
from sepsis_sc.annotate.markers import (
    UNASSIGNED,
    Vocabulary,
    current_symbols,
    load_markers,
    load_vocabulary,
    read_counts,
)
from sepsis_sc.annotate.specific import pairwise_evidence
from sepsis_sc.annotate.subsets import (
    GATE_GENES_ABSENT,
    GATE_UNDETERMINED,
    SUBSET_SOURCES,
    call_subsets,
)
from sepsis_sc.config import AnnotationSettings
from sepsis_sc.data import organism_evidence, resolve_organism
from sepsis_sc.store import CountSource

logger = logging.getLogger(__name__)

__all__ = ["annotate", "Organism"]

_OBS_KEYS = (
    "lineage",
    "cell_type",
    "cell_type_ontology_term_id",
    "annotation_confidence",
    "annotation_source",
)

Organism = Literal["auto", "human", "mouse"]


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


def _write_annotation(
    adata: AnnData,
    prefix: str,
    vocab: Vocabulary,
    lin: LineageCalls,
    cell_type: np.ndarray,
    conf: np.ndarray,
    uns: dict[str, Any],
    opinions: dict[str, Any],
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
    for key, values in opinions.items():
        adata.obs[f"{prefix}{key}"] = values
    adata.uns[f"{prefix}annotation"] = uns


def _gate_columns(gate_sides: dict[str, np.ndarray], mk: dict[str, Any]) -> dict[str, Any]:
    """``obs`` columns ``annotation_gate_<name>``: the side each cell of a gate's lineage was
    given (e.g. CD4 / CD8 for every T cell, MAIT, gamma-delta and unresolved ones included;
    ``undetermined``, ``genes_absent``), missing outside the lineage."""
    out: dict[str, Any] = {}
    for gate in mk.get("subset_gates", []):
        side = gate_sides.get(gate["name"])
        if side is None:
            continue
        levels = [g["name"] for g in gate["groups"]] + [GATE_UNDETERMINED, GATE_GENES_ABSENT]
        out[f"annotation_gate_{gate['name']}"] = pd.Categorical(side, categories=levels)
    return out


def _cluster_summary(
    clusters: Clusters, lin: LineageCalls, cell_type: np.ndarray, conf: np.ndarray
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
    settings: AnnotationSettings | None = None,
    *,
    organism: Organism = "auto",
    expected_organism: str | None = None,
    use_rep: str | None = None,
    counts: CountSource | None = None,
    layer: str | None = "counts",
    subset_cluster_weight: float = 0.25,
    down_weight: float = 1.0,
    min_genes: int = 1,
    min_cluster_size: int = 10,
    n_pcs: int = 30,
    n_neighbors: int = 15,
    seed: int = 0,
    key_added: str | None = None,
    subset_reembed: bool = True,
    subset_resolution: float = 2.0,
    subset_n_neighbors: int = 20,
    subset_min_cells: int = 100,
    unresolved_min_score: float = 0.05,
    profiles: ReferenceProfiles | None = None,
    specific_min_lfc: float = 0.5,
    reference_min_delta: float = 0.02,
    disagree_margin: float = 0.05,
    **overrides: Any,
) -> pd.DataFrame:
    """Annotate immune lineages and subsets from marker genes (hierarchical, offline).

    Parameters
    ----------
    adata
        Cells x genes with gene symbols as ``var_names`` and raw counts in ``layers[layer]``
        (or integer counts in ``X``). ``X`` is not modified.
    settings
        The ``annotation`` section of the config (:class:`sepsis_sc.config.AnnotationSettings`;
        default: the schema's defaults). Its fields used here: ``markers``, ``cluster_key``,
        ``resolution``, ``min_score``, ``min_margin``, ``subset_min_score``,
        ``cluster_weight`` (below), ``reference_profiles`` (the second opinion: ``"builtin"``,
        a path or ``None``), ``third_opinion_min_probability`` (the probability the third
        opinion, :mod:`sepsis_sc.annotate.arbiter`, needs to decide a cell the two left torn;
        ``None`` switches it off); ``celltypist_model`` and ``reference`` are for
        :func:`annotate_celltypist` and :func:`transfer_labels`.
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
        Layer with raw counts; ``X`` is used when the layer is absent and ``X`` is integer
        (without ``counts``).
    counts
        The raw counts as a :class:`sepsis_sc.store.CountSource` with ``adata``'s cells and
        genes, e.g. ``store.FileCounts.matching(path, layer, adata)``: read in row chunks from
        the ``.h5ad``, so ``adata`` needs no matrix (obs, var and the embedding are enough) and
        at a million cells the annotation never holds the count matrix (the workflow's rule
        ``annotate`` does this). Default: ``adata``'s (:func:`read_counts`).
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
    profiles
        Reference profiles of the second opinion, already loaded
        (:func:`sepsis_sc.annotate.load_reference`; e.g. one built without the evaluated
        data set); overrides ``reference_profiles``.
    specific_min_lfc
        A gene is specific to lineage a against b when a's mean reference profile exceeds
        b's highest by this many log1p(CP10k) units (and twofold): :mod:`.specific`.
    reference_min_delta
        Reference margin (fine-tuned correlation over the runner-up) needed for the
        reference to label a cell the markers left Unassigned.
    disagree_margin
        Lead in pairwise specific evidence that settles a disagreement of the two opinions.
    **overrides
        Fields of ``settings`` to change, by name (e.g. ``cluster_key="leiden"``,
        ``markers=<path or mapping>``); ``TypeError`` names one that is no field.

    Returns
    -------
    pandas.DataFrame
        One row per cluster: ``n_cells``, majority ``lineage`` and ``cell_type`` with their
        fractions, ``mean_confidence``, ``frac_unassigned`` and the mean combined score of
        every lineage (``score_<lineage>``).

    Notes
    -----
    Writes ``obs``: ``lineage``, ``cell_type``, ``cell_type_ontology_term_id``,
    ``annotation_confidence`` (0-1; the lineage confidence of the two opinions' consensus,
    :mod:`sepsis_sc.annotate.consensus`, x (0.5 + 0.5 x relative subset margin); 0 for
    Unassigned), ``annotation_source``, why the cell has its lineage (``markers``,
    ``markers:low_score_cluster_support``, ``markers:unassigned_low_score``,
    ``markers:unassigned_ambiguous``, ``markers:unassigned_other_type``,
    ``reference:marker_unassigned``, ``reference:disagreement``, ``consensus:disagreement``,
    ``classifier:two_of_three``: a torn cell the third opinion decided), and ``annotation_subset_source``, why it has its
    subset within the lineage (``markers``, ``coarse_markers``, ``default_subset``,
    ``unresolved_subset``, ``genes_absent``, ``single_subset``, ``none``:
    :data:`sepsis_sc.annotate.subsets.SUBSET_SOURCES`);
    the two opinions (issue #32): ``annotation_marker_lineage``, ``annotation_reference_label``,
    ``annotation_reference_lineage``, ``annotation_reference_score`` (fine-tuned Spearman
    correlation), ``annotation_reference_margin`` (the lineage's margin: its best label's
    correlation over the best of any other lineage) and
    ``annotation_agreement`` (``agree``, ``disagree``, ``reference_only``,
    ``not_in_reference``, ``unassigned``, ``no_reference``), the third opinion
    (:mod:`sepsis_sc.annotate.arbiter`) on the cells the two left torn:
    ``annotation_classifier_lineage`` and ``annotation_classifier_probability`` (missing for
    cells it was not asked about); per two-group subset gate
    ``annotation_gate_<name>``, e.g. ``annotation_gate_CD4_vs_CD8``: the co-receptor side
    (``CD4`` / ``CD8``, ``undetermined`` without evidence either way, ``genes_absent``) the
    gate gave each T cell, MAIT, gamma-delta and unresolved ones included, missing outside
    T (a CD4:CD8 ratio over all T cells); ``obsm``:
    ``<prefix>annotation_lineage_scores`` (combined lineage scores, DataFrame); ``uns``:
    ``<prefix>annotation`` (parameters, organism, marker-set coverage, lineage coverage,
    ``reference``: profiles used, genes read, per-cluster reference labels, the specific
    genes of every lineage pair and the agreement table,
    :func:`sepsis_sc.annotate.opinion_table`; ``gates``: cells per side of each gate).

    Without CD4 / CD8 genes in the data, T cells get ``naive T`` (CL:0000898) or ``memory
    T`` (CL:0000813); lineages whose subset genes are absent keep their lineage call
    (``<lineage> unresolved``).
    """
    settings = (settings or AnnotationSettings()).with_overrides(overrides)
    markers = settings.markers
    cluster_key = settings.cluster_key
    resolution = settings.resolution
    params = {
        "organism": organism,
        "expected_organism": expected_organism,
        "cluster_key": cluster_key,
        "layer": layer,
        "min_score": settings.min_score,
        "min_margin": settings.min_margin,
        "subset_min_score": settings.subset_min_score,
        "cluster_weight": settings.cluster_weight,
        "subset_cluster_weight": subset_cluster_weight,
        "down_weight": down_weight,
        "min_genes": min_genes,
        "min_cluster_size": min_cluster_size,
        "use_rep": use_rep,
        "resolution": resolution,
        "n_pcs": n_pcs,
        "n_neighbors": n_neighbors,
        "seed": seed,
        "subset_reembed": subset_reembed,
        "subset_resolution": subset_resolution,
        "subset_n_neighbors": subset_n_neighbors,
        "subset_min_cells": subset_min_cells,
        "unresolved_min_score": unresolved_min_score,
        "specific_min_lfc": specific_min_lfc,
        "reference_min_delta": reference_min_delta,
        "disagree_margin": disagree_margin,
        "third_opinion_min_probability": settings.third_opinion_min_probability,
    }
    for name in ("cluster_weight", "subset_cluster_weight"):
        if not 0.0 <= params[name] <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {params[name]}.")
    if adata.n_obs == 0:
        raise ValueError("adata has no cells.")
    prefix = f"{key_added}_" if key_added else ""
    vocab = load_vocabulary()
    org, detected = _resolve_organism(adata, organism, expected_organism)
    mk = load_markers(markers, org, vocabulary=vocab)
    counts = read_counts(adata, counts, layer)
    clusters = annotation_clusters(
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
    expr = marker_expression(counts, adata.var_names, mk, clusters, min_cluster_size, org)
    lin = call_lineages(
        expr,
        mk,
        clusters,
        min_score=settings.min_score,
        min_margin=settings.min_margin,
        cluster_weight=settings.cluster_weight,
        down_weight=down_weight,
        min_genes=min_genes,
    )
    ref = _reference(settings.reference_profiles, profiles, org)
    lin, opinions, ref_uns = _second_opinion(
        adata, counts, expr, mk, clusters, lin, ref, settings.cluster_weight, params
    )
    subs = call_subsets(expr, lin, mk, vocab, clusters, counts, adata.var_names, params)
    cell_type, q_sub, rep_sub, sub_source = subs.cell_type, subs.quality, subs.report, subs.clusters
    opinions.update(_gate_columns(subs.gate_sides, mk))
    opinions["annotation_subset_source"] = pd.Categorical(
        subs.source, categories=list(SUBSET_SOURCES)
    )
    conf = np.where(lin.call == UNASSIGNED, 0.0, lin.quality * (0.5 + 0.5 * q_sub))
    coverage = lineage_coverage(lin.report, [s["target"] for s in mk["lineage_sets"]])
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
        "reference": ref_uns,
        "gates": {
            name: pd.Series(side).value_counts().to_dict()  # None (outside the lineage) is dropped
            for name, side in subs.gate_sides.items()
        },
    }
    _write_annotation(adata, prefix, vocab, lin, cell_type, conf, uns, opinions)
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


def _reference(
    setting: str | None, profiles: ReferenceProfiles | None, organism: str
) -> ReferenceProfiles | None:
    """The reference of the second opinion: ``profiles`` when given, else the setting
    (``"builtin"``: the packaged human PBMC profiles; a path; ``None``: none). The packaged
    reference is human: mouse data get no second opinion (said in the log)."""
    if profiles is not None:
        return profiles
    if setting is None:
        return None
    if setting == "builtin":
        if organism != "human":
            logger.warning(
                "the packaged reference profiles are human PBMC: no second opinion for %s "
                "data (marker calls only; annotation_agreement 'no_reference'). Set "
                "annotation.reference_profiles to a %s reference file to get one.",
                organism,
                organism,
            )
            return None
        return load_reference()
    return load_reference(setting)


def _second_opinion(
    adata: AnnData,
    counts: CountSource,
    expr: MarkerExpression,
    mk: dict[str, Any],
    clusters: Clusters,
    lin: LineageCalls,
    ref: ReferenceProfiles | None,
    cluster_weight: float,
    p: dict[str, Any],
) -> tuple[LineageCalls, dict[str, Any], dict[str, Any]]:
    """Specific evidence for the marker calls, the reference classifier per cell and per
    cluster, and their consensus (issue #32): the final lineage calls, the ``obs`` columns
    of both opinions and the ``uns`` record (with the agreement table)."""
    n = adata.n_obs
    marker_call = lin.call.copy()
    opinions: dict[str, Any] = {
        "annotation_marker_lineage": pd.Categorical(marker_call),
        "annotation_agreement": pd.Categorical(
            np.full(n, "no_reference", dtype=object), categories=list(AGREEMENT_LEVELS)
        ),
    }
    if ref is None:
        return lin, opinions, {"used": False}
    ev = pairwise_evidence(
        expr,
        mk,
        ref,
        clusters,
        cluster_weight=cluster_weight,
        min_lfc=p["specific_min_lfc"],
    )
    names = current_symbols(adata.var_names, mk.get("organism", "human"))
    try:
        cell, group = classify(counts, names, ref, groups=clusters.codes)
    except ValueError as err:
        logger.warning("no reference opinion: %s", err)
        return lin, opinions, {"used": False, "reason": str(err)}
    marker_after = lin.call.copy()
    marker_source = lin.source.copy()
    cons = combine(
        lin,
        cell,
        ev,
        min_delta=p["reference_min_delta"],
        disagree_margin=p["disagree_margin"],
    )
    opinions.update(
        annotation_reference_label=pd.Categorical(cell.label),
        annotation_reference_lineage=pd.Categorical(cell.lineage),
        annotation_reference_score=cell.score.astype(np.float32),
        annotation_reference_margin=np.asarray(cell.lineage_delta, dtype=np.float32),
        annotation_agreement=pd.Categorical(cons.agreement, categories=list(AGREEMENT_LEVELS)),
    )
    final, classifier = cons.lin, None
    if p["third_opinion_min_probability"] is not None:
        arb = arbitrate(
            counts,
            cons.lin,
            marker_after,
            cell.lineage.astype(object),
            cons.agreement,
            marker_ambiguous=marker_source == "markers:unassigned_ambiguous",
            min_probability=p["third_opinion_min_probability"],
            seed=p["seed"],
        )
        final, classifier = arb.lin, arb.record
        opinions.update(
            annotation_classifier_lineage=pd.Categorical(arb.label),
            annotation_classifier_probability=arb.probability,
        )
    table = agreement_table(marker_after, cell.label, final.call, cons.agreement)
    ref_uns: dict[str, Any] = {
        "used": True,
        "labels": list(cell.labels),
        "n_genes": int(cell.n_genes),
        "profiles": list(ref.profiles.columns),
        "agreement": {c: table[c].to_numpy() for c in table.columns},
    }
    if group is not None:
        ref_uns["clusters"] = {
            "cluster": np.asarray(pd.Categorical(clusters.labels).categories.astype(str)),
            "label": group.label.astype(str),
            "delta": group.delta.astype(np.float64),
        }
    if ev is not None:
        pairs = ev.table()
        ref_uns["specific_genes"] = {c: pairs[c].to_numpy() for c in pairs.columns}
    if classifier is not None:
        ref_uns["classifier"] = classifier
    return final, opinions, ref_uns


def _log_coverage(coverage: pd.DataFrame) -> None:
    low = coverage[(coverage["lineage"] != UNASSIGNED) & (coverage["best_coverage"] < 0.5)]
    if len(low):
        logger.warning(
            "marker coverage below 50%% for lineages %s (scores down-weighted, not skipped)",
            ", ".join(f"{r.lineage} {r.best_coverage:.0%}" for r in low.itertuples()),
        )
