"""The input formats: telling them apart, finding an MTX triplet's files, and the ``var``
every reader returns.

* :data:`FORMATS` and :func:`detect_format`: which reader (and which pre-flight check) a
  sample's path gets;
* :data:`MTX_NAME`, :func:`find_mtx_in_dir`, :func:`find_mtx_companion`: the files of a 10x
  Matrix Market triplet, plain (``matrix.mtx.gz``) or GEO sample-prefixed
  (``GSM123_s1_matrix.mtx.gz``);
* :func:`finish_var`, :func:`to_csr_float32`, :data:`ENSEMBL_RE`: what every reader hands on
  (CSR float32 counts; unique symbols as ``var_names``, ``var["gene_ids"]``,
  ``var["gene_symbols"]``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

__all__ = [
    "FORMATS",
    "ENSEMBL_RE",
    "MTX_NAME",
    "detect_format",
    "find_mtx_in_dir",
    "find_mtx_companion",
    "finish_var",
    "to_csr_float32",
]

#: the input formats, each with a reader and a pre-flight check
FORMATS = ("10x_h5", "mtx", "h5ad", "table")

#: a 10x matrix file's name: group 1 its GEO sample prefix, group 2 ``.gz`` when gzipped
MTX_NAME = re.compile(r"^(.*?)matrix\.mtx(\.gz)?$")

#: an Ensembl gene ID (``ENSG...``, ``ENSMUSG...``, optionally versioned)
ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")

_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "feature_id", "id")


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def find_mtx_in_dir(path: Path) -> Path:
    """The one 10x matrix file (``[<prefix>]matrix.mtx[.gz]``) in folder ``path``; none is a
    ``FileNotFoundError``, several a ``ValueError``."""
    matrices = sorted(p for p in path.iterdir() if re.search(r"matrix\.mtx(\.gz)?$", p.name))
    if not matrices:
        raise FileNotFoundError(
            f"no Matrix Market file (matrix.mtx[.gz] or <prefix>_matrix.mtx[.gz]) in {path}; "
            "give a folder with a 10x MTX triplet, or the path of the counts file itself."
        )
    if len(matrices) > 1:
        names = ", ".join(p.name for p in matrices)
        raise ValueError(
            f"{path} holds several matrices ({names}); give the path of one matrix file "
            "per sample in the sample sheet's 'path' column."
        )
    return matrices[0]


def detect_format(path: Path) -> str:
    """The format (one of :data:`FORMATS`) a path's name says; ``ValueError`` when it says
    none. A folder is ``10x_h5`` when it holds a ``filtered_feature_bc_matrix.h5`` and no
    matrix file, else ``mtx``."""
    if path.is_dir():
        h5 = path / "filtered_feature_bc_matrix.h5"
        if h5.exists() and not any(re.search(r"matrix\.mtx", p.name) for p in path.iterdir()):
            return "10x_h5"
        return "mtx"
    name = _strip_gz(path.name.lower())
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith(".h5") or name.endswith(".hdf5"):
        return "10x_h5"
    if name.endswith(".mtx"):
        return "mtx"
    if name.endswith((".txt", ".csv", ".tsv")):
        return "table"
    raise ValueError(
        f"cannot tell the format of {path}: expected a 10x .h5, a .h5ad, a 10x MTX folder or "
        "matrix.mtx(.gz), or a gene-by-cell .txt/.csv/.tsv(.gz) table; set fmt= (one of "
        f"{', '.join(FORMATS)}) or the sample sheet's 'format' column."
    )


def find_mtx_companion(
    matrix: Path, prefix: str, stems: Iterable[str]
) -> tuple[Path | None, list[str]]:
    """The first existing ``<prefix><stem><suffix>`` beside ``matrix`` (stems in order, each
    with .tsv.gz, .tsv, .txt.gz, .txt, .csv.gz, .csv), or None, and the names tried."""
    tried = []
    for stem in stems:
        for suffix in (".tsv.gz", ".tsv", ".txt.gz", ".txt", ".csv.gz", ".csv"):
            cand = matrix.parent / f"{prefix}{stem}{suffix}"
            tried.append(cand.name)
            if cand.exists():
                return cand, tried
    return None, tried


def finish_var(adata: ad.AnnData) -> None:
    """Give ``var`` the contract columns and make symbols unique."""
    symbols = adata.var_names.astype(str)
    if "gene_symbols" not in adata.var.columns:
        adata.var["gene_symbols"] = np.asarray(symbols)
    if "gene_ids" not in adata.var.columns:
        for col in _ID_COLUMNS[1:]:
            if col in adata.var.columns:
                adata.var["gene_ids"] = adata.var[col].astype(str).to_numpy()
                break
        else:
            ids = np.where([bool(ENSEMBL_RE.match(s)) for s in symbols], symbols, "")
            adata.var["gene_ids"] = ids
    adata.var["gene_ids"] = adata.var["gene_ids"].astype(str).replace({"nan": ""})
    adata.var["gene_symbols"] = adata.var["gene_symbols"].astype(str)
    adata.var_names_make_unique()


def to_csr_float32(x: Any) -> sp.csr_matrix:
    """Counts (sparse, dense or a backed dataset) as CSR float32, duplicates summed and
    explicit zeros dropped."""
    if sp.issparse(x):
        m = sp.csr_matrix(x)
    elif hasattr(x, "to_memory"):  # backed dataset
        m = sp.csr_matrix(x.to_memory())
    else:
        m = sp.csr_matrix(np.asarray(x))
    if m.dtype != np.float32:
        m = m.astype(np.float32)
    m.sum_duplicates()
    m.eliminate_zeros()
    return m
