"""Preflight: cheap checks of every sample's input file before any job runs.

The workflow calls :func:`preflight` at parse time (``preflight.enabled``), so a broken input
stops the run with one line per problem (sample, file, what is wrong, how to fix it) instead
of ``Error in rule qc_sample`` after other samples' jobs have started. Per sample it reads the
first bytes, the HDF5 / Matrix Market headers, the gene and barcode lists and the values of
the first ``max_cells`` cells; it does not read whole matrices (gzipped MTX files and tables
up to :data:`FULL_GZIP_READ_BYTES` are decompressed to the end, without parsing, to find a
truncated download).

Checks: the format sniffed from the bytes agrees with the name (HDF5 signature, gzip magic,
``%%MatrixMarket`` header, an HTML page saved under a data name, an AnnData file named
``.h5``), truncated or corrupt HDF5 and gzip files, an MTX triplet whose matrix, barcodes and
features disagree, zero cells, Ensembl IDs without gene symbols (as
:func:`sepsis_sc.io.ensure_symbols` would reject them), the organism of the gene names
(:func:`sepsis_sc.data.detect_organism`), raw integer counts without NaN
(:func:`sepsis_sc.data.check_counts`) and duplicated barcodes.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sepsis_sc.config import SampleSheetError

logger = logging.getLogger(__name__)

__all__ = [
    "Problem",
    "PreflightError",
    "check_inputs",
    "preflight",
    "sniff",
    "FULL_GZIP_READ_BYTES",
]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
GZIP_MAGIC = b"\x1f\x8b"
#: gzipped MTX files and tables up to this size are decompressed to the end (truncation check);
#: of larger ones only the first part is read.
FULL_GZIP_READ_BYTES = 128 * 2**20
#: most Matrix Market entries whose values are checked
MTX_ENTRIES = 1_000_000
#: most rows of a gene-by-cell table that are read
TABLE_ROWS = 2000

_REDOWNLOAD = "copy or download it again and compare its size (or checksum) with the source"


@dataclass(frozen=True)
class Problem:
    """One problem of one sample's input: what is wrong and how to fix it."""

    sample: str
    file: str
    what: str
    fix: str
    #: a warning does not stop the run (e.g. a sample too small for the sample-level tests)
    warning: bool = False

    def __str__(self) -> str:
        if self.warning:
            return f"sample {self.sample} ({self.file}): {self.what}; {self.fix}."
        return f"sample {self.sample} ({self.file}): {self.what}. Fix: {self.fix}."


class PreflightError(SampleSheetError):
    """Inputs named in the sample sheet are unreadable or not raw counts (every problem listed)."""

    def __init__(self, problems: list[Problem], sheet_name: str = "sample sheet"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"preflight found {len(self.problems)} problem(s) in the input files of the "
            f"{sheet_name} (no job has run):\n{lines}\n(Skip these checks with "
            "--config preflight='{enabled: false}'; the jobs would then fail on the same files.)"
        )


class _Bad(Exception):
    """One problem found while checking a file (message = what, fix)."""

    def __init__(self, what: str, fix: str, file: Path | None = None, warning: bool = False):
        super().__init__(what)
        self.what, self.fix, self.file, self.warning = what, fix, file, warning


# --------------------------------------------------------------------------------------
# sniffing
# --------------------------------------------------------------------------------------
def _kind_of_bytes(head: bytes) -> str:
    if not head:
        return "empty"
    if head.startswith(HDF5_SIGNATURE):
        return "hdf5"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"BZh"):
        return "bzip2"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "tar"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or (
        text.startswith((b"<?xml", b"<!doctype")) and b"<html" in text
    ):
        return "html"
    if text.startswith(b"%%matrixmarket"):
        return "mtx"
    if b"\x00" in head:
        return "binary"
    return "text"


def sniff(path: str | Path) -> str:
    """What the file's first bytes say it is.

    One of ``"hdf5"``, ``"gzip"``, ``"gzip+mtx"``, ``"gzip+html"``, ``"gzip+text"``, ``"mtx"``,
    ``"html"``, ``"text"``, ``"zip"``, ``"bzip2"``, ``"tar"``, ``"binary"``, ``"empty"``,
    ``"dir"``. For gzip the first decompressed bytes are sniffed too.
    """
    p = Path(path)
    if p.is_dir():
        return "dir"
    with open(p, "rb") as fh:
        head = fh.read(1024)
    kind = _kind_of_bytes(head)
    if kind == "gzip":
        try:
            with gzip.open(p, "rb") as gz:
                inner = _kind_of_bytes(gz.read(1024))
        except (OSError, EOFError, zlib.error):
            return "gzip"
        if inner in ("mtx", "html", "text"):
            return f"gzip+{inner}"
    return kind


