"""Download public cohort files and unpack archives, safely and resumably.

Two public functions feed the workflow's local ``download`` and ``unpack_archive`` rules
(HPC compute nodes often have no internet, so fetching happens in local rules and the
compute jobs only read local paths):

* :func:`download` fetches one URL (GEO supplementary files, Zenodo, Broad, any plain
  HTTP/HTTPS URL) into ``dest`` with retries and exponential back-off, HTTP ``Range``
  resume, checksum verification, HTML-error-page detection and an atomic rename;
* :func:`unpack_archive` extracts a ``.tar``/``.tar.gz``/``.tgz`` (e.g. GEO's
  ``GSE..._RAW.tar`` of per-sample ``GSM..._matrix.mtx.gz`` triplets) or ``.zip`` with
  path-traversal protection, and writes a completion marker so that a half-unpacked
  directory is never mistaken for a finished one.

Neither function touches an AnnData; they move bytes and log through
``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlparse

import pandas as pd
import requests

logger = logging.getLogger(__name__)

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

#: Name of the marker file :func:`unpack_archive` writes into ``outdir`` when done.
UNPACK_MARKER = ".unpacked.json"

_HEX_LENGTH = {"sha256": 64, "md5": 32}
_ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip")
_HTML_SUFFIXES = (".html", ".htm")
# Client errors that no retry can fix: report them at once.
_FATAL_STATUS = {400, 401, 403, 404, 405, 410, 451}
# Transient statuses worth retrying (server errors and rate limiting).
_RETRY_STATUS = {408, 425, 429}
_MAX_RETRY_AFTER = 120.0
# FTP mirrors that serve the same tree over HTTPS (ftp:// is rewritten to https:// for these).
_HTTPS_MIRRORED_FTP = {"ftp.ncbi.nlm.nih.gov", "ftp.ebi.ac.uk", "ftp.ensembl.org"}


class DownloadError(RuntimeError):
    """A file could not be downloaded (HTTP error, HTML page instead of data, retries spent)."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the expected checksum."""


class _Retryable(Exception):
    """Internal: a transient failure; the attempt loop retries (and resumes when it can)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def parse_checksum(checksum: str) -> tuple[str, str]:
    """Split ``"sha256:<hex>"`` or ``"md5:<hex>"`` into ``(algorithm, hexdigest)``.

    Parameters
    ----------
    checksum
        Checksum string as written in the sample sheet (``checksum`` or
        ``archive_checksum`` column).

    Returns
    -------
    ``(algorithm, hexdigest)`` with the algorithm in ``{"sha256", "md5"}`` and the digest
    lower-cased.

    Raises
    ------
    ValueError
        If the string is not of that form.
    """
    text = str(checksum).strip()
    algo, sep, digest = text.partition(":")
    algo = algo.strip().lower()
    digest = digest.strip().lower()
    expected_len = _HEX_LENGTH.get(algo)
    if (
        not sep
        or expected_len is None
        or len(digest) != expected_len
        or not re.fullmatch(r"[0-9a-f]+", digest)
    ):
        raise ValueError(
            f"checksum {checksum!r} is not of the form 'sha256:<64 hex digits>' or "
            "'md5:<32 hex digits>'; fix the 'checksum'/'archive_checksum' column of the "
            "sample sheet or leave it empty"
        )
    return algo, digest


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks.

    Parameters
    ----------
    path
        File to hash.
    algorithm
        ``"sha256"`` or ``"md5"``.

    Returns
    -------
    The lower-case hex digest.
    """
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def https_url(url: str) -> str:
    """Return an HTTP(S) URL for ``url``.

    ``ftp://`` URLs of hosts that mirror their tree over HTTPS (NCBI GEO
    ``ftp.ncbi.nlm.nih.gov``, EBI, Ensembl) are rewritten to ``https://``; other schemes
    raise.

    Parameters
    ----------
    url
        URL from the sample sheet.

    Returns
    -------
    The URL to fetch.

    Raises
    ------
    ValueError
        Neither HTTP(S) nor a known HTTPS-mirrored FTP host.
    """
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        return url
    if parsed.scheme == "ftp" and parsed.hostname in _HTTPS_MIRRORED_FTP:
        return parsed._replace(scheme="https").geturl()
    raise ValueError(
        f"cannot download {url!r}: only http(s) URLs (and ftp:// URLs of "
        f"{', '.join(sorted(_HTTPS_MIRRORED_FTP))}, fetched over https) are supported; "
        "use the https:// address of the file"
    )


