"""Per-sample scores of the therapy axes: :func:`axis_scores` (the sample-level value that is
tested) and :func:`liana_by_sample` (LIANA+'s rank aggregate per sample, for context).

The axis score of a sample is LIANA's ``lr_means`` (the CellPhoneDB statistic: the mean of
the ligand's mean expression in the source cells and the receptor's in the target cells; a
complex counts by its least expressed subunit) computed on the sample's log-normalised
expression with all cells of the axis's source populations pooled, and likewise its targets,
averaged over the axis's pairs. Pooling follows the axis (e.g. every monocyte, neutrophil and
DC as the PD-L1 source) rather than LIANA's one-cell-type-to-one-cell-type rows, so a sample
has one value per axis and the value does not depend on how finely the annotation splits a
lineage. A sample with fewer than ``min_cells`` source or target cells gets NA.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sepsis_sc.ccc.axes import axis_genes, axis_pairs, load_axes
from sepsis_sc.config import CCCSettings

__all__ = [
    "axis_scores",
    "liana_by_sample",
    "add_liana_ranks",
    "resource_genes",
    "population_mask",
    "SCORE_COLUMNS",
    "READOUT_PREFIX",
]

logger = logging.getLogger(__name__)

#: readout names of the axes in patient profiles: ``axis_<name>``
READOUT_PREFIX = "axis_"

#: columns of :func:`axis_scores`
SCORE_COLUMNS = [
    "sample_id",
    "axis",
    "label",
    "readout",
    "value",
    "ligand_mean",
    "receptor_mean",
    "n_source",
    "n_target",
    "n_cells",
    "note",
]


def population_mask(
    obs: pd.DataFrame, populations: Sequence[str], label_keys: Sequence[str]
) -> np.ndarray:
    """Cells whose label in any of ``label_keys`` (e.g. ``cell_type``, ``lineage``) is one
    of ``populations``."""
    mask = np.zeros(len(obs), dtype=bool)
    pops = {str(p) for p in populations}
    for key in label_keys:
        if key in obs:
            mask |= obs[key].astype(str).isin(pops).to_numpy()
    return mask


def _gene_means(x: Any, rows: np.ndarray) -> np.ndarray:
    """Column means of ``x`` over the ``rows`` mask."""
    sub = x[rows]
    m = sub.mean(axis=0)
    return np.asarray(m).ravel()


def _complex_mean(means: Mapping[str, float], name: str) -> float:
    """A complex's mean: its least expressed subunit (NaN when a subunit is absent)."""
    vals = [means.get(g, np.nan) for g in name.split("_")]
    return float(np.min(vals)) if all(np.isfinite(vals)) else np.nan


def axis_scores(
    adata: ad.AnnData,
    settings: CCCSettings | None = None,
    *,
    axes: Mapping[str, Any] | str | None = None,
    organism: str = "human",
    sample_key: str = "sample_id",
    label_keys: Sequence[str] = ("cell_type", "lineage"),
    **overrides: Any,
) -> pd.DataFrame:
    """Per sample x axis: the axis score (``value``, LIANA's ``lr_means`` on pooled source and
    target cells; module docstring) with its ligand and receptor sides.

    ``adata.X`` must hold log-normalised expression of (at least) the axes' genes
    (:func:`sepsis_sc.ccc.axis_genes`; the workflow reads only those from the file).
    ``settings`` is the config's ``ccc`` section (:class:`~sepsis_sc.config.CCCSettings`);
    used here: ``min_cells`` and ``axes_file`` (when ``axes`` is not given).

    Returns
    -------
    pandas.DataFrame
        :data:`SCORE_COLUMNS`: ``readout`` is ``axis_<name>`` (patient profiles);
        ``n_cells`` the smaller of ``n_source`` and ``n_target``; ``note`` why a value is NA.
    """
    settings = (settings or CCCSettings()).with_overrides(overrides)
    axes = load_axes(axes if axes is not None else settings.axes_file)
    if adata.X is None:
        raise ValueError("axis_scores needs log-normalised expression in adata.X")
    names = pd.Index(adata.var_names.astype(str))
    cols = names.get_indexer([g for g in axis_genes(axes, organism) if g in names])
    x = adata.X[:, cols]  # the axes' genes only
    x = x.tocsr() if sp.issparse(x) else np.asarray(x)
    genes = names[cols]
    samples = adata.obs[sample_key].astype(str).to_numpy()
    masks = {
        name: (
            population_mask(adata.obs, a["source"], label_keys),
            population_mask(adata.obs, a["target"], label_keys),
        )
        for name, a in axes.items()
    }
    rows = []
    for sid in dict.fromkeys(samples):
        in_sample = samples == sid
        for name, a in axes.items():
            src, tgt = masks[name][0] & in_sample, masks[name][1] & in_sample
            rows.append(_score_row(x, genes, sid, name, a, src, tgt, organism, settings))
    out = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    logger.info(
        "%d axes scored in %d samples (%d sample x axis values NA)",
        len(axes),
        len(set(samples)),
        int(out["value"].isna().sum()),
    )
    return out


