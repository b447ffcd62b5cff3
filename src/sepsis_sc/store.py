"""On-disk AnnData for cohort-scale stages: read only what a stage needs, write only what it adds.

At a million cells one count matrix is about 9 GB in memory, so a stage that reads a whole
``.h5ad`` (``X`` and every layer) to add a few ``obs`` columns is what sets the memory a job
needs. The functions here let a stage

* read the parts it uses (:func:`read`: ``obs``, ``var``, ``obsm``, ``obsp``, ``uns`` and only the
  matrices and genes asked for; a gene subset is read in row chunks, so memory follows the
  subset, not the matrix);
* stream a matrix in row chunks (:func:`iter_rows`) for sums, HVG statistics and pseudobulk;
* write what it adds and *link* the matrices it did not change (:func:`write`): an HDF5
  external link to the file that holds them, so every intermediate ``.h5ad`` still opens whole
  with :func:`anndata.read_h5ad` but the counts are stored once;
* write a matrix chunk by chunk (:class:`MatrixWriter`) without holding it whole;
* copy the linked matrices into the file (:func:`write` with ``copy``), for the outputs a
  user takes away (``annotated.h5ad``): HDF5 copies them dataset by dataset, not through memory.

A matrix key is ``"X"`` or ``"layers/<name>"``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset, write_elem

from sepsis_sc.utils import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "read",
    "read_obs",
    "iter_rows",
    "matrix_keys",
    "layer_names",
    "write",
    "MatrixWriter",
    "CountSource",
    "FileCounts",
    "count_source",
    "h5ad_cells",
    "stage_mem_mb",
    "STAGE_MEMORY",
    "DEFAULT_CHUNK_ROWS",
]

#: rows per chunk when streaming a matrix (about 50-100 MB of a 12,000-gene count matrix)
DEFAULT_CHUNK_ROWS = 50_000


def matrix_keys(path: str | os.PathLike[str]) -> list[str]:
    """The matrices stored in (or linked from) an ``.h5ad``: ``"X"`` and ``"layers/<name>"``."""
    with h5py.File(path, "r") as f:
        keys = ["X"] if "X" in f else []
        if "layers" in f:
            keys += [f"layers/{name}" for name in f["layers"].keys()]
    return keys


def layer_names(path: str | os.PathLike[str]) -> list[str]:
    """The layers an ``.h5ad`` holds (or links to)."""
    return [k.split("/", 1)[1] for k in matrix_keys(path) if k.startswith("layers/")]


def _layer_key(name: str) -> str:
    return name if name == "X" or name.startswith("layers/") else f"layers/{name}"


def _gene_index(var_names: pd.Index, genes: Sequence[str] | np.ndarray | None) -> np.ndarray | None:
    """Column positions of ``genes`` (names or a boolean mask), in ``var`` order."""
    if genes is None:
        return None
    genes = np.asarray(genes)
    if genes.dtype == bool:
        if genes.size != len(var_names):
            raise ValueError(f"gene mask has {genes.size} entries for {len(var_names)} genes")
        return np.flatnonzero(genes)
    pos = var_names.get_indexer(pd.Index(genes.astype(str)))
    missing = genes[pos < 0]
    if missing.size:
        raise KeyError(f"{missing.size} genes not in the file, e.g. {list(missing[:5])}")
    return np.sort(pos)


def iter_rows(
    path: str | os.PathLike[str],
    key: str = "layers/counts",
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    genes: Sequence[str] | np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """Stream a sparse matrix of an ``.h5ad`` in row chunks: yields ``(start, stop, chunk)``.

    ``key`` is ``"X"`` or ``"layers/<name>"`` (a bare layer name is accepted). ``genes``
    (names or a boolean mask over ``var``) keeps those columns only; ``rows`` (a boolean
    mask over cells) yields only those rows of each chunk (``start``/``stop`` still index the
    full matrix). Only one chunk is in memory at a time.
    """
    key = _layer_key(key)
    with h5py.File(path, "r") as f:
        if key not in f:
            raise KeyError(
                f"{path} has no {key!r} (it holds {', '.join(matrix_keys(path)) or 'no matrix'})"
            )
        elem = f[key]
        if not isinstance(elem, h5py.Group):
            raise TypeError(f"{path}:{key} is dense; iter_rows streams sparse (CSR) matrices")
        ds = sparse_dataset(elem)
        if ds.format != "csr":
            raise TypeError(f"{path}:{key} is {ds.format.upper()}; iter_rows streams CSR matrices")
        cols = None
        if genes is not None:
            var_names = pd.Index(read_elem(f["var"]).index.astype(str))
            cols = _gene_index(var_names, genes)
        n = ds.shape[0]
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            chunk = ds[start:stop]
            if rows is not None:
                chunk = chunk[np.asarray(rows[start:stop], dtype=bool)]
            if cols is not None:
                chunk = chunk[:, cols]
            yield start, stop, _int32_offsets(sp.csr_matrix(chunk))


def _int32_offsets(m: Any) -> Any:
    """A CSR/CSC matrix with 32-bit offsets when its entries allow (files written by
    :class:`MatrixWriter` store 64-bit ones). scipy upcasts the column indices of a matrix
    with 64-bit offsets to 64 bits in every row selection: a full transient copy."""
    if sp.issparse(m) and m.format in ("csr", "csc") and m.indptr.dtype == np.int64:
        if m.nnz < np.iinfo(np.int32).max and m.indices.dtype == np.int32:
            m.indptr = m.indptr.astype(np.int32)
    return m


def _read_matrix(
    f: h5py.File, key: str, cols: np.ndarray | None, chunk_rows: int
) -> sp.csr_matrix | np.ndarray:
    elem = f[key]
    if cols is None:
        return _int32_offsets(read_elem(elem))
    if isinstance(elem, h5py.Dataset):  # dense
        return elem[:, cols] if len(cols) else np.zeros((elem.shape[0], 0), elem.dtype)
    ds = sparse_dataset(elem)
    if ds.format != "csr":
        return sp.csr_matrix(ds.to_memory()[:, cols])
    parts = [
        sp.csr_matrix(ds[start : min(start + chunk_rows, ds.shape[0])][:, cols])
        for start in range(0, ds.shape[0], chunk_rows)
    ]
    return (
        _int32_offsets(sp.vstack(parts, format="csr")) if parts else sp.csr_matrix((0, len(cols)))
    )


def read(
    path: str | os.PathLike[str],
    *,
    X: bool = False,
    layers: bool | Sequence[str] = (),
    obsm: bool | Sequence[str] = True,
    obsp: bool | Sequence[str] = True,
    varm: bool = False,
    uns: bool = True,
    genes: Sequence[str] | np.ndarray | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> ad.AnnData:
    """Read the parts of an ``.h5ad`` a stage needs.

    Parameters
    ----------
    path
        The file (its matrices may be external links: they are followed).
    X
        Read ``X``.
    layers
        Layer names to read (``True``: all, ``False``/empty: none). A layer that is absent
        raises ``KeyError`` naming the layers there are.
    obsm, obsp
        ``True``/``False`` or the keys to read.
    varm, uns
        Read them or not.
    genes
        Keep only these genes (names or a boolean mask over ``var``): ``var`` and the matrices
        are subset; sparse matrices are read in row chunks of ``chunk_rows`` so memory follows
        the subset.

    Returns
    -------
    An in-memory AnnData with the requested parts (``X`` is ``None`` when not read).
    """
    with h5py.File(path, "r") as f:
        obs = read_elem(f["obs"])
        var = read_elem(f["var"])
        cols = _gene_index(pd.Index(var.index.astype(str)), genes)
        if cols is not None:
            var = var.iloc[cols]
        present = list(f["layers"].keys()) if "layers" in f else []
        if layers is True:
            names = present
        elif layers is False:
            names = []
        else:
            names = [layers] if isinstance(layers, str) else list(layers)
        missing = [n for n in names if n not in present]
        if missing:
            raise KeyError(f"{path} has no layer(s) {missing}; it has {present or 'none'}")
        mats = {n: _read_matrix(f, f"layers/{n}", cols, chunk_rows) for n in names}
        x = _read_matrix(f, "X", cols, chunk_rows) if X and "X" in f else None
        out = ad.AnnData(X=x, obs=obs, var=var, layers=mats or None)
        for attr, want in (("obsm", obsm), ("obsp", obsp)):
            if want is False or attr not in f:
                continue
            keys = list(f[attr].keys()) if want is True else [k for k in want if k in f[attr]]
            for k in keys:
                getattr(out, attr)[k] = read_elem(f[attr][k])
        if varm and "varm" in f and cols is None:
            for k in f["varm"].keys():
                out.varm[k] = read_elem(f["varm"][k])
        if uns and "uns" in f:
            out.uns.update(read_elem(f["uns"]))
    return out


def read_obs(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Only ``obs`` of an ``.h5ad``."""
    with h5py.File(path, "r") as f:
        return read_elem(f["obs"])


