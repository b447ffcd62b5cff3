"""The per-sample QC driver :func:`run_qc`: its steps in order, the reasons and the record.

:func:`run_qc` chains the steps of the other modules of :mod:`sepsis_sc.qc` on one sample
(or each sample of ``obs[batch_key]``) and writes ``obs["qc_outlier"]`` (True = removed),
``obs["qc_reason"]`` (``"pass"`` or the semicolon-joined reasons such as
``"low_counts;low_genes"``, ``"high_mt"``, ``"doublet"``), ``uns["qc"]`` (the settings used,
thresholds, upper-tail cuts, summary) and a one-row-per-sample summary of what was removed
and why. :func:`primary_reason` picks the one reason a removed cell is counted under
(:data:`QC_REASONS` order).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from sepsis_sc.config import QCSettings
from sepsis_sc.data import get_counts
from sepsis_sc.qc.ambient import (
    LINEAGES,
    correct_counts,
    estimate_contamination,
    estimate_soup,
    first_pass_lineage,
    flag_soup_droplets,
)
from sepsis_sc.qc.blood import flag_platelet_monocyte, lineage_upper_flags
from sepsis_sc.qc.doublets import detect_doublets, expected_doublet_rate, sample_cells_loaded
from sepsis_sc.qc.metrics import qc_metrics, sample_ids
from sepsis_sc.qc.rescue import rescue_low_rna_immune
from sepsis_sc.qc.thresholds import adaptive_thresholds, add_reason, flag_outliers

logger = logging.getLogger(__name__)

__all__ = ["QC_REASONS", "run_qc", "primary_reason"]

#: removal reasons in the order used to attribute a cell to one reason in bar charts
QC_REASONS: tuple[str, ...] = (
    "ambient_droplet",
    "doublet",
    "platelet_monocyte",
    "high_mt",
    "low_counts",
    "low_genes",
    "high_counts",
    "high_genes",
)


def _resolve_sample(adata: ad.AnnData, sample_id: str | None, batch_key: str) -> None:
    if batch_key in adata.obs:
        present = pd.unique(adata.obs[batch_key].astype(str))
        if sample_id is not None and (len(present) != 1 or present[0] != str(sample_id)):
            raise ValueError(
                f"sample_id={sample_id!r} but obs[{batch_key!r}] holds {list(present)[:5]}; "
                f"pass sample_id=None to QC each sample in obs[{batch_key!r}] separately."
            )
        return
    adata.obs[batch_key] = pd.Categorical([str(sample_id or "sample")] * adata.n_obs)


def run_qc(
    adata: ad.AnnData,
    settings: QCSettings | None = None,
    *,
    sample_id: str | None = None,
    batch_key: str = "sample_id",
    organism: str = "auto",
    cells_loaded: float | Mapping[str, float] | None = None,
    seed: int = 0,
    raw: ad.AnnData | Mapping[str, ad.AnnData] | None = None,
    chemistry: str | Mapping[str, str] | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Full QC of one sample (or of each sample in ``obs[batch_key]``), annotating in place.

    Steps: :func:`qc_metrics` → first-pass lineage
    (:func:`~sepsis_sc.qc.ambient.first_pass_lineage`) → soup profile and soup-only droplets
    (:mod:`sepsis_sc.qc.ambient`) → :func:`adaptive_thresholds` (lower side, mito) and
    :func:`flag_outliers` → upper tail per lineage (:func:`lineage_upper_flags`) →
    contamination → :func:`detect_doublets` on the cells that passed so far, and
    platelet-monocyte aggregates (:func:`flag_platelet_monocyte`) →
    :func:`rescue_low_rna_immune` against the soup → SoupX correction into
    ``layers["soupx_counts"]``. Cells are not removed here; use :func:`filter_cells_qc`.

    Parameters
    ----------
    adata
        Raw integer counts in ``layers["counts"]`` or ``X`` (a counts layer is created from
        ``X`` when missing, kept sparse).
    settings
        Thresholds and switches (:class:`~sepsis_sc.config.QCSettings`, e.g.
        ``QCSettings.from_config(cfg["qc"])``); ``None``: the schema defaults. Among them
        ``on_empty``: what to do when a sample has no cell left: ``"error"`` raises
        ``ValueError`` naming the sample and the thresholds; ``"drop"`` logs a warning and
        marks the summary row ``empty = True``. See ``docs/qc.md`` for the others.
    sample_id
        Name of the sample when ``obs[batch_key]`` is absent (it is then written there).
        ``None`` with a multi-sample ``obs[batch_key]`` QCs every sample separately.
    batch_key
        ``obs`` column naming the sample.
    organism
        ``"human"``, ``"mouse"`` or ``"auto"``.
    cells_loaded
        Cells loaded per sample (number or mapping); see :func:`detect_doublets`.
    seed
        Random seed (doublet simulation).
    raw
        The raw (unfiltered) droplet matrix of the sample (or a mapping sample -> matrix),
        for the SoupX soup profile; ``None``: the soup is the pooled cells' profile.
    chemistry
        10x chemistry (``v2``, ``v3``, ``v3.1``, ``HT``; one value or per sample) for the
        expected doublet rate; ``None`` reads ``obs["chemistry"]`` when present.
    **overrides
        Any :class:`~sepsis_sc.config.QCSettings` field by name (``nmads_counts``,
        ``nmads_genes``, ``nmads_mt``, ``min_counts``, ``max_counts``, ``min_genes``,
        ``max_genes``, ``max_pct_mt``, ``mt_threshold_floor``, ``doublet_method``,
        ``remove_doublets``, ``expected_doublet_rate``, ``doublet_threshold``,
        ``rescue_low_rna_immune``, ``rescue_markers``, ``rescue_max_pct_mt``, ...,
        ``on_empty``); they replace the fields of ``settings``. ``TypeError`` names an
        unknown one.

    Returns
    -------
    Summary with one row per sample: ``sample_id``, ``organism``, ``cells_in``,
    ``cells_out``, ``frac_removed``, ``flagged_<reason>`` (cells with that reason, reasons
    overlap), ``removed_<reason>`` (each removed cell counted once, for the first reason
    in :data:`QC_REASONS` it has), ``rescued_low_rna_immune``, the effective thresholds
    (``min_counts`` ... ``max_pct_mt``), ``expected_doublet_rate``, ``doublet_threshold``
    and ``empty``. Writes the ``obs``/``var`` slots listed in the :mod:`sepsis_sc.qc` docstring,
    ``layers["counts"]`` and ``uns["qc"]`` (``params``, ``thresholds``, ``summary``).

    Raises
    ------
    ValueError
        Non-integer counts, an empty input, or (with ``on_empty="error"``) a sample with
        no cell passing QC.
    """
    settings = (settings or QCSettings()).with_overrides(overrides)
    _check_run_qc_args(adata, settings, sample_id=sample_id)
    _resolve_sample(adata, sample_id, batch_key)
    organism = qc_metrics(adata, organism)  # validates integer counts
    _ensure_counts_layer(adata)
    first_pass_lineage(adata)
    soups = _soup_step(adata, settings, batch_key=batch_key, raw=raw)
    thresholds = _sample_thresholds(adata, settings, batch_key)
    flag_outliers(adata, thresholds, batch_key=batch_key)
    add_reason(adata, adata.obs["soup_droplet"].to_numpy(dtype=bool), "ambient_droplet")
    upper = _upper_tail_step(adata, settings, batch_key=batch_key)
    _contamination_step(adata, soups, batch_key=batch_key)
    doublets = _doublet_step(
        adata,
        settings,
        thresholds.index,
        batch_key=batch_key,
        cells_loaded=cells_loaded,
        chemistry=chemistry,
        seed=seed,
    )
    flag_platelet_monocyte(adata, soups, batch_key=batch_key)
    _rescue_step(adata, settings, batch_key=batch_key, organism=organism, soups=soups)
    _finalise_reasons(
        adata,
        remove_doublets=settings.remove_doublets,
        platelet_monocyte=settings.platelet_monocyte,
    )
    _correction_step(adata, settings, soups, batch_key=batch_key, seed=seed)
    summary = _summarise(adata, thresholds, doublets, batch_key, organism)
    summary = _add_blood_columns(summary, adata, soups, upper, settings, batch_key=batch_key)
    adata.uns["qc"] = {
        "params": _params_record(settings, organism=organism, seed=seed),
        "thresholds": thresholds.reset_index(),
        "upper_tail": upper,
        "summary": summary.copy(),
    }
    _handle_empty_samples(summary, thresholds, on_empty=settings.on_empty)
    return summary