def url_filename(url: str) -> str:
    """File name a URL's content should be stored under.

    The last path component of the URL (percent-decoded). GEO's
    ``https://www.ncbi.nlm.nih.gov/geo/download/?acc=GSE123&format=file`` has none, so
    ``acc=GSE123`` gives ``GSE123_RAW.tar`` (what GEO serves there).

    Parameters
    ----------
    url
        HTTP(S) URL.

    Returns
    -------
    A bare file name (no directory part).

    Raises
    ------
    ValueError
        If no file name can be derived; store the file under an explicit path instead.
    """
    parsed = urlparse(url)
    name = unquote(Path(parsed.path).name)
    if name and name != "download":
        return name
    query = parse_qs(parsed.query)
    acc = query.get("acc", [""])[0]
    if re.fullmatch(r"GSE\d+", acc) and query.get("format", [""])[0] == "file":
        return f"{acc}_RAW.tar"
    raise ValueError(
        f"cannot derive a file name from URL {url!r}; use a URL whose path ends in the file "
        "name (e.g. the GEO FTP URL https://ftp.ncbi.nlm.nih.gov/geo/series/GSEnnn/GSE.../"
        "suppl/<file>)"
    )


def archive_stem(name: str | os.PathLike[str]) -> str:
    """Archive file name without its archive suffix (``GSE1_RAW.tar`` -> ``GSE1_RAW``).

    Parameters
    ----------
    name
        Archive file name or path.

    Returns
    -------
    The stem, used as the name of the directory the archive unpacks into.

    Raises
    ------
    ValueError
        If the name has no supported archive suffix.
    """
    base = Path(name).name
    for suffix in _ARCHIVE_SUFFIXES:
        if base.lower().endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    raise ValueError(
        f"{base!r} is not a supported archive (expected one of {', '.join(_ARCHIVE_SUFFIXES)})"
    )


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _read_sidecar(dest: Path) -> str | None:
    side = _sidecar(dest)
    if not side.is_file():
        return None
    fields = side.read_text().split()
    if fields and re.fullmatch(r"[0-9a-f]{64}", fields[0].lower()):
        return fields[0].lower()
    return None


def _already_verified(dest: Path, expected: tuple[str, str] | None) -> bool:
    """True when ``dest`` exists and its bytes match the checksum or the sidecar."""
    if not dest.is_file():
        return False
    if expected is not None:
        algo, digest = expected
        actual = file_digest(dest, algo)
        if actual == digest:
            return True
        logger.warning(
            "%s exists but its %s %s differs from the expected %s; downloading again",
            dest,
            algo,
            actual,
            digest,
        )
        return False
    recorded = _read_sidecar(dest)
    if recorded is None:
        logger.info("%s exists but has no checksum or sidecar to verify it; downloading", dest)
        return False
    if file_digest(dest, "sha256") == recorded:
        return True
    logger.warning("%s does not match its sidecar %s; downloading again", dest, _sidecar(dest))
    return False


def _looks_like_html(first_bytes: bytes) -> bool:
    head = first_bytes[:512].lstrip().lower()
    return head.startswith(b"<!doctype html") or head.startswith(b"<html")


