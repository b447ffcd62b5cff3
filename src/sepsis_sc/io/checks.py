"""Pre-flight: cheap checks of every sample's input file before any job runs.

The workflow calls :func:`preflight` at parse time (``preflight.enabled``), so a broken input
stops the run with one line per problem (sample, file, what is wrong, how to fix it) instead
of ``Error in rule qc_sample`` after other samples' jobs have started. Per sample it reads the
first bytes, the HDF5 / Matrix Market headers, the gene and barcode lists and the values of
the first ``max_cells`` cells; it does not read whole matrices (gzipped MTX files and tables
up to :data:`~sepsis_sc.io.problems.FULL_GZIP_READ_BYTES` are decompressed to the end,
without parsing, to find a truncated download).

Checks: the format sniffed from the bytes agrees with the name (HDF5 signature, gzip magic,
``%%MatrixMarket`` header, an HTML page saved under a data name, an AnnData file named
``.h5``), truncated or corrupt HDF5 and gzip files, an MTX triplet whose matrix, barcodes and
features disagree, zero cells, Ensembl IDs without gene symbols (as
:func:`sepsis_sc.io.ensure_symbols` would reject them), the organism of the gene names
(:func:`sepsis_sc.data.detect_organism`), raw integer counts without NaN
(:func:`sepsis_sc.data.check_counts`) and duplicated barcodes.

Each format's check lives beside its reader (``check_10x_h5`` in
:mod:`~sepsis_sc.io.tenx_h5`, ...); this module holds the run over the sample sheet
(:func:`check_inputs`, :func:`preflight`), the cache of files that passed and the messages
(:class:`Problem`, :class:`PreflightError`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sepsis_sc.config import IngestSettings, PreflightSettings, SampleSheetError
from sepsis_sc.io.formats import MTX_NAME, detect_format
from sepsis_sc.io.h5ad import check_h5ad
from sepsis_sc.io.mtx import check_mtx
from sepsis_sc.io.problems import BadInput, CellLimits
from sepsis_sc.io.tenx_h5 import check_10x_h5
from sepsis_sc.io.text import check_table

logger = logging.getLogger(__name__)

__all__ = ["Problem", "PreflightError", "check_inputs", "preflight"]


@dataclass(frozen=True)
class Problem:
    """One problem of one sample's input: what is wrong and how to fix it."""

    sample: str
    file: str
    what: str
    fix: str
    #: a warning does not stop the run (e.g. a sample too small for the sample-level tests)
    warning: bool = False

    def __str__(self) -> str:
        if self.warning:
            return f"sample {self.sample} ({self.file}): {self.what}; {self.fix}."
        return f"sample {self.sample} ({self.file}): {self.what}. Fix: {self.fix}."


class PreflightError(SampleSheetError):
    """Inputs named in the sample sheet are unreadable or not raw counts (every problem listed)."""

    def __init__(self, problems: list[Problem], sheet_name: str = "sample sheet"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"preflight found {len(self.problems)} problem(s) in the input files of the "
            f"{sheet_name} (no job has run):\n{lines}\n(Skip these checks with "
            "--config preflight='{enabled: false}'; the jobs would then fail on the same files.)"
        )


_CHECKERS = {"10x_h5": check_10x_h5, "mtx": check_mtx, "h5ad": check_h5ad, "table": check_table}


def _check_one(
    path: Path, fmt: str, organism: str | None, max_cells: int, cells: CellLimits
) -> list[BadInput]:
    if not path.exists():
        return [
            BadInput(
                f"{path} does not exist",
                "fix the 'path' column (relative to the working directory)",
                path,
            )
        ]
    try:
        fmt_used = detect_format(path) if fmt in ("", "auto") else fmt
    except ValueError as err:
        return [
            BadInput(
                str(err).split(": expected")[0],
                "use a 10x .h5, .h5ad, 10x MTX or a .txt/.csv/.tsv table, or set 'format'",
                path,
            )
        ]
    if fmt_used not in _CHECKERS:
        return [
            BadInput(f"unknown format {fmt_used!r}", f"use one of {', '.join(_CHECKERS)}", path)
        ]
    if fmt_used == "10x_h5" and path.is_dir():
        path = path / "filtered_feature_bc_matrix.h5"
    try:
        return _CHECKERS[fmt_used](path, organism, max_cells, cells)
    except BadInput as bad:
        return [bad]
    except Exception as err:  # a layout these checks do not know: leave it to the job
        logger.warning(
            "preflight could not check %s (%s: %s); the job will read it",
            path,
            type(err).__name__,
            err,
        )
        return []


def _fingerprint(path: Path) -> list | None:
    """Size and mtime of the file(s) a sample reads (an MTX triplet: all three)."""
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
        else:
            m = MTX_NAME.match(path.name)
            files = (
                sorted(
                    p
                    for p in path.parent.iterdir()
                    if p.is_file() and p.name.startswith(m.group(1))
                )
                if m
                else [path]
            )
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    except OSError:
        return None


def _load_cache(cache: Path | None) -> dict:
    if cache is None or not cache.exists():
        return {}
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_cache(cache: Path | None, data: dict) -> None:
    if cache is None:
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(cache)
    except OSError:  # a read-only working directory: check again next time
        pass