def _resolve(path: Path, key: str) -> tuple[Path, str]:
    """Follow external links to the file and object that really hold ``path:key``."""
    seen = 0
    while True:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise KeyError(f"{path} has no {key!r} to link to")
            link = f.get(key, getlink=True)
        if not isinstance(link, h5py.ExternalLink):
            return path, key
        target = Path(link.filename)
        path = target if target.is_absolute() else (path.parent / target)
        key = link.path.lstrip("/")
        seen += 1
        if seen > 16:
            raise RuntimeError(f"more than 16 chained external links at {path}:{key}")


def write(
    adata: ad.AnnData,
    path: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str] | None = None,
    link: Iterable[str] = (),
    copy: Iterable[str] = (),
) -> None:
    """Write ``adata`` atomically, with the matrices it does not hold taken from ``source``.

    ``adata`` carries what the stage made (``obs``, ``var``, ``obsm``, ``obsp``, ``uns``; ``X``
    and layers only if it changed them). Each key in ``link`` (``"X"``, ``"layers/<name>"`` or a
    bare layer name) becomes an HDF5 external link to that matrix of ``source`` (followed to
    the file that really holds it, by a path relative to ``path``'s folder, so a results folder
    can be moved whole); each key in ``copy`` is copied from ``source`` into the file (dataset
    by dataset, not through memory). Either way the file opens whole with
    :func:`anndata.read_h5ad`. The cells and genes of ``adata`` must be those of ``source``.
    """
    link = [_layer_key(k) for k in link]
    copy = [_layer_key(k) for k in copy]
    path = Path(path)
    if (link or copy) and source is None:
        raise ValueError("write(link=/copy=) needs the source file")
    if source is not None:
        source = Path(source)
        with h5py.File(source, "r") as f:
            n_obs = f["obs"][f["obs"].attrs["_index"]].shape[0]
            src_var = read_elem(f["var"]).index
        if n_obs != adata.n_obs or not pd.Index(src_var).equals(adata.var_names):
            raise ValueError(
                f"write: {path.name} would link matrices of {source} with {n_obs} cells x "
                f"{len(src_var)} genes to an object of {adata.n_obs} x {adata.n_vars}; the "
                "cells and genes must be the same (read with genes=None)"
            )
    taken = set(link) | set(copy)
    own = {k for k in ("X",) if adata.X is not None} | {f"layers/{k}" for k in adata.layers}
    clash = sorted(taken & own)
    if clash:
        raise ValueError(f"write: {clash} are both in the object and taken from {source}")
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
        if not taken:
            return
        with h5py.File(tmp, "a") as out:
            if "layers" not in out:
                out.create_group("layers")
            for key in link:
                holder, real_key = _resolve(source, key)
                if key in out:
                    del out[key]
                rel = os.path.relpath(holder.resolve(), path.parent.resolve())
                out[key] = h5py.ExternalLink(rel, "/" + real_key)
            for key in copy:
                holder, real_key = _resolve(source, key)
                if key in out:
                    del out[key]
                with h5py.File(holder, "r") as src:
                    src.copy(src[real_key], out, name=key)