def _retry_after_seconds(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return min(float(value), _MAX_RETRY_AFTER)
    except ValueError:
        return None


def _new_hashers(expected: tuple[str, str] | None) -> dict[str, hashlib._Hash]:
    hashers = {"sha256": hashlib.sha256()}
    if expected is not None and expected[0] not in hashers:
        hashers[expected[0]] = hashlib.new(expected[0])
    return hashers


def _hash_existing(part: Path, hashers: dict[str, hashlib._Hash]) -> None:
    with open(part, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            for hasher in hashers.values():
                hasher.update(block)


def _attempt(
    url: str,
    dest: Path,
    part: Path,
    state: dict[str, dict[str, hashlib._Hash]],
    session: requests.Session,
    timeout: float,
    chunk_size: int,
) -> None:
    """One GET; appends to ``part`` (resuming when possible).

    ``state["hashers"]`` always holds hashers fed with exactly the bytes in ``part``: they
    are replaced by fresh ones whenever the transfer restarts from byte 0.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = session.get(url, stream=True, timeout=timeout, headers=headers)
    except (requests.ConnectionError, requests.Timeout) as err:
        raise _Retryable(f"connection failed: {err}") from err

    with response:
        _check_status(response, url, offset, part)
        offset, mode = _resume_or_restart(response, url, offset, part, state)
        expects_html = dest.name.lower().endswith(_HTML_SUFFIXES)
        _reject_html_content_type(response, url, dest, part, expects_html)
        length = response.headers.get("Content-Length")
        expected_total = offset + int(length) if length and length.isdigit() else None
        received = _stream_body(
            response,
            url,
            dest,
            part,
            mode=mode,
            offset=offset,
            hashers=state["hashers"],
            chunk_size=chunk_size,
            expects_html=expects_html,
        )
        if expected_total is not None and received < expected_total:
            raise _Retryable(f"connection dropped after {received} of {expected_total} bytes")


def _check_status(response: requests.Response, url: str, offset: int, part: Path) -> None:
    """Raise on an HTTP status that is no 200/206: fatal client errors as
    :class:`DownloadError`, 5xx/408/429 and a 416 on resume (the partial file is removed)
    as retryable."""
    status = response.status_code
    if status in _FATAL_STATUS:
        raise DownloadError(
            f"HTTP {status} ({response.reason}) for {url}: the file is not available at "
            "this URL (moved, private or mistyped); check the 'url'/'archive_url' column "
            "of the sample sheet"
        )
    if status >= 500 or status in _RETRY_STATUS:
        raise _Retryable(f"HTTP {status} ({response.reason})", _retry_after_seconds(response))
    if status == 416 and offset:
        # The partial file is as long as (or longer than) the remote file: start over.
        part.unlink(missing_ok=True)
        raise _Retryable("HTTP 416 on resume; restarting from scratch", 0.0)
    if status not in (200, 206):
        raise DownloadError(f"unexpected HTTP {status} ({response.reason}) for {url}")


def _resume_or_restart(
    response: requests.Response,
    url: str,
    offset: int,
    part: Path,
    state: dict[str, dict[str, hashlib._Hash]],
) -> tuple[int, str]:
    """(offset, file mode): append after a matching ``206``; else start at byte 0 with
    fresh hashers. A ``Content-Range`` that does not start at ``offset`` is retried from
    scratch."""
    if offset and response.status_code == 206:
        content_range = response.headers.get("Content-Range", "")
        match = re.match(r"bytes (\d+)-", content_range)
        if match is None or int(match.group(1)) != offset:
            part.unlink(missing_ok=True)
            raise _Retryable(f"server answered Range with {content_range!r}; restarting", 0.0)
        logger.info("resuming %s at byte %d", url, offset)
        return offset, "ab"
    if offset:
        logger.info("server ignored the Range header; restarting %s from byte 0", url)
    state["hashers"] = {name: hashlib.new(name) for name in state["hashers"]}
    return 0, "wb"


def _reject_html_content_type(
    response: requests.Response, url: str, dest: Path, part: Path, expects_html: bool
) -> None:
    """An HTML ``Content-Type`` for a file that is no HTML page is a landing or login page:
    :class:`DownloadError`, the partial file removed."""
    content_type = response.headers.get("Content-Type", "").lower()
    if not expects_html and content_type.startswith("text/html"):
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{url} served an HTML page (Content-Type {content_type!r}) instead of "
            f"{dest.name}; the URL probably points at a landing or login page, not the "
            "file itself (for GEO use the .../suppl/<file> FTP URL, for Zenodo append "
            "?download=1)"
        )


def _stream_body(
    response: requests.Response,
    url: str,
    dest: Path,
    part: Path,
    *,
    mode: str,
    offset: int,
    hashers: dict[str, hashlib._Hash],
    chunk_size: int,
    expects_html: bool,
) -> int:
    """Write the body to ``part`` and feed the hashers; returns the bytes now in ``part``.

    A body that starts with an HTML tag (from byte 0) is a :class:`DownloadError`; a
    connection that drops is retryable.
    """
    received = offset
    first = True
    try:
        with open(part, mode) as handle:
            for chunk in response.iter_content(chunk_size=chunk_size):
                if not chunk:
                    continue
                if first and offset == 0 and not expects_html and _looks_like_html(chunk):
                    handle.close()
                    part.unlink(missing_ok=True)
                    raise DownloadError(
                        f"{url} served an HTML page instead of {dest.name} (the body "
                        "starts with an HTML tag); the URL probably points at a landing, "
                        "error or login page rather than the file"
                    )
                first = False
                handle.write(chunk)
                for hasher in hashers.values():
                    hasher.update(chunk)
                received += len(chunk)
    except (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
    ) as err:
        raise _Retryable(f"connection dropped after {received} bytes: {err}") from err
    return received


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    checksum: str | None = None,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60,
    chunk_size: int = 1 << 20,
    session: requests.Session | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resuming, retrying and verifying on the way.

    The bytes go to ``dest + ".part"``; only when the transfer is complete and the
    checksum (if given) matches is the file renamed to ``dest`` (atomic on one file
    system) and a sidecar ``dest + ".sha256"`` written (``sha256sum`` format). A ``dest``
    that already exists and verifies (against ``checksum``, else against its sidecar) is
    not fetched again.

    Connection errors, a connection dropped mid-file, HTTP 5xx, 408 and 429 are retried
    up to ``retries`` times, sleeping ``backoff * 2**(attempt - 1)`` seconds (or the
    server's ``Retry-After``, capped at 120 s) in between; a partial file is resumed with
    an HTTP ``Range`` request when the server supports it and restarted from scratch
    when it does not.

    Parameters
    ----------
    url
        HTTP or HTTPS URL of the file (GEO supplementary ``https://ftp.ncbi.nlm.nih.gov/
        geo/...``, Zenodo ``.../files/<name>?download=1``, Broad, any plain URL);
        ``ftp://`` URLs of NCBI/EBI/Ensembl are fetched over HTTPS (see :func:`https_url`).
    dest
        Local path to write. Parent directories are created.
    checksum
        ``"sha256:<hex>"`` or ``"md5:<hex>"``; ``None`` skips verification (a sidecar
        sha256 is still recorded so a later call can skip the download).
    retries
        How many times to retry after the first attempt.
    backoff
        Base of the exponential back-off, in seconds (``0`` retries at once).
    timeout
        Seconds to wait for the connection and between received bytes.
    chunk_size
        Bytes per read/write.
    session
        A :class:`requests.Session` to reuse (proxies, authentication headers); a new one
        is made and closed otherwise.

    Returns
    -------
    ``Path(dest)``, complete and verified.

    Raises
    ------
    ValueError
        Bad arguments (malformed checksum, non-HTTP URL, negative retries).
    DownloadError
        HTTP 403/404 and other client errors (message names URL and status), an HTML page
        served instead of data, or retries exhausted; no ``dest`` or ``.part`` is left
        for the first two.
    ChecksumError
        The downloaded bytes do not match ``checksum``; the message quotes both sums and
        the URL, and neither ``dest`` nor ``.part`` is left behind.
    """
    url = https_url(url)
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    expected = parse_checksum(checksum) if checksum else None
    dest = Path(dest)
    if dest.name.endswith(".part"):
        raise ValueError(f"dest {dest} must not end in '.part' (reserved for partial files)")
    if _already_verified(dest, expected):
        logger.info("%s already present and verified; not downloading %s again", dest, url)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    own_session = session is None
    session = session or requests.Session()
    state = {"hashers": _new_hashers(expected)}
    if part.exists():
        logger.info(
            "found partial file %s (%d bytes); will try to resume", part, part.stat().st_size
        )
        _hash_existing(part, state["hashers"])
    try:
        _fetch_with_retries(
            url,
            dest,
            part,
            state,
            session,
            expected=expected,
            retries=retries,
            backoff=backoff,
            timeout=timeout,
            chunk_size=chunk_size,
        )
    finally:
        if own_session:
            session.close()
    return _verify_and_publish(url, dest, part, state["hashers"], expected)


def _fetch_with_retries(
    url: str,
    dest: Path,
    part: Path,
    state: dict[str, dict[str, hashlib._Hash]],
    session: requests.Session,
    *,
    expected: tuple[str, str] | None,
    retries: int,
    backoff: float,
    timeout: float,
    chunk_size: int,
) -> None:
    """Up to ``retries + 1`` attempts with exponential back-off (or the server's
    ``Retry-After``); :class:`DownloadError` when all fail (the partial file is kept)."""
    last_error = ""
    for attempt in range(retries + 1):
        if attempt:
            delay = backoff * 2 ** (attempt - 1)
            logger.warning(
                "attempt %d/%d for %s failed (%s); retrying in %.1f s",
                attempt,
                retries + 1,
                url,
                last_error,
                delay,
            )
            time.sleep(delay)
        try:
            logger.info("downloading %s -> %s", url, dest)
            _attempt(url, dest, part, state, session, timeout, chunk_size)
            return
        except _Retryable as err:
            last_error = str(err)
            if err.retry_after is not None and attempt < retries:
                time.sleep(err.retry_after)
            if not part.exists():
                state["hashers"] = _new_hashers(expected)
    raise DownloadError(
        f"giving up on {url} after {retries + 1} attempts; last error: {last_error}. "
        f"The partial file {part} is kept and will be resumed on the next run"
    )


def _verify_and_publish(
    url: str,
    dest: Path,
    part: Path,
    hashers: dict[str, hashlib._Hash],
    expected: tuple[str, str] | None,
) -> Path:
    """Check the checksum (a mismatch deletes the download: :class:`ChecksumError`), then
    rename ``part`` to ``dest`` and write the sha256 sidecar."""
    if expected is not None:
        algo, digest = expected
        actual = hashers[algo].hexdigest()
        if actual != digest:
            part.unlink(missing_ok=True)
            dest.unlink(missing_ok=True)
            raise ChecksumError(
                f"checksum mismatch for {url}: expected {algo}:{digest}, got {algo}:{actual}. "
                "The corrupt download was deleted; if the remote file changed on purpose, "
                "update the checksum in the sample sheet"
            )
    sha256 = hashers["sha256"].hexdigest()
    os.replace(part, dest)
    _sidecar(dest).write_text(f"{sha256}  {dest.name}\n")
    logger.info("downloaded %s (%d bytes, sha256 %s)", dest, dest.stat().st_size, sha256)
    return dest


# --------------------------------------------------------------------------- unpacking


def _check_member_name(name: str, archive: Path) -> None:
    path = Path(name)
    if path.is_absolute() or name.startswith(("/", "\\")) or ".." in path.parts:
        raise ValueError(
            f"archive {archive} contains the unsafe member {name!r} (absolute path or '..'); "
            "refusing to unpack it"
        )


def _list_members(archive: Path) -> list[str]:
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            return [info.filename for info in zf.infolist() if not info.is_dir()]
    with tarfile.open(archive, "r:*") as tf:
        return [m.name for m in tf.getmembers() if m.isfile()]


def _read_marker(outdir: Path) -> dict | None:
    marker = outdir / UNPACK_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _select(members: Sequence[str] | None, names: Iterable[str], archive: Path) -> list[str]:
    names = list(names)
    if members is None:
        return names
    available = set(names)
    missing = [m for m in members if m not in available]
    if missing:
        shown = ", ".join(sorted(available)[:20]) + (" ..." if len(available) > 20 else "")
        raise ValueError(
            f"archive {archive} has no member(s) {missing}; it holds {len(available)} "
            f"files: {shown}. Fix the member names (the sample sheet 'path' column)"
        )
    return list(dict.fromkeys(members))


def unpack_archive(
    archive: str | os.PathLike[str],
    outdir: str | os.PathLike[str],
    *,
    members: Sequence[str] | None = None,
    nested: bool = False,
) -> list[Path]:
    """Safely extract a tar (``.tar``, ``.tar.gz``/``.tgz``, ``.bz2``, ``.xz``) or zip.

    Extraction uses :mod:`tarfile`'s ``data`` filter (no absolute paths, no ``..``, no
    links pointing outside ``outdir``, no device files); members with an unsafe name are
    refused before anything is written. When everything is extracted a marker file
    ``outdir/.unpacked.json`` records the archive (name, size, mtime) and the files; a
    directory without a marker is a half-finished one and is unpacked again. A second
    call for the same archive whose files are all present returns at once.

    Parameters
    ----------
    archive
        Archive file, e.g. GEO's ``GSE167363_RAW.tar`` holding flat per-sample
        ``GSM..._barcodes.tsv.gz``/``_features.tsv.gz``/``_matrix.mtx.gz`` files.
    outdir
        Directory to extract into (created).
    members
        Member names (paths inside the archive) to extract; ``None`` extracts all
        regular files. A name missing from the archive raises ``ValueError`` listing
        what the archive holds.
    nested
        Also unpack extracted members that are archives themselves (GEO series such as
        GSE190856 ship a ``_RAW.tar`` of per-sample ``GSM..._<name>.tar.gz``), each into
        a directory named by its stem next to it, with the same safety rules and marker.

    Returns
    -------
    Paths of the extracted files (under ``outdir``), in archive order; with ``nested``,
    followed by the files of the nested archives.

    Raises
    ------
    FileNotFoundError
        ``archive`` does not exist.
    ValueError
        Unsupported archive type, unsafe member names, or requested members missing.
    """
    archive = Path(archive)
    outdir = Path(outdir)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} not found; download it first")
    archive_stem(archive)  # raises on unsupported suffixes
    stat = archive.stat()
    names = _list_members(archive)
    for name in names:
        _check_member_name(name, archive)
    selected = _select(members, names, archive)

    done = _read_marker(outdir)
    if _already_unpacked(done, archive, stat, selected, outdir):
        logger.info("%s already unpacked into %s; skipping", archive, outdir)
        return [outdir / name for name in selected]

    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / UNPACK_MARKER).unlink(missing_ok=True)
    logger.info("unpacking %d file(s) of %s into %s", len(selected), archive, outdir)
    _extract(archive, selected, outdir)
    extracted = [outdir / name for name in selected]
    if nested:
        extracted += _unpack_nested(extracted)
    previous = set(done.get("files", [])) if done and done.get("archive") == archive.name else set()
    record = {
        "archive": archive.name,
        "size": stat.st_size,
        "mtime": stat.st_mtime,
        "files": sorted(previous | set(selected)),
    }
    (outdir / UNPACK_MARKER).write_text(json.dumps(record, indent=1) + "\n")
    logger.info("unpacked %d file(s) into %s", len(selected), outdir)
    return extracted