_KIND_WORDS = {
    "empty": "an empty file (0 bytes)",
    "html": "an HTML page, not data (a failed download or a login/error page saved under a data name)",
    "gzip+html": "a gzipped HTML page, not data (a failed download saved under a data name)",
    "zip": "a zip archive",
    "bzip2": "a bzip2-compressed file",
    "tar": "a tar archive",
    "hdf5": "an HDF5 file",
    "gzip": "a gzip-compressed file",
    "gzip+mtx": "a gzip-compressed Matrix Market file",
    "gzip+text": "a gzip-compressed text file",
    "mtx": "a plain (uncompressed) Matrix Market file",
    "text": "a text file",
    "binary": "a binary file of unknown type",
}


def _fix_for_kind(kind: str, expected: str) -> str:
    if kind in ("empty", "binary"):
        return _REDOWNLOAD
    if kind in ("html", "gzip+html"):
        return f"{_REDOWNLOAD}; open it in a text editor to see what the server sent"
    if kind.startswith("gzip") and "HDF5" in expected:
        return f"gunzip it (HDF5 files are not gzipped), or point 'path' at {expected}"
    if kind in ("zip", "tar", "bzip2"):
        return f"unpack it and point 'path' at {expected} inside"
    return f"point 'path' at {expected}, or set the sheet's 'format' column to what the file is"


def _expect(path: Path, kind: str, allowed: Iterable[str], expected: str) -> None:
    if kind not in allowed:
        raise _Bad(
            f"{path.name} should be {expected} but is {_KIND_WORDS.get(kind, kind)}",
            _fix_for_kind(kind, expected),
            path,
        )


def _scan_gzip(path: Path, count_lines: bool = False) -> int | None:
    """Decompress to the end (files up to FULL_GZIP_READ_BYTES); return the line count.

    Raises _Bad for a stream that ends early or fails its CRC; returns None when not scanned.
    """
    if path.stat().st_size > FULL_GZIP_READ_BYTES:
        return None
    lines, last = 0, b"\n"
    try:
        with gzip.open(path, "rb") as gz:
            while chunk := gz.read(16 * 2**20):
                if count_lines:
                    lines += chunk.count(b"\n")
                last = chunk[-1:]
    except EOFError:
        raise _Bad(
            f"{path.name} is truncated (the gzip stream ends early)", _REDOWNLOAD, path
        ) from None
    except (OSError, zlib.error) as err:
        raise _Bad(f"{path.name} is a corrupt gzip file ({err})", _REDOWNLOAD, path) from None
    return lines + (last != b"\n")


# --------------------------------------------------------------------------------------
# gene names, values
# --------------------------------------------------------------------------------------
def _gene_problems(var: pd.DataFrame, organism: str | None, file: Path) -> list[_Bad]:
    """Ensembl-only IDs and the organism, exactly as ingest decides them."""
    import anndata as ad

    from sepsis_sc.data import organism_evidence
    from sepsis_sc.io import ensure_symbols

    var = var.copy()
    var.index = pd.Index(var.index.astype(str))
    adata = ad.AnnData(var=var)
    try:
        ensure_symbols(adata)
    except ValueError as err:
        example = re.search(r"\(e\.g\. ([^)]*)\)", str(err))
        return [
            _Bad(
                "the genes are Ensembl IDs only"
                + (f" (e.g. {example.group(1)})" if example else "")
                + " with no gene-symbol column, and marker genes are matched by symbol",
                "give the 10x features.tsv with an ID and a symbol column, or add a "
                "'gene_symbols' column to the h5ad's var",
                file,
            )
        ]
    evidence = organism_evidence(adata.var_names)
    detected = evidence.organism
    if organism is not None and detected is not None and detected != organism:
        seen = evidence.probes[detected][:3] or list(adata.var_names[:3])
        return [
            _Bad(
                f"the config says organism: {organism} but the genes are {detected} "
                f"({', '.join(seen)}, ...)",
                f"set 'organism: {detected}' in the config, or fix this sample's path",
                file,
            )
        ]
    return []


