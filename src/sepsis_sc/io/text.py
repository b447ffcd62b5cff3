"""Dense gene-by-cell text tables (``.txt``, ``.csv``, ``.tsv``, optionally gzipped; first
column the gene, header the barcodes), as GEO series ship ``*_processed_UMI.txt.gz``: the
reader (:func:`read_table`, row chunks straight into a sparse matrix) and the pre-flight
check (:func:`check_table`)."""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sepsis_sc.io.formats import ENSEMBL_RE, finish_var
from sepsis_sc.io.problems import (
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

__all__ = ["read_table", "check_table", "TABLE_ROWS"]

#: most rows of a gene-by-cell table that are read
TABLE_ROWS = 2000


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt")
    return open(path)


def _sniff_separator(line: str) -> str:
    if "\t" in line:
        return "\t"
    if "," in line:
        return ","
    return r"\s+"


def _table_header(header: str, first: str) -> tuple[str, list[str], int, list[str] | None]:
    """The layout of a gene-by-cell text table from its header and first row.

    Returns the separator, the header's fields, the first row's number of fields and the
    barcodes: the whole header (R ``write.table`` style, no name above the gene column) or
    all but its first field; ``None`` when the header does not fit the first row.
    """
    sep = _sniff_separator(header + first)
    split = re.compile(sep).split if sep == r"\s+" else (lambda s: s.split(sep))
    head = [h.strip().strip('"') for h in split(header.strip())]
    n_fields = len(split(first.strip()))
    if len(head) == n_fields - 1:
        return sep, head, n_fields, head
    if len(head) == n_fields:
        return sep, head, n_fields, head[1:]
    return sep, head, n_fields, None


def _read_table_rows(path: Path, sep: str, **read_csv: Any) -> Any:
    """``pandas.read_csv`` of a table's gene rows (below the header): no header, fields
    quoted with ``"``, the python engine for a whitespace separator; ``read_csv`` adds to
    (chunks, rows, columns, dtypes)."""
    return pd.read_csv(
        path,
        sep=sep,
        header=None,
        skiprows=1,
        quotechar='"',
        engine="python" if sep == r"\s+" else "c",
        **read_csv,
    )


def read_table(path: Path, chunk_values: int = 20_000_000) -> ad.AnnData:
    """Read a dense gene-by-cell table in row chunks into cells x genes CSR."""
    with _open_text(path) as fh:
        header = fh.readline().rstrip("\r\n")
        first = fh.readline().rstrip("\r\n")
    if not first:
        raise ValueError(f"{path} has a header but no gene rows; is it a gene-by-cell table?")
    sep, head, n_fields, barcodes = _table_header(header, first)
    if barcodes is None:
        raise ValueError(
            f"{path}: the header has {len(head)} fields but the first row {n_fields}; expected "
            "a gene-by-cell table whose first column is the gene and whose header is the barcodes."
        )
    n_cells = len(barcodes)
    rows_per_chunk = max(1, chunk_values // max(n_cells, 1))
    genes: list[str] = []
    blocks: list[sp.csr_matrix] = []
    dtypes = {i: np.float32 for i in range(1, n_cells + 1)}
    dtypes[0] = str
    reader = _read_table_rows(path, sep, chunksize=rows_per_chunk, dtype=dtypes)
    for chunk in reader:
        if chunk.shape[1] != n_cells + 1:
            raise ValueError(
                f"{path}: a row has {chunk.shape[1]} fields, expected {n_cells + 1} "
                "(gene + one value per barcode)."
            )
        genes.extend(chunk[0].astype(str).tolist())
        values = chunk.iloc[:, 1:].to_numpy(dtype=np.float32, copy=False)
        blocks.append(sp.csr_matrix(values))
        del chunk, values
    counts = sp.vstack(blocks, format="csr").T.tocsr() if blocks else sp.csr_matrix((n_cells, 0))
    counts = counts.astype(np.float32)
    genes_arr = np.asarray(genes, dtype=str)
    is_id = np.array([bool(ENSEMBL_RE.match(g)) for g in genes_arr], dtype=bool)
    var = pd.DataFrame(
        {"gene_ids": np.where(is_id, genes_arr, ""), "gene_symbols": genes_arr},
        index=pd.Index(genes_arr),
    )
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=pd.Index(barcodes, dtype=str)), var=var)
    finish_var(adata)
    return adata


def check_table(
    path: Path, organism: str | None, max_cells: int, cells: CellLimits
) -> list[BadInput]:
    """A gene-by-cell text table: text (gzipped when named so, and complete), a header of
    barcodes that fits the first row, cells, barcodes, and the genes and values of the first
    :data:`TABLE_ROWS` rows and ``max_cells`` cells."""
    gz = path.name.endswith(".gz")
    expect_kind(
        path,
        sniff(path),
        ("gzip+text",) if gz else ("text",),
        "a gene-by-cell text table" + (" (gzipped)" if gz else ""),
    )
    if gz:
        scan_gzip(path)
    opener = gzip.open if gz else open
    with opener(path, "rt") as fh:
        header = fh.readline().rstrip("\r\n")
        first = fh.readline().rstrip("\r\n")
    if not first:
        raise BadInput(
            f"{path.name} has a header but no gene rows",
            "give a gene-by-cell table (first column gene, header barcodes)",
            path,
        )
    sep, head, n_fields, barcodes = _table_header(header, first)
    if barcodes is None:
        raise BadInput(
            f"{path.name}: the header has {len(head)} fields but the first row {n_fields}",
            "give a gene-by-cell table whose header is the barcodes",
            path,
        )
    out = cells_problems(len(barcodes), cells, path)
    out += barcode_problems(np.asarray(barcodes), path)
    k = min(max_cells, len(barcodes))
    rows = _read_table_rows(path, sep, nrows=TABLE_ROWS, usecols=range(k + 1), dtype={0: str})
    genes = rows[0].astype(str).to_numpy()
    values = rows.iloc[:, 1:].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    var = pd.DataFrame({"gene_symbols": genes}, index=genes)
    out += gene_problems(var, organism, path)
    out += value_problems(values, f"the first {k} cells", path)
    return out