def _already_unpacked(
    done: dict | None, archive: Path, stat: os.stat_result, selected: list[str], outdir: Path
) -> bool:
    """The marker names this archive (same size) and all selected files, and they exist."""
    return (
        done is not None
        and done.get("archive") == archive.name
        and done.get("size") == stat.st_size
        and set(selected) <= set(done.get("files", []))
        and all((outdir / name).is_file() for name in selected)
    )


def _extract(archive: Path, selected: list[str], outdir: Path) -> None:
    """Extract the selected members (zip, or tar with the ``data`` filter) into ``outdir``."""
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in selected:
                target = outdir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    else:
        with tarfile.open(archive, "r:*") as tf:
            wanted = set(selected)
            chosen = [m for m in tf.getmembers() if m.isfile() and m.name in wanted]
            tf.extractall(outdir, members=chosen, filter="data")


def _unpack_nested(extracted: list[Path]) -> list[Path]:
    """Unpack every extracted archive beside itself (``x.tar.gz`` -> ``x/``), recursively;
    returns the files they held."""
    inner_files: list[Path] = []
    for path in list(extracted):
        if path.name.lower().endswith(_ARCHIVE_SUFFIXES):
            inner = path.parent / archive_stem(path.name)
            logger.info("unpacking nested archive %s into %s", path, inner)
            inner_files += unpack_archive(path, inner, nested=True)
    return inner_files


