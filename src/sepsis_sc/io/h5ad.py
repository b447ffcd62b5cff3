"""AnnData ``.h5ad`` input (counts from ``layers["counts"]`` when present, else ``X``): the
reader (:func:`read_h5ad`) and the pre-flight check (:func:`check_h5ad`)."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np

from sepsis_sc.io.formats import finish_var, to_csr_float32
from sepsis_sc.io.problems import (
    MTX_ENTRIES,
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

logger = logging.getLogger(__name__)

__all__ = ["read_h5ad", "check_h5ad"]


def read_h5ad(path: Path) -> ad.AnnData:
    """An ``.h5ad``'s counts (``layers["counts"]`` when present, else ``X``) as CSR float32
    with its ``obs`` and ``var``."""
    adata = ad.read_h5ad(path)
    if "counts" in adata.layers:
        x = adata.layers["counts"]
        source = 'layers["counts"]'
    else:
        x = adata.X
        source = "X"
    logger.info("%s: counts taken from %s", path, source)
    out = ad.AnnData(X=to_csr_float32(x), obs=adata.obs.copy(), var=adata.var.copy())
    finish_var(out)
    return out


def check_h5ad(
    path: Path, organism: str | None, max_cells: int, cells: CellLimits
) -> list[BadInput]:
    """An AnnData ``.h5ad``: HDF5 of the AnnData layout, counts in ``X`` or
    ``layers["counts"]``, cells, barcodes, genes and the values of the first cells."""
    expect_kind(path, sniff(path), ("hdf5",), "an AnnData .h5ad (HDF5)")
    from anndata.io import read_elem

    with open_h5(path) as f:
        if "matrix" in f and not is_anndata(f):
            raise BadInput(
                f"{path.name} is a 10x HDF5 file named .h5ad",
                "rename it to .h5 (or set the sheet's 'format' column to 10x_h5)",
                path,
            )
        if not is_anndata(f):
            raise BadInput(
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
                raise BadInput(
                    f"{path.name} has neither X nor layers['counts']",
                    "store the raw counts in X or layers['counts']",
                    path,
                )
            source = "layers['counts']" if elem.name.endswith("counts") else "X"
            obs_index = f["obs"].attrs.get("_index", "_index")
            barcodes = decode_strings(f["obs"][obs_index][()]) if obs_index in f["obs"] else None
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
        except BadInput:
            raise
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise BadInput(
                f"{path.name} cannot be read as AnnData ({err})", REDOWNLOAD, path
            ) from None
    out = cells_problems(n_cells, cells, path)
    if barcodes is not None:
        out += barcode_problems(barcodes, path)
    out += gene_problems(var, organism, path)
    out += value_problems(values, f"{source} of the first {k} cells", path)
    return out
