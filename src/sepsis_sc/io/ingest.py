"""Ingest: one sample's raw UMI counts read into an AnnData that follows the data contract.

* :func:`read_counts`: any input format (:data:`~sepsis_sc.io.formats.FORMATS`, picked by
  :func:`~sepsis_sc.io.formats.detect_format` from the path), each read by its module
  (:mod:`~sepsis_sc.io.tenx_h5`, :mod:`~sepsis_sc.io.mtx`, :mod:`~sepsis_sc.io.h5ad`,
  :mod:`~sepsis_sc.io.text`) into cells x genes CSR float32 counts with gene symbols as
  ``var_names`` (made unique), Ensembl IDs in ``var["gene_ids"]`` (empty string where
  unknown) and symbols in ``var["gene_symbols"]``;
* :func:`ensure_symbols`: Ensembl-ID ``var_names`` switched to the symbols of a ``var``
  column;
* :func:`ingest_sample`: read, check the values, the organism and the sample sheet, and
  label the cells (the per-sample AnnData of the ``ingest`` stage);
* :func:`read_raw_droplets`: a sample's raw droplet matrix for the ambient-RNA step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sepsis_sc.config import IngestSettings
from sepsis_sc.data import check_counts, detect_organism, resolve_organism
from sepsis_sc.io.formats import ENSEMBL_RE, FORMATS, detect_format, finish_var, to_csr_float32
from sepsis_sc.io.h5ad import read_h5ad
from sepsis_sc.io.mtx import read_mtx
from sepsis_sc.io.tenx_h5 import read_10x_h5
from sepsis_sc.io.text import read_table

logger = logging.getLogger(__name__)

__all__ = ["read_counts", "ensure_symbols", "ingest_sample", "read_raw_droplets"]

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
    fmt_used = detect_format(p) if fmt == "auto" else fmt
    readers = {"10x_h5": read_10x_h5, "mtx": read_mtx, "h5ad": read_h5ad, "table": read_table}
    if fmt_used not in readers:
        raise ValueError(f"unknown format {fmt!r}; use 'auto' or one of {', '.join(FORMATS)}.")
    if fmt_used == "10x_h5" and p.is_dir():
        p = p / "filtered_feature_bc_matrix.h5"
    adata = readers[fmt_used](p)
    adata.uns["ingest_format"] = fmt_used
    logger.info("read %s (%s): %d cells x %d genes", p, fmt_used, adata.n_obs, adata.n_vars)
    return adata


def _looks_ensembl(names: Iterable[str]) -> float:
    names = list(names)
    if not names:
        return 0.0
    return float(np.mean([bool(ENSEMBL_RE.match(str(n))) for n in names]))


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
        finish_var(adata)
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


def _obs_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return str(value)


def ingest_sample(
    path: str | Path,
    sample: Mapping[str, Any],
    settings: IngestSettings | None = None,
    *,
    organism: str | None = None,
    **overrides: Any,
) -> ad.AnnData:
    """Read, check and label one sample of the sample sheet.

    Parameters
    ----------
    path
        The sample's counts (any format of :func:`read_counts`).
    sample
        The sample-sheet row: ``sample_id`` (required), ``condition``, ``donor``, ``batch``
        and free columns. An optional ``format`` entry is passed to :func:`read_counts`.
    settings
        The ``ingest`` config section (:class:`~sepsis_sc.config.IngestSettings`; schema
        defaults when ``None``): ``min_cells``, the fewest barcodes a sample may have;
        fewer raises (an empty sample is an error).
    organism
        ``"human"`` or ``"mouse"`` as configured; ``None`` accepts what is detected.
    **overrides
        Fields of ``settings`` by name (``min_cells=10``).

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
    settings = (settings or IngestSettings()).with_overrides(overrides)
    if "sample_id" not in sample or not str(sample["sample_id"]).strip():
        raise ValueError("the sample-sheet row has no 'sample_id'; every sample needs one.")
    sample_id = str(sample["sample_id"])
    if organism not in (None, "human", "mouse"):
        raise ValueError(f"organism must be 'human', 'mouse' or None, not {organism!r}.")
    fmt = str(sample.get("format") or sample.get("fmt") or "auto")
    adata, fmt_used = _read_sample(path, sample_id, fmt, settings.min_cells)
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
    (absent genes are zero); the ambient-RNA step (:mod:`sepsis_sc.qc.ambient`) estimates the
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
    counts = to_csr_float32(adata.X)
    adata.layers["counts"] = counts
    adata.X = counts.copy()
    names = adata.var_names.str.upper()
    adata.var["mt"] = np.asarray(names.str.startswith("MT-"))
    adata.var["ribo"] = np.asarray(names.str.match(r"^RP[SL]\d"))
    adata.var["hb"] = np.asarray(names.str.match(r"^HB[ABDEGMQZ]\d?$|^HB[AB]-"))
