"""A third opinion where the marker route and the reference disagree (issue #32).

The two opinions of :mod:`sepsis_sc.annotate.consensus` settle most cells; what they leave
torn (``disagree``, ``reference_only``, Unassigned for ambiguous or weak evidence) are mostly
cells whose few marker UMIs cannot tell two close lineages apart: cytotoxic CD8 T cells vs NK
cells at 500-1,000 UMIs, where neither side's specific genes are detected. Neither a few
marker genes nor a reference from other data sets reads these cells well; the cells of the
same data set that both opinions agree on do. So, as Garnett does with its marker-chosen
representative cells (Pliner et al. 2019, Nat Methods 16:983), a multinomial logistic
regression over every gene detected in them (log1p CP10k, L2 penalty, balanced class
weights) is trained on the agreed cells of this data set and asked about the torn cells only.

Its answer is used only as the deciding vote between the two opinions already there: a torn
cell takes the classifier's lineage when that lineage is the marker lineage or the reference
lineage of the cell (two of three opinions), the probability reaches ``min_probability``, the
classifier knows the cell's current lineage (it was trained on it; a lineage too rare among
the agreed cells, a DC population of 20 cells, is never taken away), and the classifier
gives the agreed cells of that lineage back to it in cross-validation
(``min_recall``). Unassigned cells whose reason is
not weak evidence (decoys such as basophils, ``markers:unassigned_other_type``) stay so.
Without agreed cells (no reference opinion: mouse data, reference switched off) there is no
third opinion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sepsis_sc.annotate.lineage import LineageCalls
from sepsis_sc.annotate.markers import UNASSIGNED
from sepsis_sc.data import log_normalise
from sepsis_sc.store import CountSource

logger = logging.getLogger(__name__)

__all__ = ["Arbitration", "arbitrate", "ARBITER_SOURCE", "TORN_SOURCES"]

#: ``annotation_source`` of cells whose lineage the third opinion decided
ARBITER_SOURCE = "classifier:two_of_three"
#: the reasons for a cell's current call that leave it open to the third opinion
TORN_SOURCES = (
    "markers:unassigned_low_score",
    "markers:unassigned_ambiguous",
    "consensus:disagreement",
)


@dataclass
class Arbitration:
    """The calls after the third opinion (``lin``), its lineage and probability per cell
    (``None`` / NaN for cells it was not asked about) and the ``uns`` record."""

    lin: LineageCalls
    label: np.ndarray
    probability: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)


def _training_rows(
    labels: np.ndarray, rows: np.ndarray, min_train: int, max_per_class: int, seed: int
) -> tuple[np.ndarray, list[str]]:
    """Agreed cells of the lineages with at least ``min_train`` of them, at most
    ``max_per_class`` each (a seeded sample: an atlas trains on a bounded set)."""
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    classes: list[str] = []
    for lab in sorted(set(labels[rows])):
        r = rows[labels[rows] == lab]
        if r.size < min_train:
            continue
        if r.size > max_per_class:
            r = rng.choice(r, max_per_class, replace=False)
        keep.append(r)
        classes.append(str(lab))
    return (np.sort(np.concatenate(keep)) if keep else np.array([], dtype=int)), classes


def arbitrate(
    counts: CountSource,
    lin: LineageCalls,
    marker_lineage: np.ndarray,
    reference_lineage: np.ndarray,
    agreement: np.ndarray,
    *,
    marker_ambiguous: np.ndarray | None = None,
    min_probability: float = 0.8,
    min_recall: float = 0.9,
    min_train: int = 10,
    max_train_per_class: int = 2000,
    min_detection: float = 0.01,
    penalty_c: float = 0.1,
    seed: int = 0,
) -> Arbitration:
    """The third opinion (module docstring): train on the agreed cells of this data set,
    decide the torn cells where it sides with one of the two opinions.

    Parameters
    ----------
    counts
        Raw counts, the annotated cells x all genes.
    lin
        The consensus calls of the two opinions (:func:`sepsis_sc.annotate.combine`).
    marker_lineage, reference_lineage, agreement
        Per cell: the marker route's lineage, the reference's lineage and their agreement
        (``agree``, ``disagree`` ...).
    marker_ambiguous
        Per cell, whether the marker route left it Unassigned because its two best lineages
        were too close (``markers:unassigned_ambiguous``): its opinion is then "one of these
        two", and the classifier may side with either.
    min_probability
        Classifier probability needed to decide a torn cell.
    min_recall
        Share of a lineage's agreed cells the classifier gives back to it in 5-fold
        cross-validation that the lineage needs before any cell is moved to it (logged).
    min_train
        Agreed cells a lineage needs to be a class of the classifier.
    max_train_per_class
        Agreed cells per lineage the classifier is trained on at most (seeded sample).
    min_detection
        Genes detected in fewer than this share of the training cells are not read.
    penalty_c
        Inverse L2 penalty strength of the logistic regression.
    seed
        Seed of the training sample and the cross-validation folds.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    if min_train < 2:
        raise ValueError(f"min_train must be at least 2 (cross-validation), got {min_train}.")
    n = lin.call.size
    label = np.full(n, None, dtype=object)
    prob = np.full(n, np.nan, dtype=np.float32)
    call = lin.call.astype(object)
    agreed = np.flatnonzero((agreement == "agree") & (call != UNASSIGNED))
    train, classes = _training_rows(call, agreed, min_train, max_train_per_class, seed)
    record: dict[str, Any] = {"used": False, "classes": classes}
    torn = (agreement != "agree") & (
        np.isin(call, classes) | np.isin(lin.source.astype(object), TORN_SOURCES)
    )
    asked = np.flatnonzero(torn)
    if len(classes) < 2 or not asked.size:
        record["reason"] = (
            "fewer than two lineages with enough agreed cells"
            if len(classes) < 2
            else "no torn cells"
        )
        logger.info("third opinion not used: %s", record["reason"])
        return Arbitration(lin, label, prob, record)
    raw = counts.rows(train)
    genes = np.flatnonzero(np.asarray((raw > 0).mean(axis=0)).ravel() >= min_detection)
    x_train = log_normalise(raw, columns=genes, totals=counts.totals[train])
    y = call[train].astype(str)
    clf = LogisticRegression(C=penalty_c, max_iter=2000, class_weight="balanced")
    n_splits = max(2, min(5, min(int((y == c).sum()) for c in classes)))
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    cv = cross_val_predict(clf, x_train, y, cv=folds)
    recall = {c: float((cv[y == c] == c).mean()) for c in classes}
    trusted = [c for c in classes if recall[c] >= min_recall]
    clf.fit(x_train, y)
    record.update(
        n_train={c: int((y == c).sum()) for c in classes},
        cv_recall=recall,
        trusted=trusted,
        n_genes=int(genes.size),
        n_asked=int(asked.size),
    )
    if not trusted:
        record["reason"] = f"no lineage recalled at {min_recall} in cross-validation"
        logger.warning("third opinion not used: %s", record["reason"])
        return Arbitration(lin, label, prob, record)
    P = np.empty((asked.size, len(clf.classes_)), dtype=np.float64)
    step = 50_000
    for s in range(0, asked.size, step):
        rows = asked[s : s + step]
        x = log_normalise(counts.rows(rows), columns=genes, totals=counts.totals[rows])
        P[s : s + step] = clf.predict_proba(x)
    pred = clf.classes_[P.argmax(axis=1)].astype(object)
    pmax = P.max(axis=1)
    label[asked] = pred
    prob[asked] = pmax
    sides = (pred == marker_lineage[asked]) | (pred == reference_lineage[asked])
    if marker_ambiguous is not None and marker_ambiguous[asked].any():
        order = np.argsort(-lin.scores[asked], axis=1)[:, :2]
        two = np.asarray(lin.targets, dtype=object)[order]
        sides |= marker_ambiguous[asked] & ((pred == two[:, 0]) | (pred == two[:, -1]))
    take = asked[(pmax >= min_probability) & sides & (pred != call[asked]) & np.isin(pred, trusted)]
    new_call = call.copy()
    new_call[take] = label[take]
    source = lin.source.astype(object).copy()
    source[take] = ARBITER_SOURCE
    quality = lin.quality.astype(np.float64).copy()
    quality[take] = prob[take] / 2
    moves = (
        pd.DataFrame({"from": call[take].astype(str), "to": new_call[take].astype(str)})
        .value_counts(sort=False)
        .rename("n_cells")
        .reset_index()
    )
    record.update(
        used=True,
        n_decided=int(take.size),
        # column arrays: h5ad-writable
        moves={c: moves[c].to_numpy(dtype=object if c != "n_cells" else np.int64) for c in moves},
    )
    logger.info(
        "third opinion (classifier on %d agreed cells, %d genes; cross-validated recall %s): "
        "%d of %d torn cells decided",
        train.size,
        genes.size,
        ", ".join(f"{c} {r:.2f}" for c, r in recall.items()),
        take.size,
        asked.size,
    )
    out = LineageCalls(new_call, source, quality, lin.scores, lin.targets, lin.report)
    return Arbitration(out, label, prob, record)
