"""Differential abundance of lineages or subsets, propeller style: :func:`composition_test`.

Phipson et al. 2022 (DOI 10.1093/bioinformatics/btac582): per-sample label proportions,
logit- or arcsine-sqrt-transformed, averaged per unit of the design (:mod:`sepsis_sc.design`)
and fitted with its linear model; variances moderated across labels (limma eBayes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from sepsis_sc.config import StatsSettings
from sepsis_sc.design import (
    COEF,
    Contrast,
    ContrastArgs,
    SampleDesign,
    linear_test,
    sample_meta,
    unit_weights,
)
from sepsis_sc.stats.effects import bh_fdr, contrast_args, direction
from sepsis_sc.stats.samples import condition_meta


def composition_test(
    adata: ad.AnnData,
    settings: StatsSettings | None = None,
    *,
    case: str | None = None,
    control: str | None = None,
    contrast: Contrast | None = None,
    meta: pd.DataFrame | None = None,
    level: str = "lineage",
    sample_key: str = "sample_id",
    condition_key: str = "condition",
    donor_key: str | None = "donor",
    transform: str = "logit",
    exclude: Sequence[str] = ("Unassigned",),
    **overrides: Any,
) -> pd.DataFrame:
    """Differential abundance of lineages or subsets, propeller style, donors as units.

    Per sample, label counts become proportions with 0.5 pseudo-counts (speckle's
    ``getTransformedProps``), logit- (default) or arcsine-sqrt-transformed; the values are
    averaged per unit of the design (:mod:`sepsis_sc.design`: a donor's samples at one
    contrast level are one unit, so a patient sampled at T0 and T6 counts once; donors seen at
    both levels are paired with donor blocks), and each label is fitted with the design's
    linear model (covariates from the settings' ``design``). Residual variances are
    moderated with limma's empirical-Bayes prior across labels (Smyth 2004; robust and / or
    trended in the label's mean abundance, settings ``moderation``) and tested with
    the moderated t (Phipson et al. 2022, DOI 10.1093/bioinformatics/btac582); BH-FDR over
    labels. All cells of the units form the denominators; labels in ``exclude`` are not tested.

    Parameters
    ----------
    adata
        Annotated AnnData (``obs[level]``, sample sheet columns).
    settings
        The config's ``stats`` section (:class:`~sepsis_sc.config.StatsSettings`), its fields
        overridden by keyword (``**overrides``), as in :func:`condition_effects`: ``alpha``
        (FDR level for ``significant``), ``design`` (formula or resolved
        :class:`~sepsis_sc.design.SampleDesign`) and ``paired``.
    case, control, contrast, meta
        The contrast, as in :func:`condition_effects`: ``case`` and ``control`` are values
        of ``obs[condition_key]`` (effect = case vs control); ``meta`` defaults to the sheet
        columns in ``obs``.
    level
        ``"lineage"`` or ``"cell_type"`` (any obs column of labels works).
    sample_key, condition_key, donor_key
        Sample sheet columns (donor optional: without it each sample is its own donor).
    transform
        ``"logit"`` or ``"asin"`` (arcsine square root).
    exclude
        Labels counted in the totals but not tested.

    Returns
    -------
    pandas.DataFrame
        One row per label: ``contrast``, ``level``, ``label``, ``mean_prop_case``,
        ``mean_prop_control`` (mean over units), ``prop_ratio``, ``log2_prop_ratio``,
        ``effect`` (difference on the transformed scale) with ``ci_low`` / ``ci_high``, ``unit``,
        ``t``, ``df``, ``pvalue``, ``fdr``, ``significant``, ``prior_df`` / ``prior_var``
        (the empirical-Bayes prior of the label's variance; ``stats.moderation``) and
        ``residual_var`` (its own), ``n_case``, ``n_control`` (units),
        ``design``, ``transform``, ``direction`` (only where significant), ``meaning``,
        ``note``. Nothing is written to ``adata``.
    """
    settings, args = contrast_args(
        settings, overrides, case=case, control=control, contrast=contrast, meta=meta
    )
    if level not in adata.obs:
        raise KeyError(f"obs[{level!r}] missing; run sepsis_sc.annotate.annotate first")
    if transform not in ("logit", "asin"):
        raise ValueError(f"transform must be 'logit' or 'asin', got {transform!r}")
    meta = args.meta
    if meta is None:
        meta, shorthand = _composition_meta(adata, args, sample_key, condition_key, donor_key)
        args = replace(args, contrast=shorthand)
    design = args.resolve(meta)
    con = design.contrast
    counts = _label_counts(adata, design, sample_key, level)
    y, props, sample_y = _unit_proportions(counts, design, transform)
    labels = [c for c in counts.columns if c not in set(exclude)]
    res = _proportion_summary(props, labels, design)
    weights = unit_weights(design, sample_y[labels]) if settings.unit_weights else None
    fit, note = _composition_fit(design, y[labels], labels, settings.moderation, weights)
    res = _composition_columns(res, fit, design, note, transform, settings.alpha)
    res["meaning"] = [_composition_meaning(r, con.case, con.control) for r in res.itertuples()]
    res.insert(0, "level", level)
    res.insert(0, "contrast", con.name)
    return res.sort_values("pvalue", na_position="last").reset_index(drop=True)


def _composition_meta(
    adata: ad.AnnData,
    args: ContrastArgs,
    sample_key: str,
    condition_key: str,
    donor_key: str | None,
) -> tuple[pd.DataFrame, Contrast | None]:
    """The sheet from ``obs``: condition and donor, plus every sheet column when the formula
    or the contrast needs more; and the contrast (``case`` vs ``control`` when not given)."""
    meta = condition_meta(adata, sample_key, condition_key, donor_key)
    if condition_key != "condition":
        meta[condition_key] = meta["condition"]
    contrast, design = args.contrast, args.design
    if contrast is None and design is None:
        contrast = args.shorthand()
    col = (design.contrast if design is not None else contrast).column
    extra = sample_meta(adata, sample_key) if (args.formula or col not in meta) else None
    if extra is not None:
        meta = meta.join(extra.drop(columns=[c for c in extra.columns if c in meta]))
    return meta, contrast


def _label_counts(
    adata: ad.AnnData, design: SampleDesign, sample_key: str, level: str
) -> pd.DataFrame:
    """Samples of the design x labels: cell counts (zeros included)."""
    obs = adata.obs[[sample_key, level]].astype(str)
    obs = obs[obs[sample_key].isin(design.sample_unit.index)]
    return pd.crosstab(obs[sample_key], obs[level]).reindex(design.sample_unit.index, fill_value=0)


def _unit_proportions(
    counts: pd.DataFrame, design: SampleDesign, transform: str
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Units x labels: transformed proportions (test scale) and raw proportions; and the
    samples' transformed proportions (for the unit weights).

    Logit of proportions with 0.5 pseudo-counts (speckle's ``getTransformedProps``) or the
    arcsine square root; a unit's value is the mean of its samples (each patient counts once).
    """
    totals = counts.sum(axis=1)
    sprops = counts.div(totals.where(totals > 0), axis=0)
    pseudo = (counts + 0.5).div((counts + 0.5).sum(axis=1), axis=0)
    sy = np.log(pseudo / (1 - pseudo)) if transform == "logit" else np.arcsin(np.sqrt(sprops))
    y = pd.DataFrame({c: design.aggregate_mean(sy[c]) for c in sy.columns})
    props = pd.DataFrame({c: design.aggregate_mean(sprops[c]) for c in sprops.columns})
    return y, props, sy


def _proportion_summary(
    props: pd.DataFrame, labels: Sequence[str], design: SampleDesign
) -> pd.DataFrame:
    """Per label: mean proportion over case and control units, and their ratio."""
    is_case = (design.matrix[COEF] == 1).to_numpy()
    res = pd.DataFrame({"label": labels})
    res["mean_prop_case"] = props.loc[is_case, labels].mean().to_numpy()
    res["mean_prop_control"] = props.loc[~is_case, labels].mean().to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        res["prop_ratio"] = res["mean_prop_case"] / res["mean_prop_control"]
        res["log2_prop_ratio"] = np.log2(res["prop_ratio"])
    return res


def _composition_fit(
    design: SampleDesign,
    y: pd.DataFrame,
    labels: Sequence[str],
    moderation: str,
    weights: pd.Series | None,
) -> tuple[pd.DataFrame, str]:
    """Moderated linear model per label (no p-values without residual df) and the note."""
    fit = linear_test(design, y, moderation=moderation, weights=weights).reindex(labels)
    note = "; ".join(n for n in [design.reason, *design.notes] if n)
    if not design.testable or design.df_resid < 1:
        fit[["ci_low", "ci_high", "t", "df", "pvalue", "d0", "s2", "s2_prior"]] = np.nan
        note = note or "no residual degree of freedom: effect size only, no p-value"
        note += "; propeller needs replicates"
    return fit, note


def _composition_columns(
    res: pd.DataFrame,
    fit: pd.DataFrame,
    design: SampleDesign,
    note: str,
    transform: str,
    alpha: float,
) -> pd.DataFrame:
    """Add the fit, BH-FDR, significance, design, note, unit and direction columns."""
    for c in ("effect", "ci_low", "ci_high", "t", "df", "pvalue"):
        res[c] = fit[c].to_numpy(float)
    res["prior_df"] = fit["d0"].to_numpy(float)
    res["prior_var"] = fit["s2_prior"].to_numpy(float)
    res["residual_var"] = fit["s2"].to_numpy(float)
    res["fdr"] = bh_fdr(res["pvalue"].to_numpy())
    res["significant"] = res["fdr"] <= alpha
    res["n_case"], res["n_control"] = design.n_case, design.n_control
    res["design"], res["note"] = design.description(), note
    res["transform"] = transform
    res["unit"] = (
        "logit proportion difference"
        if transform == "logit"
        else "arcsine-sqrt proportion difference"
    )
    res["direction"] = direction(res, design.contrast.case)
    return res


def _composition_meaning(r: Any, case: str, control: str) -> str:
    """One plain-language sentence for a row of :func:`composition_test`."""
    if r.significant:
        return (
            f"The {r.label} share of cells is {'larger' if r.effect > 0 else 'smaller'} in "
            f"{case} than in {control} ({r.mean_prop_case:.1%} vs {r.mean_prop_control:.1%}, FDR {r.fdr:.2g})."
        )
    if np.isfinite(r.fdr):
        return (
            f"No evidence that the {r.label} share differs ({r.mean_prop_case:.1%} vs "
            f"{r.mean_prop_control:.1%}, FDR {r.fdr:.2g})."
        )
    return f"The {r.label} share: {r.mean_prop_case:.1%} vs {r.mean_prop_control:.1%}; not tested."
