"""10x Matrix Market triplets (``matrix.mtx[.gz]`` with ``features.tsv[.gz]`` or
``genes.tsv[.gz]`` and ``barcodes.tsv[.gz]``, also GEO sample-prefixed): the reader
(:func:`read_mtx`) and the pre-flight check (:func:`check_mtx`)."""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Iterable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from sepsis_sc.io.formats import (
    ENSEMBL_RE,
    MTX_NAME,
    find_mtx_companion,
    find_mtx_in_dir,
    finish_var,
)
from sepsis_sc.io.problems import (
    FULL_GZIP_READ_BYTES,
    MTX_ENTRIES,
    REDOWNLOAD,
    BadInput,
    CellLimits,
    barcode_problems,
    cells_problems,
    expect_kind,
    gene_problems,
    scan_gzip,
    sniff,
    value_problems,
)

logger = logging.getLogger(__name__)

__all__ = ["read_mtx", "check_mtx"]


def read_mtx(path: Path) -> ad.AnnData:
    """A 10x MTX triplet (the matrix file, or the folder holding it) as cells x genes."""
    matrix = find_mtx_in_dir(path) if path.is_dir() else path
    prefix = _mtx_prefix(matrix)
    features_path = _mtx_companion(matrix, prefix, ("features", "genes"))
    barcodes_path = _mtx_companion(matrix, prefix, ("barcodes",))
    counts = scipy.io.mmread(str(matrix))  # genes x cells
    counts = sp.csr_matrix(counts.T, dtype=np.float32)
    sep = "," if ".csv" in features_path.name else "\t"
    features = pd.read_csv(features_path, sep=sep, header=None, dtype=str)
    barcodes = pd.read_csv(barcodes_path, sep="\t", header=None, dtype=str)[0].to_numpy()
    if counts.shape != (len(barcodes), len(features)):
        raise ValueError(
            f"{matrix} is {counts.shape[1]} genes x {counts.shape[0]} cells but "
            f"{features_path.name} lists {len(features)} features and {barcodes_path.name} "
            f"{len(barcodes)} barcodes; the three files do not belong together."
        )
    counts, var = _gene_expression_features(counts, features, matrix)
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=barcodes.astype(str)), var=var)
    finish_var(adata)
    return adata


def _mtx_prefix(matrix: Path) -> str:
    """The GEO sample prefix of a 10x matrix file (``""`` for a plain ``matrix.mtx[.gz]``)."""
    m = MTX_NAME.match(matrix.name)
    if m is None:
        raise ValueError(
            f"{matrix.name} does not look like a 10x matrix file (expected "
            "'matrix.mtx[.gz]' or '<prefix>matrix.mtx[.gz]')."
        )
    return m.group(1)


def _mtx_companion(matrix: Path, prefix: str, stems: Iterable[str]) -> Path:
    """:func:`find_mtx_companion`; a missing file is a ``FileNotFoundError``."""
    found, tried = find_mtx_companion(matrix, prefix, stems)
    if found is None:
        raise FileNotFoundError(
            f"the 10x triplet of {matrix} is incomplete: none of {', '.join(tried[:4])} ... "
            f"found in {matrix.parent}; put the features/genes and barcodes files beside the "
            "matrix with the same prefix."
        )
    return found


