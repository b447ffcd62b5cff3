"""Download public cohort files and unpack archives, safely and resumably.

The public functions feed the workflow's local ``download`` and ``unpack_archive`` rules
(HPC compute nodes often have no internet, so fetching happens in local rules and the
compute jobs only read local paths):

* :func:`download_plan` (:mod:`~sepsis_sc.download.plan`) works out from the sample sheet
  which files and archives to fetch and which sample files each archive must yield;
* :func:`download` (:mod:`~sepsis_sc.download.fetch`) fetches one URL (GEO supplementary
  files, Zenodo, Broad, any plain HTTP/HTTPS URL) into ``dest`` with retries and exponential
  back-off, HTTP ``Range`` resume, checksum verification, HTML-error-page detection and an
  atomic rename;
* :func:`unpack_archive` (:mod:`~sepsis_sc.download.archive`) extracts a
  ``.tar``/``.tar.gz``/``.tgz`` (e.g. GEO's ``GSE..._RAW.tar`` of per-sample
  ``GSM..._matrix.mtx.gz`` triplets) or ``.zip`` with path-traversal protection, and writes a
  completion marker so that a half-unpacked directory is never mistaken for a finished one.

None of them touches an AnnData; they move bytes and log through :mod:`logging`.
"""

from sepsis_sc.download.archive import UNPACK_MARKER, archive_stem, unpack_archive
from sepsis_sc.download.fetch import (
    ChecksumError,
    DownloadError,
    download,
    file_digest,
    https_url,
    parse_checksum,
)
from sepsis_sc.download.plan import (
    ArchiveSpec,
    DownloadPlan,
    FileSpec,
    download_plan,
    url_filename,
)

__all__ = [
    "ArchiveSpec",
    "ChecksumError",
    "DownloadError",
    "DownloadPlan",
    "FileSpec",
    "UNPACK_MARKER",
    "archive_stem",
    "download",
    "download_plan",
    "file_digest",
    "https_url",
    "parse_checksum",
    "unpack_archive",
    "url_filename",
]