def _value_problems(values: np.ndarray, what: str, file: Path) -> list[_Bad]:
    from sepsis_sc.data import check_counts

    try:
        check_counts(np.asarray(values))
    except ValueError as err:
        msg = str(err)
        i = msg.lower().find("give raw")
        found = (msg[:i] if i > 0 else msg).rstrip(" ;.").replace("the count matrix", what, 1)
        fix = msg[i:].rstrip(".") if i > 0 else "give raw UMI counts"
        return [_Bad(found, fix[0].lower() + fix[1:], file)]
    return []


@dataclass(frozen=True)
class CellLimits:
    """Cell-number limits of one sample's input file.

    ``min_cells`` (``ingest.min_cells``): fewer is an error. ``small_cells``
    (``qc.min_cells_per_sample``): fewer cells than this even before QC means the sample
    cannot reach that number after QC; it is an error when ``small_is_error``
    (``qc.on_small_sample: stop``), else a warning (the sample will be left out at
    ``qc_merge``).
    """

    min_cells: int = 1
    small_cells: int = 0
    small_is_error: bool = False


def _cells_problems(n_cells: int, cells: CellLimits, file: Path) -> list[_Bad]:
    if n_cells < max(cells.min_cells, 1):
        return [
            _Bad(
                f"{file.name} has {n_cells} cells (ingest.min_cells is {cells.min_cells})",
                "point 'path' at the filtered matrix of this sample, or remove the sample "
                "from the sheet",
                file,
            )
        ]
    if n_cells < cells.small_cells:
        what = (
            f"{file.name} has only {n_cells} cells, fewer than qc.min_cells_per_sample "
            f"({cells.small_cells}) even before QC"
        )
        if cells.small_is_error:
            fix = (
                "remove the sample from the sheet, point 'path' at the right matrix, or set "
                "qc.on_small_sample: drop to leave it out of the cohort and run the others"
            )
            return [_Bad(what, fix, file)]
        fix = (
            "it will be left out of the cohort at qc_merge (qc.on_small_sample: drop); "
            "remove it from the sheet to silence this, or lower qc.min_cells_per_sample"
        )
        return [_Bad(what, fix, file, warning=True)]
    return []


def _barcode_problems(barcodes: np.ndarray, file: Path) -> list[_Bad]:
    s = pd.Index(barcodes)
    if not s.is_unique:
        dup = s[s.duplicated()][0]
        return [
            _Bad(
                f"{file.name} has duplicated barcodes (e.g. {dup!s}); a 10x filtered matrix has "
                "unique barcodes, so this is probably several samples concatenated",
                "give one sample's own filtered matrix",
                file,
            )
        ]
    return []


def _decode(a: np.ndarray) -> np.ndarray:
    return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in a], dtype=object)


