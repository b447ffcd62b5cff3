"""Reference-based labels with a local CellTypist model, and the agreement of two annotations.

* :func:`annotate_celltypist`: CellTypist with a model file given by path (no downloads),
  majority voting optional;
* :func:`label_lineages`: the lineage of any label (vocabulary label, lineage name,
  ``label_map`` or keyword rules for common CellTypist / Azimuth / author names), used by
  CellTypist, scANVI transfer (:mod:`sepsis_sc.annotate.reference`) and the agreement table;
* :func:`label_summary`: cells and mean probability per transferred label;
* :func:`annotation_agreement`: lineage-level accuracy and per-label confusion of two
  ``obs`` columns.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from sepsis_sc.annotate.markers import UNASSIGNED, Vocabulary, load_vocabulary
from sepsis_sc.data import counts_csr, log_normalise

logger = logging.getLogger(__name__)

__all__ = ["annotate_celltypist", "annotation_agreement", "label_lineages", "label_summary"]

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


def label_lineages(
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
    lineages = label_lineages(labels, vocab, label_map)
    adata.obs[f"{key_added}_label"] = pd.Categorical(labels)
    adata.obs[f"{key_added}_probability"] = prob.astype(np.float32)
    adata.obs[f"{key_added}_lineage"] = pd.Categorical(lineages)
    summary = label_summary(labels, lineages, prob)
    logger.info(
        "CellTypist model %s: %d labels over %d cells", model_path.name, len(summary), adata.n_obs
    )
    return summary


def label_summary(labels: pd.Series, lineages: pd.Series, prob: np.ndarray) -> pd.DataFrame:
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
    lin_a = label_lineages(a, vocab, label_map)
    lin_b = label_lineages(b, vocab, label_map)
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
