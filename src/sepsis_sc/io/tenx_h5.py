"""Cell Ranger HDF5 (``filtered_feature_bc_matrix.h5``, v3 and v2 layouts): the reader
(:func:`read_10x_h5`, gene-expression features only), the writer the tests and the demo use
(:func:`write_10x_h5`) and the pre-flight check (:func:`check_10x_h5`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sepsis_sc.io.formats import finish_var, to_csr_float32
from sepsis_sc.io.problems import (
    REDOWNLOAD,
    BadInput,
    CellLimits,
    barcode_problems,
    cells_problems,
    decode_strings,
    expect_kind,
    gene_problems,
    is_anndata,
    open_h5,
    sniff,
    value_problems,
)

__all__ = ["read_10x_h5", "write_10x_h5", "check_10x_h5"]


def read_10x_h5(path: Path) -> ad.AnnData:
    """A Cell Ranger ``.h5`` (read with :func:`scanpy.read_10x_h5`, gene-expression features
    only) with CSR float32 counts and the contract's ``var``."""
    import scanpy as sc

    adata = sc.read_10x_h5(path)
    adata.X = to_csr_float32(adata.X)
    adata.var["gene_symbols"] = np.asarray(adata.var_names.astype(str))
    finish_var(adata)
    return adata


def write_10x_h5(
    path: str | Path,
    counts: sp.spmatrix,
    barcodes: Iterable[str],
    gene_ids: Iterable[str],
    gene_symbols: Iterable[str],
    *,
    genome: str = "GRCh38",
) -> None:
    """Write a Cell Ranger v3 ``filtered_feature_bc_matrix.h5`` (readable by scanpy).

    Parameters
    ----------
    path
        Output file.
    counts
        Cells x genes integer counts (any scipy sparse format).
    barcodes, gene_ids, gene_symbols
        Row and column names. ``gene_ids`` fills ``features/id`` (``var["gene_ids"]`` on
        reading), ``gene_symbols`` fills ``features/name``.
    genome
        Written to ``features/genome``.
    """
    m = sp.csr_matrix(counts)  # cells x genes CSR == genes x cells CSC, the 10x layout
    m.sort_indices()
    n_cells, n_genes = m.shape
    barcodes = np.asarray(list(barcodes), dtype="S")
    gene_ids = np.asarray(list(gene_ids), dtype="S")
    gene_symbols = np.asarray(list(gene_symbols), dtype="S")
    if len(barcodes) != n_cells or len(gene_ids) != n_genes or len(gene_symbols) != n_genes:
        raise ValueError("barcodes/gene_ids/gene_symbols do not match the matrix shape.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        grp = f.create_group("matrix")
        grp.create_dataset("barcodes", data=barcodes)
        grp.create_dataset("data", data=m.data.astype(np.int32), compression="gzip")
        grp.create_dataset("indices", data=m.indices.astype(np.int64), compression="gzip")
        grp.create_dataset("indptr", data=m.indptr.astype(np.int64))
        grp.create_dataset("shape", data=np.array([n_genes, n_cells], dtype=np.int32))
        feat = grp.create_group("features")
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        feat.create_dataset("feature_type", data=np.full(n_genes, b"Gene Expression"))
        feat.create_dataset("genome", data=np.full(n_genes, genome.encode()))
        feat.create_dataset("id", data=gene_ids)
        feat.create_dataset("name", data=gene_symbols)
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2


@dataclass(frozen=True)
class _H5Matrix:
    """What :func:`check_10x_h5` reads of a 10x matrix group: its stated shape, barcodes,
    ``indptr``, number of stored values and the values of the first ``k`` cells."""

    n_genes: int
    n_cells: int
    barcodes: np.ndarray
    indptr: np.ndarray
    n_data: int
    k: int
    data: np.ndarray


def check_10x_h5(
    path: Path, organism: str | None, max_cells: int, cells: CellLimits
) -> list[BadInput]:
    """A Cell Ranger ``.h5``: its layout, sizes that agree, cells, barcodes, genes, values."""
    expect_kind(path, sniff(path), ("hdf5",), "a Cell Ranger filtered_feature_bc_matrix.h5 (HDF5)")
    with open_h5(path) as f:
        grp, names, ids, ftype = _h5_features(f, path)
        m = _h5_read_matrix(grp, max_cells, path)
    inconsistent = _h5_shape_problem(m, len(names), path)
    if inconsistent is not None:
        return [inconsistent]
    out = _h5_indptr_problems(m, path)
    out += cells_problems(m.n_cells, cells, path)
    out += barcode_problems(m.barcodes, path)
    var = _h5_expression_var(names, ids, ftype)
    if var is None:
        out.append(
            BadInput(
                f"{path.name} has no 'Gene Expression' features",
                "give the gene-expression matrix of this sample",
                path,
            )
        )
        return out
    out += gene_problems(var, organism, path)
    out += value_problems(m.data, f"the first {m.k} cells", path)
    return out


def _h5_features(f: Any, path: Path) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray | None]:
    """The 10x matrix group of an open ``.h5`` and its raw feature names, IDs and types.

    The Cell Ranger v3 layout (group ``matrix``) has feature types; the v2 layout (a
    genome group with ``barcodes`` and ``gene_names``) gives ``None`` for them. An AnnData
    named ``.h5``, or an HDF5 file of neither layout, is refused.
    """
    if "matrix" in f:
        try:
            grp = f["matrix"]
            feat = grp["features"]
            names, ids = feat["name"][()], feat["id"][()]
            ftype = feat["feature_type"][()] if "feature_type" in feat else None
        except (KeyError, ValueError, TypeError, OSError) as err:
            raise BadInput(
                f"{path.name} has a 'matrix' group but not the 10x layout ({err})",
                "point 'path' at Cell Ranger's filtered_feature_bc_matrix.h5",
                path,
            ) from None
        return grp, names, ids, ftype
    if is_anndata(f):
        raise BadInput(
            f"{path.name} is an AnnData (.h5ad) file named .h5",
            "rename it to .h5ad (or set the sheet's 'format' column to h5ad)",
            path,
        )
    groups = [
        k for k in f if isinstance(f[k], h5py.Group) and "barcodes" in f[k] and "gene_names" in f[k]
    ]
    if not groups:
        raise BadInput(
            f"{path.name} is HDF5 but not a 10x matrix (top-level keys: "
            f"{', '.join(list(f)[:6]) or 'none'})",
            "point 'path' at Cell Ranger's filtered_feature_bc_matrix.h5",
            path,
        )
    grp = f[groups[0]]
    return grp, grp["gene_names"][()], grp["genes"][()], None