class MatrixWriter:
    """Write CSR matrices of a new ``.h5ad`` row chunk by row chunk.

    Use as ``with MatrixWriter(path, keys, n_vars) as w: w.append("layers/counts", chunk)``
    after the file has been written (without those matrices) by :func:`anndata.AnnData.write_h5ad`;
    each key starts empty and grows by appended rows. The caller makes sure the rows add up
    to ``n_obs`` (checked on exit). ``compression`` (LZF by default: fast, about 2x on
    counts) applies to the values and column indices.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        keys: Sequence[str],
        n_vars: int,
        n_obs: int,
        *,
        compression: str | None = "lzf",
    ) -> None:
        self.path = Path(path)
        self.compression = compression
        self.keys = [_layer_key(k) for k in keys]
        self.n_vars = int(n_vars)
        self.n_obs = int(n_obs)
        self._rows = dict.fromkeys(self.keys, 0)
        self._f: h5py.File | None = None
        self._ds: dict[str, Any] = {}

    def __enter__(self) -> MatrixWriter:
        self._f = h5py.File(self.path, "a")
        if "layers" not in self._f:
            self._f.create_group("layers")
        for key in self.keys:
            if key in self._f:
                del self._f[key]
        return self

    def append(self, key: str, chunk: sp.spmatrix | sp.sparray) -> None:
        key = _layer_key(key)
        chunk = sp.csr_matrix(chunk)
        if chunk.shape[1] != self.n_vars:
            raise ValueError(f"{key}: chunk has {chunk.shape[1]} columns, expected {self.n_vars}")
        chunk.sort_indices()
        if key not in self._ds:
            # int64 offsets from the start: a million cells hold more than 2**31 entries
            write_elem(self._f, key, chunk)
            grp = self._f[key]
            # resizable, with chunks large enough for ~10^9 entries; int64 offsets from the
            # start (a million cells hold more than 2**31 entries)
            for name, dtype, size in (
                ("data", None, 1 << 18),
                ("indices", None, 1 << 18),
                ("indptr", np.int64, 1 << 16),
            ):
                values = grp[name][...]
                del grp[name]
                grp.create_dataset(
                    name,
                    data=values.astype(dtype or values.dtype),
                    maxshape=(None,),
                    chunks=(size,),
                    compression=self.compression if name != "indptr" else None,
                )
            self._ds[key] = sparse_dataset(self._f[key])
        else:
            self._ds[key].append(chunk)
        self._rows[key] += chunk.shape[0]

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                for key in self.keys:
                    if key not in self._ds:  # no rows at all
                        write_elem(self._f, key, sp.csr_matrix((0, self.n_vars), dtype=np.float32))
                    if self._rows[key] != self.n_obs:
                        raise ValueError(
                            f"{key}: wrote {self._rows[key]} rows for {self.n_obs} cells"
                        )
        finally:
            self._f.close()


class CountSource:
    """A cells x genes matrix that an algorithm reads by rows, by columns or in row chunks,
    held in memory or streamed from an ``.h5ad`` (:class:`FileCounts`), with one interface.

    Every stage that reads counts after QC takes one (``counts=``; :func:`count_source`
    builds it from an AnnData's layer when none is given), so a stage has one code path for
    a notebook's in-memory object and the workflow's file. ``totals`` are the cells' row sums
    over all genes, as scipy computes them (float32 for float32 counts), so size factors
    from a source equal those from the matrix.

    Attributes
    ----------
    shape
        (cells, genes).
    where
        The matrix named for messages (``layers["counts"]``, ``path:layers/counts``).
    var_names, obs_names
        The genes (columns) and cells (rows), when known: :func:`count_source` checks them
        against the AnnData a stage is given.
    """

    def __init__(
        self,
        matrix: Any,
        *,
        where: str = "matrix",
        var_names: Sequence[str] | pd.Index | None = None,
    ) -> None:
        self._m = sp.csr_matrix(matrix)
        self.shape = self._m.shape
        self.where = where
        self.var_names = None if var_names is None else pd.Index(var_names).astype(str)
        self.obs_names: pd.Index | None = None  # in memory: adata's own matrix
        self._totals: np.ndarray | None = None

    @property
    def totals(self) -> np.ndarray:
        if self._totals is None:
            self._totals = np.asarray(self._m.sum(axis=1)).ravel()
        return self._totals

    def columns(self, cols: np.ndarray) -> sp.csr_matrix:
        """All cells, the given gene columns (positions, ascending)."""
        return sp.csr_matrix(self._m[:, cols])

    def rows(self, idx: np.ndarray) -> sp.csr_matrix:
        """The given cells (positions, ascending), all genes: a new matrix."""
        return sp.csr_matrix(self._m[idx])

    def full(self) -> sp.csr_matrix:
        """The whole matrix (a copy the caller may modify)."""
        return self._m.copy()

    def chunks(
        self,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        *,
        rows: np.ndarray | None = None,
        genes: Sequence[str] | np.ndarray | None = None,
    ) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """Row chunks ``(start, stop, chunk)`` of the matrix, as :func:`iter_rows` yields
        them from a file: ``rows`` (a boolean mask over cells) keeps those rows of each
        chunk, ``genes`` (names or a boolean mask over the genes) those columns."""
        cols = None if genes is None else _gene_index(self._gene_names(genes), genes)
        n = self.shape[0]
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            if rows is None:
                chunk = self._m[start:stop]
            else:  # the selected rows only: one copy
                chunk = self._m[start + np.flatnonzero(np.asarray(rows[start:stop], dtype=bool))]
            if cols is not None:
                chunk = chunk[:, cols]
            yield start, stop, sp.csr_matrix(chunk)

    def _gene_names(self, genes: Sequence[str] | np.ndarray) -> pd.Index:
        if self.var_names is None:
            if np.asarray(genes).dtype != bool:
                raise ValueError(f"{self.where}: genes by name need the source's var_names")
            return pd.RangeIndex(self.shape[1]).astype(str)
        return self.var_names


class FileCounts(CountSource):
    """:class:`CountSource` over ``path:key`` (``"layers/counts"``), read in row chunks:
    each request is one pass over the file, memory follows what is returned."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: str = "layers/counts",
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ) -> None:
        self.path, self.key, self.chunk_rows = Path(path), _layer_key(key), chunk_rows
        with h5py.File(self.path, "r") as f:
            if self.key not in f:
                raise KeyError(
                    f"{self.path} has no {self.key!r} (it holds {', '.join(matrix_keys(self.path)) or 'no matrix'})"
                )
            self.shape = tuple(sparse_dataset(f[self.key]).shape)
            self.var_names = pd.Index(read_elem(f["var"]).index.astype(str))
        self.where = f"{self.path}:{self.key}"
        self._totals = None
        self._obs_names: pd.Index | None = None

    @classmethod
    def matching(cls, path: str | os.PathLike[str], key: str, adata: ad.AnnData) -> FileCounts:
        """The counts of ``path:key`` for ``adata``: ``ValueError`` unless the file holds
        its cells and genes (read ``adata`` from that file with :func:`read`)."""
        return _matched(cls(path, key), adata)

    @property
    def obs_names(self) -> pd.Index:
        """The file's cell names (its ``obs`` index), read on first use."""
        if self._obs_names is None:
            with h5py.File(self.path, "r") as f:
                index = f["obs"][f["obs"].attrs["_index"]]
                self._obs_names = pd.Index(read_elem(index)).astype(str)
        return self._obs_names

    def _chunks(self) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        return iter_rows(self.path, self.key, chunk_rows=self.chunk_rows)

    def chunks(
        self,
        chunk_rows: int | None = None,
        *,
        rows: np.ndarray | None = None,
        genes: Sequence[str] | np.ndarray | None = None,
    ) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        return iter_rows(
            self.path, self.key, chunk_rows=chunk_rows or self.chunk_rows, rows=rows, genes=genes
        )

    @property
    def totals(self) -> np.ndarray:
        if self._totals is None:
            self._totals = (
                np.concatenate([np.asarray(c.sum(axis=1)).ravel() for _, _, c in self._chunks()])
                if self.shape[0]
                else np.zeros(0, np.float32)
            )
        return self._totals

    def columns(self, cols: np.ndarray) -> sp.csr_matrix:
        parts = [c[:, cols] for _, _, c in self._chunks()]
        return (
            _int32_offsets(sp.vstack(parts, format="csr"))
            if parts
            else sp.csr_matrix((0, len(cols)))
        )

    def rows(self, idx: np.ndarray) -> sp.csr_matrix:
        idx = np.asarray(idx)
        parts = []
        for start, stop, c in self._chunks():
            lo, hi = np.searchsorted(idx, [start, stop])
            if hi > lo:
                parts.append(c[idx[lo:hi] - start])
        if not parts:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        return _int32_offsets(sp.vstack(parts, format="csr"))

    def full(self) -> sp.csr_matrix:
        parts = [c for _, _, c in self._chunks()]
        return _int32_offsets(sp.vstack(parts, format="csr"))


