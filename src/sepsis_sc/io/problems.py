"""What the pre-flight checks of every format share.

* :func:`sniff`: what a file's first bytes say it is (HDF5, gzip, Matrix Market, an HTML page
  saved under a data name, ...), and :func:`expect_kind`, which turns a mismatch with the
  expected kind into a problem;
* :class:`BadInput`: one problem found in a file (what is wrong, how to fix it), raised or
  returned by each format's ``check_...``;
* :func:`scan_gzip`, :func:`open_h5`, :func:`is_anndata`: truncated or corrupt gzip and HDF5
  files;
* :func:`gene_problems`, :func:`value_problems`, :func:`cells_problems`,
  :func:`barcode_problems` with :class:`CellLimits`: the genes, values, cell numbers and
  barcodes of a file, judged as ingest would judge them.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "HDF5_SIGNATURE",
    "GZIP_MAGIC",
    "FULL_GZIP_READ_BYTES",
    "MTX_ENTRIES",
    "REDOWNLOAD",
    "BadInput",
    "CellLimits",
    "sniff",
    "expect_kind",
    "scan_gzip",
    "gene_problems",
    "value_problems",
    "cells_problems",
    "barcode_problems",
    "decode_strings",
    "open_h5",
    "is_anndata",
]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

GZIP_MAGIC = b"\x1f\x8b"

#: gzipped MTX files and tables up to this size are decompressed to the end (truncation check);
#: of larger ones only the first part is read.
FULL_GZIP_READ_BYTES = 128 * 2**20

#: most Matrix Market entries whose values are checked
MTX_ENTRIES = 1_000_000

#: the fix of a damaged file
REDOWNLOAD = "copy or download it again and compare its size (or checksum) with the source"


class BadInput(Exception):
    """One problem found while checking a file (message = what, fix)."""

    def __init__(self, what: str, fix: str, file: Path | None = None, warning: bool = False):
        super().__init__(what)
        self.what, self.fix, self.file, self.warning = what, fix, file, warning


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
        return REDOWNLOAD
    if kind in ("html", "gzip+html"):
        return f"{REDOWNLOAD}; open it in a text editor to see what the server sent"
    if kind.startswith("gzip") and "HDF5" in expected:
        return f"gunzip it (HDF5 files are not gzipped), or point 'path' at {expected}"
    if kind in ("zip", "tar", "bzip2"):
        return f"unpack it and point 'path' at {expected} inside"
    return f"point 'path' at {expected}, or set the sheet's 'format' column to what the file is"


def expect_kind(path: Path, kind: str, allowed: Iterable[str], expected: str) -> None:
    """A :class:`BadInput` (with the fix for what the file is) unless ``kind`` (of
    :func:`sniff`) is one of ``allowed``; ``expected`` says in words what it should be."""
    if kind not in allowed:
        raise BadInput(
            f"{path.name} should be {expected} but is {_KIND_WORDS.get(kind, kind)}",
            _fix_for_kind(kind, expected),
            path,
        )


def scan_gzip(path: Path, count_lines: bool = False) -> int | None:
    """Decompress to the end (files up to FULL_GZIP_READ_BYTES); return the line count.

    Raises BadInput for a stream that ends early or fails its CRC; returns None when not scanned.
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
        raise BadInput(
            f"{path.name} is truncated (the gzip stream ends early)", REDOWNLOAD, path
        ) from None
    except (OSError, zlib.error) as err:
        raise BadInput(f"{path.name} is a corrupt gzip file ({err})", REDOWNLOAD, path) from None
    return lines + (last != b"\n")


def gene_problems(var: pd.DataFrame, organism: str | None, file: Path) -> list[BadInput]:
    """Ensembl-only IDs and the organism, exactly as ingest decides them."""
    import anndata as ad

    from sepsis_sc.data import organism_evidence
    from sepsis_sc.io.ingest import ensure_symbols

    var = var.copy()
    var.index = pd.Index(var.index.astype(str))
    adata = ad.AnnData(var=var)
    try:
        ensure_symbols(adata)
    except ValueError as err:
        example = re.search(r"\(e\.g\. ([^)]*)\)", str(err))
        return [
            BadInput(
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
            BadInput(
                f"the config says organism: {organism} but the genes are {detected} "
                f"({', '.join(seen)}, ...)",
                f"set 'organism: {detected}' in the config, or fix this sample's path",
                file,
            )
        ]
    return []


def value_problems(values: np.ndarray, what: str, file: Path) -> list[BadInput]:
    """The values as :func:`sepsis_sc.data.check_counts` judges them (raw integer counts, no
    NaN or negatives); ``what`` names them in the message."""
    from sepsis_sc.data import check_counts

    try:
        check_counts(np.asarray(values))
    except ValueError as err:
        msg = str(err)
        i = msg.lower().find("give raw")
        found = (msg[:i] if i > 0 else msg).rstrip(" ;.").replace("the count matrix", what, 1)
        fix = msg[i:].rstrip(".") if i > 0 else "give raw UMI counts"
        return [BadInput(found, fix[0].lower() + fix[1:], file)]
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

    min_cells: int
    small_cells: int = 0
    small_is_error: bool = False


def cells_problems(n_cells: int, cells: CellLimits, file: Path) -> list[BadInput]:
    """Too few cells for ``ingest.min_cells`` (an error) or, before QC, for
    ``qc.min_cells_per_sample`` (see :class:`CellLimits`)."""
    if n_cells < max(cells.min_cells, 1):
        return [
            BadInput(
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
            return [BadInput(what, fix, file)]
        fix = (
            "it will be left out of the cohort at qc_merge (qc.on_small_sample: drop); "
            "remove it from the sheet to silence this, or lower qc.min_cells_per_sample"
        )
        return [BadInput(what, fix, file, warning=True)]
    return []


def barcode_problems(barcodes: np.ndarray, file: Path) -> list[BadInput]:
    """Duplicated barcodes (several samples concatenated)."""
    s = pd.Index(barcodes)
    if not s.is_unique:
        dup = s[s.duplicated()][0]
        return [
            BadInput(
                f"{file.name} has duplicated barcodes (e.g. {dup!s}); a 10x filtered matrix has "
                "unique barcodes, so this is probably several samples concatenated",
                "give one sample's own filtered matrix",
                file,
            )
        ]
    return []


def decode_strings(a: np.ndarray) -> np.ndarray:
    """HDF5 strings (bytes or str) as an object array of ``str``."""
    return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in a], dtype=object)


def open_h5(path: Path):
    """``h5py.File(path, "r")``; a truncated or corrupt file is a :class:`BadInput`."""
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
        raise BadInput(what, REDOWNLOAD, path) from None


def is_anndata(f: Any) -> bool:
    """Whether an open HDF5 file has the AnnData layout."""
    return f.attrs.get("encoding-type") == "anndata" or ("obs" in f and "var" in f)