def _h5_read_matrix(grp: Any, max_cells: int, path: Path) -> _H5Matrix:
    """Shape, barcodes, ``indptr`` and the values of the first ``max_cells`` cells of a 10x
    matrix group; a group that cannot be read is corrupt."""
    try:
        n_genes, n_cells = (int(v) for v in grp["shape"][()][:2])
        barcodes = decode_strings(grp["barcodes"][()])
        indptr = grp["indptr"][()]
        n_data = grp["data"].shape[0]
        k = min(max_cells, n_cells)
        data = grp["data"][: int(indptr[k])] if len(indptr) > k else grp["data"][:0]
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise BadInput(f"{path.name} is corrupt ({err})", REDOWNLOAD, path) from None
    return _H5Matrix(n_genes, n_cells, barcodes, indptr, n_data, k, data)


def _h5_shape_problem(m: _H5Matrix, n_features: int, path: Path) -> BadInput | None:
    """The stated shape against the numbers of features, barcodes and ``indptr`` entries;
    a mismatch (returned) ends the check."""
    if len(m.barcodes) != m.n_cells or len(m.indptr) != m.n_cells + 1 or n_features != m.n_genes:
        return BadInput(
            f"{path.name} is inconsistent: shape {m.n_genes} genes x {m.n_cells} cells but "
            f"{n_features} features, {len(m.barcodes)} barcodes, {len(m.indptr)} indptr",
            REDOWNLOAD,
            path,
        )
    return None


def _h5_indptr_problems(m: _H5Matrix, path: Path) -> list[BadInput]:
    """The last ``indptr`` entry must be the number of stored values."""
    if m.n_cells and int(m.indptr[-1]) != m.n_data:
        return [
            BadInput(
                f"{path.name} is corrupt: indptr ends at {m.indptr[-1]} but data has {m.n_data}",
                REDOWNLOAD,
                path,
            )
        ]
    return []


def _h5_expression_var(
    names: np.ndarray, ids: np.ndarray, ftype: np.ndarray | None
) -> pd.DataFrame | None:
    """``var`` (``gene_ids``, ``gene_symbols``; index the names) of the gene-expression
    features; ``None`` when feature types are given and none is ``Gene Expression``."""
    names, ids = decode_strings(names), decode_strings(ids)
    if ftype is not None:
        keep = decode_strings(ftype) == "Gene Expression"
        if not keep.any():
            return None
        names, ids = names[keep], ids[keep]
    return pd.DataFrame({"gene_ids": ids, "gene_symbols": names}, index=names)