def _matched(src: CountSource, adata: ad.AnnData) -> CountSource:
    """``src`` when it holds ``adata``'s cells and genes, else ``ValueError`` naming both."""
    if tuple(src.shape) != tuple(adata.shape):
        raise ValueError(
            f"the counts {src.where} hold {src.shape[0]} cells x {src.shape[1]} genes, adata "
            f"{adata.n_obs} x {adata.n_vars}: pass the AnnData read from that file"
        )
    if src.var_names is not None and not src.var_names.equals(
        pd.Index(adata.var_names).astype(str)
    ):
        raise ValueError(
            f"the counts {src.where} hold other genes than adata (same number, other names or "
            "order): pass the AnnData read from that file"
        )
    cells = src.obs_names
    if cells is not None and not cells.equals(pd.Index(adata.obs_names).astype(str)):
        raise ValueError(
            f"the counts {src.where} hold other cells than adata (same number, other names or "
            "order): pass the AnnData read from that file"
        )
    return src


def count_source(
    adata: ad.AnnData,
    counts: CountSource | None = None,
    layer: str | None = "counts",
    *,
    check: bool = True,
) -> CountSource:
    """The counts a stage reads for ``adata``: ``counts`` when given (checked to hold
    ``adata``'s cells and genes; its first chunk checked to be raw counts when ``check``),
    else ``adata.layers[layer]`` or an integer-valued ``X``
    (:func:`sepsis_sc.data.get_counts`), in memory.

    ``layer=None`` reads ``X`` as it is (log-normalised values for marker tests).
    """
    from sepsis_sc.data import check_counts, get_counts

    if counts is not None:
        src = _matched(counts, adata)
        if check and src.shape[0]:
            _, _, first = next(iter(src.chunks(20_000)))
            check_counts(first, source=src.where)
        return src
    if layer is None:
        return CountSource(adata.X, where="X", var_names=adata.var_names)
    x, slot = get_counts(adata, layer, check=check, max_values=100_000)
    return CountSource(x, where=slot, var_names=adata.var_names)


