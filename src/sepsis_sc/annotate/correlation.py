"""The whole-transcriptome second opinion: a SingleR-style correlation classifier (issue #32).

A :class:`ReferenceProfiles` holds, for each reference label (``CD4 T``, ``NK``, ``Classical
monocyte`` ...), mean log1p(CP10k) profiles per source data set (up to four per label and
source, k-means groups of its cells, as SingleR's ``aggregateReference``) over ~1,000 genes,
and for each ordered pair of labels the genes higher in the first (the pairwise markers of
SingleR's ``de`` method). :func:`build_reference` makes one from labelled AnnData objects
(``benchmarks/annotation_reference.py`` rebuilds the packaged file); :func:`load_reference`
reads the packaged ``resources/annotation/human_pbmc_reference.tsv.gz`` or a user's file.

:func:`classify` scores every cell (and every cluster's pseudo-bulk) as SingleR does
(Aran et al. 2019, Nat Immunol, DOI 10.1038/s41590-018-0276-y): the Spearman correlation of
the cell's counts with each profile over the union of the pairwise markers present in the
data (a label's score is the best of its profiles), then fine-tuning: the labels within
``tune_tol`` of the best are scored again on the markers among themselves only, until one is
left. Ranks ignore library size, so the counts are read as they are, in row chunks of a
:class:`sepsis_sc.store.CountSource` (never the whole matrix).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import rankdata

from sepsis_sc.store import CountSource

logger = logging.getLogger(__name__)

__all__ = [
    "ReferenceProfiles",
    "build_reference",
    "load_reference",
    "save_reference",
    "classify",
    "Opinion",
    "REFERENCE_FILE",
]

_TECHNICAL = r"^(RP[SL]\d|RPLP|MRP[SL]\d|MT-|MALAT1$|NEAT1$)"

#: the packaged reference (human PBMC; built by benchmarks/annotation_reference.py)
REFERENCE_FILE = ("annotation", "human_pbmc_reference.tsv.gz")


@dataclass
class ReferenceProfiles:
    """Reference profiles (genes x profiles, mean log1p CP10k), the label and source of each
    profile, the lineage of each label and the pairwise marker genes."""

    profiles: pd.DataFrame
    labels: list[str]
    sources: list[str]
    lineage: dict[str, str]
    markers: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    @property
    def label_set(self) -> list[str]:
        return list(dict.fromkeys(self.labels))

    def lineages(self) -> set[str]:
        return set(self.lineage.values())

    def without(self, source: str) -> ReferenceProfiles:
        """The reference minus the profiles of one source (leave-one-data-set-out)."""
        keep = [s != source for s in self.sources]
        prof = self.profiles.loc[:, keep]
        labels = [lab for lab, k in zip(self.labels, keep, strict=True) if k]
        sources = [s for s, k in zip(self.sources, keep, strict=True) if k]
        lineage = {lab: self.lineage[lab] for lab in dict.fromkeys(labels)}
        return _with_markers(prof, labels, sources, lineage)

    def lineage_profiles(self, how: str = "mean") -> pd.DataFrame:
        """Genes x lineages: the mean (or ``"max"``) of each lineage's profiles, over its
        labels and sources (NaN where no profile measured the gene)."""
        cols = {}
        for lin in dict.fromkeys(self.lineage.values()):
            idx = [i for i, lab in enumerate(self.labels) if self.lineage[lab] == lin]
            sub = self.profiles.iloc[:, idx]
            cols[lin] = sub.max(axis=1) if how == "max" else sub.mean(axis=1)
        return pd.DataFrame(cols)


def _pairwise_markers(
    profiles: pd.DataFrame, labels: Sequence[str], sources: Sequence[str], n_top: int
) -> dict[tuple[str, str], list[str]]:
    """For each ordered label pair (a, b): the ``n_top`` genes most higher in a than in b,
    the difference averaged over the sources that hold both (a gene must be higher in every
    one of them), at least 0.5 log units."""
    uniq = list(dict.fromkeys(labels))
    per: dict[str, dict[str, pd.Series]] = {}
    for lab in uniq:
        by_src: dict[str, list[int]] = {}
        for i, (lb, s) in enumerate(zip(labels, sources, strict=True)):
            if lb == lab:
                by_src.setdefault(s, []).append(i)
        per[lab] = {s: profiles.iloc[:, idx].mean(axis=1) for s, idx in by_src.items()}
    pooled = {lab: pd.concat(list(per[lab].values()), axis=1).mean(axis=1) for lab in uniq}
    out: dict[tuple[str, str], list[str]] = {}
    for a in uniq:
        for b in uniq:
            if a == b:
                continue
            shared = sorted(set(per[a]) & set(per[b]))
            if shared:
                diffs = pd.concat([per[a][s] - per[b][s] for s in shared], axis=1)
                d = diffs.mean(axis=1).where(diffs.min(axis=1) > 0, -np.inf)
            else:  # no source holds both: the pooled profiles
                d = pooled[a] - pooled[b]
            d = d[d >= 0.5].sort_values(ascending=False)
            out[(a, b)] = list(d.index[:n_top])
    return out


def _with_markers(
    prof: pd.DataFrame,
    labels: list[str],
    sources: list[str],
    lineage: dict[str, str],
    n_top: int | None = None,
) -> ReferenceProfiles:
    n = len(dict.fromkeys(labels))
    if n_top is None:  # SingleR's de.n default: 500 * (2/3) ** log2(n labels)
        n_top = int(round(500 * (2 / 3) ** np.log2(max(n, 2))))
    markers = _pairwise_markers(prof, labels, sources, n_top)
    return ReferenceProfiles(prof, list(labels), list(sources), dict(lineage), markers)


def build_reference(
    sets: Mapping[str, tuple[sp.spmatrix | np.ndarray, Sequence[str], Sequence[str]]],
    lineage: Mapping[str, str],
    *,
    min_cells: int = 10,
    n_top: int | None = None,
    keep_genes: Sequence[str] = (),
    max_profiles: int = 4,
    cells_per_profile: int = 40,
    seed: int = 0,
) -> ReferenceProfiles:
    """Reference profiles from labelled count matrices.

    Parameters
    ----------
    sets
        Source name -> ``(counts, var_names, labels)``: raw counts (cells x genes), gene
        symbols (current HGNC; map old ones first), one label per cell (``"none"`` = skip).
    lineage
        Label -> lineage (vocabulary lineages); labels not in it are skipped.
    min_cells
        Labels with fewer cells in a source get no profile from it.
    n_top
        Pairwise markers kept per label pair (default SingleR's ``500 * (2/3) ** log2(n)``).
    keep_genes
        Genes stored even when no pair selects them (e.g. the marker sets' genes, whose
        specificity the marker route reads from the reference).
    max_profiles, cells_per_profile, seed
        Each label of a source is split by k-means (on a PCA of its cells) into up to
        ``max_profiles`` groups of at least ``cells_per_profile`` cells on average, one
        profile each (SingleR's ``aggregateReference``): a label's mean hides its states
        (cytotoxic effector CD8 T cells inside "CD8 T").
    """
    from sepsis_sc.data import log_normalise

    cols, labels, sources = [], [], []
    for src, (counts, var_names, labs) in sets.items():
        names = pd.Index(var_names).astype(str)
        keep = ~names.duplicated()
        X = log_normalise(sp.csr_matrix(counts, dtype=np.float32))[:, np.flatnonzero(keep)]
        labs = np.asarray(labs, dtype=object)
        for lab in dict.fromkeys(labs):
            rows = np.flatnonzero(labs == lab)
            if lab not in lineage or rows.size < min_cells:
                continue
            for part in _subprofiles(X[rows], max_profiles, cells_per_profile, seed):
                mean = np.asarray(X[rows[part]].mean(axis=0)).ravel()
                cols.append(pd.Series(mean, index=names[keep]))
                labels.append(str(lab))
                sources.append(str(src))
    if not cols:
        raise ValueError("no label has enough cells to build a reference.")
    prof = pd.concat(cols, axis=1)  # NaN: a gene the source data set does not hold
    # ribosomal and mitochondrial genes: their share follows chemistry, depth and QC, not
    # the cell type, and they would dominate the pairwise markers of similar profiles
    prof = prof.loc[~prof.index.str.match(_TECHNICAL)]
    seen: dict[tuple[str, str], int] = {}
    names_out = []
    for lab, src in zip(labels, sources, strict=True):
        seen[(lab, src)] = seen.get((lab, src), 0) + 1
        names_out.append(f"{lab}|{src}|{seen[(lab, src)]}")
    prof.columns = names_out
    full = _with_markers(prof, labels, sources, {lab: lineage[lab] for lab in labels}, n_top)
    genes = sorted({g for v in full.markers.values() for g in v} | set(keep_genes))
    genes = [g for g in genes if g in prof.index]
    out = _with_markers(prof.loc[genes], labels, sources, full.lineage, n_top)
    out.markers = full.markers  # chosen on all genes
    return out


def _subprofiles(
    X: sp.csr_matrix, max_profiles: int, cells_per_profile: int, seed: int
) -> list[np.ndarray]:
    """Row groups of one label's cells: k-means on a PCA of its 1,000 most variable genes,
    ``k = min(max_profiles, n // cells_per_profile)`` (one group below that)."""
    n = X.shape[0]
    k = int(min(max_profiles, n // max(cells_per_profile, 1)))
    if k <= 1:
        return [np.arange(n)]
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    var = np.asarray(X.power(2).mean(axis=0)).ravel() - np.asarray(X.mean(axis=0)).ravel() ** 2
    top = np.argsort(-var)[: min(1000, X.shape[1])]
    dense = X[:, top].toarray()
    pcs = PCA(n_components=min(20, n - 1, top.size), random_state=seed).fit_transform(dense)
    groups = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(pcs)
    return [np.flatnonzero(groups == g) for g in range(k) if (groups == g).sum() >= 5]


def save_reference(ref: ReferenceProfiles, path: str | PathLike[str]) -> None:
    """Write the profiles as a gzipped TSV (genes x ``label|source|k``; lineage in a header
    row; empty = a gene the source did not hold); pairwise markers are recomputed on load."""
    df = ref.profiles.round(4)
    header = pd.DataFrame([[ref.lineage[lab] for lab in ref.labels]], columns=df.columns)
    header.index = ["#lineage"]
    pd.concat([header, df.astype(object)]).to_csv(path, sep="\t", index_label="gene")


def load_reference(
    path: str | PathLike[str] | None = None, *, n_top: int | None = None
) -> ReferenceProfiles:
    """Load reference profiles (default: the packaged human PBMC reference)."""
    from sepsis_sc.resources import resource_dir

    path = Path(path) if path is not None else resource_dir().joinpath(*REFERENCE_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference profiles {path} not found (rebuild the packaged one with "
            "benchmarks/annotation_reference.py)."
        )
    raw = pd.read_csv(path, sep="\t", index_col=0, dtype=str)
    lin_row = raw.loc["#lineage"]
    prof = raw.drop(index="#lineage").astype(np.float64)
    labels = [c.split("|", 1)[0] for c in prof.columns]
    sources = [c.split("|")[1] if "|" in c else "ref" for c in prof.columns]
    lineage = {lab: str(lin_row[c]) for lab, c in zip(labels, prof.columns, strict=True)}
    return _with_markers(prof, labels, sources, lineage, n_top)


def _spearman_rows(M: np.ndarray) -> np.ndarray:
    """Rows ranked (ties averaged), centred and scaled to unit norm (NaN-free)."""
    R = rankdata(M, axis=1).astype(np.float64)
    R -= R.mean(axis=1, keepdims=True)
    norm = np.sqrt((R * R).sum(axis=1, keepdims=True))
    return np.divide(R, norm, out=np.zeros_like(R), where=norm > 0)


@dataclass
class Opinion:
    """Per cell (or group): best label, its lineage, its score (fine-tuned correlation),
    the margin over the runner-up of the last round (``delta``; between CD4 and CD8 T it
    says little about the lineage), the first-round correlation of every label (``scores``,
    cells x labels) and ``lineage_delta``: the best first-round correlation of the chosen
    lineage's labels minus that of any other lineage's (the lineage call's margin)."""

    label: np.ndarray
    lineage: np.ndarray
    score: np.ndarray
    delta: np.ndarray
    scores: np.ndarray
    labels: list[str]
    n_genes: int
    known: list[str] = field(default_factory=list)  # the reference's lineages
    lineage_delta: np.ndarray | None = None  # best label of the lineage over other lineages


def _lineage_delta(
    S: np.ndarray, labels: np.ndarray, ref: ReferenceProfiles, uniq: list[str]
) -> np.ndarray:
    lin_of = np.array([ref.lineage[lab] for lab in uniq], dtype=object)
    chosen = np.array([ref.lineage[lab] for lab in labels], dtype=object)
    out = np.zeros(S.shape[0])
    for lin in dict.fromkeys(lin_of):
        rows = chosen == lin
        if not rows.any():
            continue
        own = S[np.ix_(rows, lin_of == lin)].max(axis=1)
        other = S[np.ix_(rows, lin_of != lin)]
        out[rows] = own - (other.max(axis=1) if other.shape[1] else -1.0)
    return out


def _label_scores(C: np.ndarray, ref_labels: Sequence[str], uniq: Sequence[str]) -> np.ndarray:
    out = np.full((C.shape[0], len(uniq)), -np.inf)
    for k, lab in enumerate(uniq):
        cols = [i for i, lb in enumerate(ref_labels) if lb == lab]
        out[:, k] = C[:, cols].max(axis=1)
    return out


def _score(X: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Spearman correlations, cells (rows of X) x profiles (columns of P), each profile over
    the genes it measured (NaN = a gene its source data set did not hold)."""
    out = np.zeros((X.shape[0], P.shape[1]))
    measured = ~np.isnan(P)
    patterns: dict[bytes, list[int]] = {}
    for j in range(P.shape[1]):
        patterns.setdefault(np.packbits(measured[:, j]).tobytes(), []).append(j)
    for cols in patterns.values():
        g = measured[:, cols[0]]
        if g.sum() < 3:
            continue
        out[:, cols] = _spearman_rows(X[:, g]) @ _spearman_rows(P[np.ix_(g, cols)].T).T
    return out


def _fine_tune(
    X: np.ndarray,
    S: np.ndarray,
    ref: ReferenceProfiles,
    genes: pd.Index,
    uniq: list[str],
    tol: float,
    max_rounds: int = 10,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SingleR fine-tuning: the labels within ``tol`` of the best are scored again on the
    markers among themselves only, until one is left or none drops out (then the best).
    Cells with the same candidates are scored together. Returns the best label (index),
    its correlation and its margin over the runner-up, both of the last round."""
    n = X.shape[0]
    srt = np.sort(S, axis=1)
    score = srt[:, -1].copy()
    delta = srt[:, -1] - srt[:, -2] if S.shape[1] > 1 else np.ones(n)
    best = S.argmax(axis=1)
    cand = S >= (score - tol)[:, None]
    done = cand.sum(axis=1) <= 1
    gene_pos = {g: i for i, g in enumerate(genes)}
    for _ in range(max_rounds):
        todo = np.flatnonzero(~done)
        if not todo.size:
            break
        by_key: dict[tuple[int, ...], list[int]] = {}
        for i in todo:
            by_key.setdefault(tuple(np.flatnonzero(cand[i])), []).append(i)
        for key, rows_l in by_key.items():
            rows = np.asarray(rows_l)
            labs = [uniq[k] for k in key]
            g = sorted(
                {
                    gene_pos[x]
                    for a in labs
                    for b in labs
                    if a != b
                    for x in ref.markers.get((a, b), [])
                    if x in gene_pos
                }
            )
            if len(g) < 5:  # no markers among them: the first round decides
                done[rows] = True
                continue
            pcols = [i for i, lb in enumerate(ref.labels) if lb in labs]
            P = ref.profiles.reindex(genes[g]).to_numpy()[:, pcols]
            C = _label_scores(_score(X[np.ix_(rows, g)], P), [ref.labels[i] for i in pcols], labs)
            srt_c = np.sort(C, axis=1)
            best[rows] = np.asarray(key)[C.argmax(axis=1)]
            score[rows] = srt_c[:, -1]
            delta[rows] = srt_c[:, -1] - srt_c[:, -2]
            keep = C >= (srt_c[:, -1] - tol)[:, None]
            n_keep = keep.sum(axis=1)
            done[rows[(n_keep == 1) | (n_keep == len(key))]] = True
            sub = np.zeros((rows.size, len(uniq)), dtype=bool)
            sub[:, list(key)] = keep
            cand[rows] = sub
    return best, score, delta


def classify(
    counts: CountSource,
    var_names: pd.Index,
    ref: ReferenceProfiles,
    *,
    groups: np.ndarray | None = None,
    tune_tol: float = 0.05,
    chunk_rows: int = 5000,
    min_genes: int = 50,
) -> tuple[Opinion, Opinion | None]:
    """SingleR-style labels per cell, and per group (cluster pseudo-bulk) when ``groups``.

    Parameters
    ----------
    counts
        Raw counts (cells x genes) with gene symbols ``var_names`` (current symbols: map old
        ones with :func:`sepsis_sc.annotate.markers.current_symbols` first).
    ref
        The reference (:func:`load_reference`).
    groups
        Integer codes (one per cell, -1 = none) of the groups to classify as pseudo-bulks.
    tune_tol
        Labels within this correlation of the best are fine-tuned (SingleR: 0.05).
    chunk_rows
        Cells read per chunk.
    min_genes
        Fewer reference genes in the data: ``ValueError`` (no opinion is possible).
    """
    names = pd.Index(var_names).astype(str)
    # genes every profile measured: correlations over one gene set stay comparable
    complete = ref.profiles.index[ref.profiles.notna().all(axis=1)]
    in_data = ~names.duplicated() & names.isin(complete)
    genes = names[in_data]
    if genes.size < min_genes:
        raise ValueError(
            f"only {genes.size} of the reference's {ref.profiles.shape[0]} genes are in the "
            f"data (need {min_genes}): no reference opinion."
        )
    P = ref.profiles.reindex(genes).to_numpy()
    uniq = ref.label_set
    parts = []
    gsum = None
    if groups is not None:
        n_groups = int(groups.max()) + 1 if groups.size and groups.max() >= 0 else 0
        gsum = np.zeros((n_groups, genes.size))
        gtot = np.zeros(n_groups)
    for start, stop, chunk in counts.chunks(chunk_rows, genes=in_data):
        X = chunk.toarray().astype(np.float64)
        S = _label_scores(_score(X, P), ref.labels, uniq)
        best, top, delta = _fine_tune(X, S, ref, genes, uniq, tune_tol)
        parts.append((best, top, delta, S))
        if gsum is not None:
            g = groups[start:stop]
            ok = g >= 0
            np.add.at(gsum, g[ok], X[ok])
            np.add.at(gtot, g[ok], 1)

    def opinion(best: np.ndarray, top: np.ndarray, delta: np.ndarray, S: np.ndarray) -> Opinion:
        labels = np.array(uniq, dtype=object)[best]
        lineages = np.array([ref.lineage[x] for x in labels], dtype=object)
        lin_delta = _lineage_delta(S, labels, ref, uniq)
        known = sorted(ref.lineages())
        return Opinion(labels, lineages, top, delta, S, uniq, int(genes.size), known, lin_delta)

    cell = opinion(*(np.concatenate([p[i] for p in parts]) for i in range(4)))
    group = None
    if gsum is not None and gsum.shape[0]:
        Xg = np.log1p(gsum / np.maximum(gsum.sum(axis=1, keepdims=True), 1) * 1e4)
        Sg = _label_scores(_score(Xg, P), ref.labels, uniq)
        group = opinion(*_fine_tune(Xg, Sg, ref, genes, uniq, tune_tol), Sg)
    logger.info(
        "reference opinion: %d cells on %d of %d reference genes, %d labels",
        cell.label.size,
        genes.size,
        ref.profiles.shape[0],
        len(uniq),
    )
    return cell, group
