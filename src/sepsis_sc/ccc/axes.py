"""The therapy axes as data (``resources/therapy_axes.yaml``): :func:`load_axes`,
:func:`axis_pairs`, :func:`axis_genes`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sepsis_sc.resources import load_yaml, resource_path

__all__ = ["load_axes", "axis_pairs", "axis_genes", "AXIS_KEYS"]

#: keys every axis must have
AXIS_KEYS = (
    "label",
    "pairs",
    "mouse_pairs",
    "source",
    "target",
    "states",
    "target_direction",
    "therapy",
    "trial",
    "rationale",
    "references",
    "caveat",
)


def load_axes(axes: Mapping[str, Any] | str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The therapy axes: as given, from a YAML path, or the packaged resource; every axis is
    checked for :data:`AXIS_KEYS` (``ValueError`` names the axis and the missing keys)."""
    if axes is None or isinstance(axes, str | Path):
        axes = load_yaml(Path(axes) if axes else resource_path("therapy_axes.yaml"))
    out = {}
    for name, a in dict(axes).items():
        missing = [k for k in AXIS_KEYS if k not in a]
        if missing:
            raise ValueError(f"therapy axis {name!r} lacks {missing}")
        if a["target_direction"] not in ("up", "down"):
            raise ValueError(f"therapy axis {name!r}: target_direction must be 'up' or 'down'")
        out[str(name)] = dict(a)
    return out


def axis_pairs(axis: Mapping[str, Any], organism: str = "human") -> list[tuple[str, str]]:
    """The axis's (ligand, receptor) pairs of ``organism`` in LIANA's complex notation."""
    key = "mouse_pairs" if organism == "mouse" else "pairs"
    return [(str(lig), str(rec)) for lig, rec in axis[key]]


def axis_genes(axes: Mapping[str, Mapping[str, Any]], organism: str = "human") -> list[str]:
    """Every gene (complex subunit) of the axes' pairs, sorted."""
    genes = set()
    for axis in axes.values():
        for lig, rec in axis_pairs(axis, organism):
            genes.update(lig.split("_"))
            genes.update(rec.split("_"))
    return sorted(genes)