# --------------------------------------------------------------------------------------
# memory requests of the cohort-level rules
# --------------------------------------------------------------------------------------
#: peak resident memory of each cohort-level stage as (MB, MB per 10,000 cells), fitted to
#: the per-stage peaks of ``benchmarks/scaling.py`` at 100k, 200k and 1M cells (2026-12-01/02;
#: ``benchmarks/report.py --fit-memory``; docs/benchmarks.md, "Memory requests"): each line
#: lies on or above every measured peak. integration_metrics (off in the benchmark) keeps its
#: earlier estimate.
STAGE_MEMORY: dict[str, tuple[float, float]] = {
    "qc_merge": (553, 9.7),
    "integrate": (992, 46.4),
    "integration_metrics": (400, 150),
    "cluster": (0, 98.7),
    "cluster_summary": (399, 48.9),
    "annotate": (1420, 42.2),
    "annotation_figures": (1276, 12.4),
    "score": (1232, 20.8),
    "sample_table": (591, 9.8),
    "stats": (186, 10.2),
    "de": (1995, 17.4),
    "de_figures": (1385, 53.6),
    "patients": (1948, 13.9),
    # provisional until measured at 100k cells (obs and two embeddings, kNN with k = 30)
    "da": (1000, 30.0),
    # provisional until benchmarks/scaling.py measures it: obs plus the LIANA resource's
    # ~1,900 genes of the log-normalised X (benchmarks/ccc_calibration.py --scale)
    "ccc": (1000, 20.0),
}

