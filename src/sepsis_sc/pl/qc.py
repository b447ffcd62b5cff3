"""Figures of the QC stage (:func:`sepsis_sc.qc.run_qc` outputs).

* :func:`violins`: per-sample distributions of UMI counts, genes and mito %, with each
  sample's own thresholds drawn.
* :func:`scatter`: UMI counts vs detected genes, coloured by mito %, removed cells marked.
* :func:`removed`: cells removed per sample, stacked by main reason.
* :func:`removed_by_lineage`: share of each first-pass lineage removed, per sample.
* :func:`contamination`: estimated ambient-RNA contamination per sample.

Each function returns the matplotlib Figure; save it with
:func:`sepsis_sc.pl.style.savefig` (``savefig(fig, path)``).
"""

from __future__ import annotations

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sepsis_sc.pl.style import set_style
from sepsis_sc.qc.run import primary_reason

__all__ = ["violins", "scatter", "removed", "removed_by_lineage", "contamination"]


def _obs(adata_or_obs: ad.AnnData | pd.DataFrame) -> pd.DataFrame:
    return adata_or_obs.obs if isinstance(adata_or_obs, ad.AnnData) else adata_or_obs


def violins(
    adata_or_obs: ad.AnnData | pd.DataFrame,
    thresholds: pd.DataFrame,
    *,
    batch_key: str = "sample_id",
) -> plt.Figure:
    """Per-sample distributions of UMI counts, genes and mito %, with the thresholds drawn.

    The mito % axis stops at the pooled 99.5th percentile, but at least at the highest
    threshold and at most at 1.5 times it, so damaged cells near 60 % do not squash the
    violins; cells above the axis are not drawn in the violins (medians are of all cells),
    their number is written above each sample and the highest value in the panel title.

    Parameters
    ----------
    adata_or_obs
        AnnData after :func:`sepsis_sc.qc.run_qc` or its ``obs``.
    thresholds
        Table from :func:`sepsis_sc.qc.adaptive_thresholds` (or the ``uns["qc"]["thresholds"]`` frame
        with a ``sample_id`` column).
    batch_key
        ``obs`` column naming the sample.
    """

    set_style()
    obs = _obs(adata_or_obs)
    thr = thresholds.set_index("sample_id") if "sample_id" in thresholds.columns else thresholds
    thr.index = thr.index.astype(str)
    samples = obs[batch_key].astype(str) if batch_key in obs else None
    order = list(pd.unique(samples)) if samples is not None else ["sample"]
    if samples is None:
        samples = pd.Series("sample", index=obs.index)
    panels = [
        ("total_counts", "UMI counts per cell", "min_counts", "max_counts", True),
        ("n_genes_by_counts", "genes per cell", "min_genes", "max_genes", True),
        ("pct_counts_mt", "mitochondrial UMIs (%)", None, "max_pct_mt", False),
    ]
    # one panel per metric, stacked, so sample names stay readable for large cohorts
    width = min(max(6.0, 0.55 * len(order) + 1.5), 20)
    fig, axes = plt.subplots(3, 1, figsize=(width, 8.4), sharex=True)
    for ax, (col, label, lo, hi, log) in zip(axes, panels):
        data = [obs.loc[(samples == s).to_numpy(), col].to_numpy(dtype=float) for s in order]
        if log:
            data = [np.log10(np.maximum(d, 1)) for d in data]
        top = None if log else _robust_top(data, thr, hi, order)
        if top is None:
            parts = ax.violinplot(data, showmedians=True, widths=0.8)
        else:
            parts = _cut_violins(ax, data, top)
        for body in parts["bodies"]:
            body.set_facecolor("#9ecae1")
            body.set_edgecolor("#4a6f8a")
            body.set_alpha(0.8)
        for i, s in enumerate(order, start=1):
            for key, style in ((lo, "--"), (hi, "-")):
                if key is None or s not in thr.index or key not in thr.columns:
                    continue
                value = thr.loc[s, key]
                if not np.isfinite(value):
                    continue
                y = np.log10(max(value, 1)) if log else value
                ax.hlines(y, i - 0.45, i + 0.45, colors="#c0392b", linestyles=style, lw=1.5)
        ax.set_xticks(range(1, len(order) + 1))
        ax.set_xticklabels(order, rotation=45 if len(order) > 3 else 0, ha="right")
        ax.set_ylabel(f"log10 {label}" if log else label)
        if top is not None:
            ax.set_ylim(top=top)
    axes[0].plot([], [], color="#c0392b", ls="--", label="lower threshold")
    axes[0].plot([], [], color="#c0392b", ls="-", label="upper threshold")
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    axes[0].set_title("QC metrics per sample, with each sample's own thresholds")
    fig.tight_layout()
    return fig