def _raw_path_problems(sid: str, row: pd.Series, base: Path) -> list[Problem]:
    """The optional ``raw_path`` (unfiltered droplets for the SoupX soup) must exist."""
    raw = row.get("raw_path", "")
    if not isinstance(raw, str) or not raw.strip() or (base / raw).exists():
        return []
    return [
        Problem(
            sid,
            raw,
            "raw_path (the raw, unfiltered droplet matrix) does not exist",
            "fix the 'raw_path' column (relative to the working directory), or leave "
            "it empty: the contamination is then estimated from the filtered matrix "
            "and reported, not corrected (qc.ambient_without_raw)",
        )
    ]


def check_inputs(
    samples: pd.DataFrame,
    organism: str | None,
    settings: PreflightSettings | None = None,
    *,
    base: str | Path = ".",
    min_cells: int | None = None,
    small_cells: int = 0,
    small_is_error: bool = False,
    skip: Iterable[str] = (),
    cache: str | Path | None = None,
    **overrides: Any,
) -> list[Problem]:
    """Check every sample's input file cheaply; return the problems found (empty when fine).

    Parameters
    ----------
    samples
        The validated sample sheet (indexed by ``sample_id``; column ``path``, optional
        ``format``, ``url``, ``archive_url``).
    organism
        ``"human"`` or ``"mouse"`` (the config's ``organism``); ``None`` skips that check.
    settings
        The ``preflight`` config section (:class:`~sepsis_sc.config.PreflightSettings`; schema
        defaults when ``None``): the values of the first ``max_cells`` cells are checked
        (integers, no NaN / negatives). ``enabled`` is the workflow's switch, not read here.
    base
        Directory the sheet's paths are relative to.
    min_cells
        Fewest cells a sample may have (``ingest.min_cells``; ``None``: that key's default).
    small_cells, small_is_error
        A sample with fewer cells than ``small_cells`` (``qc.min_cells_per_sample``) in its
        file is reported: an error when ``small_is_error`` (``qc.on_small_sample: stop``),
        else a warning (``Problem.warning``), since it will be left out at ``qc_merge``.
    skip
        Paths the workflow will produce (demo simulator outputs). Rows with a ``url`` or
        ``archive_url`` whose file does not exist yet are skipped as well (the workflow
        downloads them); once downloaded they are checked.
    cache
        Optional JSON file (relative to ``base``) remembering the files that passed, by
        size and modification time, so that later runs do not read them again.
    **overrides
        Fields of ``settings`` by name (``max_cells=500``).
    """
    settings = (settings or PreflightSettings()).with_overrides(overrides)
    max_cells = settings.max_cells
    if min_cells is None:
        min_cells = IngestSettings().min_cells
    skipped = {str(Path(p)) for p in skip}
    cache_path = Path(base) / cache if cache is not None else None
    passed = _load_cache(cache_path)
    cells = CellLimits(min_cells, small_cells, small_is_error)
    checked_with = [organism, max_cells, min_cells, small_cells, small_is_error]
    problems: list[Problem] = []
    before = json.dumps(passed, sort_keys=True)
    for sid, row in samples.iterrows():
        problems += _raw_path_problems(str(sid), row, Path(base))
        rel = str(Path(str(row["path"])))
        path = Path(base) / rel
        if rel in skipped:
            continue
        if (row.get("url") or row.get("archive_url")) and not path.exists():
            continue
        fmt = str(row.get("format") or row.get("fmt") or "auto")
        key = str(path.resolve())
        stamp = [fmt, checked_with, _fingerprint(path)]
        if stamp[2] is not None and passed.get(key) == stamp:
            continue
        found = _check_one(path, fmt, organism, max_cells, cells)
        if not found and stamp[2] is not None:
            passed[key] = stamp
        if found:
            passed.pop(key, None)
        for bad in found:
            file = bad.file if bad.file is not None else path
            try:
                shown = str(Path(file).relative_to(base)) if str(base) != "." else str(file)
            except ValueError:
                shown = str(file)
            problems.append(Problem(str(sid), shown, bad.what, bad.fix, bad.warning))
    if json.dumps(passed, sort_keys=True) != before:
        _save_cache(cache_path, passed)
    return problems


def preflight(
    samples: pd.DataFrame,
    organism: str | None,
    settings: PreflightSettings | None = None,
    *,
    sheet_name: str = "sample sheet",
    **options: Any,
) -> list[Problem]:
    """Run :func:`check_inputs`; raise :class:`PreflightError` listing every problem.

    ``settings`` and ``options`` are those of :func:`check_inputs` (``base``, ``min_cells``,
    ``small_cells``, ``small_is_error``, ``skip``, ``cache``, and ``max_cells`` as an
    override); ``sheet_name`` names the sheet in the error. Returns the warnings (problems
    that do not stop the run) for the caller to show.
    """
    problems = check_inputs(samples, organism, settings, **options)
    errors = [p for p in problems if not p.warning]
    if errors:
        raise PreflightError(errors, sheet_name)
    return [p for p in problems if p.warning]
