"""Input: each sample's raw UMI counts read into the data contract, and checked before any job.

Supported inputs (``fmt="auto"`` picks one from the path; :mod:`~sepsis_sc.io.formats`):

``10x_h5``
    Cell Ranger ``filtered_feature_bc_matrix.h5`` (gene-expression features only;
    :mod:`~sepsis_sc.io.tenx_h5`).
``mtx``
    A 10x Matrix Market triplet (``matrix.mtx[.gz]``, ``features.tsv[.gz]`` or ``genes.tsv[.gz]``,
    ``barcodes.tsv[.gz]``), also GEO-style sample-prefixed triplets
    (``GSM123_s1_matrix.mtx.gz``, ``GSM123_s1_features.tsv.gz``, ``GSM123_s1_barcodes.tsv.gz``),
    given as the folder or as the path of the matrix file (:mod:`~sepsis_sc.io.mtx`).
``h5ad``
    An AnnData file; counts are taken from ``layers["counts"]`` when present, else ``X``
    (:mod:`~sepsis_sc.io.h5ad`).
``table``
    A dense gene-by-cell UMI table (``.txt``, ``.csv``, ``.tsv``, optionally ``.gz``; first
    column gene, header = barcodes), as GEO series ship ``*_processed_UMI.txt.gz``, read in
    row chunks straight into a sparse matrix (:mod:`~sepsis_sc.io.text`).

Each format's module holds its reader (``read_...``) and its pre-flight check (``check_...``)
side by side. :mod:`~sepsis_sc.io.ingest` reads any of them (:func:`read_counts`) and applies
the data contract (:func:`ingest_sample`, :func:`ensure_symbols`, :func:`read_raw_droplets`);
:mod:`~sepsis_sc.io.checks` runs the cheap checks of every sample's file at workflow start
(:func:`preflight`, :func:`check_inputs`), with the vocabulary the checks share in
:mod:`~sepsis_sc.io.problems` (:func:`sniff`, ...).
"""

from sepsis_sc.io.checks import PreflightError, Problem, check_inputs, preflight
from sepsis_sc.io.formats import FORMATS
from sepsis_sc.io.ingest import ensure_symbols, ingest_sample, read_counts, read_raw_droplets
from sepsis_sc.io.problems import FULL_GZIP_READ_BYTES, sniff
from sepsis_sc.io.tenx_h5 import write_10x_h5

__all__ = [
    "read_counts",
    "read_raw_droplets",
    "ingest_sample",
    "ensure_symbols",
    "write_10x_h5",
    "FORMATS",
    "Problem",
    "PreflightError",
    "check_inputs",
    "preflight",
    "sniff",
    "FULL_GZIP_READ_BYTES",
]