def _robust_top(
    data: list[np.ndarray], thr: pd.DataFrame, key: str | None, order: list[str]
) -> float | None:
    """Upper y limit of a linear panel: the pooled 99.5th percentile, kept between the highest
    threshold and 1.5 times it (plus headroom); None when no value lies above it."""
    values = np.concatenate(data) if data else np.array([])
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    top = float(np.percentile(values, 99.5))
    if key is not None and key in thr.columns:
        limits = thr.reindex(order)[key].to_numpy(dtype=float)
        if np.isfinite(limits).any():
            highest = float(np.nanmax(limits))
            top = min(max(top, highest), 1.5 * highest)
    top *= 1.1
    return top if values.max() > top else None


def _cut_violins(ax, data: list[np.ndarray], top: float) -> dict:
    """Violins of the values up to ``top``, medians of all values, counts of those above."""
    shown = [d[d <= top] if (d <= top).any() else np.array([top]) for d in data]
    parts = ax.violinplot(shown, showmedians=False, showextrema=False, widths=0.8)
    highest = max(float(np.nanmax(d)) for d in data if len(d))
    for i, d in enumerate(data, start=1):
        if len(d):
            ax.hlines(np.nanmedian(d), i - 0.2, i + 0.2, colors="#1f77b4", lw=1.5)
        n_above = int((d > top).sum())
        if n_above:
            ax.text(i, top, f"\u25b2{n_above}", ha="center", va="bottom", fontsize=7, color="0.3")
    ax.set_title(
        f"axis cut at {top:.1f} %: \u25b2 n = cells above, not drawn (highest {highest:.1f} %)",
        loc="left",
        fontsize=8,
        color="0.3",
        pad=14,
    )
    return parts