# --------------------------------------------------------------------------------------
# per format
# --------------------------------------------------------------------------------------
def _open_h5(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as err:
        text = str(err)
        m = re.search(r"eof = (\d+).*stored_eof = (\d+)", text)
        if m:
            what = (
                f"{path.name} is truncated: it is {int(m.group(1)):,} bytes but its HDF5 header "
                f"says {int(m.group(2)):,} (an interrupted download or copy)"
            )
        else:
            reason = re.sub(r"^.*?\((.*)\)\s*$", r"\1", text) or text
            what = f"{path.name} has an HDF5 signature but is corrupt ({reason})"
        raise _Bad(what, _REDOWNLOAD, path) from None


def _is_anndata(f: Any) -> bool:
    return f.attrs.get("encoding-type") == "anndata" or ("obs" in f and "var" in f)


@dataclass(frozen=True)
class _H5Matrix:
    """What :func:`_check_10x_h5` reads of a 10x matrix group: its stated shape, barcodes,
    ``indptr``, number of stored values and the values of the first ``k`` cells."""

    n_genes: int
    n_cells: int
    barcodes: np.ndarray
    indptr: np.ndarray
    n_data: int
    k: int
    data: np.ndarray


def _check_10x_h5(
    path: Path, organism: str | None, max_cells: int, cells: CellLimits
) -> list[_Bad]:
    """A Cell Ranger ``.h5``: its layout, sizes that agree, cells, barcodes, genes, values."""
    _expect(path, sniff(path), ("hdf5",), "a Cell Ranger filtered_feature_bc_matrix.h5 (HDF5)")
    with _open_h5(path) as f:
        grp, names, ids, ftype = _h5_features(f, path)
        m = _h5_read_matrix(grp, max_cells, path)
    inconsistent = _h5_shape_problem(m, len(names), path)
    if inconsistent is not None:
        return [inconsistent]
    out = _h5_indptr_problems(m, path)
    out += _cells_problems(m.n_cells, cells, path)
    out += _barcode_problems(m.barcodes, path)
    var = _h5_expression_var(names, ids, ftype)
    if var is None:
        out.append(
            _Bad(
                f"{path.name} has no 'Gene Expression' features",
                "give the gene-expression matrix of this sample",
                path,
            )
        )
        return out
    out += _gene_problems(var, organism, path)
    out += _value_problems(m.data, f"the first {m.k} cells", path)
    return out


def _h5_features(f: Any, path: Path) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray | None]:
    """The 10x matrix group of an open ``.h5`` and its raw feature names, IDs and types.

    The Cell Ranger v3 layout (group ``matrix``) has feature types; the v2 layout (a
    genome group with ``barcodes`` and ``gene_names``) gives ``None`` for them. An AnnData
    named ``.h5``, or an HDF5 file of neither layout, is refused.
    """
    import h5py

    if "matrix" in f:
        try:
            grp = f["matrix"]
            feat = grp["features"]
            names, ids = feat["name"][()], feat["id"][()]
            ftype = feat["feature_type"][()] if "feature_type" in feat else None
        except (KeyError, ValueError, TypeError, OSError) as err:
            raise _Bad(
                f"{path.name} has a 'matrix' group but not the 10x layout ({err})",
                "point 'path' at Cell Ranger's filtered_feature_bc_matrix.h5",
                path,
            ) from None
        return grp, names, ids, ftype
    if _is_anndata(f):
        raise _Bad(
            f"{path.name} is an AnnData (.h5ad) file named .h5",
            "rename it to .h5ad (or set the sheet's 'format' column to h5ad)",
            path,
        )
    groups = [
        k for k in f if isinstance(f[k], h5py.Group) and "barcodes" in f[k] and "gene_names" in f[k]
    ]
    if not groups:
        raise _Bad(
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
        barcodes = _decode(grp["barcodes"][()])
        indptr = grp["indptr"][()]
        n_data = grp["data"].shape[0]
        k = min(max_cells, n_cells)
        data = grp["data"][: int(indptr[k])] if len(indptr) > k else grp["data"][:0]
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise _Bad(f"{path.name} is corrupt ({err})", _REDOWNLOAD, path) from None
    return _H5Matrix(n_genes, n_cells, barcodes, indptr, n_data, k, data)


def _h5_shape_problem(m: _H5Matrix, n_features: int, path: Path) -> _Bad | None:
    """The stated shape against the numbers of features, barcodes and ``indptr`` entries;
    a mismatch (returned) ends the check."""
    if len(m.barcodes) != m.n_cells or len(m.indptr) != m.n_cells + 1 or n_features != m.n_genes:
        return _Bad(
            f"{path.name} is inconsistent: shape {m.n_genes} genes x {m.n_cells} cells but "
            f"{n_features} features, {len(m.barcodes)} barcodes, {len(m.indptr)} indptr",
            _REDOWNLOAD,
            path,
        )
    return None


def _h5_indptr_problems(m: _H5Matrix, path: Path) -> list[_Bad]:
    """The last ``indptr`` entry must be the number of stored values."""
    if m.n_cells and int(m.indptr[-1]) != m.n_data:
        return [
            _Bad(
                f"{path.name} is corrupt: indptr ends at {m.indptr[-1]} but data has {m.n_data}",
                _REDOWNLOAD,
                path,
            )
        ]
    return []


def _h5_expression_var(
    names: np.ndarray, ids: np.ndarray, ftype: np.ndarray | None
) -> pd.DataFrame | None:
    """``var`` (``gene_ids``, ``gene_symbols``; index the names) of the gene-expression
    features; ``None`` when feature types are given and none is ``Gene Expression``."""
    names, ids = _decode(names), _decode(ids)
    if ftype is not None:
        keep = _decode(ftype) == "Gene Expression"
        if not keep.any():
            return None
        names, ids = names[keep], ids[keep]
    return pd.DataFrame({"gene_ids": ids, "gene_symbols": names}, index=names)


def _mtx_companion(matrix: Path, prefix: str, stems: tuple[str, ...]) -> Path:
    from sepsis_sc.io import _find_mtx_companion

    found, tried = _find_mtx_companion(matrix, prefix, stems)
    if found is not None:
        return found
    raise _Bad(
        f"the 10x triplet of {matrix.name} is incomplete: none of {', '.join(tried[:4])} ... "
        f"in {matrix.parent}",
        "put the features/genes and barcodes files beside the matrix with the same prefix",
        matrix,
    )


def _read_small_table(path: Path) -> pd.DataFrame:
    kind = sniff(path)
    gz = path.name.endswith(".gz")
    _expect(path, kind, ("gzip+text", "gzip") if gz else ("text",), "a (gzipped) text list")
    if gz:
        _scan_gzip(path)
    sep = "," if ".csv" in path.name else "\t"
    try:
        return pd.read_csv(path, sep=sep, header=None, dtype=str)
    except pd.errors.EmptyDataError:
        return pd.DataFrame({0: pd.Series([], dtype=str)})
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise _Bad(f"{path.name} cannot be read ({err})", _REDOWNLOAD, path) from None


def _check_mtx(path: Path, organism: str | None, max_cells: int, cells: CellLimits) -> list[_Bad]:
    """A 10x MTX triplet: file names and compression, header, truncation, three files that
    belong together, cells, barcodes, values and genes."""
    matrix, prefix, gz = _mtx_matrix_file(path)
    features_path = _mtx_companion(matrix, prefix, ("features", "genes"))
    barcodes_path = _mtx_companion(matrix, prefix, ("barcodes",))
    n_header, (n_rows, n_cols, nnz) = _mtx_header(matrix, gz)
    _mtx_check_complete(matrix, gz, n_header, nnz)
    features = _read_small_table(features_path)
    barcodes = _read_small_table(barcodes_path)
    _mtx_check_triplet(
        matrix, (n_rows, n_cols), features_path, len(features), barcodes_path, len(barcodes)
    )
    out = _cells_problems(len(barcodes), cells, matrix)
    out += _barcode_problems(barcodes[0].to_numpy(), barcodes_path)
    if nnz:
        out += _mtx_value_problems(
            matrix, n_header, (n_rows, n_cols, nnz), max_cells, len(barcodes)
        )
    out += _gene_problems(_mtx_var(features), organism, features_path)
    return out


def _mtx_matrix_file(path: Path) -> tuple[Path, str, bool]:
    """The matrix file of a sample (the path, or the one in its folder), its GEO prefix and
    whether it is gzipped; its name, compression and content must agree."""
    from sepsis_sc.io import _find_mtx_in_dir

    try:
        matrix = _find_mtx_in_dir(path) if path.is_dir() else path
    except (FileNotFoundError, ValueError) as err:
        raise _Bad(str(err).split("; ")[0], "give one 10x MTX triplet per sample", path) from None
    m = re.match(r"^(.*?)matrix\.mtx(\.gz)?$", matrix.name)
    if m is None:
        raise _Bad(
            f"{matrix.name} is not named like a 10x matrix file",
            "name it matrix.mtx[.gz] or <prefix>matrix.mtx[.gz] beside its features/barcodes",
            matrix,
        )
    gz = bool(m.group(2))
    kind = sniff(matrix)
    if gz and kind == "mtx":
        raise _Bad(
            f"{matrix.name} is named .gz but is not compressed",
            "gzip it, or drop the .gz from its name",
            matrix,
        )
    if not gz and kind == "gzip+mtx":
        raise _Bad(
            f"{matrix.name} is gzip-compressed but not named .gz",
            "rename it to matrix.mtx.gz",
            matrix,
        )
    _expect(matrix, kind, ("gzip+mtx",) if gz else ("mtx",), "a Matrix Market file")
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
        raise _Bad(f"{matrix.name} cannot be read ({err})", _REDOWNLOAD, matrix) from None
    fields = banner.lower().split()
    try:
        n_rows, n_cols, nnz = (int(v) for v in line.split()[:3])
    except ValueError:
        raise _Bad(
            f"{matrix.name} has no size line after its header (read {line[:40]!r})",
            _REDOWNLOAD,
            matrix,
        ) from None
    if len(fields) < 3 or fields[2] != "coordinate":
        raise _Bad(
            f"{matrix.name} is a dense Matrix Market array, not a sparse 10x matrix",
            "give the 10x matrix.mtx (coordinate format)",
            matrix,
        )
    return n_header, (n_rows, n_cols, nnz)


def _mtx_check_complete(matrix: Path, gz: bool, n_header: int, nnz: int) -> None:
    """Truncation: the entries found against those the header announces (a gzipped file is
    read through; a plain one when it is small enough)."""
    if gz:
        lines = _scan_gzip(matrix, count_lines=True)
    elif matrix.stat().st_size <= 4 * FULL_GZIP_READ_BYTES:
        with open(matrix, "rb") as fh:
            data = fh.read()
        lines = data.count(b"\n") + (not data.endswith(b"\n"))
    else:
        lines = None
    if lines is not None and lines - n_header < nnz:
        raise _Bad(
            f"{matrix.name} is truncated: its header announces {nnz} entries but it holds "
            f"{max(lines - n_header, 0)}",
            _REDOWNLOAD,
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
        raise _Bad(
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
) -> list[_Bad]:
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
        raise _Bad(f"{matrix.name} cannot be parsed ({err})", _REDOWNLOAD, matrix) from None
    if entries.shape[1] < 3:
        raise _Bad(f"{matrix.name} has entries without values", _REDOWNLOAD, matrix)
    rows = pd.to_numeric(entries[0], errors="coerce").to_numpy()
    cols = pd.to_numeric(entries[1], errors="coerce").to_numpy()
    if np.any(~(rows >= 1) | (rows > n_rows) | ~(cols >= 1) | (cols > n_cols)):
        raise _Bad(
            f"{matrix.name} has entries outside its {n_rows} x {n_cols} size",
            _REDOWNLOAD,
            matrix,
        )
    values = pd.to_numeric(entries[2], errors="coerce").to_numpy(dtype=float)
    values = values[cols <= max_cells] if (cols <= max_cells).any() else values
    return _value_problems(values, f"the first {min(max_cells, n_bc)} cells", matrix)


def _mtx_var(features: pd.DataFrame) -> pd.DataFrame:
    """``var`` (``gene_ids``, ``gene_symbols``) of the features file: IDs and symbols from
    its first two columns (one column: IDs where Ensembl-like), only the ``Gene Expression``
    rows when a third column says so."""
    from sepsis_sc.io import _feature_ids_symbols

    ids, symbols = _feature_ids_symbols(features)
    var = pd.DataFrame({"gene_ids": ids, "gene_symbols": symbols}, index=symbols.astype(str))
    if features.shape[1] >= 3:
        keep = (features[2] == "Gene Expression").to_numpy()
        if keep.any():
            var = var.loc[keep]
    return var


def _check_h5ad(path: Path, organism: str | None, max_cells: int, cells: CellLimits) -> list[_Bad]:
    _expect(path, sniff(path), ("hdf5",), "an AnnData .h5ad (HDF5)")
    from anndata.io import read_elem

    with _open_h5(path) as f:
        if "matrix" in f and not _is_anndata(f):
            raise _Bad(
                f"{path.name} is a 10x HDF5 file named .h5ad",
                "rename it to .h5 (or set the sheet's 'format' column to 10x_h5)",
                path,
            )
        if not _is_anndata(f):
            raise _Bad(
                f"{path.name} is HDF5 but not an AnnData file (keys: {', '.join(list(f)[:6])})",
                "write it with anndata's write_h5ad",
                path,
            )
        try:
            var = read_elem(f["var"])
            elem = (
                f["layers"]["counts"] if "layers" in f and "counts" in f["layers"] else f.get("X")
            )
            if elem is None:
                raise _Bad(
                    f"{path.name} has neither X nor layers['counts']",
                    "store the raw counts in X or layers['counts']",
                    path,
                )
            source = "layers['counts']" if elem.name.endswith("counts") else "X"
            obs_index = f["obs"].attrs.get("_index", "_index")
            barcodes = _decode(f["obs"][obs_index][()]) if obs_index in f["obs"] else None
            if hasattr(elem, "keys"):  # sparse group
                enc = elem.attrs.get("encoding-type", "csr_matrix")
                n_cells = int(elem.attrs["shape"][0])
                k = min(max_cells, n_cells)
                if enc == "csr_matrix":
                    end = int(elem["indptr"][k]) if n_cells else 0
                    values = elem["data"][:end]
                else:
                    values = elem["data"][:MTX_ENTRIES]
            else:
                n_cells = int(elem.shape[0])
                k = min(max_cells, n_cells)
                values = np.asarray(elem[:k]).ravel()
        except _Bad:
            raise
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise _Bad(
                f"{path.name} cannot be read as AnnData ({err})", _REDOWNLOAD, path
            ) from None
    out = _cells_problems(n_cells, cells, path)
    if barcodes is not None:
        out += _barcode_problems(barcodes, path)
    out += _gene_problems(var, organism, path)
    out += _value_problems(values, f"{source} of the first {k} cells", path)
    return out


def _check_table(path: Path, organism: str | None, max_cells: int, cells: CellLimits) -> list[_Bad]:
    from sepsis_sc.io import _read_table_rows, _table_header

    gz = path.name.endswith(".gz")
    _expect(
        path,
        sniff(path),
        ("gzip+text",) if gz else ("text",),
        "a gene-by-cell text table" + (" (gzipped)" if gz else ""),
    )
    if gz:
        _scan_gzip(path)
    opener = gzip.open if gz else open
    with opener(path, "rt") as fh:
        header = fh.readline().rstrip("\r\n")
        first = fh.readline().rstrip("\r\n")
    if not first:
        raise _Bad(
            f"{path.name} has a header but no gene rows",
            "give a gene-by-cell table (first column gene, header barcodes)",
            path,
        )
    sep, head, n_fields, barcodes = _table_header(header, first)
    if barcodes is None:
        raise _Bad(
            f"{path.name}: the header has {len(head)} fields but the first row {n_fields}",
            "give a gene-by-cell table whose header is the barcodes",
            path,
        )
    out = _cells_problems(len(barcodes), cells, path)
    out += _barcode_problems(np.asarray(barcodes), path)
    k = min(max_cells, len(barcodes))
    rows = _read_table_rows(path, sep, nrows=TABLE_ROWS, usecols=range(k + 1), dtype={0: str})
    genes = rows[0].astype(str).to_numpy()
    values = rows.iloc[:, 1:].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    var = pd.DataFrame({"gene_symbols": genes}, index=genes)
    out += _gene_problems(var, organism, path)
    out += _value_problems(values, f"the first {k} cells", path)
    return out


_CHECKERS = {"10x_h5": _check_10x_h5, "mtx": _check_mtx, "h5ad": _check_h5ad, "table": _check_table}


def _check_one(
    path: Path, fmt: str, organism: str | None, max_cells: int, cells: CellLimits
) -> list[_Bad]:
    from sepsis_sc.io import _detect_format

    if not path.exists():
        return [
            _Bad(
                f"{path} does not exist",
                "fix the 'path' column (relative to the working directory)",
                path,
            )
        ]
    try:
        fmt_used = _detect_format(path) if fmt in ("", "auto") else fmt
    except ValueError as err:
        return [
            _Bad(
                str(err).split(": expected")[0],
                "use a 10x .h5, .h5ad, 10x MTX or a .txt/.csv/.tsv table, or set 'format'",
                path,
            )
        ]
    if fmt_used not in _CHECKERS:
        return [_Bad(f"unknown format {fmt_used!r}", f"use one of {', '.join(_CHECKERS)}", path)]
    if fmt_used == "10x_h5" and path.is_dir():
        path = path / "filtered_feature_bc_matrix.h5"
    try:
        return _CHECKERS[fmt_used](path, organism, max_cells, cells)
    except _Bad as bad:
        return [bad]
    except Exception as err:  # a layout these checks do not know: leave it to the job
        logger.warning(
            "preflight could not check %s (%s: %s); the job will read it",
            path,
            type(err).__name__,
            err,
        )
        return []


def _fingerprint(path: Path) -> list | None:
    """Size and mtime of the file(s) a sample reads (an MTX triplet: all three)."""
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
        else:
            m = re.match(r"^(.*?)matrix\.mtx(\.gz)?$", path.name)
            files = (
                sorted(
                    p
                    for p in path.parent.iterdir()
                    if p.is_file() and p.name.startswith(m.group(1))
                )
                if m
                else [path]
            )
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    except OSError:
        return None


def _load_cache(cache: Path | None) -> dict:
    if cache is None or not cache.exists():
        return {}
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_cache(cache: Path | None, data: dict) -> None:
    if cache is None:
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(cache)
    except OSError:  # a read-only working directory: check again next time
        pass


def _raw_path_problems(sid: str, row: pd.Series, base: Path) -> list[Problem]:
    """The optional ``raw_path`` (unfiltered droplets for the SoupX soup) must exist."""
    raw = row.get("raw_path", "")
    if not isinstance(raw, str) or not raw.strip() or (base / raw).exists():
        return []
    return [
        Problem(
            sid,
            raw,
            "raw_path (the raw, unfiltered droplet matrix) does not exist",
            "fix the 'raw_path' column (relative to the working directory), or leave "
            "it empty: the contamination is then estimated from the filtered matrix "
            "and reported, not corrected (qc.ambient_without_raw)",
        )
    ]


def check_inputs(
    samples: pd.DataFrame,
    organism: str | None,
    *,
    base: str | Path = ".",
    max_cells: int = 2000,
    min_cells: int = 1,
    small_cells: int = 0,
    small_is_error: bool = False,
    skip: Iterable[str] = (),
    cache: str | Path | None = None,
) -> list[Problem]:
    """Check every sample's input file cheaply; return the problems found (empty when fine).

    Parameters
    ----------
    samples
        The validated sample sheet (indexed by ``sample_id``; column ``path``, optional
        ``format``, ``url``, ``archive_url``).
    organism
        ``"human"`` or ``"mouse"`` (the config's ``organism``); ``None`` skips that check.
    base
        Directory the sheet's paths are relative to.
    max_cells
        Values of the first ``max_cells`` cells are checked (integers, no NaN / negatives).
    min_cells
        Fewest cells a sample may have (``ingest.min_cells``).
    small_cells, small_is_error
        A sample with fewer cells than ``small_cells`` (``qc.min_cells_per_sample``) in its
        file is reported: an error when ``small_is_error`` (``qc.on_small_sample: stop``),
        else a warning (``Problem.warning``), since it will be left out at ``qc_merge``.
    skip
        Paths the workflow will produce (demo simulator outputs). Rows with a ``url`` or
        ``archive_url`` whose file does not exist yet are skipped as well (the workflow
        downloads them); once downloaded they are checked.
    cache
        Optional JSON file (relative to ``base``) remembering the files that passed, by
        size and modification time, so that later runs do not read them again.
    """
    skipped = {str(Path(p)) for p in skip}
    cache_path = Path(base) / cache if cache is not None else None
    passed = _load_cache(cache_path)
    cells = CellLimits(min_cells, small_cells, small_is_error)
    settings = [organism, max_cells, min_cells, small_cells, small_is_error]
    problems: list[Problem] = []
    before = json.dumps(passed, sort_keys=True)
    for sid, row in samples.iterrows():
        problems += _raw_path_problems(str(sid), row, Path(base))
        rel = str(Path(str(row["path"])))
        path = Path(base) / rel
        if rel in skipped:
            continue
        if (row.get("url") or row.get("archive_url")) and not path.exists():
            continue
        fmt = str(row.get("format") or row.get("fmt") or "auto")
        key = str(path.resolve())
        stamp = [fmt, settings, _fingerprint(path)]
        if stamp[2] is not None and passed.get(key) == stamp:
            continue
        found = _check_one(path, fmt, organism, max_cells, cells)
        if not found and stamp[2] is not None:
            passed[key] = stamp
        if found:
            passed.pop(key, None)
        for bad in found:
            file = bad.file if bad.file is not None else path
            try:
                shown = str(Path(file).relative_to(base)) if str(base) != "." else str(file)
            except ValueError:
                shown = str(file)
            problems.append(Problem(str(sid), shown, bad.what, bad.fix, bad.warning))
    if json.dumps(passed, sort_keys=True) != before:
        _save_cache(cache_path, passed)
    return problems


def preflight(
    samples: pd.DataFrame,
    organism: str | None,
    *,
    sheet_name: str = "sample sheet",
    **options: Any,
) -> list[Problem]:
    """Run :func:`check_inputs`; raise :class:`PreflightError` listing every problem.

    ``options`` are the keyword arguments of :func:`check_inputs` (``base``, ``max_cells``,
    ``min_cells``, ``small_cells``, ``small_is_error``, ``skip``, ``cache``); ``sheet_name``
    names the sheet in the error. Returns the warnings (problems that do not stop the run)
    for the caller to show.
    """
    problems = check_inputs(samples, organism, **options)
    errors = [p for p in problems if not p.warning]
    if errors:
        raise PreflightError(errors, sheet_name)
    return [p for p in problems if p.warning]
