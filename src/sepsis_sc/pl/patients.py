"""Figures of the patient-profile stage (:func:`sepsis_sc.patients.profile` outputs).

* :func:`immune_card`: one sample's readouts as z-scores against the control range band
  (grey), flagged readouts coloured (below purple, above orange), its state calls beneath.
* :func:`cohort_heatmap`: samples x readouts z-scores, samples clustered, condition bar.
* :func:`trajectory_plot`: donors sampled more than once, one panel per readout.

Every function takes the tables as written by the workflow (``patients/profiles.tsv``,
``states.tsv``, ``trajectories.tsv``) and returns a matplotlib Figure (callers save it with
:func:`sepsis_sc.pl.style.savefig`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sepsis_sc.pl.style import categorical_palette, condition_palette, set_style

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FLAG_COLOURS", "immune_card", "cohort_heatmap", "trajectory_plot"]

#: flag colours (distinct from the red / blue of the conditions)
FLAG_COLOURS = {"below": "#6a3d9a", "above": "#e66101", "within": "#4d4d4d"}
_BAND = "#d9d9d9"
_CLIP = 8.0


def _plt():
    import matplotlib.pyplot as plt

    set_style()
    return plt


def _palette(conditions: Sequence[str], case: str | None, control: str | None) -> dict[str, str]:
    fixed = condition_palette(case, control) if case and control else {}
    return categorical_palette(list(dict.fromkeys(conditions)), fixed)


def _readout_order(profiles: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(profiles["readout"]))


def immune_card(
    profiles: pd.DataFrame,
    sample_id: str,
    states: pd.DataFrame | None = None,
    *,
    case: str | None = None,
    control: str | None = None,
    condition_key: str = "condition",
) -> Figure:
    """One sample's immune card.

    Parameters
    ----------
    profiles
        Long profile table (``patients/profiles.tsv``): ``sample_id``, ``readout``,
        ``label``, ``group``, ``value``, ``z``, ``ref_k``, ``flag`` (and ``donor``,
        ``condition``).
    sample_id
        The sample to draw.
    states
        State calls (``patients/states.tsv``); the calls of this sample are listed.
    case, control
        Condition labels (colours from :func:`sepsis_sc.pl.style.condition_palette`).
    condition_key
        Column holding the condition.

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _plt()
    p = profiles[profiles["sample_id"].astype(str) == str(sample_id)]
    if p.empty:
        raise KeyError(f"sample {sample_id!r} not in the profile table")
    p = p.reset_index(drop=True)
    n = len(p)
    st = (
        states[states["sample_id"].astype(str) == str(sample_id)]
        if states is not None
        else pd.DataFrame()
    )
    n_lines = 1 + (len(st) if len(st) else 0)
    fig = plt.figure(figsize=(8.2, 0.26 * n + 1.5 + 0.17 * n_lines))
    h = fig.get_figheight()
    top = 1 - 0.55 / h
    y_head = (0.15 + 0.17 * n_lines) / h  # heading of the state-call block
    bottom = y_head + 0.62 / h
    ax = fig.add_axes((0.36, bottom, 0.47, top - bottom))
    y = np.arange(n)[::-1]
    _card_points(plt, ax, p, y)
    _card_axis(ax, p, y)
    _card_header(plt, fig, p, sample_id, case, control, condition_key)
    _card_states(fig, st, y_head)
    return fig


def _card_points(plt, ax, p: pd.DataFrame, y: np.ndarray) -> None:
    """Control-range bands (grey) and each readout's z-score, coloured by its flag; values
    beyond the clip are drawn as arrows at the edge."""
    for yi, k in zip(y, p.get("ref_k", pd.Series(np.nan, index=p.index))):
        if np.isfinite(k):
            ax.add_patch(plt.Rectangle((-k, yi - 0.35), 2 * k, 0.7, color=_BAND, lw=0, zorder=0))
    ax.axvline(0, color="#969696", lw=0.8, zorder=1)
    for yi, (_, r) in zip(y, p.iterrows()):
        z = float(r["z"]) if pd.notna(r["z"]) else np.nan
        flag = str(r["flag"])
        if not np.isfinite(z):
            ax.text(0, yi, "n/a", ha="center", va="center", fontsize=7.5, color="#737373")
            continue
        col = FLAG_COLOURS.get(flag, "#4d4d4d")
        zc = float(np.clip(z, -_CLIP, _CLIP))
        marker = "o" if abs(z) <= _CLIP else (">" if z > 0 else "<")
        ax.scatter(
            [zc],
            [yi],
            s=42 if flag != "within" else 26,
            color=col,
            marker=marker,
            zorder=3,
            edgecolor="white",
            linewidth=0.5,
        )