#: a request is this much above the fitted peak
MEMORY_MARGIN = 1.3
#: and at least this many MB
MEMORY_FLOOR_MB = 2000


def h5ad_cells(paths: Iterable[str | os.PathLike[str]]) -> int | None:
    """Cells in the ``.h5ad`` files together (from each obs index, nothing else read);
    ``None`` when there are none or one is missing (a dry run before they exist)."""
    paths = list(paths)
    if not paths or not all(Path(p).exists() for p in paths):
        return None
    total = 0
    for path in paths:
        with h5py.File(path, "r") as f:
            total += f["obs"][f["obs"].attrs["_index"]].shape[0]
    return total


def stage_mem_mb(
    stage: str, cells: int, *, per_10k_cells: float | None = None, attempt: int = 1
) -> int:
    """Memory (MB) a cohort-level job asks the scheduler for.

    ``MEMORY_MARGIN`` x the stage's fitted peak at ``cells`` (:data:`STAGE_MEMORY`), at least
    ``MEMORY_FLOOR_MB``; or, with ``per_10k_cells`` (config ``resources.mem_mb_per_10k_cells``),
    that many MB per 10,000 cells for every stage (at least 4000). Times ``attempt``, so a
    job killed for memory asks for more when Snakemake retries it.
    """
    if per_10k_cells is not None:
        return int(max(4000, per_10k_cells * max(1.0, cells / 1e4)) * attempt)
    if stage not in STAGE_MEMORY:
        raise KeyError(f"no measured memory for stage {stage!r}; known: {sorted(STAGE_MEMORY)}")
    fixed, slope = STAGE_MEMORY[stage]
    return int(max(MEMORY_FLOOR_MB, MEMORY_MARGIN * (fixed + slope * cells / 1e4)) * attempt)
