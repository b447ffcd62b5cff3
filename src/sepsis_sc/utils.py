"""Small helpers shared by the workflow scripts: logging, atomic writes, provenance."""

from __future__ import annotations

import logging
import os
import platform
import sys
import tempfile
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import anndata as ad
import pandas as pd
import yaml

__all__ = [
    "setup_logging",
    "atomic_path",
    "write_h5ad",
    "write_table",
    "package_versions",
    "provenance",
]

_PACKAGES = (
    "sepsis-sc",
    "scanpy",
    "anndata",
    "scvi-tools",
    "torch",
    "lightning",
    "snakemake",
    "leidenalg",
    "igraph",
    "pynndescent",
    "harmonypy",
    "numpy",
    "scipy",
    "pandas",
    "scikit-learn",
    "statsmodels",
    "matplotlib",
    "celltypist",
)


#: suffix of the one-line error file written beside a job's log when the job fails
ERROR_SUFFIX = ".error.txt"


def error_file(log_path: str | os.PathLike[str]) -> Path:
    """Where a failed job's one-line message is written (beside its log)."""
    return Path(f"{log_path}{ERROR_SUFFIX}")


def _job_name() -> str:
    """``rule (wildcards)`` of the running Snakemake script, or ``the job``."""
    smk = getattr(sys.modules.get("__main__"), "snakemake", None)
    if smk is None:
        return "the job"
    name = getattr(smk, "rule", None) or "the job"
    wildcards = dict(getattr(smk, "wildcards", {}) or {})
    if wildcards:
        name += " (" + ", ".join(f"{k}={v}" for k, v in wildcards.items()) + ")"
    return name


def _report_errors_at_terminal(log_path: Path) -> None:
    """On an uncaught exception: traceback to the log, the message to the terminal.

    Snakemake itself only prints ``Error in rule ...`` and the log path; the project's own
    message (which says what is wrong and how to fix it) would stay in the log. This hook
    keeps the full traceback in the log, writes the message to ``<log>.error.txt`` (the
    workflow's ``onerror`` handler prints it again at the end of the run) and to the
    terminal's stderr.
    """
    terminal = sys.__stderr__
    err_file = error_file(log_path)
    err_file.unlink(missing_ok=True)
    previous = sys.excepthook

    def hook(exc_type, exc, tb):  # type: ignore[no-untyped-def]
        previous(exc_type, exc, tb)  # the traceback goes to the log (stderr is the log)
        if issubclass(exc_type, KeyboardInterrupt):
            return
        message = str(exc).strip() or exc_type.__name__
        if exc_type.__name__ not in ("ValueError", "SampleSheetError", "PreflightError"):
            message = f"{exc_type.__name__}: {message}"
        text = f"sepsis-sc: {_job_name()} failed: {message}\n  (full log: {log_path})"
        try:
            err_file.write_text(text + "\n")
        except OSError:
            pass
        if terminal is not None:
            print(text, file=terminal, flush=True)

    sys.excepthook = hook


def setup_logging(log_path: str | os.PathLike[str] | None, level: int = logging.INFO) -> None:
    """Send library logging (and Python warnings, and stderr) to a rule's log file.

    With a log file, an uncaught exception's message is also printed at the terminal and
    kept in ``<log>.error.txt`` (see :func:`error_file`), so a data error that only a job
    can find is shown where the user looks, not only in the log.
    """
    handlers: list[logging.Handler]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers = [logging.FileHandler(log_path, mode="w")]
        sys.stderr = open(log_path, "a", buffering=1)  # noqa: SIM115 (lives as long as the job)
        _report_errors_at_terminal(Path(log_path))
    else:
        handlers = [logging.StreamHandler()]
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.captureWarnings(True)
    warnings.simplefilter("default")


@contextmanager
def atomic_path(path: str | os.PathLike[str]):
    """Yield a temporary path beside ``path``; move it into place only on success.

    A failed job therefore never leaves a half-written output behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike[str]) -> None:
    """Write an AnnData atomically (uncompressed: the pipeline's intermediates favour speed)."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def write_table(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    index: bool = False,
    digits: int | None = None,
) -> None:
    """Write a tab-separated table atomically (gzip when the name ends in .gz).

    ``digits`` rounds float columns to that many significant digits
    (:func:`sepsis_sc.report.round_significant`): for the tables a person reads; tables
    that feed later computations keep full precision (``None``).
    """
    if digits is not None:
        from sepsis_sc.report import round_significant

        df = round_significant(df, digits)
    compression = "gzip" if str(path).endswith(".gz") else None
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=index, compression=compression)


def package_versions(packages: tuple[str, ...] = _PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape the results."""
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def provenance(config: Mapping[str, Any], integration_record: Mapping[str, Any]) -> dict:
    """What made a run's results: config, versions, scVI device, seeds, machine."""
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_name": config.get("run_name"),
        "seed": config.get("seed"),
        "integration": dict(integration_record),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "config": dict(config),
    }


def dump_yaml(data: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a mapping as YAML atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        yaml.safe_dump(_plain(data), fh, sort_keys=False)


def _plain(obj: Any) -> Any:
    """Convert numpy scalars / tuples / Paths so YAML writes plain types."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (ValueError, TypeError):
            return str(obj)
    return obj
