"""Published bulk-blood endotype scores (SRS, MARS, Sweeney) on whole-sample pseudobulk
(:func:`endotype_scores`), with caveats; no endotype is called (see ``endotypes.yaml``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from sepsis_sc import store
from sepsis_sc.patients.readouts import population_log2cpm
from sepsis_sc.resources import load_yaml, resource_path

__all__ = ["load_endotypes", "endotype_scores"]


def load_endotypes(path: str | Path | None = None) -> dict[str, Any]:
    """Load the endotype gene sets (default ``resources/endotypes.yaml``).

    Returns
    -------
    dict
        ``aliases`` (symbol -> older symbols) and ``endotypes`` (list of dicts with
        ``name``, ``kind``, ``up`` / ``down`` or ``pairs``, ``score``, ``call``, ``source``,
        ``marker``).
    """
    p = Path(path) if path is not None else resource_path("endotypes.yaml")
    raw = load_yaml(p)
    for e in raw["endotypes"]:
        for key in ("name", "kind", "source", "marker", "call"):
            if not e.get(key):
                raise ValueError(f"{p}: endotype {e.get('name')!r} has no {key!r}")
    return raw


def _resolve(gene: str, var: pd.Index, aliases: Mapping[str, Sequence[str]]) -> str | None:
    if gene in var:
        return gene
    return next((a for a in aliases.get(gene, ()) if a in var), None)


def endotype_scores(
    adata: ad.AnnData,
    *,
    sample_key: str = "sample_id",
    counts: store.CountSource | None = None,
    layer: str | None = "counts",
    endotypes: Mapping[str, Any] | None = None,
    min_cells: int = 10,
) -> pd.DataFrame:
    """Published bulk-blood endotype scores on whole-sample pseudobulk (all cells summed).

    Parameters
    ----------
    adata
        AnnData with raw counts in ``layers[layer]``.
    sample_key, layer, min_cells
        Sample column, count layer, minimum cells per sample.
    counts
        The raw counts (e.g. :meth:`sepsis_sc.store.FileCounts.matching`, streamed from the
        ``.h5ad``; ``adata`` then needs no matrix). None: ``adata``'s ``layer``.
    endotypes
        Output of :func:`load_endotypes` (default: the packaged file).

    Returns
    -------
    pandas.DataFrame
        ``sample_id``, ``endotype``, ``component`` (the score, or the MARS pair), ``score``,
        ``z`` (across samples; cohort-relative), ``genes_used``, ``genes_missing``,
        ``call`` (never an endotype here: why not), ``caveat``, ``source``, ``marker``.
        Scores: ``classifier`` = mean log2CPM(up) - mean log2CPM(down); ``pairs`` =
        log2CPM(up) - log2CPM(down) per pair; ``score`` (Sweeney) = geomMean(up) -
        (n_down/n_up) geomMean(down) of log2(CPM + 1). A component missing its up or down
        genes is NaN.
    """
    cfg = endotypes if endotypes is not None else load_endotypes()
    aliases = cfg.get("aliases", {})
    caveat = (
        "derived on whole-blood / leukocyte bulk transcriptomes; on single-cell pseudobulk "
        "(PBMC especially) scores are exploratory and composition-driven; read with the "
        "neutrophil share"
    )
    comps: list[tuple[dict, str, list[str], list[str]]] = []
    for e in cfg["endotypes"]:
        if e["kind"] == "pairs":
            for k, pr in e["pairs"].items():
                comps.append((e, k, [pr["up"]], [pr["down"]]))
        else:
            comps.append((e, e["name"], list(e.get("up") or []), list(e.get("down") or [])))
    var = pd.Index(adata.var_names)
    wanted = sorted(
        {
            g2
            for _, _, up, dn in comps
            for g in up + dn
            if (g2 := _resolve(g, var, aliases)) is not None
        }
    )
    allc = np.ones(adata.n_obs, bool)
    [(lc, _)] = population_log2cpm(
        adata,
        [(allc, wanted)],
        sample_key=sample_key,
        counts=counts,
        layer=layer,
        min_cells=min_cells,
    )
    rows = []
    for e, comp, up, dn in comps:
        upr = [g2 for g in up if (g2 := _resolve(g, var, aliases))]
        dnr = [g2 for g in dn if (g2 := _resolve(g, var, aliases))]
        miss = [g for g in up + dn if _resolve(g, var, aliases) is None]
        need_both = bool(up) and bool(dn)
        if not upr or (need_both and not dnr):
            score = pd.Series(np.nan, index=lc.index)
        elif e["kind"] == "score":

            def gm(genes: list[str]) -> pd.Series:
                return np.exp(np.log1p(lc[genes]).mean(axis=1)) - 1.0

            score = gm(upr) - ((len(dn) / len(up)) * gm(dnr) if dnr else 0.0)
        else:
            score = lc[upr].mean(axis=1) - (lc[dnr].mean(axis=1) if dnr else 0.0)
        sd = float(np.nanstd(score, ddof=1)) if np.isfinite(score).sum() > 1 else np.nan
        z = (score - np.nanmean(score)) / sd if sd and sd > 0 else score * np.nan
        for sid in lc.index:
            rows.append(
                {
                    "sample_id": sid,
                    "endotype": e["name"],
                    "component": comp,
                    "score": float(score[sid]),
                    "z": float(z[sid]),
                    "genes_used": ", ".join(upr + dnr),
                    "genes_missing": ", ".join(miss),
                    "call": " ".join(str(e["call"]).split()),
                    "caveat": caveat,
                    "source": e["source"],
                    "marker": e["marker"],
                }
            )
    return pd.DataFrame(rows)