def _card_axis(ax, p: pd.DataFrame, y: np.ndarray) -> None:
    """Readout names, z axis, dotted lines between readout groups, the value column."""
    n = len(p)
    ax.set_yticks(y)
    ax.set_yticklabels(p["label"].astype(str), fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlim(-_CLIP - 0.6, _CLIP + 0.6)
    ax.set_xlabel("z-score vs control reference (grey band = control range)", fontsize=8.5)
    ax.tick_params(axis="x", labelsize=8)
    groups = p["group"].astype(str).tolist() if "group" in p else [""] * n
    for i in range(1, n):
        if groups[i] != groups[i - 1]:
            ax.axhline(y[i] + 0.5, color="#bdbdbd", lw=0.6, ls=":")
    for yi, (_, r) in zip(y, p.iterrows()):
        v = r["value"]
        txt = "NA" if pd.isna(v) else f"{float(v):.3g}"
        ax.text(1.02, yi, txt, transform=ax.get_yaxis_transform(), fontsize=7.5, va="center")
    ax.text(
        1.02,
        n - 0.3,
        "value",
        transform=ax.get_yaxis_transform(),
        fontsize=7.5,
        va="bottom",
        style="italic",
    )


def _card_header(plt, fig, p: pd.DataFrame, sample_id: str, case, control, condition_key) -> None:
    """Sample, condition (in its colour), donor and the flag legend along the top."""
    h = fig.get_figheight()
    cond = str(p[condition_key].iloc[0]) if condition_key in p else ""
    donor = str(p["donor"].iloc[0]) if "donor" in p else ""
    pal = _palette([cond], case, control)
    fig.text(
        0.02, 1 - 0.3 / h, f"Immune card: {sample_id}", fontsize=11, fontweight="bold", va="center"
    )
    fig.text(
        0.40,
        1 - 0.3 / h,
        f"{cond}",
        color=pal.get(cond, "black"),
        fontsize=10,
        fontweight="bold",
        va="center",
    )
    fig.text(0.58, 1 - 0.3 / h, f"donor {donor}", fontsize=9, va="center")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=c, label=f) for f, c in FLAG_COLOURS.items()
    ]
    fig.legend(
        handles=handles,
        loc="center right",
        bbox_to_anchor=(0.99, 1 - 0.3 / h),
        ncol=3,
        fontsize=7.5,
        frameon=False,
        handletextpad=0.2,
        columnspacing=0.8,
    )


def _card_states(fig, st: pd.DataFrame, y_head: float) -> None:
    """The sample's state calls under the readouts (yes / probable in colour and bold)."""
    step = 0.17 / fig.get_figheight()
    fig.text(
        0.02,
        y_head,
        "State calls (research hypotheses, not treatment advice):",
        fontsize=8,
        fontweight="bold",
    )
    for i, (_, s) in enumerate(st.iterrows()):
        call = str(s["call"])
        extra = (
            f" (support {int(s['n_support'])}/{int(s['n_support_total'])})"
            if call in ("yes", "probable") and int(s.get("n_support_total", 0))
            else ""
        )
        colour = {"yes": "#b2182b", "probable": "#e08214", "no": "black"}.get(call, "#737373")
        fig.text(
            0.04,
            y_head - (i + 1) * step,
            f"{s['label']}: {call}{extra}",
            fontsize=7.5,
            color=colour,
            fontweight="bold" if call in ("yes", "probable") else "normal",
        )


