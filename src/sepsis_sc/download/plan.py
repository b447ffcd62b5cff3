"""What a sample sheet asks the workflow to fetch: :func:`download_plan` turns the sheet's
``url``/``checksum`` and ``archive_url``/``archive_checksum`` columns into a
:class:`DownloadPlan` (direct downloads, archives and the sample files each must yield),
checking them; :func:`url_filename` names the file a URL is stored under."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlparse

import pandas as pd

from sepsis_sc.config import DownloadSettings
from sepsis_sc.download.archive import archive_stem
from sepsis_sc.download.fetch import https_url, parse_checksum

__all__ = ["ArchiveSpec", "DownloadPlan", "FileSpec", "download_plan", "url_filename"]


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


def download_plan(samples: pd.DataFrame, download_dir: str | None = None) -> DownloadPlan:
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
        The ``download.dir`` config key (``None``: its default,
        :class:`~sepsis_sc.config.DownloadSettings`).

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
    if download_dir is None:
        download_dir = DownloadSettings().dir
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
