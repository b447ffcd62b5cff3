"""Ingest: read one sample's raw UMI counts into an AnnData that follows the data contract.

Supported inputs (``fmt="auto"`` picks one from the path):

``10x_h5``
    Cell Ranger ``filtered_feature_bc_matrix.h5`` (read with :func:`scanpy.read_10x_h5`,
    gene-expression features only).
``mtx``
    A 10x Matrix Market triplet (``matrix.mtx[.gz]``, ``features.tsv[.gz]`` or ``genes.tsv[.gz]``,
    ``barcodes.tsv[.gz]``), also GEO-style sample-prefixed triplets
    (``GSM123_s1_matrix.mtx.gz``, ``GSM123_s1_features.tsv.gz``, ``GSM123_s1_barcodes.tsv.gz``),
    given as the folder or as the path of the matrix file.
``h5ad``
    An AnnData file; counts are taken from ``layers["counts"]`` when present, else ``X``.
``table``
    A dense gene-by-cell UMI table (``.txt``, ``.csv``, ``.tsv``, optionally ``.gz``; first
    column gene, header = barcodes), as GEO series ship ``*_processed_UMI.txt.gz``. It is read
    in row chunks straight into a sparse matrix.

Every reader returns cells x genes CSR counts in ``X`` with gene symbols as ``var_names``
(made unique), Ensembl IDs in ``var["gene_ids"]`` (empty string where unknown) and symbols in
``var["gene_symbols"]``. :func:`ingest_sample` then checks the values, the organism and the
sample sheet and writes the per-sample AnnData of the ``ingest`` stage.
"""

from __future__ import annotations

import gzip
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from sepsis_sc.data import check_counts, detect_organism, resolve_organism

logger = logging.getLogger(__name__)

__all__ = [
    "read_counts",
    "read_raw_droplets",
    "ingest_sample",
    "ensure_symbols",
    "write_10x_h5",
    "FORMATS",
]

FORMATS = ("10x_h5", "mtx", "h5ad", "table")

#: sample-sheet columns that describe where the data come from, not the sample itself;
#: they are not copied into ``obs``.
_SHEET_COLUMNS_NOT_IN_OBS = frozenset(
    {"path", "url", "urls", "checksum", "md5", "sha256", "format", "fmt", "raw_path"}
)

#: symbol columns that may hold gene symbols when ``var_names`` are Ensembl IDs.
_SYMBOL_COLUMNS = (
    "gene_symbols",
    "gene_symbol",
    "feature_name",
    "feature_names",
    "gene_name",
    "gene_names",
    "symbol",
    "symbols",
    "gene",
    "name",
)
_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "feature_id", "id")

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


# --------------------------------------------------------------------------------------
# format detection
# --------------------------------------------------------------------------------------
def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def _find_mtx_in_dir(path: Path) -> Path:
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


def _detect_format(path: Path) -> str:
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


# --------------------------------------------------------------------------------------
# var helpers
# --------------------------------------------------------------------------------------
def _finish_var(adata: ad.AnnData) -> None:
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
            ids = np.where([bool(_ENSEMBL_RE.match(s)) for s in symbols], symbols, "")
            adata.var["gene_ids"] = ids
    adata.var["gene_ids"] = adata.var["gene_ids"].astype(str).replace({"nan": ""})
    adata.var["gene_symbols"] = adata.var["gene_symbols"].astype(str)
    adata.var_names_make_unique()


def _to_csr_float32(x: Any) -> sp.csr_matrix:
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


# --------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------
def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt")
    return open(path)


def _read_10x_h5(path: Path) -> ad.AnnData:
    import scanpy as sc

    adata = sc.read_10x_h5(path)
    adata.X = _to_csr_float32(adata.X)
    adata.var["gene_symbols"] = np.asarray(adata.var_names.astype(str))
    _finish_var(adata)
    return adata


def _read_mtx(path: Path) -> ad.AnnData:
    """A 10x MTX triplet (the matrix file, or the folder holding it) as cells x genes."""
    matrix = _find_mtx_in_dir(path) if path.is_dir() else path
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
    _finish_var(adata)
    return adata


def _mtx_prefix(matrix: Path) -> str:
    """The GEO sample prefix of a 10x matrix file (``""`` for a plain ``matrix.mtx[.gz]``)."""
    m = re.match(r"^(.*?)matrix\.mtx(\.gz)?$", matrix.name)
    if m is None:
        raise ValueError(
            f"{matrix.name} does not look like a 10x matrix file (expected "
            "'matrix.mtx[.gz]' or '<prefix>matrix.mtx[.gz]')."
        )
    return m.group(1)