def _score_row(
    x: Any,
    genes: pd.Index,
    sid: str,
    name: str,
    axis: Mapping[str, Any],
    src: np.ndarray,
    tgt: np.ndarray,
    organism: str,
    settings: CCCSettings,
) -> dict[str, Any]:
    """One sample x axis row of :func:`axis_scores`."""
    n_src, n_tgt = int(src.sum()), int(tgt.sum())
    row = {
        "sample_id": sid,
        "axis": name,
        "label": axis["label"],
        "readout": READOUT_PREFIX + name,
        "value": np.nan,
        "ligand_mean": np.nan,
        "receptor_mean": np.nan,
        "n_source": n_src,
        "n_target": n_tgt,
        "n_cells": min(n_src, n_tgt),
        "note": "",
    }
    if min(n_src, n_tgt) < settings.min_cells:
        row["note"] = f"fewer than {settings.min_cells} source or target cells"
        return row
    pairs = axis_pairs(axis, organism)
    src_means = dict(zip(genes, _gene_means(x, src), strict=True))
    tgt_means = dict(zip(genes, _gene_means(x, tgt), strict=True))
    lig = np.array([_complex_mean(src_means, lg) for lg, _ in pairs])
    rec = np.array([_complex_mean(tgt_means, rc) for _, rc in pairs])
    ok = np.isfinite(lig) & np.isfinite(rec)
    if not ok.any():
        row["note"] = "genes of the axis absent from the data"
        return row
    row["ligand_mean"] = float(lig[ok].mean())
    row["receptor_mean"] = float(rec[ok].mean())
    row["value"] = float(((lig[ok] + rec[ok]) / 2).mean())
    return row


def _resource_name(settings: CCCSettings, organism: str) -> str:
    """The LIANA resource of the run: the setting, its mouse version for mouse data."""
    if organism == "mouse" and settings.resource == "consensus":
        return "mouseconsensus"
    return settings.resource


def resource_genes(settings: CCCSettings | None = None, *, organism: str = "human") -> list[str]:
    """Every gene (complex subunit) of the LIANA resource :func:`liana_by_sample` ranks (the
    genes the workflow reads from the file when ``liana`` is on)."""
    import liana as li

    res = li.resource.select_resource(_resource_name(settings or CCCSettings(), organism))
    return sorted({g for c in ("ligand", "receptor") for x in res[c] for g in str(x).split("_")})