# ----------------------------------------------------------------- sample-sheet plan


@dataclass(frozen=True)
class FileSpec:
    """One file to download: where it goes (relative to the download dir) and from where."""

    name: str
    url: str
    checksum: str | None = None


@dataclass
class ArchiveSpec:
    """One archive to download and unpack, and the sample files it must yield."""

    stem: str
    archive: str
    url: str
    checksum: str | None = None
    members: list[str] = field(default_factory=list)


@dataclass
class DownloadPlan:
    """What the workflow must fetch for a sample sheet (see :func:`download_plan`).

    ``files`` maps a path relative to ``download_dir`` to its :class:`FileSpec` (direct
    downloads and archives alike); ``archives`` maps an archive stem (the directory under
    ``download_dir`` it unpacks into) to its :class:`ArchiveSpec`.
    """

    download_dir: str
    files: dict[str, FileSpec] = field(default_factory=dict)
    archives: dict[str, ArchiveSpec] = field(default_factory=dict)

    def unpack_dir(self, stem: str) -> str:
        """Directory archive ``stem`` unpacks into."""
        return f"{self.download_dir}/{stem}"

    def archive_path(self, stem: str) -> str:
        """Where archive ``stem`` is downloaded to."""
        return f"{self.download_dir}/{self.archives[stem].archive}"

    def archive_outputs(self, stem: str) -> list[str]:
        """The sample-sheet paths archive ``stem`` must yield."""
        return [f"{self.unpack_dir(stem)}/{m}" for m in self.archives[stem].members]


