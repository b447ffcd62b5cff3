"""Figures of the sample-level statistics (:mod:`sepsis_sc.stats` tables) and state scores.

* :func:`forest`: effect and 95% CI per state, one panel per metric scale.
* :func:`sample_values`: one panel per state, one point per sample, by condition.
* :func:`score_umaps`: UMAP small multiples coloured by state scores.
* :func:`composition`: stacked bars of label proportions per sample.
* :func:`therapy_targets`: signed -log10 FDR per state and therapy axis, coloured by
  evidence, grouped per therapy (strata and axes under their state), the therapeutic idea
  once per group.

Each function returns a matplotlib Figure; save it with :func:`sepsis_sc.pl.style.savefig`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from sepsis_sc.pl.style import (
    cell_type_palette,
    condition_palette,
    lineage_palette,
    set_style,
    wrap,
)
from sepsis_sc.stats import EFFECT_TYPE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["forest", "sample_values", "score_umaps", "composition", "therapy_targets"]


def _plt():
    import matplotlib.pyplot as plt

    set_style()
    return plt


def forest(
    effects: pd.DataFrame,
    *,
    case: str,
    control: str,
    alpha: float = 0.05,
    primary_only: bool = False,
) -> Figure:
    """Forest plot: effect and 95% CI per state, one panel per metric scale.

    Significant effects (FDR <= alpha) are drawn in the case colour, others in grey.
    ``primary_only``: only each state's pre-specified primary row (``role == "primary"``,
    the tests the FDR is taken over); the workflow draws these, since with a row per
    stratum (``ifn_response.t``, ...) all four metrics make a figure too tall to read.
    Returns the matplotlib Figure (save with :func:`sepsis_sc.pl.style.savefig`).
    """
    plt = _plt()
    if primary_only and "role" in effects:
        effects = effects[effects["role"] == "primary"]
    metrics = [
        m
        for m in ("fraction", "mean_score", "pseudobulk_score", "pseudobulk_expression")
        if m in set(effects["metric"])
    ]
    heights = [max(1, (effects["metric"] == m).sum()) for m in metrics]
    fig, axes = plt.subplots(
        len(metrics),
        1,
        figsize=(7, 1.0 + 0.38 * sum(heights) + 0.6 * len(metrics)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    col = condition_palette(case, control)[case]
    for ax, m in zip(axes[:, 0], metrics):
        sub = effects[effects["metric"] == m].iloc[::-1]
        yy = np.arange(len(sub))
        sig = sub["significant"].fillna(False).to_numpy(bool)
        colours = np.where(sig, col, "#7f7f7f")
        ok = np.isfinite(sub["ci_low"].to_numpy(float))
        for y, r, c, has_ci in zip(yy, sub.itertuples(), colours, ok):
            if has_ci:
                ax.plot([r.ci_low, r.ci_high], [y, y], color=c, lw=2)
            ax.plot(r.effect, y, "o", color=c, ms=6, mfc=c if has_ci else "white")
        ax.axvline(0, color="black", lw=0.8, ls="--")
        labels = sub["label"].astype(str)
        if "role" in sub and not primary_only:  # the pre-specified primary metric is starred
            labels = labels + np.where(sub["role"] == "primary", " *", "")
        ax.set_yticks(yy, labels)
        ax.set_xlabel(
            EFFECT_TYPE[m]
            .replace("(case - control)", f"({case} - {control})")
            .replace("(case/control)", f"({case}/{control})")
        )
        ax.set_title(
            {
                "fraction": "State frequency",
                "mean_score": "Mean state score",
                "pseudobulk_score": "Pseudobulk state score",
                "pseudobulk_expression": "Pseudobulk expression of the state genes",
            }[m],
            loc="left",
        )
    star = "; * = primary metric" if "role" in effects and not primary_only else ""
    star = "; primary metric of each state" if primary_only else star
    fig.suptitle(
        f"{case} vs {control}: effect and 95% CI (coloured: FDR \u2264 {alpha}{star})",
        x=0.01,
        ha="left",
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return fig


def sample_values(
    table: pd.DataFrame, *, case: str, control: str, metric: str = "mean_score", ncols: int = 4
) -> Figure:
    """Small multiples: one panel per state, one point per sample, by condition.

    Lines join the samples of a donor seen in both conditions; the bar marks the group mean.
    Returns the Figure.
    """
    plt = _plt()
    sub = table[(table["metric"] == metric) & table["condition"].isin([case, control])]
    states = list(dict.fromkeys(sub["state"]))
    if not states:
        raise ValueError(f"no rows with metric {metric!r} for {case!r}/{control!r} in the table")
    ncols = min(ncols, len(states))
    nrows = int(np.ceil(len(states) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.5 * nrows), squeeze=False)
    pal = condition_palette(case, control)
    rng = np.random.default_rng(0)
    for ax, st in zip(axes.flat, states):
        d = sub[sub["state"] == st]
        for i, c in enumerate((control, case)):
            v = d[d["condition"] == c]
            x = i + rng.uniform(-0.12, 0.12, len(v))
            ax.scatter(x, v["value"], color=pal[c], s=22, alpha=0.85, edgecolor="white", lw=0.4)
            if v["value"].notna().any():
                ax.hlines(v["value"].mean(), i - 0.25, i + 0.25, color="black", lw=1.5)
        piv = d.pivot_table(index="donor", columns="condition", values="value", aggfunc="mean")
        if case in piv and control in piv:
            for _, r in piv.dropna().iterrows():
                ax.plot([0, 1], [r[control], r[case]], color="#9e9e9e", lw=0.6, zorder=0)
        ax.set_xticks([0, 1], [control, case])
        ax.set_xlim(-0.5, 1.5)
        lab = str(d["label"].iloc[0])
        ax.set_title(wrap(lab, 30), fontsize=9)
    for ax in list(axes.flat)[len(states) :]:
        ax.axis("off")
    ylabel = {
        "fraction": "fraction of population",
        "mean_score": "mean score",
        "pseudobulk_score": "pseudobulk score",
        "pseudobulk_expression": "pseudobulk log2 CPM (up - down)",
    }[metric]
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    fig.suptitle(f"Per-sample {ylabel} (one point per sample)", x=0.01, ha="left")
    fig.tight_layout()
    return fig


def score_umaps(
    adata: ad.AnnData, states: Sequence[str] | None = None, *, ncols: int = 3, basis: str = "X_umap"
) -> Figure:
    """UMAP small multiples coloured by state scores (grey: outside the parent population).

    Needs ``obsm[basis]``. Returns the Figure.
    """
    plt = _plt()
    if basis not in adata.obsm:
        raise KeyError(f"obsm[{basis!r}] missing; compute a UMAP (sepsis_sc.cluster) first")
    if states is None:
        # the states score_states recorded (not other *_score columns such as doublet_score)
        rules = adata.uns.get("state_rules", {})
        states = [
            c[:-6]
            for c in adata.obs.columns
            if c.endswith("_score") and (c[:-6] in rules if len(rules) else c != "doublet_score")
        ]
    if not states:
        raise ValueError("no <state>_score columns in obs; run sepsis_sc.score.score_states first")
    panels = _score_panels(adata, states)
    xy = np.asarray(adata.obsm[basis])[:, :2]
    ncols = min(ncols, len(panels))
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.1 * nrows + 0.4), squeeze=False)
    order = np.random.default_rng(0).permutation(adata.n_obs)
    size = max(0.5, min(8.0, 12000 / max(adata.n_obs, 1)))
    for ax, (lab, values) in zip(axes.flat, panels.items()):
        v = values[order]
        p = xy[order]
        na = ~np.isfinite(v)
        ax.scatter(p[na, 0], p[na, 1], c="#e0e0e0", s=size, lw=0, rasterized=True)
        sc = ax.scatter(
            p[~na, 0], p[~na, 1], c=v[~na], cmap="viridis", s=size, lw=0, rasterized=True
        )
        fig.colorbar(sc, ax=ax, shrink=0.7)
        ax.set_title(wrap(lab, 32), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        "State scores (grey: cells outside the state's parent population)", x=0.01, ha="left"
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return fig


def _score_panels(adata: ad.AnnData, states: Sequence[str]) -> dict[str, np.ndarray]:
    """One panel per state, the strata of a stratified state (``ifn_response.t``, ...) drawn
    together: their cells do not overlap, and nine small panels of one programme say less
    than one. Panel title: the label (``... (per lineage)`` for a stratified state)."""
    rules = adata.uns.get("state_rules", {})
    panels: dict[str, np.ndarray] = {}
    for st in states:
        r = rules.get(st, {})
        stratum = str(r.get("stratum", "") or "")
        label = str(r.get("label", st))
        values = adata.obs[f"{st}_score"].to_numpy(float)
        if stratum and label.endswith(f" ({stratum})"):
            label = label[: -len(f" ({stratum})")] + " (per stratum)"
            if label in panels:
                panels[label] = np.where(np.isfinite(panels[label]), panels[label], values)
                continue
        panels[label] = values.copy()
    return panels


def composition(
    adata: ad.AnnData,
    *,
    case: str,
    control: str,
    level: str = "lineage",
    sample_key: str = "sample_id",
    condition_key: str = "condition",
) -> Figure:
    """Stacked bars of label proportions per sample, samples grouped by condition.

    Colours come from the shared lineage / cell-type palettes. Returns the Figure.
    """
    plt = _plt()
    obs = adata.obs[[sample_key, condition_key, level]].astype(str)
    obs = obs[obs[condition_key].isin([case, control])]
    props = pd.crosstab(obs[sample_key], obs[level], normalize="index")
    cond = obs.drop_duplicates(sample_key).set_index(sample_key)[condition_key]
    order = sorted(props.index, key=lambda s: (cond[s] != control, s))
    props = props.loc[order]
    pal = lineage_palette(props.columns) if level == "lineage" else cell_type_palette(props.columns)
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(order) + 3), 4))
    bottom = np.zeros(len(order))
    for lab in props.columns:
        ax.bar(
            np.arange(len(order)), props[lab], bottom=bottom, color=pal[lab], label=lab, width=0.85
        )
        bottom += props[lab].to_numpy()
    cpal = condition_palette(case, control)
    n_ctrl = int((cond[order] == control).sum())
    ax.axvline(n_ctrl - 0.5, color="black", lw=1)
    for x0, x1, c in ((0, n_ctrl, control), (n_ctrl, len(order), case)):
        if x1 > x0:
            ax.text(
                (x0 + x1 - 1) / 2,
                1.02,
                c,
                ha="center",
                va="bottom",
                color=cpal[c],
                fontweight="bold",
            )
    ax.set_xticks(np.arange(len(order)), order, rotation=90, fontsize=7)
    ax.set_ylabel(f"fraction of cells ({level})")
    ax.set_ylim(0, 1.08)
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False, fontsize=8)
    ax.set_title(
        f"{level.replace('_', ' ').capitalize()} composition per sample", loc="left", pad=16
    )
    fig.tight_layout()
    return fig


def _short_labels(labels: pd.Series, states: pd.Series) -> str:
    """Labels joined; strata of the group's state ("type I interferon response (DC)") by
    their stratum only, after the state's name once."""
    base = str(states.iloc[0]).rsplit(" (", 1)[0]
    inner = [
        str(x)[len(base) + 2 : -1]
        for x in labels
        if str(x).startswith(base + " (") and str(x).endswith(")")
    ]
    other = [
        str(x) for x in labels if not (str(x).startswith(base + " (") and str(x).endswith(")"))
    ]
    parts = ([f"{base} in {', '.join(inner)}"] if inner else []) + other
    return "; ".join(parts)