def _feature_ids_symbols(features: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Gene IDs and symbols of a 10x features (genes) file: its first two columns; with one
    column, that column is the symbols and, where Ensembl-like, the IDs."""
    if features.shape[1] >= 2:
        ids = features[0].fillna("").to_numpy()
        symbols = features[1].fillna(features[0]).to_numpy()
    else:
        col = features[0].fillna("").to_numpy()
        is_id = np.array([bool(ENSEMBL_RE.match(s)) for s in col])
        ids = np.where(is_id, col, "")
        symbols = col
    return ids, symbols


def _gene_expression_features(
    counts: sp.csr_matrix, features: pd.DataFrame, matrix: Path
) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """``var`` of the features file (with ``feature_types`` when it has a third column) and
    the counts, both limited to the ``Gene Expression`` features when there are others."""
    ids, symbols = _feature_ids_symbols(features)
    var = pd.DataFrame(
        {"gene_ids": ids, "gene_symbols": symbols},
        index=pd.Index(symbols.astype(str)),
    )
    if features.shape[1] >= 3:
        var["feature_types"] = features[2].to_numpy()
        keep = (var["feature_types"] == "Gene Expression").to_numpy()
        if keep.any() and not keep.all():
            logger.info("%s: keeping %d gene-expression features", matrix, keep.sum())
            counts = counts[:, keep]
            var = var.loc[keep]
    var.index = var.index.astype(str)
    return counts, var


def _companion_or_bad(matrix: Path, prefix: str, stems: tuple[str, ...]) -> Path:
    found, tried = find_mtx_companion(matrix, prefix, stems)
    if found is not None:
        return found
    raise BadInput(
        f"the 10x triplet of {matrix.name} is incomplete: none of {', '.join(tried[:4])} ... "
        f"in {matrix.parent}",
        "put the features/genes and barcodes files beside the matrix with the same prefix",
        matrix,
    )


def _read_small_table(path: Path) -> pd.DataFrame:
    kind = sniff(path)
    gz = path.name.endswith(".gz")
    expect_kind(path, kind, ("gzip+text", "gzip") if gz else ("text",), "a (gzipped) text list")
    if gz:
        scan_gzip(path)
    sep = "," if ".csv" in path.name else "\t"
    try:
        return pd.read_csv(path, sep=sep, header=None, dtype=str)
    except pd.errors.EmptyDataError:
        return pd.DataFrame({0: pd.Series([], dtype=str)})
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise BadInput(f"{path.name} cannot be read ({err})", REDOWNLOAD, path) from None


def check_mtx(
    path: Path, organism: str | None, max_cells: int, cells: CellLimits
) -> list[BadInput]:
    """A 10x MTX triplet: file names and compression, header, truncation, three files that
    belong together, cells, barcodes, values and genes."""
    matrix, prefix, gz = _mtx_matrix_file(path)
    features_path = _companion_or_bad(matrix, prefix, ("features", "genes"))
    barcodes_path = _companion_or_bad(matrix, prefix, ("barcodes",))
    n_header, (n_rows, n_cols, nnz) = _mtx_header(matrix, gz)
    _mtx_check_complete(matrix, gz, n_header, nnz)
    features = _read_small_table(features_path)
    barcodes = _read_small_table(barcodes_path)
    _mtx_check_triplet(
        matrix, (n_rows, n_cols), features_path, len(features), barcodes_path, len(barcodes)
    )
    out = cells_problems(len(barcodes), cells, matrix)
    out += barcode_problems(barcodes[0].to_numpy(), barcodes_path)
    if nnz:
        out += _mtx_value_problems(
            matrix, n_header, (n_rows, n_cols, nnz), max_cells, len(barcodes)
        )
    out += gene_problems(_mtx_var(features), organism, features_path)
    return out


def _mtx_matrix_file(path: Path) -> tuple[Path, str, bool]:
    """The matrix file of a sample (the path, or the one in its folder), its GEO prefix and
    whether it is gzipped; its name, compression and content must agree."""
    try:
        matrix = find_mtx_in_dir(path) if path.is_dir() else path
    except (FileNotFoundError, ValueError) as err:
        raise BadInput(
            str(err).split("; ")[0], "give one 10x MTX triplet per sample", path
        ) from None
    m = MTX_NAME.match(matrix.name)
    if m is None:
        raise BadInput(
            f"{matrix.name} is not named like a 10x matrix file",
            "name it matrix.mtx[.gz] or <prefix>matrix.mtx[.gz] beside its features/barcodes",
            matrix,
        )
    gz = bool(m.group(2))
    kind = sniff(matrix)
    if gz and kind == "mtx":
        raise BadInput(
            f"{matrix.name} is named .gz but is not compressed",
            "gzip it, or drop the .gz from its name",
            matrix,
        )
    if not gz and kind == "gzip+mtx":
        raise BadInput(
            f"{matrix.name} is gzip-compressed but not named .gz",
            "rename it to matrix.mtx.gz",
            matrix,
        )
    expect_kind(matrix, kind, ("gzip+mtx",) if gz else ("mtx",), "a Matrix Market file")
    return matrix, m.group(1), gz


def _mtx_header(matrix: Path, gz: bool) -> tuple[int, tuple[int, int, int]]:
    """The number of header lines (banner, comments, size line) and the size line's rows,
    columns and entries; the matrix must be a sparse (coordinate) Matrix Market file."""
    opener = gzip.open if gz else open
    n_header = 0
    try:
        with opener(matrix, "rt") as fh:
            banner = fh.readline()
            n_header = 1
            line = fh.readline()
            n_header += 1
            while line.startswith("%"):
                line = fh.readline()
                n_header += 1
    except (OSError, EOFError, zlib.error) as err:
        raise BadInput(f"{matrix.name} cannot be read ({err})", REDOWNLOAD, matrix) from None
    fields = banner.lower().split()
    try:
        n_rows, n_cols, nnz = (int(v) for v in line.split()[:3])
    except ValueError:
        raise BadInput(
            f"{matrix.name} has no size line after its header (read {line[:40]!r})",
            REDOWNLOAD,
            matrix,
        ) from None
    if len(fields) < 3 or fields[2] != "coordinate":
        raise BadInput(
            f"{matrix.name} is a dense Matrix Market array, not a sparse 10x matrix",
            "give the 10x matrix.mtx (coordinate format)",
            matrix,
        )
    return n_header, (n_rows, n_cols, nnz)


def _mtx_check_complete(matrix: Path, gz: bool, n_header: int, nnz: int) -> None:
    """Truncation: the entries found against those the header announces (a gzipped file is
    read through; a plain one when it is small enough)."""
    if gz:
        lines = scan_gzip(matrix, count_lines=True)
    elif matrix.stat().st_size <= 4 * FULL_GZIP_READ_BYTES:
        with open(matrix, "rb") as fh:
            data = fh.read()
        lines = data.count(b"\n") + (not data.endswith(b"\n"))
    else:
        lines = None
    if lines is not None and lines - n_header < nnz:
        raise BadInput(
            f"{matrix.name} is truncated: its header announces {nnz} entries but it holds "
            f"{max(lines - n_header, 0)}",
            REDOWNLOAD,
            matrix,
        )


def _mtx_check_triplet(
    matrix: Path,
    shape: tuple[int, int],
    features_path: Path,
    n_feat: int,
    barcodes_path: Path,
    n_bc: int,
) -> None:
    """The matrix must be features x barcodes of its companion files (a transposed matrix is
    named as such)."""
    n_rows, n_cols = shape
    if (n_rows, n_cols) != (n_feat, n_bc):
        transposed = (n_rows, n_cols) == (n_bc, n_feat)
        raise BadInput(
            f"the three MTX files do not belong together: {matrix.name} is {n_rows} genes x "
            f"{n_cols} cells but {features_path.name} lists {n_feat} features and "
            f"{barcodes_path.name} {n_bc} barcodes"
            + (" (the matrix looks transposed: cells x genes)" if transposed else ""),
            "take matrix, features and barcodes from the same Cell Ranger output folder (or "
            "the same GEO sample prefix)"
            + ("; write the matrix genes x cells as 10x does" if transposed else ""),
            matrix,
        )


def _mtx_value_problems(
    matrix: Path, n_header: int, size: tuple[int, int, int], max_cells: int, n_bc: int
) -> list[BadInput]:
    """The first :data:`MTX_ENTRIES` entries: parseable, inside the matrix's size, and
    count-like values (those of the first ``max_cells`` cells when there are any)."""
    n_rows, n_cols, nnz = size
    try:
        entries = pd.read_csv(
            matrix,
            sep=r"\s+",
            header=None,
            skiprows=n_header,
            nrows=min(nnz, MTX_ENTRIES),
            comment="%",
        )
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise BadInput(f"{matrix.name} cannot be parsed ({err})", REDOWNLOAD, matrix) from None
    if entries.shape[1] < 3:
        raise BadInput(f"{matrix.name} has entries without values", REDOWNLOAD, matrix)
    rows = pd.to_numeric(entries[0], errors="coerce").to_numpy()
    cols = pd.to_numeric(entries[1], errors="coerce").to_numpy()
    if np.any(~(rows >= 1) | (rows > n_rows) | ~(cols >= 1) | (cols > n_cols)):
        raise BadInput(
            f"{matrix.name} has entries outside its {n_rows} x {n_cols} size",
            REDOWNLOAD,
            matrix,
        )
    values = pd.to_numeric(entries[2], errors="coerce").to_numpy(dtype=float)
    values = values[cols <= max_cells] if (cols <= max_cells).any() else values
    return value_problems(values, f"the first {min(max_cells, n_bc)} cells", matrix)


def _mtx_var(features: pd.DataFrame) -> pd.DataFrame:
    """``var`` (``gene_ids``, ``gene_symbols``) of the features file: IDs and symbols from
    its first two columns (one column: IDs where Ensembl-like), only the ``Gene Expression``
    rows when a third column says so."""
    ids, symbols = _feature_ids_symbols(features)
    var = pd.DataFrame({"gene_ids": ids, "gene_symbols": symbols}, index=symbols.astype(str))
    if features.shape[1] >= 3:
        keep = (features[2] == "Gene Expression").to_numpy()
        if keep.any():
            var = var.loc[keep]
    return var