def liana_by_sample(
    adata: ad.AnnData,
    settings: CCCSettings | None = None,
    *,
    axes: Mapping[str, Any] | str | None = None,
    organism: str = "human",
    sample_key: str = "sample_id",
    groupby: str = "cell_type",
    label_keys: Sequence[str] = ("cell_type", "lineage"),
    seed: int = 0,
    **overrides: Any,
) -> pd.DataFrame:
    """LIANA+'s rank aggregate (``li.mt.rank_aggregate``) on each sample's cells, every pair
    of its resource ranked, the rows of the axes' pairs kept.

    The same as ``rank_aggregate.by_sample`` but one sample at a time, so only one sample's
    results are held: per sample, cell types (``groupby``) with at least ``min_cells`` cells,
    ``expr_prop``, ``n_perms`` permutations, the bundled ``resource`` (``mouseconsensus`` for
    mouse), ``adata.X`` as log-normalised expression (``use_raw=False``). Kept: rows whose
    pair is an axis pair and whose source / target cell types lie in the axis's source /
    target populations.

    Returns
    -------
    pandas.DataFrame
        ``sample_id``, ``axis`` and LIANA's columns (``source``, ``target``,
        ``ligand_complex``, ``receptor_complex``, ``lr_means``, ``magnitude_rank``,
        ``specificity_rank``, ...); ``attrs["seconds"]``: each sample's LIANA time.
    """
    import liana as li

    settings = (settings or CCCSettings()).with_overrides(overrides)
    axes = load_axes(axes if axes is not None else settings.axes_file)
    resource = _resource_name(settings, organism)
    samples = adata.obs[sample_key].astype(str).to_numpy()
    wanted = {p: name for name, a in axes.items() for p in axis_pairs(a, organism)}
    types = {
        name: (
            set(adata.obs.loc[population_mask(adata.obs, a["source"], label_keys), groupby]),
            set(adata.obs.loc[population_mask(adata.obs, a["target"], label_keys), groupby]),
        )
        for name, a in axes.items()
    }
    out, seconds = [], {}
    for sid in dict.fromkeys(samples):
        sub = adata[samples == sid].copy()
        sub.obs[groupby] = sub.obs[groupby].astype(str).astype("category")
        if int((sub.obs[groupby].value_counts() >= settings.min_cells).sum()) < 2:
            logger.warning("LIANA skips sample %s: < 2 cell types with min_cells cells", sid)
            continue
        t0 = time.perf_counter()
        try:
            res = li.mt.rank_aggregate(
                sub,
                groupby=groupby,
                resource_name=resource,
                expr_prop=settings.expr_prop,
                min_cells=settings.min_cells,
                use_raw=False,
                n_perms=settings.n_perms,
                seed=seed,
                inplace=False,
                verbose=False,
            )
        except ValueError as err:  # e.g. fewer than two cell types with enough cells
            logger.warning("LIANA on sample %s: %s", sid, err)
            continue
        seconds[sid] = time.perf_counter() - t0
        pair = list(zip(res["ligand_complex"], res["receptor_complex"], strict=True))
        res["axis"] = [wanted.get(p, "") for p in pair]
        res = res[res["axis"] != ""]
        keep = np.array(
            [
                s in types[a][0] and t in types[a][1]
                for a, s, t in zip(res["axis"], res["source"], res["target"], strict=True)
            ],
            dtype=bool,
        )
        res = res.loc[keep].copy()
        res.insert(0, "sample_id", sid)
        out.append(res)
        logger.info("LIANA sample %s: %d cells, %.1f s", sid, sub.n_obs, seconds[sid])
    cols = ["sample_id", "axis"]
    if out:
        res = pd.concat(out, ignore_index=True)
        res = res[cols + [c for c in res.columns if c not in cols]]
    else:
        res = pd.DataFrame(columns=[*cols, "source", "target"])
    res.attrs["seconds"] = seconds
    return res


def add_liana_ranks(scores: pd.DataFrame, liana: pd.DataFrame | None) -> pd.DataFrame:
    """:func:`axis_scores` with each sample x axis's best LIANA ``magnitude_rank`` (and the
    ``specificity_rank`` and source -> target of that row) from :func:`liana_by_sample`."""
    out = scores.copy()
    for c in ("magnitude_rank", "specificity_rank", "best_pair"):
        out[c] = np.nan if c != "best_pair" else ""
    if liana is None or liana.empty:
        return out
    best = liana.sort_values("magnitude_rank").drop_duplicates(["sample_id", "axis"])
    best = best.set_index(["sample_id", "axis"])
    key = pd.MultiIndex.from_arrays([out["sample_id"], out["axis"]])
    hit = key.isin(best.index)
    sel = best.reindex(key[hit])
    out.loc[hit, "magnitude_rank"] = sel["magnitude_rank"].to_numpy(float)
    out.loc[hit, "specificity_rank"] = sel["specificity_rank"].to_numpy(float)
    out.loc[hit, "best_pair"] = (
        sel["source"].astype(str) + " -> " + sel["target"].astype(str)
    ).to_numpy()
    return out