def _therapy_rows(targets: pd.DataFrame, max_ns: int = 3) -> list[dict]:
    """Display rows of the therapy figure, top to bottom: per group (``group`` column; each
    row its own group without one) its significant rows, its not-significant rows (beyond
    ``max_ns`` of them only the first, the rest named on one line), then one line naming
    its untested rows. The group's therapy (its state's, else its first row's) is written
    once, at its first row."""
    t = targets.copy()
    if "group" not in t:
        t["group"] = np.arange(len(t)).astype(str)
    t["therapy"] = t["therapy"].fillna("").astype(str)
    out = []
    for _, g in t.groupby("group", sort=False):
        own = g[g["kind"] != "axis"] if "kind" in g else g
        idea = str((own if len(own) else g)["therapy"].iloc[0])
        tested = g[g["fdr"].notna()]
        ns = tested["evidence"] == "not significant"
        shown = tested if ns.sum() <= max_ns else tested[~ns | (ns.cumsum() == 1)]
        hidden = tested.loc[ns & ~tested.index.isin(shown.index), "label"]
        rows = [
            {
                "label": str(r.label),
                "effect": float(r.effect) if pd.notna(r.effect) else 0.0,
                "fdr": float(r.fdr),
                "evidence": str(r.evidence),
                "untested": False,
            }
            for r in shown.itertuples(index=False)
        ]
        for what, labels in (
            ("also not significant", hidden),
            ("not tested", g.loc[g["fdr"].isna(), "label"]),
        ):
            if len(labels):
                names = _short_labels(labels, own["label"] if len(own) else labels)
                rows.append(
                    {
                        "label": f"{what}: {names}",
                        "effect": 0.0,
                        "fdr": 1.0,
                        "evidence": "not tested",
                        "untested": True,
                    }
                )
        for k, r in enumerate(rows):
            r["idea"] = idea if k == 0 else ""
            r["last_of_group"] = k == len(rows) - 1
        out += rows
    return out


