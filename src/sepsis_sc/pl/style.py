"""Shared figure conventions: one palette per vocabulary, used by every figure.

Colours are fixed per label (not per figure), so ``Classical monocyte`` has the same colour
in the UMAP, the dot plot and the composition bars, and ``sepsis`` is the same red in every
panel. All figure helpers in the library use these functions.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on HPC nodes or CI
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = [
    "LINEAGE_COLOURS",
    "CELL_TYPE_COLOURS",
    "UNASSIGNED_COLOUR",
    "lineage_palette",
    "cell_type_palette",
    "condition_palette",
    "categorical_palette",
    "legend_right",
    "savefig",
    "set_style",
    "wrap",
]

UNASSIGNED_COLOUR = "#bdbdbd"

# One hue family per lineage; subsets are shades of their lineage's hue.
LINEAGE_COLOURS: dict[str, str] = {
    "T": "#1f77b4",
    "NK": "#17becf",
    "B": "#2ca02c",
    "Plasma": "#98df8a",
    "Monocyte": "#ff7f0e",
    "Macrophage": "#8c564b",
    "DC": "#9467bd",
    "Neutrophil": "#d62728",
    "Platelet": "#e377c2",
    "Erythroid": "#7f0000",
    "Progenitor": "#bcbd22",
    "Unassigned": UNASSIGNED_COLOUR,
}

CELL_TYPE_COLOURS: dict[str, str] = {
    "CD4 naive T": "#aec7e8",
    "CD4 memory T": "#1f77b4",
    "Treg": "#393b79",
    "CD8 naive T": "#6baed6",
    "CD8 effector/memory T": "#08519c",
    "MAIT": "#5254a3",
    "gamma-delta T": "#9ecae1",
    "NK CD56bright": "#9edae5",
    "NK CD56dim": "#17becf",
    "naive B": "#2ca02c",
    "memory B": "#006d2c",
    "Plasmablast": "#98df8a",
    "Classical monocyte": "#ff7f0e",
    "Non-classical monocyte": "#fdae6b",
    "cDC1": "#5e3c99",
    "cDC2": "#9467bd",
    "pDC": "#c5b0d5",
    "Mature neutrophil": "#d62728",
    "Immature neutrophil": "#ff9896",
    "TREM2-high macrophage": "#8c564b",
    "Macrophage": "#c49c94",
    "Platelet": "#e377c2",
    "Erythroid": "#7f0000",
    "HSPC": "#bcbd22",
    # what the genes allow (issue #32): coarse labels in a greyed shade of their lineage's hue,
    # so a "T unresolved" cell is not drawn in a sibling subset's colour
    "naive T": "#74a9cf",
    "memory T": "#045a8d",
    "T unresolved": "#7f9fbf",
    "NK unresolved": "#6fa8ad",
    "B unresolved": "#7fa37f",
    "Monocyte unresolved": "#c98a4b",
    "DC unresolved": "#8f7fa8",
    "Unassigned": UNASSIGNED_COLOUR,
}

_FALLBACK = plt.get_cmap("tab20").colors


def categorical_palette(
    categories: Iterable[str], fixed: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Map each category to a colour: from ``fixed`` when listed, else a stable fallback."""
    fixed = fixed or {}
    out: dict[str, str] = {}
    i = 0
    for cat in categories:
        if cat in fixed:
            out[cat] = fixed[cat]
        else:
            out[cat] = matplotlib.colors.to_hex(_FALLBACK[i % len(_FALLBACK)])
            i += 1
    return out


def lineage_palette(lineages: Iterable[str] | None = None) -> dict[str, str]:
    """Colours for lineages (all known lineages when ``lineages`` is None)."""
    return categorical_palette(
        lineages if lineages is not None else LINEAGE_COLOURS, LINEAGE_COLOURS
    )


def cell_type_palette(cell_types: Iterable[str] | None = None) -> dict[str, str]:
    """Colours for subset labels (all known labels when ``cell_types`` is None)."""
    return categorical_palette(
        cell_types if cell_types is not None else CELL_TYPE_COLOURS, CELL_TYPE_COLOURS
    )


def condition_palette(case: str, control: str) -> dict[str, str]:
    """Case in red, control in blue, in every figure of a run."""
    return {case: "#c0392b", control: "#2e86c1"}


def set_style() -> None:
    """Readable defaults for report figures (font sizes for a 1:1 view in HTML)."""
    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 150,
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "xtick.labelsize": 9,
            "ytick.labelsize": 9,
            "legend.fontsize": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )


def wrap(text: object, width: int) -> str:
    """``text`` broken into lines of at most ``width`` characters, words kept whole.

    Figures wrap long labels with this instead of cutting them with an ellipsis, so no text
    of a figure is lost (a single word longer than ``width`` stays on its own line).
    """
    return textwrap.fill(str(text), width=width, break_long_words=False, break_on_hyphens=False)


def legend_right(ax: plt.Axes, palette: Mapping[str, str], labels: Iterable[str], **kwargs) -> None:
    """A legend of one coloured dot per label (colour from ``palette``), to the right of
    ``ax``, without a frame; ``kwargs`` go to ``ax.legend`` (e.g. ``markerscale``)."""
    handles = [plt.Line2D([], [], marker="o", ls="", color=palette[v], label=v) for v in labels]
    ax.legend(
        handles=handles,
        frameon=False,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=8,
        **kwargs,
    )


def savefig(fig: plt.Figure, path: str | Path) -> Path:
    """Save ``fig`` as PNG (creating folders), close it, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    logger.info("wrote figure %s", path)
    return path