def cohort_heatmap(
    profiles: pd.DataFrame,
    *,
    case: str | None = None,
    control: str | None = None,
    condition_key: str = "condition",
    cluster: bool = True,
    vmax: float = 5.0,
) -> Figure:
    """Samples x readouts heatmap of z-scores with a condition colour bar.

    Parameters
    ----------
    profiles
        Long profile table (``patients/profiles.tsv``).
    case, control
        Condition labels (colours of the bar).
    condition_key
        Condition column.
    cluster
        Order samples by average-linkage clustering of their z-profiles (missing = 0).
    vmax
        Colour scale limit (z clipped to +/- vmax).

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _plt()
    order = _readout_order(profiles)
    z = profiles.pivot(index="sample_id", columns="readout", values="z")
    z = z.reindex(columns=[r for r in order if r in z.columns])
    z = z.loc[:, z.notna().any()]
    labels = profiles.drop_duplicates("readout").set_index("readout")["label"]
    cond = profiles.drop_duplicates("sample_id").set_index("sample_id")[condition_key].astype(str)
    rows = _sample_order(z, cluster, vmax)
    z = z.loc[rows]
    n_s, n_r = z.shape
    fig = plt.figure(figsize=(max(6.0, 0.36 * n_r + 3.0), max(3.2, 0.28 * n_s + 2.6)))
    h = fig.get_figheight()
    w = fig.get_figwidth()
    bottom, top = 2.2 / h, 1 - 0.45 / h
    left = 1.6 / w
    bar = fig.add_axes((left, bottom, 0.22 / w, top - bottom))
    ax = fig.add_axes((left + 0.3 / w, bottom, 1 - left - 1.5 / w, top - bottom))
    cax = fig.add_axes(
        (1 - 0.95 / w, bottom + 0.2 * (top - bottom), 0.18 / w, 0.6 * (top - bottom))
    )
    if n_r == 0:
        ax.text(0.5, 0.5, "no readout has a reference range", ha="center", va="center")
        ax.axis("off")
        bar.axis("off")
        cax.axis("off")
        return fig
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#e0e0e0")
    data = np.ma.masked_invalid(z.to_numpy(dtype=float).clip(-vmax, vmax))
    im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(n_r))
    ax.set_xticklabels(
        [str(labels.get(r, r)) for r in z.columns],
        rotation=60,
        ha="right",
        fontsize=7.5,
        rotation_mode="anchor",
    )
    ax.set_yticks([])
    pal = _palette(sorted(set(cond)), case, control)
    _condition_strip(bar, rows, cond, pal)
    cb = fig.colorbar(im, cax=cax)
    cb.set_label(f"z vs controls (clipped at +/-{vmax:g})", fontsize=8)
    cb.ax.tick_params(labelsize=7.5)
    handles = [plt.Rectangle((0, 0), 1, 1, color=pal[c]) for c in pal]
    fig.legend(
        handles,
        list(pal),
        loc="upper left",
        bbox_to_anchor=(0.01, 1 - 0.05 / h),
        ncol=len(pal),
        fontsize=8,
        frameon=False,
        title=None,
    )
    ax.set_title("Patient immune profiles (grey = not measurable)", fontsize=10, loc="right")
    return fig


def _sample_order(z: pd.DataFrame, cluster: bool, vmax: float) -> list[str]:
    """Samples in average-linkage order of their clipped z-profiles (missing = 0), or as
    given when not clustering or too few samples / readouts."""
    rows = list(z.index)
    if cluster and len(rows) > 2 and z.shape[1] > 1:
        from scipy.cluster.hierarchy import leaves_list, linkage

        rows = [
            rows[i]
            for i in leaves_list(linkage(z.fillna(0).clip(-vmax, vmax).to_numpy(), "average"))
        ]
    return rows


def _condition_strip(bar, rows: list[str], cond: pd.Series, pal: Mapping[str, str]) -> None:
    """The samples' conditions as a colour strip, sample names as its tick labels."""
    from matplotlib.colors import ListedColormap

    cats = list(pal)
    bar.imshow(
        np.array([[cats.index(cond[s])] for s in rows]),
        aspect="auto",
        cmap=ListedColormap([pal[c] for c in cats]),
        vmin=-0.5,
        vmax=len(cats) - 0.5,
        interpolation="nearest",
    )
    bar.set_xticks([])
    bar.set_yticks(range(len(rows)))
    bar.set_yticklabels(rows, fontsize=7.5)
    for sp_ in ("top", "right", "bottom", "left"):
        bar.spines[sp_].set_visible(False)