def _correction_step(
    adata: ad.AnnData,
    settings: QCSettings,
    soups: dict[str, dict[str, Any]],
    *,
    batch_key: str,
    seed: int,
) -> None:
    """SoupX subtraction per sample into ``layers["soupx_counts"]`` (integers); samples not
    corrected (no estimate, or no raw droplets with ``ambient_without_raw="report"``) get
    their raw counts there. Without any corrected sample the layer is not written (no
    second copy of the raw counts; :func:`sepsis_sc.data.counts_layer` then reads
    ``layers["counts"]``)."""
    samples = sample_ids(adata, batch_key)
    counts = sparse.csr_matrix(get_counts(adata, check=False)[0])
    blocks, order = [], []
    for sample, info in soups.items():
        idx = np.flatnonzero((samples == sample).to_numpy())
        rho = info.get("rho", np.nan)
        use = info["soup"] is not None and np.isfinite(rho) and rho > 0
        use = use and (info["source"] == "raw" or settings.ambient_without_raw == "correct")
        info["corrected"] = bool(use)
        if use:
            sub = _sample_sub(adata, idx, ["qc_lineage"])
            correct_counts(sub, info["soup"], rho, seed=seed)
            blocks.append(sub.layers["soupx_counts"])
        else:
            blocks.append(counts[idx])
        order.append(idx)
    if not any(info.get("corrected") for info in soups.values()):
        adata.layers.pop("soupx_counts", None)
        return
    stacked = sparse.vstack(blocks, format="csr")
    inverse = np.argsort(np.concatenate(order))
    adata.layers["soupx_counts"] = sparse.csr_matrix(stacked[inverse], dtype=np.float32)


