"""The controlled vocabulary, the marker sets, and the inputs every annotation step reads.

* :class:`Vocabulary` / :func:`load_vocabulary`: the lineages and cell-type labels of
  ``resources/cell_types.yaml`` with their Cell Ontology terms;
* :func:`load_markers`: lineage and subset marker sets, subset gates and state genes of
  ``resources/markers/{human,mouse}.yaml`` (or a user file), validated against the vocabulary;
* :func:`marker_symbols`, :func:`resolve_genes`: the symbols the sets name and their columns
  in the data (exact symbol first, then older aliases);
* :func:`read_counts`: the raw counts the annotation reads (:class:`sepsis_sc.store.CountSource`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from sepsis_sc import store
from sepsis_sc.data import get_counts
from sepsis_sc.resources import load_yaml, resource_dir, resource_path

__all__ = [
    "UNASSIGNED",
    "LINEAGES",
    "Vocabulary",
    "load_vocabulary",
    "load_markers",
    "marker_symbols",
    "resolve_genes",
    "read_counts",
    "symbol_aliases",
    "current_symbols",
]

UNASSIGNED = "Unassigned"
LINEAGES: tuple[str, ...] = (
    "T",
    "NK",
    "B",
    "Plasma",
    "Monocyte",
    "Macrophage",
    "DC",
    "Neutrophil",
    "Platelet",
    "Erythroid",
    "Progenitor",
)


@dataclass(frozen=True)
class Vocabulary:
    """The controlled vocabulary: ``lineages`` and ``cell_types`` tables.

    Attributes
    ----------
    lineages
        One row per lineage (index), columns ``cl``, ``cl_name``, ``definition``,
        ``default_subset`` (label or ``None``).
    cell_types
        One row per ``cell_type`` label (index, ``Unassigned`` included), columns ``lineage``,
        ``cl``, ``cl_name``, ``parent``, ``definition``, ``cl_exact``.
    """

    lineages: pd.DataFrame
    cell_types: pd.DataFrame

    def lineage_of(self, cell_type: str) -> str:
        """Lineage of a vocabulary label (``Unassigned`` for unknown labels)."""
        if cell_type in self.cell_types.index:
            return str(self.cell_types.at[cell_type, "lineage"])
        return UNASSIGNED

    def subsets_of(self, lineage: str) -> list[str]:
        """Subset labels of a lineage, in vocabulary order."""
        ct = self.cell_types
        return list(ct.index[ct["lineage"] == lineage])


def load_vocabulary(path: str | PathLike[str] | None = None) -> Vocabulary:
    """Load and check the controlled cell-type vocabulary.

    Parameters
    ----------
    path
        YAML file; default ``resources/cell_types.yaml``.

    Returns
    -------
    Vocabulary
        ``lineages`` and ``cell_types`` tables.

    Raises
    ------
    ValueError
        If a label points at an unknown lineage, a CL identifier is malformed or a lineage's
        ``default_subset`` is not one of its subsets.
    """
    path = Path(path) if path is not None else resource_path("cell_types.yaml")
    raw = load_yaml(path)
    if not isinstance(raw, dict) or "lineages" not in raw or "cell_types" not in raw:
        raise ValueError(f"{path}: expected top-level keys 'lineages' and 'cell_types'.")
    lin = pd.DataFrame.from_dict(raw["lineages"], orient="index")
    if "default_subset" not in lin:
        lin["default_subset"] = None
    lin["default_subset"] = lin["default_subset"].where(lin["default_subset"].notna(), None)
    for col in ("unresolved",):
        if col not in lin:
            lin[col] = None
        lin[col] = lin[col].where(lin[col].notna(), None)
    ct = pd.DataFrame.from_dict(raw["cell_types"], orient="index")
    if "cl_exact" not in ct:
        ct["cl_exact"] = True
    ct["cl_exact"] = [v is not False for v in ct["cl_exact"]]
    cl_ok = re.compile(r"^CL:\d{7}$")
    for label, row in ct.iterrows():
        if label != UNASSIGNED and row["lineage"] not in lin.index:
            raise ValueError(f"{path}: cell type {label!r} has unknown lineage {row['lineage']!r}.")
        if label != UNASSIGNED and not cl_ok.match(str(row["cl"])):
            raise ValueError(f"{path}: cell type {label!r} has malformed CL id {row['cl']!r}.")
    for lineage, row in lin.iterrows():
        d = row["default_subset"]
        if d is not None and (d not in ct.index or ct.at[d, "lineage"] != lineage):
            raise ValueError(
                f"{path}: default_subset {d!r} of lineage {lineage!r} is not one of its subsets."
            )
    if "coarse" not in ct:
        ct["coarse"] = None
    ct["coarse"] = ct["coarse"].where(ct["coarse"].notna(), None)
    for lineage, row in lin.iterrows():
        u = row["unresolved"]
        if u is not None and (u not in ct.index or ct.at[u, "lineage"] != lineage):
            raise ValueError(
                f"{path}: unresolved {u!r} of lineage {lineage!r} is not one of its subsets."
            )
    for label, row in ct.iterrows():
        c = row["coarse"]
        if c is not None and (c not in ct.index or ct.at[c, "lineage"] != row["lineage"]):
            raise ValueError(f"{path}: coarse {c!r} of {label!r} is not a label of its lineage.")
    if UNASSIGNED not in ct.index:
        raise ValueError(f"{path}: the vocabulary must contain {UNASSIGNED!r}.")
    if "cl_ancestors" not in ct:
        ct["cl_ancestors"] = [[] for _ in range(len(ct))]
    ct["cl_ancestors"] = [list(v) if isinstance(v, list) else [] for v in ct["cl_ancestors"]]
    for label, row in ct.drop(index=UNASSIGNED).iterrows():
        lin_cl = lin.at[row["lineage"], "cl"]
        if lin_cl != row["cl"] and lin_cl not in row["cl_ancestors"]:
            raise ValueError(
                f"{path}: cell type {label!r} ({row['cl']}) is not its lineage's term {lin_cl} "
                "nor a descendant of it (cl_ancestors); fix the CL term of the label or lineage."
            )
    return Vocabulary(lineages=lin, cell_types=ct)


def load_markers(
    markers: str | PathLike[str] | Mapping[str, Any] | None = None,
    organism: Literal["human", "mouse"] = "human",
    *,
    vocabulary: Vocabulary | None = None,
) -> dict[str, Any]:
    """Load and validate lineage and subset marker sets.

    Parameters
    ----------
    markers
        ``None`` for the packaged ``resources/markers/<organism>.yaml``, a path to a YAML file
        of the same layout, or an already-loaded mapping with keys ``lineage_sets`` and
        ``subset_sets`` (lists of sets with ``name``, ``up``, ``down``, ``source`` and
        ``lineage`` or ``cell_type``) and optional ``aliases``.
    organism
        Which packaged file to load when ``markers`` is ``None``.
    vocabulary
        Vocabulary to check labels against (default: the packaged one).

    Returns
    -------
    dict
        ``{"organism", "aliases", "lineage_sets", "subset_sets", "source_file"}``; each set is a
        dict with ``name``, ``target`` (lineage or cell type), ``up``, ``down``, ``source``.

    Raises
    ------
    ValueError
        If a set lacks a key, has no up-genes or names a label outside the vocabulary.
    """
    vocab = vocabulary or load_vocabulary()
    if markers is None:
        source_file = str(resource_path("markers", f"{organism}.yaml"))
        raw = load_yaml(source_file)
    elif isinstance(markers, Mapping):
        source_file = "<dict>"
        raw = dict(markers)
    else:
        source_file = str(markers)
        if not Path(markers).exists():
            raise FileNotFoundError(f"marker file {markers} does not exist.")
        raw = load_yaml(markers)
    if not isinstance(raw, Mapping) or "lineage_sets" not in raw:
        raise ValueError(
            f"markers {source_file}: expected a mapping with 'lineage_sets' (and 'subset_sets')."
        )

    def _sets(key: str, target_key: str) -> list[dict[str, Any]]:
        out = []
        for i, s in enumerate(raw.get(key) or []):
            name = s.get("name", f"{key}[{i}]")
            for k in ("up", target_key):
                if k not in s:
                    raise ValueError(f"markers {source_file}: set {name!r} lacks key {k!r}.")
            up = [str(g) for g in s.get("up") or []]
            down = [str(g) for g in s.get("down") or []]
            core = [str(g) for g in s.get("core") or []]
            if set(core) - set(up):
                raise ValueError(
                    f"markers {source_file}: set {name!r} lists core genes that are not up "
                    f"genes: {sorted(set(core) - set(up))}."
                )
            if not up:
                raise ValueError(f"markers {source_file}: set {name!r} has no 'up' genes.")
            target = str(s[target_key])
            if target_key == "lineage":
                if target != UNASSIGNED and target not in vocab.lineages.index:
                    raise ValueError(
                        f"markers {source_file}: set {name!r} names unknown lineage {target!r}; "
                        f"use one of {list(vocab.lineages.index)} or {UNASSIGNED!r} (decoy)."
                    )
            elif target not in vocab.cell_types.index or target == UNASSIGNED:
                raise ValueError(
                    f"markers {source_file}: set {name!r} names unknown cell_type {target!r}; "
                    "labels must come from resources/cell_types.yaml."
                )
            out.append(
                {
                    "name": str(name),
                    "target": target,
                    "up": up,
                    "down": down,
                    "core": core or list(up),
                    "source": str(s.get("source", "")),
                }
            )
        return out

    out = {
        "organism": raw.get("organism", organism),
        "aliases": {str(k): [str(v) for v in vs] for k, vs in (raw.get("aliases") or {}).items()},
        "lineage_sets": _sets("lineage_sets", "lineage"),
        "subset_sets": _sets("subset_sets", "cell_type"),
        "state_genes": dict(raw.get("state_genes") or {}),
        "subset_gates": _gates(raw.get("subset_gates") or [], vocab, source_file),
        "source_file": source_file,
    }
    _check_state_genes(out, vocab)
    return out


def _gates(
    raw: Sequence[Mapping[str, Any]], vocab: Vocabulary, source_file: str
) -> list[dict[str, Any]]:
    """Validated two-group subset gates (``name``, ``lineage``, ``groups`` of ``up`` genes,
    ``cell_types`` and a ``name``: the side a cell is given, e.g. CD4 / CD8)."""
    out = []
    for g in raw:
        name = str(g.get("name", "gate"))
        groups = list(g.get("groups") or [])
        if g.get("lineage") not in vocab.lineages.index or len(groups) != 2:
            raise ValueError(f"markers {source_file}: gate {name!r} needs a lineage and 2 groups.")
        for grp in groups:
            bad = [c for c in grp.get("cell_types", []) if vocab.lineage_of(c) != g["lineage"]]
            if bad or not grp.get("up"):
                raise ValueError(
                    f"markers {source_file}: gate {name!r}: each group needs up genes and "
                    f"cell types of lineage {g['lineage']!r} (bad: {bad})."
                )
        out.append(
            {
                "name": name,
                "lineage": str(g["lineage"]),
                "groups": [
                    {
                        "name": str(grp.get("name") or f"group{k + 1}"),
                        "up": [str(x) for x in grp["up"]],
                        "cell_types": list(grp["cell_types"]),
                    }
                    for k, grp in enumerate(groups)
                ],
                "source": str(g.get("source", "")),
            }
        )
    return out


def _check_state_genes(mk: Mapping[str, Any], vocab: Vocabulary) -> None:
    """No set uses the genes of a state measured within its own lineage (issue #16 item 4).

    ``state_genes`` maps a state to ``lineages`` and ``genes``: those genes must not be up or
    down genes of a set of those lineages (or their subsets), nor down genes of any set.
    """
    for state, spec in mk["state_genes"].items():
        genes = set(map(str, spec.get("genes") or []))
        lineages = set(map(str, spec.get("lineages") or []))
        for s in mk["lineage_sets"] + mk["subset_sets"]:
            t = s["target"]
            lin = t if t in vocab.lineages.index else vocab.lineage_of(t)
            used = genes & set(s["down"])
            if lin in lineages:
                used |= genes & set(s["up"])
            if used:
                raise ValueError(
                    f"markers {mk['source_file']}: set {s['name']!r} uses {sorted(used)}, genes of "
                    f"the state {state!r} measured within {sorted(lineages)}; identity evidence "
                    "must not depend on a state that is measured in that population."
                )


def marker_symbols(markers: Mapping[str, Any]) -> set[str]:
    """Every up and down gene of the lineage and subset sets of :func:`load_markers`."""
    genes: set[str] = set()
    for key in ("lineage_sets", "subset_sets"):
        for s in markers[key]:
            genes.update(s["up"])
            genes.update(s["down"])
    return genes


@functools.lru_cache(maxsize=4)
def symbol_aliases(organism: str = "human") -> dict[str, list[str]]:
    """Current symbol -> previous symbols (``resources/annotation/<organism>_symbol_aliases.tsv``;
    HGNC renames since the hg19 era, issue #32); empty where no table exists (mouse)."""
    path = resource_dir() / "annotation" / f"{organism}_symbol_aliases.tsv"
    if not path.is_file():
        return {}
    tab = pd.read_csv(path, sep="\t", dtype=str, comment="#")
    out: dict[str, list[str]] = {}
    for cur, prev in zip(tab["symbol"], tab["previous"], strict=True):
        out.setdefault(cur, []).append(prev)
    return out


def current_symbols(var_names: Sequence[str] | pd.Index, organism: str = "human") -> pd.Index:
    """``var_names`` with previous symbols renamed to current ones (:func:`symbol_aliases`),
    where the current symbol is not in the data already; other names unchanged."""
    names = pd.Index(var_names).astype(str)
    old_to_new = {p: c for c, ps in symbol_aliases(organism).items() for p in ps}
    present = set(names)
    return pd.Index(
        [old_to_new[g] if g in old_to_new and old_to_new[g] not in present else g for g in names]
    )


def resolve_genes(
    genes: Sequence[str], var_index: pd.Index, aliases: Mapping[str, Sequence[str]]
) -> dict[str, int]:
    """Map marker symbols to column positions (exact symbol first, then older aliases: the
    marker file's and the organism's table of previous symbols, :func:`symbol_aliases`)."""
    pos: dict[str, int] = {}
    lookup = pd.Series(np.arange(len(var_index)), index=var_index)
    lookup = lookup[~lookup.index.duplicated(keep="first")]
    for g in genes:
        if g in lookup.index:
            pos[g] = int(lookup[g])
            continue
        for alt in list(aliases.get(g, ())) + symbol_aliases("human").get(g, []):
            if alt in lookup.index:
                pos[g] = int(lookup[alt])
                break
    return pos


def read_counts(
    adata: AnnData, counts: store.CountSource | None = None, layer: str | None = "counts"
) -> store.CountSource:
    """The raw counts the annotation reads for ``adata``.

    Parameters
    ----------
    adata
        Cells x genes; its matrices are read only when ``counts`` is ``None``.
    counts
        A :class:`sepsis_sc.store.CountSource` with ``adata``'s cells and genes, e.g.
        ``store.FileCounts.matching(path, layer, adata)`` to stream them from the ``.h5ad``
        (checked by :func:`sepsis_sc.store.count_source`: same cells and genes, raw counts).
    layer
        Without ``counts``: ``layers[layer]``, else an integer-valued ``X``
        (:func:`sepsis_sc.data.get_counts`; ``None`` looks at ``X`` only, which must hold
        counts). The matrix is taken as float32 CSR, as the pipeline's files store counts.

    Returns
    -------
    sepsis_sc.store.CountSource
    """
    if counts is not None:
        return store.count_source(adata, counts, layer)
    x, slot = get_counts(adata, layer, max_values=100_000)
    return store.CountSource(
        sp.csr_matrix(x, dtype=np.float32), where=slot, var_names=adata.var_names
    )