def trajectory_plot(
    trajectories: pd.DataFrame,
    *,
    readouts: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    ncols: int = 4,
    max_raw: int = 8,
) -> Figure:
    """Readout z-scores over time for donors sampled more than once (the raw readouts when
    the run has no control reference, so no z).

    Parameters
    ----------
    trajectories
        ``patients/trajectories.tsv`` (:func:`sepsis_sc.patients.trajectories`).
    readouts
        Readouts to draw (default: those with a z-score in any repeated sample; without any
        z-score, the first ``max_raw`` readouts with a value).
    labels
        Readout -> display label.
    ncols
        Panels per row.
    max_raw
        Readouts drawn by default when there is no z-score (raw values).

    Returns
    -------
    matplotlib.figure.Figure
        A single message panel when no donor was sampled twice.
    """
    plt = _plt()
    t = trajectories
    if t is None or t.empty:
        fig, ax = plt.subplots(figsize=(5, 1.6))
        ax.text(
            0.5,
            0.5,
            "no donor was sampled more than once:\nno trajectories",
            ha="center",
            va="center",
            fontsize=10,
        )
        ax.axis("off")
        return fig
    t = t.copy()
    t["z"] = pd.to_numeric(t["z"], errors="coerce")
    t["value"] = pd.to_numeric(t.get("value", np.nan), errors="coerce")
    # without a control reference (no control donors, no reference_file) there is no z:
    # the raw readouts are drawn instead, said on the axis and in the title
    use_z = bool(t["z"].notna().any())
    y = "z" if use_z else "value"
    if readouts is None:
        readouts = [
            r for r in dict.fromkeys(t["readout"]) if t.loc[t["readout"] == r, y].notna().any()
        ]
        if not use_z:
            readouts = readouts[:max_raw]
    readouts = list(readouts)
    if not readouts:
        readouts = list(dict.fromkeys(t["readout"]))[:1]
    donors = list(dict.fromkeys(t["donor"].astype(str)))
    pal = categorical_palette(donors)
    nrow = int(np.ceil(len(readouts) / ncols))
    ncol = min(ncols, len(readouts))
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(2.6 * ncol + 0.4, 2.1 * nrow + 0.8), squeeze=False, sharex=True
    )
    tp = t.drop_duplicates(["order"]).set_index("order")["timepoint"].astype(str)
    for ax, r in zip(axes.flat, readouts):
        sub = t[t["readout"] == r]
        if use_z:
            k = pd.to_numeric(sub.get("ref_k", pd.Series(dtype=float)), errors="coerce").median()
            k = float(k) if np.isfinite(k) else 2.0
            ax.axhspan(-k, k, color=_BAND, lw=0, zorder=0)
            ax.axhline(0, color="#969696", lw=0.7)
        for d, g in sub.groupby(sub["donor"].astype(str), sort=False):
            g = g.sort_values("order")
            ax.plot(
                g["order"],
                g[y].clip(-_CLIP, _CLIP) if use_z else g[y],
                marker="o",
                ms=4,
                color=pal[d],
                lw=1.2,
                label=d,
            )
        ax.set_title(str((labels or {}).get(r, r)), fontsize=8.5)
        ax.tick_params(labelsize=7.5)
        ax.set_xticks(list(tp.index))
        ax.set_xticklabels([tp[i] if tp[i] not in ("", "nan") else f"#{i + 1}" for i in tp.index])
    for ax in list(axes.flat)[len(readouts) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("z vs controls" if use_z else "value", fontsize=8)
    handles = [plt.Line2D([], [], color=pal[d], marker="o", label=d) for d in donors]
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=min(len(donors), 6),
        fontsize=8,
        frameon=False,
        title="donor",
        title_fontsize=8,
        bbox_to_anchor=(0.5, 1.0),
    )
    fig.suptitle(
        "Trajectories of repeatedly sampled donors ("
        + (
            "grey band: control range)"
            if use_z
            else "raw values: no control reference in this run, no z)"
        ),
        fontsize=10,
        y=1.0 + 0.35 / fig.get_figheight(),
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    return fig