def _add_blood_columns(
    summary: pd.DataFrame,
    adata: ad.AnnData,
    soups: Mapping[str, Mapping[str, Any]],
    upper: pd.DataFrame,
    settings: QCSettings,
    *,
    batch_key: str,
) -> pd.DataFrame:
    """Ambient, upper-tail, aggregate and per-lineage columns of the QC summary.

    ``contamination`` (NaN = not estimated), ``contamination_source`` (``raw`` = SoupX on
    empty droplets, ``filtered_pooled`` = pooled cells, ``not_estimated``),
    ``contamination_sets``, ``ambient_corrected``, ``soup_droplets``, ``upper_tail_rule``,
    ``platelet_monocyte`` (aggregates flagged), ``platelet_monocyte_action``, and per
    first-pass lineage ``lineage_n_<lineage>``, ``lineage_removed_frac_<lineage>``.
    """
    samples = sample_ids(adata, batch_key)
    lineage = adata.obs["qc_lineage"].astype(str)
    removed = adata.obs["qc_outlier"].to_numpy(dtype=bool)
    pm = adata.obs["doublet_type"].astype(str).eq("platelet_monocyte").to_numpy()
    extra = []
    for sample in summary["sample_id"]:
        m = (samples == sample).to_numpy()
        info = soups.get(sample, {})
        row: dict[str, Any] = {
            "contamination": float(info.get("rho", np.nan)),
            "contamination_source": info.get("source", "not_estimated")
            if np.isfinite(info.get("rho", np.nan))
            else "not_estimated",
            "contamination_sets": info.get("sets", ""),
            "ambient_corrected": bool(info.get("corrected", False)),
            "soup_droplets": int(adata.obs["soup_droplet"].to_numpy(dtype=bool)[m].sum()),
            "upper_tail_rule": settings.upper_tail,
            "platelet_monocyte": int(pm[m].sum()),
            "platelet_monocyte_action": settings.platelet_monocyte,
        }
        for lin in LINEAGES:
            in_lin = m & (lineage == lin).to_numpy()
            row[f"lineage_n_{lin}"] = int(in_lin.sum())
            row[f"lineage_removed_frac_{lin}"] = (
                float(removed[in_lin].mean()) if in_lin.any() else np.nan
            )
        extra.append(row)
    return pd.concat([summary.reset_index(drop=True), pd.DataFrame(extra)], axis=1)