def scatter(obs: ad.AnnData | pd.DataFrame) -> plt.Figure:
    """UMI counts vs detected genes, coloured by mito %, removed cells marked by reason.

    Parameters
    ----------
    obs
        ``obs`` (or the AnnData) after :func:`sepsis_sc.qc.run_qc`.
    """

    set_style()
    obs = _obs(obs)
    x = np.log10(np.maximum(obs["total_counts"].to_numpy(dtype=float), 1))
    y = np.log10(np.maximum(obs["n_genes_by_counts"].to_numpy(dtype=float), 1))
    mt = obs["pct_counts_mt"].to_numpy(dtype=float)
    reason = obs["qc_reason"].astype(str) if "qc_reason" in obs else pd.Series("pass", obs.index)
    primary = reason.map(primary_reason)
    fig, ax = plt.subplots(figsize=(6.2, 4.8))
    vmax = float(np.nanpercentile(mt, 99)) if len(mt) else 1.0
    sca = ax.scatter(x, y, c=mt, s=5, cmap="viridis", vmin=0, vmax=max(vmax, 1e-3), lw=0)
    fig.colorbar(sca, ax=ax, label="mitochondrial UMIs (%)")
    markers = {
        "doublet": ("D", "#d62728"),
        "high_mt": ("x", "#ff7f0e"),
        "low_counts": ("v", "black"),
        "low_genes": ("v", "black"),
        "high_counts": ("^", "#7f7f7f"),
        "high_genes": ("^", "#7f7f7f"),
    }
    shown: set[str] = set()
    for name in primary.dropna().unique():
        sel = (primary == name).to_numpy()
        marker, colour = markers.get(name, ("s", "#7f7f7f"))
        label = (
            "low counts/genes" if name in ("low_counts", "low_genes") else name.replace("_", " ")
        )
        label = "high counts/genes" if name in ("high_counts", "high_genes") else label
        kwargs = {"facecolors": "none", "edgecolors": colour} if marker in "Dv^s" else {"c": colour}
        ax.scatter(
            x[sel],
            y[sel],
            marker=marker,
            s=18,
            lw=0.8,
            label=f"removed: {label}" if label not in shown else None,
            **kwargs,
        )
        shown.add(label)
    if "low_rna_immune" in obs and obs["low_rna_immune"].any():
        sel = obs["low_rna_immune"].to_numpy(dtype=bool)
        ax.scatter(
            x[sel],
            y[sel],
            marker="o",
            s=22,
            facecolors="none",
            edgecolors="#e377c2",
            lw=0.9,
            label="kept: low-RNA immune",
        )
    ax.set_xlabel("log10 UMI counts per cell")
    ax.set_ylabel("log10 genes per cell")
    n_removed = int(primary.notna().sum())
    ax.set_title(f"Counts vs genes ({n_removed} of {len(obs)} cells removed)")
    ax.legend(loc="upper left", frameon=False, fontsize=8, markerscale=1.3)
    fig.tight_layout()
    return fig