def _find_mtx_companion(
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


def _mtx_companion(matrix: Path, prefix: str, stems: Iterable[str]) -> Path:
    """:func:`_find_mtx_companion`; a missing file is a ``FileNotFoundError``."""
    found, tried = _find_mtx_companion(matrix, prefix, stems)
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
        is_id = np.array([bool(_ENSEMBL_RE.match(s)) for s in col])
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


def _read_h5ad(path: Path) -> ad.AnnData:
    adata = ad.read_h5ad(path)
    if "counts" in adata.layers:
        x = adata.layers["counts"]
        source = 'layers["counts"]'
    else:
        x = adata.X
        source = "X"
    logger.info("%s: counts taken from %s", path, source)
    out = ad.AnnData(X=_to_csr_float32(x), obs=adata.obs.copy(), var=adata.var.copy())
    _finish_var(out)
    return out


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


def _read_table(path: Path, chunk_values: int = 20_000_000) -> ad.AnnData:
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
    is_id = np.array([bool(_ENSEMBL_RE.match(g)) for g in genes_arr], dtype=bool)
    var = pd.DataFrame(
        {"gene_ids": np.where(is_id, genes_arr, ""), "gene_symbols": genes_arr},
        index=pd.Index(genes_arr),
    )
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=pd.Index(barcodes, dtype=str)), var=var)
    _finish_var(adata)
    return adata