def _check_run_qc_args(adata: ad.AnnData, settings: QCSettings, *, sample_id: str | None) -> None:
    """Reject an unknown ``on_empty`` or ``doublet_method`` and an input without cells."""
    if settings.on_empty not in ("error", "drop"):
        raise ValueError(f"on_empty must be 'error' or 'drop', not {settings.on_empty!r}.")
    if settings.doublet_method not in ("scrublet", "none"):
        raise ValueError(
            f"doublet_method must be 'scrublet' or 'none', not {settings.doublet_method!r}."
        )
    choices = {
        "upper_tail": ("lineage", "sample", "none"),
        "ambient": ("auto", "none"),
        "ambient_without_raw": ("report", "correct"),
        "platelet_monocyte": ("flag", "remove"),
    }
    for name, allowed in choices.items():
        if getattr(settings, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, not {getattr(settings, name)!r}.")
    if adata.n_obs == 0:
        raise ValueError(f"sample {sample_id or ''} has no cells before QC; check the input.")


def _ensure_counts_layer(adata: ad.AnnData) -> None:
    """Create ``layers["counts"]`` (sparse) from ``X`` when the input has no counts layer."""
    if "counts" not in adata.layers:
        adata.layers["counts"] = (
            adata.X.copy() if sparse.issparse(adata.X) else sparse.csr_matrix(adata.X)
        )


def _sample_thresholds(adata: ad.AnnData, settings: QCSettings, batch_key: str) -> pd.DataFrame:
    """:func:`adaptive_thresholds` with the limits of ``settings``."""
    return adaptive_thresholds(
        adata, settings, batch_key=batch_key, upper=settings.upper_tail == "sample"
    )


def _sample_sub(adata: ad.AnnData, idx: np.ndarray, cols: Sequence[str]) -> ad.AnnData:
    """A light AnnData of the cells ``idx``: raw counts in ``X`` and the ``obs`` columns."""
    counts = sparse.csr_matrix(get_counts(adata, check=False)[0])[idx]
    keep = [c for c in cols if c in adata.obs]
    return ad.AnnData(
        X=counts,
        obs=adata.obs.iloc[idx][keep].copy(),
        var=pd.DataFrame(index=adata.var_names.copy()),
    )


def _raw_for(raw: ad.AnnData | Mapping[str, ad.AnnData] | None, sample: str, n_samples: int):
    if raw is None:
        return None
    if isinstance(raw, Mapping):
        return raw.get(sample)
    if n_samples > 1:
        raise ValueError("pass raw as a mapping {sample_id: raw AnnData} for several samples.")
    return raw


def _soup_step(
    adata: ad.AnnData,
    settings: QCSettings,
    *,
    batch_key: str,
    raw: ad.AnnData | Mapping[str, ad.AnnData] | None,
) -> dict[str, dict[str, Any]]:
    """Soup profile per sample and (raw soup only) the soup-only droplets.

    Returns ``{sample: {"soup": Series or None, "source": str, ...}}`` and writes
    ``obs["soup_droplet"]`` and ``obs["soup_loglik_ratio"]``.
    """
    samples = sample_ids(adata, batch_key)
    adata.obs["soup_droplet"] = False
    adata.obs["soup_loglik_ratio"] = np.nan
    out: dict[str, dict[str, Any]] = {}
    uniq = pd.unique(samples)
    for sample in uniq:
        idx = np.flatnonzero((samples == sample).to_numpy())
        if settings.ambient == "none":
            out[sample] = {"soup": None, "source": "not_estimated"}
            continue
        sub = _sample_sub(adata, idx, ["qc_lineage"])
        soup, source = estimate_soup(
            sub, _raw_for(raw, sample, len(uniq)), soup_max_counts=settings.soup_max_counts
        )
        out[sample] = {"soup": soup, "source": source}
        if source == "raw" and settings.flag_soup_droplets:
            flag = flag_soup_droplets(sub, soup)
            col = adata.obs.columns.get_loc("soup_droplet")
            adata.obs.iloc[idx, col] = flag
            col = adata.obs.columns.get_loc("soup_loglik_ratio")
            adata.obs.iloc[idx, col] = sub.obs["soup_loglik_ratio"].to_numpy()
    return out


def _upper_tail_step(adata: ad.AnnData, settings: QCSettings, *, batch_key: str) -> pd.DataFrame:
    """The per-lineage upper cuts (``upper_tail="lineage"``), else an empty table."""
    if settings.upper_tail == "lineage":
        return lineage_upper_flags(adata, settings, batch_key=batch_key)
    return pd.DataFrame(
        columns=[
            "sample_id",
            "lineage",
            "n_cells",
            "max_counts",
            "max_genes",
            "flagged_high_counts",
            "flagged_high_genes",
        ]
    )


def _contamination_step(
    adata: ad.AnnData, soups: dict[str, dict[str, Any]], *, batch_key: str
) -> None:
    """SoupX contamination per sample, from the cells that passed so far (no soup droplets,
    no damaged cells); stored in ``soups[sample]``."""
    samples = sample_ids(adata, batch_key)
    passing = adata.obs["qc_reason"].astype(str).eq("pass").to_numpy()
    for sample, info in soups.items():
        info.update(rho=np.nan, sets="", n_cells_used=0)
        if info["soup"] is None:
            continue
        idx = np.flatnonzero((samples == sample).to_numpy())
        sub = _sample_sub(adata, idx, ["qc_lineage"])
        est = estimate_contamination(sub, info["soup"], source=info["source"], cells=passing[idx])
        info.update(rho=est["rho"], sets=",".join(est["sets"]), n_cells_used=est["n_cells_used"])


def _doublet_step(
    adata: ad.AnnData,
    settings: QCSettings,
    samples: pd.Index,
    *,
    batch_key: str,
    cells_loaded: float | Mapping[str, float] | None,
    seed: int,
    chemistry: str | Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Scrublet per sample on the cells that passed the filters so far, or
    (``doublet_method="none"``) no scores and no doublets.

    Damaged cells and soup droplets would enter Scrublet's simulated doublets and its kNN
    graph as if they were cells, so they are left out; the expected rate still comes from
    all barcodes recovered (and the chemistry), since it is a property of the loading.
    Returns the per-sample doublet table (NaN rate and threshold when not scored).
    """
    adata.obs["doublet_score"] = np.nan
    adata.obs["predicted_doublet"] = False
    if settings.doublet_method != "scrublet":
        return pd.DataFrame(
            {"expected_doublet_rate": np.nan, "doublet_threshold": np.nan}, index=samples
        )
    ids = sample_ids(adata, batch_key)
    passing = adata.obs["qc_reason"].astype(str).eq("pass").to_numpy()
    rows = []
    scores = np.full(adata.n_obs, np.nan)
    calls = np.zeros(adata.n_obs, dtype=bool)
    for sample in pd.unique(ids):
        all_idx = np.flatnonzero((ids == sample).to_numpy())
        idx = all_idx[passing[all_idx]]
        chem = chemistry.get(sample) if isinstance(chemistry, Mapping) else chemistry
        if chem is None and "chemistry" in adata.obs:
            chem = str(adata.obs["chemistry"].iloc[all_idx[0]])
        loaded = sample_cells_loaded(adata, cells_loaded, sample, all_idx)
        rate = (
            float(settings.expected_doublet_rate)
            if settings.expected_doublet_rate is not None
            else expected_doublet_rate(all_idx.size, loaded, chem)
        )
        sub = _sample_sub(adata, idx, [batch_key])
        table = detect_doublets(
            sub, settings.with_overrides(expected_doublet_rate=rate), batch_key=batch_key, seed=seed
        )
        scores[idx] = sub.obs["doublet_score"].to_numpy()
        calls[idx] = sub.obs["predicted_doublet"].to_numpy(dtype=bool)
        table = table.assign(chemistry=chem or "", n_scored=idx.size)
        rows.append(table)
    adata.obs["doublet_score"] = scores
    adata.obs["predicted_doublet"] = calls
    return pd.concat(rows)


def _rescue_step(
    adata: ad.AnnData,
    settings: QCSettings,
    *,
    batch_key: str,
    organism: str,
    soups: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """:func:`rescue_low_rna_immune` with ``settings``, if switched on; else no cell is
    rescued."""
    if not settings.rescue_low_rna_immune:
        adata.obs["low_rna_immune"] = False
        return
    rescue_low_rna_immune(
        adata,
        settings,
        batch_key=batch_key,
        organism=organism,
        soup={s: v["soup"] for s, v in (soups or {}).items() if v.get("soup") is not None} or None,
    )


def _finalise_reasons(
    adata: ad.AnnData, *, remove_doublets: bool, platelet_monocyte: str = "flag"
) -> None:
    """Add the reason ``doublet`` to predicted doublets (which are then never rescued) and
    set ``obs["qc_outlier"]`` from the final ``qc_reason``. Platelet-monocyte aggregates
    (``obs["doublet_type"]``) are their own category: kept (``"flag"``) or removed with
    the reason ``platelet_monocyte``, never as plain doublets."""
    pm = (
        adata.obs["doublet_type"].astype(str).eq("platelet_monocyte").to_numpy()
        if "doublet_type" in adata.obs
        else np.zeros(adata.n_obs, dtype=bool)
    )
    if platelet_monocyte == "remove" and pm.any():
        reason = adata.obs["qc_reason"].astype(str).to_numpy(dtype=object)
        for i in np.flatnonzero(pm):
            reason[i] = (
                "platelet_monocyte" if reason[i] == "pass" else f"{reason[i]};platelet_monocyte"
            )
        adata.obs["qc_reason"] = reason
        adata.obs["low_rna_immune"] = adata.obs["low_rna_immune"].to_numpy(dtype=bool) & ~pm
    if remove_doublets:
        dbl = adata.obs["predicted_doublet"].to_numpy(dtype=bool) & ~pm
        reason = adata.obs["qc_reason"].astype(str).to_numpy(dtype=object)
        for i in np.flatnonzero(dbl):
            reason[i] = "doublet" if reason[i] == "pass" else f"{reason[i]};doublet"
        adata.obs["qc_reason"] = reason
        low_rna = adata.obs["low_rna_immune"].to_numpy(dtype=bool)
        adata.obs["low_rna_immune"] = low_rna & ~dbl
    adata.obs["qc_outlier"] = adata.obs["qc_reason"].astype(str).ne("pass").to_numpy()


def _params_record(settings: QCSettings, *, organism: str, seed: int) -> dict[str, Any]:
    """``uns["qc"]["params"]``: the settings used, keys that are ``None`` left out (an
    ``.h5ad`` file cannot store ``None``; a missing key reads as "not set")."""
    record = {
        "organism": organism,
        "nmads": dict(settings.nmads),
        "min_counts": settings.min_counts,
        "max_counts": settings.max_counts,
        "min_genes": settings.min_genes,
        "max_genes": settings.max_genes,
        "max_pct_mt": settings.max_pct_mt,
        "mt_threshold_floor": settings.mt_threshold_floor,
        "doublet_method": settings.doublet_method,
        "remove_doublets": settings.remove_doublets,
        "expected_doublet_rate": settings.expected_doublet_rate,
        "doublet_threshold": settings.doublet_threshold,
        "rescue_low_rna_immune": settings.rescue_low_rna_immune,
        "rescue_max_pct_mt": settings.rescue_max_pct_mt,
        "rescue_min_counts": settings.rescue_min_counts,
        "rescue_min_genes": settings.rescue_min_genes,
        "rescue_min_markers": settings.rescue_min_markers,
        "rescue_min_enrichment": settings.rescue_min_enrichment,
        "rescue_alpha": settings.rescue_alpha,
        "upper_tail": settings.upper_tail,
        "ambient": settings.ambient,
        "ambient_without_raw": settings.ambient_without_raw,
        "soup_max_counts": settings.soup_max_counts,
        "flag_soup_droplets": settings.flag_soup_droplets,
        "platelet_monocyte": settings.platelet_monocyte,
        "seed": seed,
    }
    return {key: value for key, value in record.items() if value is not None}


def _handle_empty_samples(
    summary: pd.DataFrame, thresholds: pd.DataFrame, *, on_empty: str
) -> None:
    """Raise (``on_empty="error"``) or warn for each sample with no cell left, naming the
    thresholds used and the cells flagged per reason."""
    empty = summary.loc[summary["cells_out"] == 0]
    for _, row in empty.iterrows():
        msg = _empty_sample_message(row, thresholds.loc[row["sample_id"]], summary.columns)
        if on_empty == "error":
            raise ValueError(msg)
        logger.warning("%s Sample marked empty and dropped.", msg)


def _empty_sample_message(row: pd.Series, thr: pd.Series, columns: pd.Index) -> str:
    """The message for a sample that QC emptied: thresholds used, cells flagged by reason."""
    used = ", ".join(
        f"{name}={thr[name]:.4g}"
        for name in ("min_counts", "max_counts", "min_genes", "max_genes", "max_pct_mt")
        if name in thr and np.isfinite(thr[name])
    )
    removed = ", ".join(
        f"{c.removeprefix('flagged_')}: {int(row[c])}"
        for c in columns
        if c.startswith("flagged_") and row[c] > 0
    )
    return (
        f"QC removed all {int(row['cells_in'])} cells of sample {row['sample_id']!r} "
        f"(thresholds used: {used}; cells flagged by reason: {removed}). Loosen the "
        "config keys qc.nmads_counts / qc.nmads_genes / qc.nmads_mt / qc.min_counts / "
        "qc.min_genes / qc.max_pct_mt, check that the input holds cells rather than empty "
        "droplets, or set qc.on_empty: drop."
    )


def primary_reason(reason: str) -> str | None:
    """The reason a removed cell is counted under: the first of ``reason``'s semicolon-joined
    reasons in :data:`QC_REASONS` order (else its first); ``None`` for ``"pass"``."""
    if reason == "pass":
        return None
    parts = reason.split(";")
    for r in QC_REASONS:
        if r in parts:
            return r
    return parts[0]


def _summarise(
    adata: ad.AnnData,
    thresholds: pd.DataFrame,
    doublets: pd.DataFrame,
    batch_key: str,
    organism: str,
) -> pd.DataFrame:
    samples = sample_ids(adata, batch_key)
    reasons = adata.obs["qc_reason"].astype(str)
    all_reasons = sorted({p for r in reasons.unique() if r != "pass" for p in r.split(";")})
    ordered = [r for r in QC_REASONS] + [r for r in all_reasons if r not in QC_REASONS]
    rows = []
    for sample in pd.unique(samples):
        mask = (samples == sample).to_numpy()
        r = reasons[mask]
        n_in = int(mask.sum())
        n_out = int((r == "pass").sum())
        row: dict[str, Any] = {
            "sample_id": sample,
            "organism": organism,
            "cells_in": n_in,
            "cells_out": n_out,
            "frac_removed": (n_in - n_out) / n_in if n_in else np.nan,
        }
        split = r[r != "pass"].str.split(";")
        primary = r.map(primary_reason)
        for name in ordered:
            row[f"flagged_{name}"] = int(split.map(lambda parts, n=name: n in parts).sum())
        for name in ordered:
            row[f"removed_{name}"] = int((primary == name).sum())
        row["rescued_low_rna_immune"] = int(adata.obs["low_rna_immune"].to_numpy()[mask].sum())
        thr = thresholds.loc[sample]
        for name in ("min_counts", "max_counts", "min_genes", "max_genes", "max_pct_mt"):
            row[name] = float(thr[name]) if name in thr else np.nan
        if sample in doublets.index:
            row["expected_doublet_rate"] = float(doublets.loc[sample, "expected_doublet_rate"])
            row["doublet_threshold"] = float(doublets.loc[sample, "doublet_threshold"])
        row["empty"] = n_out == 0
        rows.append(row)
    return pd.DataFrame(rows)