def _norm(path: str) -> str:
    return PurePosixPath(os.path.normpath(path)).as_posix()


def _cell(row: pd.Series, column: str) -> str:
    value = row.get(column, "")
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def _relative_to(path: str, directory: str) -> str | None:
    prefix = directory.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) and len(path) > len(prefix) else None


def download_plan(samples: pd.DataFrame, download_dir: str = "data/downloads") -> DownloadPlan:
    """Work out the downloads and unpack jobs a sample sheet asks for.

    Rows with a ``url`` download that URL to their ``path``, which must lie under
    ``download_dir``. Rows with an ``archive_url`` download the archive to
    ``download_dir/<archive file name>`` and unpack it into ``download_dir/<stem>/``
    (``GSE167363_RAW.tar`` -> ``data/downloads/GSE167363_RAW/``); their ``path`` must be a
    file inside that directory. Rows with neither are local files and are ignored.
    Several rows may share an archive (one download, one unpack job).

    Parameters
    ----------
    samples
        Sample sheet with at least ``path``; optional ``url``, ``checksum``,
        ``archive_url``, ``archive_checksum`` (missing columns and empty cells mean none).
    download_dir
        The ``download.dir`` config key.

    Returns
    -------
    A :class:`DownloadPlan`.

    Raises
    ------
    ValueError
        Naming the sample and column at fault: a download target outside
        ``download_dir``, both ``url`` and ``archive_url`` on one row, one path with two
        URLs, one archive with two checksums, or an archive URL without a usable file name.
    """
    ddir = _norm(download_dir)
    plan = DownloadPlan(download_dir=ddir)
    ids = samples["sample_id"] if "sample_id" in samples.columns else samples.index
    for sid, (_, row) in zip(ids, samples.iterrows()):
        url, archive_url = _cell(row, "url"), _cell(row, "archive_url")
        path = _norm(_cell(row, "path"))
        if url and archive_url:
            raise ValueError(
                f"sample {sid!r} has both 'url' and 'archive_url'; give 'url' when 'path' is "
                "the downloaded file itself, 'archive_url' when 'path' is a file inside an archive"
            )
        if url:
            _plan_file(plan, sid, path, url, _cell(row, "checksum") or None)
        elif archive_url:
            _plan_archive(plan, sid, path, archive_url, _cell(row, "archive_checksum") or None)
    clash = set(plan.files) & {f"{s}/{m}" for s, a in plan.archives.items() for m in a.members}
    if clash:
        raise ValueError(
            f"{sorted(clash)} would be both downloaded and unpacked from an archive; "
            "give each file one source"
        )
    return plan