def read_counts(path: str | Path, fmt: str = "auto") -> ad.AnnData:
    """Read one sample's raw UMI counts.

    Parameters
    ----------
    path
        A 10x ``.h5``, a 10x MTX folder or matrix file (plain or GEO sample-prefixed), an
        ``.h5ad``, or a gene-by-cell ``.txt``/``.csv``/``.tsv`` table (optionally gzipped).
    fmt
        ``"auto"`` (from the path) or one of ``"10x_h5"``, ``"mtx"``, ``"h5ad"``, ``"table"``.

    Returns
    -------
    AnnData with CSR float32 counts in ``X`` (cells x genes), barcodes as ``obs_names``, gene
    symbols as unique ``var_names``, ``var["gene_ids"]`` (Ensembl IDs, ``""`` where unknown)
    and ``var["gene_symbols"]``. Values are not checked here; see
    :func:`sepsis_sc.data.check_counts`. ``adata.uns["ingest_format"]`` records the format read.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"counts file {p} does not exist; check the 'path' column of the sample sheet."
        )
    fmt_used = _detect_format(p) if fmt == "auto" else fmt
    readers = {"10x_h5": _read_10x_h5, "mtx": _read_mtx, "h5ad": _read_h5ad, "table": _read_table}
    if fmt_used not in readers:
        raise ValueError(f"unknown format {fmt!r}; use 'auto' or one of {', '.join(FORMATS)}.")
    if fmt_used == "10x_h5" and p.is_dir():
        p = p / "filtered_feature_bc_matrix.h5"
    adata = readers[fmt_used](p)
    adata.uns["ingest_format"] = fmt_used
    logger.info("read %s (%s): %d cells x %d genes", p, fmt_used, adata.n_obs, adata.n_vars)
    return adata


# --------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------
def _looks_ensembl(names: Iterable[str]) -> float:
    names = list(names)
    if not names:
        return 0.0
    return float(np.mean([bool(_ENSEMBL_RE.match(str(n))) for n in names]))


def ensure_symbols(adata: ad.AnnData, sample_id: str | None = None) -> None:
    """Make gene symbols the ``var_names`` (in place).

    When ``var_names`` are Ensembl IDs (``ENSG...``, ``ENSMUSG...``) and ``var`` has a symbol
    column (``gene_symbols``, ``feature_name``, ``gene_name``, ``symbol``, ...), the IDs move
    to ``var["gene_ids"]`` and the symbols become the (unique) ``var_names``; IDs without a
    symbol keep the ID. Afterwards ``var["gene_symbols"]`` and ``var["gene_ids"]`` exist.

    Raises
    ------
    ValueError
        When ``var_names`` are Ensembl IDs and no symbol column exists.
    """
    who = f"sample {sample_id}" if sample_id else "the data"
    if _looks_ensembl(adata.var_names[:2000]) < 0.5:
        _finish_var(adata)
        return
    ids = adata.var_names.astype(str).to_numpy()
    for col in _SYMBOL_COLUMNS:
        if col in adata.var.columns:
            sym = adata.var[col].astype(object).to_numpy()
            sym_s = np.array([str(s) if isinstance(s, str) and s else "" for s in sym])
            if _looks_ensembl(sym_s[sym_s != ""][:2000]) >= 0.5 or not (sym_s != "").any():
                continue
            symbols = np.where(sym_s == "", ids, sym_s)
            adata.var["gene_ids"] = ids
            adata.var["gene_symbols"] = symbols
            adata.var_names = pd.Index(symbols)
            adata.var_names_make_unique()
            logger.info("%s: switched var_names from Ensembl IDs to var[%r]", who, col)
            return
    raise ValueError(
        f"{who} has Ensembl gene IDs as var_names (e.g. {ids[0]}) and no gene-symbol column "
        f"(looked for {', '.join(_SYMBOL_COLUMNS[:6])}, ...). Marker genes are matched by "
        "symbol: give the 10x features.tsv (ID + symbol columns) or add a 'gene_symbols' "
        "column to var."
    )


# --------------------------------------------------------------------------------------
# ingest
# --------------------------------------------------------------------------------------
def _obs_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return str(value)


def ingest_sample(
    path: str | Path,
    sample: Mapping[str, Any],
    *,
    organism: str | None = None,
    min_cells: int = 1,
) -> ad.AnnData:
    """Read, check and label one sample of the sample sheet.

    Parameters
    ----------
    path
        The sample's counts (any format of :func:`read_counts`).
    sample
        The sample-sheet row: ``sample_id`` (required), ``condition``, ``donor``, ``batch``
        and free columns. An optional ``format`` entry is passed to :func:`read_counts`.
    organism
        ``"human"`` or ``"mouse"`` as configured; ``None`` accepts what is detected.
    min_cells
        Fewest barcodes a sample may have; fewer raises (an empty sample is an error).

    Returns
    -------
    AnnData with

    - ``obs_names`` ``"{sample_id}_{barcode}"``; ``obs`` gets every sample-sheet column
      (categorical) except ``path``/``url``/checksums/``format``;
    - ``layers["counts"]`` and ``X``: the raw counts, CSR float32 (separate copies);
    - ``var_names`` symbols, ``var["gene_ids"]``, ``var["gene_symbols"]``, flags
      ``var["mt"]``, ``var["ribo"]``, ``var["hb"]``;
    - ``uns["ingest"] = {"source", "format", "organism", "sample_id"}``.
    """
    if "sample_id" not in sample or not str(sample["sample_id"]).strip():
        raise ValueError("the sample-sheet row has no 'sample_id'; every sample needs one.")
    sample_id = str(sample["sample_id"])
    if organism not in (None, "human", "mouse"):
        raise ValueError(f"organism must be 'human', 'mouse' or None, not {organism!r}.")
    fmt = str(sample.get("format") or sample.get("fmt") or "auto")
    adata, fmt_used = _read_sample(path, sample_id, fmt, min_cells)
    ensure_symbols(adata, sample_id)
    check_counts(adata, sample_id=sample_id, source=str(path))
    org = _sample_organism(adata, organism, sample_id, path)
    _label_cells(adata, sample, sample_id)
    _store_counts_and_flags(adata)
    adata.uns["ingest"] = {
        "source": str(path),
        "format": fmt_used,
        "organism": org if org is not None else "unknown",
        "sample_id": sample_id,
    }
    logger.info(
        "ingested sample %s: %d cells x %d genes (%s, %s)",
        sample_id,
        adata.n_obs,
        adata.n_vars,
        fmt_used,
        org,
    )
    return adata


def read_raw_droplets(path: str | Path, sample_id: str, var_names: Sequence[str]) -> ad.AnnData:
    """Read a sample's raw (unfiltered) droplet matrix, symbols matched to ``var_names``.

    Any format of :func:`read_counts` (Cell Ranger ``raw_feature_bc_matrix.h5``, an MTX
    folder, ``.h5ad``). Genes are aligned to the filtered matrix's ``var_names``
    (absent genes are zero); the ambient-RNA step (:mod:`sepsis_sc.ambient`) estimates the
    soup from its low-UMI droplets.
    """
    try:
        raw = read_counts(path)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise type(err)(f"sample {sample_id}: raw_path: {err}") from err
    raw.uns.pop("ingest_format", None)
    ensure_symbols(raw, sample_id)
    if not raw.var_names.is_unique:
        raw.var_names_make_unique()
    check_counts(raw, sample_id=sample_id, source=f"raw_path {path}")
    cols = raw.var_names.get_indexer(pd.Index(list(var_names)))
    x = sp.csr_matrix(raw.X)
    aligned = sp.csr_matrix((x.shape[0], len(cols)), dtype=np.float32)
    if (cols >= 0).any():
        sel = np.flatnonzero(cols >= 0)
        aligned = sp.hstack(
            [x[:, cols[sel]], sp.csr_matrix((x.shape[0], len(cols) - sel.size))], format="csr"
        )
        order = np.concatenate([sel, np.flatnonzero(cols < 0)])
        aligned = aligned[:, np.argsort(order)]
    return ad.AnnData(
        X=sp.csr_matrix(aligned, dtype=np.float32),
        obs=pd.DataFrame(index=raw.obs_names.copy()),
        var=pd.DataFrame(index=pd.Index(list(var_names))),
    )


def _read_sample(
    path: str | Path, sample_id: str, fmt: str, min_cells: int
) -> tuple[ad.AnnData, str]:
    """Read the counts (errors name the sample) and the format used; at least
    ``min_cells`` (and one) barcodes."""
    try:
        adata = read_counts(path, fmt=fmt)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise type(err)(f"sample {sample_id}: {err}") from err
    fmt_used = adata.uns.pop("ingest_format", fmt)
    if adata.n_obs < max(min_cells, 1):
        raise ValueError(
            f"sample {sample_id} ({path}) has {adata.n_obs} cells (min_cells={min_cells}); "
            "check that the path points at the filtered matrix of that sample, or remove it "
            "from the sample sheet."
        )
    return adata, fmt_used


def _sample_organism(
    adata: ad.AnnData, organism: str | None, sample_id: str, path: str | Path
) -> str | None:
    """The configured organism, checked against the gene symbols, or the detected one
    (``None``, logged, when neither is known)."""
    detected = detect_organism(adata.var_names)
    if organism is not None:  # raises when the genes contradict the config
        resolve_organism(adata.var_names, organism, what=f"sample {sample_id} ({path})")
    org = organism or detected
    if org is None:
        logger.warning("sample %s: could not tell the organism from gene names", sample_id)
    return org


def _label_cells(adata: ad.AnnData, sample: Mapping[str, Any], sample_id: str) -> None:
    """Cell names ``{sample_id}_{barcode}``, ``obs["barcode"]`` and the sheet columns as
    categorical ``obs`` columns; barcodes must be unique."""
    barcodes = adata.obs_names.astype(str)
    adata.obs = pd.DataFrame(index=pd.Index([f"{sample_id}_{b}" for b in barcodes]))
    adata.obs["barcode"] = np.asarray(barcodes)
    for key, value in sample.items():
        if key in _SHEET_COLUMNS_NOT_IN_OBS or key == "barcode":
            continue
        adata.obs[key] = pd.Categorical([_obs_value(value)] * adata.n_obs)
    if not adata.obs_names.is_unique:
        raise ValueError(
            f"sample {sample_id} has duplicated barcodes; a 10x filtered matrix has unique "
            "barcodes, so the input is probably a concatenation of several samples."
        )


def _store_counts_and_flags(adata: ad.AnnData) -> None:
    """Counts as CSR float32 in ``layers["counts"]`` and (a copy) ``X``; ``var`` flags
    ``mt``, ``ribo``, ``hb`` from the symbols (either letter case)."""
    counts = _to_csr_float32(adata.X)
    adata.layers["counts"] = counts
    adata.X = counts.copy()
    names = adata.var_names.str.upper()
    adata.var["mt"] = np.asarray(names.str.startswith("MT-"))
    adata.var["ribo"] = np.asarray(names.str.match(r"^RP[SL]\d"))
    adata.var["hb"] = np.asarray(names.str.match(r"^HB[ABDEGMQZ]\d?$|^HB[AB]-"))


# --------------------------------------------------------------------------------------
# writer (tests, demo data)
# --------------------------------------------------------------------------------------
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
