"""Unpacking a downloaded archive: :func:`unpack_archive` extracts a ``.tar``/``.tar.gz``/
``.tgz`` (e.g. GEO's ``GSE..._RAW.tar`` of per-sample ``GSM..._matrix.mtx.gz`` triplets) or
``.zip`` with path-traversal protection, nested archives too, and writes a completion marker
(:data:`UNPACK_MARKER`) so that a half-unpacked directory is never mistaken for a finished
one; :func:`archive_stem` names the directory an archive unpacks into."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["UNPACK_MARKER", "archive_stem", "unpack_archive"]

#: Name of the marker file :func:`unpack_archive` writes into ``outdir`` when done.
UNPACK_MARKER = ".unpacked.json"

_ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip")


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
