"""Fetching one file: :func:`download` (retries with exponential back-off, HTTP ``Range``
resume, checksum verification, HTML-error-page detection, an atomic rename and a sha256
sidecar), the checksums of the sample sheet (:func:`parse_checksum`, :func:`file_digest`) and
the URLs it fetches (:func:`https_url`)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

from sepsis_sc.config import DownloadSettings

logger = logging.getLogger(__name__)

__all__ = [
    "ChecksumError",
    "DownloadError",
    "download",
    "file_digest",
    "https_url",
    "parse_checksum",
]

_HEX_LENGTH = {"sha256": 64, "md5": 32}

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
    settings: DownloadSettings | None = None,
    *,
    checksum: str | None = None,
    backoff: float = 2.0,
    chunk_size: int = 1 << 20,
    session: requests.Session | None = None,
    **overrides: Any,
) -> Path:
    """Download ``url`` to ``dest``, resuming, retrying and verifying on the way.

    The bytes go to ``dest + ".part"``; only when the transfer is complete and the
    checksum (if given) matches is the file renamed to ``dest`` (atomic on one file
    system) and a sidecar ``dest + ".sha256"`` written (``sha256sum`` format). A ``dest``
    that already exists and verifies (against ``checksum``, else against its sidecar) is
    not fetched again.

    Connection errors, a connection dropped mid-file, HTTP 5xx, 408 and 429 are retried
    up to ``settings.retries`` times, sleeping ``backoff * 2**(attempt - 1)`` seconds (or the
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
    settings
        The ``download`` config section (:class:`~sepsis_sc.config.DownloadSettings`; schema
        defaults when ``None``): ``retries``, how many times to retry after the first
        attempt, and ``timeout``, the seconds to wait for the connection and between
        received bytes (``dir`` is not read: ``dest`` says where the file goes).
    backoff
        Base of the exponential back-off, in seconds (``0`` retries at once).
    chunk_size
        Bytes per read/write.
    session
        A :class:`requests.Session` to reuse (proxies, authentication headers); a new one
        is made and closed otherwise.
    **overrides
        Fields of ``settings`` by name (``retries=3``, ``timeout=30``).

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
    settings = (settings or DownloadSettings()).with_overrides(overrides)
    retries, timeout = settings.retries, settings.timeout
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