def therapy_targets(targets: pd.DataFrame, *, alpha: float = 0.05) -> Figure:
    """Therapy-target summary per therapy: signed -log10 FDR per state or axis, coloured by
    evidence, grouped as the table groups them (``group``: a state's strata and the therapy
    axes under it; tested rows first, its untested rows named on one line, no empty bars).

    Bars point right when the state is higher in cases, left when lower; the dotted lines
    mark FDR = alpha; thin lines separate groups. Each group is labelled once with its
    therapeutic idea, wrapped over as many lines as it needs (never shortened); rows grow
    with the longest text. Returns the Figure.
    """
    plt = _plt()
    if targets.empty:
        raise ValueError("empty therapy-target table")
    rows = _therapy_rows(targets)[::-1]
    d = pd.DataFrame(rows)
    sign = np.sign(d["effect"].to_numpy(float))
    val = sign * -np.log10(d["fdr"].clip(lower=1e-12).to_numpy(float))
    val[d["untested"].to_numpy(bool)] = 0.0
    colours = {
        "supported": "#2ca02c",
        "unnamed change": "#ff7f0e",
        "opposite": "#9467bd",
        "not significant": "#bdbdbd",
        "not tested": "#e0e0e0",
    }
    ideas = [wrap(t, 60) for t in d["idea"]]
    labels = [wrap(t, 48) for t in d["label"]]
    n_lines = max(s.count("\n") + 1 for s in ideas + labels)
    row = max(0.55, 0.25 + 0.16 * n_lines)  # inches per row: room for the wrapped texts
    fig, ax = plt.subplots(figsize=(9, row * len(d) + 1.4))
    yy = np.arange(len(d))
    ax.barh(yy, val, color=[colours.get(e, "#e0e0e0") for e in d["evidence"]], height=0.6)
    lim = max(2.0, np.abs(val).max() * 1.1)
    ax.set_xlim(-lim, lim)
    for x in (-np.log10(alpha), np.log10(alpha)):
        ax.axvline(x, color="black", lw=0.6, ls=":")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_ylim(-0.6, len(d) - 0.4)
    ax.set_yticks(yy, labels)
    for tick, untested in zip(ax.get_yticklabels(), d["untested"], strict=True):
        if untested:
            tick.set_color("#808080")
            tick.set_fontstyle("italic")
    for y, idea in zip(yy, ideas, strict=True):
        if idea:
            ax.text(lim * 1.02, y, idea, va="center", ha="left", fontsize=8, linespacing=1.15)
    ends = d["last_of_group"].to_numpy(bool)
    for y in yy[ends]:
        if y > 0:  # below each group but the bottom one
            ax.axhline(y - 0.5, color="#808080", lw=0.5)
    ax.set_xlabel("signed -log10 FDR (right: higher in cases, left: lower)")
    shown = [e for e in colours if e in set(d["evidence"])]
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[e]) for e in shown]
    ax.legend(
        handles,
        shown,
        loc="lower left",
        bbox_to_anchor=(0, 1.0),
        ncol=5,
        frameon=False,
        fontsize=8,
    )
    ax.set_title("Therapy targets: evidence per therapy", loc="left", pad=22)
    fig.tight_layout()
    return fig