def removed(summary: pd.DataFrame) -> plt.Figure:
    """Stacked bars: cells removed per sample, each cell counted once by its main reason.

    Parameters
    ----------
    summary
        Table returned by :func:`sepsis_sc.qc.run_qc` (``removed_<reason>`` columns).
    """

    set_style()
    cols = [c for c in summary.columns if c.startswith("removed_")]
    if not cols:
        raise ValueError("summary has no removed_<reason> columns; pass the table from run_qc.")
    colours = {
        "removed_doublet": "#d62728",
        "removed_high_mt": "#ff7f0e",
        "removed_low_counts": "#1f77b4",
        "removed_low_genes": "#6baed6",
        "removed_high_counts": "#7f7f7f",
        "removed_high_genes": "#c7c7c7",
        "removed_ambient_droplet": "#8c564b",
        "removed_platelet_monocyte": "#9467bd",
    }
    samples = summary["sample_id"].astype(str).to_numpy()
    fig, ax = plt.subplots(figsize=(max(4.5, 0.7 * len(samples) + 3), 3.8))
    bottom = np.zeros(len(samples))
    for col in cols:
        values = summary[col].to_numpy(dtype=float)
        if values.sum() == 0:
            continue
        ax.bar(
            samples,
            values,
            bottom=bottom,
            color=colours.get(col, None),
            label=col.removeprefix("removed_").replace("_", " "),
        )
        bottom += values
    if "cells_in" in summary:
        for i, (total, n_in) in enumerate(zip(bottom, summary["cells_in"])):
            ax.text(
                i, total, f"{100 * total / max(n_in, 1):.1f}%", ha="center", va="bottom", fontsize=8
            )
    ax.set_ylabel("cells removed")
    ax.set_title("Cells removed by QC, by main reason")
    ax.legend(frameon=False, bbox_to_anchor=(1.02, 1), loc="upper left")
    if len(samples) > 4:
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def removed_by_lineage(summary: pd.DataFrame) -> plt.Figure:
    """Heatmap: percent of each first-pass lineage removed by QC, per sample.

    A rule fair to the cell mix removes about the same share of a lineage in every sample,
    whatever its neutrophil share. Cells show the percent and, below it, the cells seen.

    Parameters
    ----------
    summary
        Table returned by :func:`sepsis_sc.qc.run_qc` (``lineage_removed_frac_<lineage>``
        and ``lineage_n_<lineage>`` columns).
    """
    set_style()
    cols = [c for c in summary.columns if c.startswith("lineage_removed_frac_")]
    if not cols:
        raise ValueError("summary has no lineage_removed_frac_<lineage> columns (run_qc output).")
    names = [c.removeprefix("lineage_removed_frac_") for c in cols]
    n = summary[[f"lineage_n_{x}" for x in names]].to_numpy(dtype=float)
    keep = n.sum(axis=0) > 0
    names = [x for x, k in zip(names, keep) if k]
    frac = 100 * summary[[c for c, k in zip(cols, keep) if k]].to_numpy(dtype=float)
    n = n[:, keep]
    samples = summary["sample_id"].astype(str).to_numpy()
    fig, ax = plt.subplots(figsize=(0.9 * len(names) + 2.5, 0.45 * len(samples) + 1.8))
    im = ax.imshow(np.nan_to_num(frac, nan=0.0), cmap="Reds", vmin=0, vmax=max(20, np.nanmax(frac)))
    for i in range(len(samples)):
        for j in range(len(names)):
            if n[i, j] > 0:
                dark = frac[i, j] > 0.6 * max(20, np.nanmax(frac))
                ax.text(
                    j,
                    i,
                    f"{frac[i, j]:.0f}%\nn={int(n[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(samples)), samples)
    rule = summary["upper_tail_rule"].iloc[0] if "upper_tail_rule" in summary else "?"
    ax.set_title(f"Cells removed by QC per lineage (upper-tail rule: {rule})")
    fig.colorbar(im, ax=ax, label="% of the lineage removed", shrink=0.8)
    fig.tight_layout()
    return fig


def contamination(summary: pd.DataFrame) -> plt.Figure:
    """Bars: estimated ambient-RNA contamination per sample, labelled by how it was made.

    Parameters
    ----------
    summary
        Table returned by :func:`sepsis_sc.qc.run_qc` (``contamination``,
        ``contamination_source``, ``ambient_corrected``).
    """
    set_style()
    if "contamination" not in summary:
        raise ValueError("summary has no contamination column (run_qc output).")
    samples = summary["sample_id"].astype(str).to_numpy()
    rho = 100 * summary["contamination"].to_numpy(dtype=float)
    source = summary.get("contamination_source", pd.Series("", index=summary.index)).astype(str)
    corrected = summary.get("ambient_corrected", pd.Series(False, index=summary.index))
    colours = {"raw": "#1f77b4", "filtered_pooled": "#bdbdbd"}
    fig, ax = plt.subplots(figsize=(max(4.5, 0.7 * len(samples) + 3), 3.8))
    x = np.arange(len(samples))
    ax.bar(
        x,
        np.nan_to_num(rho),
        color=[colours.get(s, "#ffffff") for s in source],
        edgecolor="black",
        linewidth=0.5,
    )
    for i, (r, cor, src) in enumerate(zip(rho, corrected.astype(bool), source)):
        # the colour says how the soup was made (raw: corrected; pooled: reported only);
        # a sample that departs from that says so
        note = "\n(not corrected)" if src == "raw" and not cor else ""
        note = "\n(corrected)" if src != "raw" and cor else note
        label = "not estimated" if not np.isfinite(r) else f"{r:.1f}%{note}"
        ax.text(i, 0 if not np.isfinite(r) else r, label, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, samples, rotation=45 if len(samples) > 4 else 0)
    ax.set_ylabel("contamination (% of UMIs from soup)")
    ax.set_title("Ambient RNA per sample")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(
        handles,
        [
            "soup from raw droplets (SoupX; corrected)",
            "no raw droplets: soup from the pooled cells\n(rough, biased high on "
            "simulated blood;\nreported, not corrected)",
        ],
        frameon=False,
        bbox_to_anchor=(1.02, 1),
        loc="upper left",
        fontsize=8,
    )
    top = np.nanmax(rho) if np.isfinite(rho).any() else 1.0
    ax.set_ylim(0, 1.3 * top + 0.5)
    fig.tight_layout()
    return fig