def _plan_file(plan: DownloadPlan, sid: object, path: str, url: str, checksum: str | None) -> None:
    """Add a row's direct download (its ``path`` under the download directory)."""
    ddir = plan.download_dir
    rel = _relative_to(path, ddir)
    if rel is None:
        raise ValueError(
            f"sample {sid!r}: 'path' {path!r} has a 'url' but is not under the download "
            f"directory {ddir!r} (config key download.dir); set 'path' to "
            f"{ddir}/<file name>"
        )
    spec = FileSpec(rel, https_url(url), checksum)
    if spec.checksum:
        parse_checksum(spec.checksum)
    old = plan.files.get(rel)
    if old is not None and old != spec:
        raise ValueError(
            f"sample {sid!r}: {path!r} is listed with two different url/checksum "
            f"values ({old.url} vs {spec.url}); make the rows agree"
        )
    plan.files[rel] = spec


def _plan_archive(
    plan: DownloadPlan, sid: object, path: str, archive_url: str, checksum: str | None
) -> None:
    """Add a row's archive: its download, its unpack job and ``path`` as a member."""
    ddir = plan.download_dir
    fetch = https_url(archive_url)
    name = url_filename(fetch)
    stem = archive_stem(name)
    if checksum:
        parse_checksum(checksum)
    member = _relative_to(path, f"{ddir}/{stem}")
    if member is None:
        raise ValueError(
            f"sample {sid!r}: 'path' {path!r} must be a file inside the unpacked archive "
            f"directory {ddir}/{stem}/ (archive_url {archive_url}); set 'path' to "
            f"{ddir}/{stem}/<file name inside the archive>"
        )
    arch = plan.archives.get(stem)
    if arch is None:
        arch = plan.archives[stem] = ArchiveSpec(stem, name, fetch, checksum)
    elif arch.url != fetch or (checksum and arch.checksum and checksum != arch.checksum):
        raise ValueError(
            f"sample {sid!r}: archive {name!r} is listed with a different "
            f"archive_url/archive_checksum than another row ({arch.url}); make them agree"
        )
    arch.checksum = arch.checksum or checksum
    if member not in arch.members:
        arch.members.append(member)
    if arch.checksum:
        # Keep the file entry in step with the archive's (first non-empty) checksum.
        plan.files[name] = FileSpec(name, fetch, arch.checksum)
    else:
        plan.files.setdefault(name, FileSpec(name, fetch, None))
