"""The sample sheet: one row per sample, validated against ``samples.schema.yaml``.

Required columns are ``sample_id``, ``condition``, ``donor``, ``batch`` and ``path``; any other
column (age, sex, timepoint, ...) is copied into ``obs`` and may enter a design formula.
Problems are reported before any job runs, naming the row, the column and the fix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd

from sepsis_sc.config.schema import describe_error, load_schema

__all__ = [
    "SampleSheetError",
    "load_samples",
    "validate_samples",
    "check_sample_inputs",
    "SHEET_RESERVED_COLUMNS",
    "REQUIRED_SAMPLE_COLUMNS",
    "RESERVED_SAMPLE_IDS",
]

#: sample-sheet columns that describe where data comes from; not copied into ``obs``
SHEET_RESERVED_COLUMNS = ("path", "url", "checksum", "archive_url", "archive_checksum")
#: columns every sheet has
REQUIRED_SAMPLE_COLUMNS = ("sample_id", "condition", "donor", "batch", "path")
_SAMPLE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: sample_ids that would collide with a cohort-level file next to the per-sample ones
RESERVED_SAMPLE_IDS = frozenset({"merged"})


class SampleSheetError(ValueError):
    """The sample sheet is malformed, inconsistent or points at missing files."""


def load_samples(path: str | Path) -> pd.DataFrame:
    """Read a tab-separated sample sheet (all columns as strings) without validating it."""
    path = Path(path)
    if not path.exists():
        raise SampleSheetError(
            f"sample sheet not found: {path}. Set the config key 'samples' to a TSV file with "
            f"columns {', '.join(REQUIRED_SAMPLE_COLUMNS)}."
        )
    sheet = pd.read_csv(path, sep="\t", dtype=str, comment="#", keep_default_na=False)
    sheet.columns = [c.strip() for c in sheet.columns]
    _check_tab_separated(sheet.columns, path)
    for col in sheet.columns:
        sheet[col] = sheet[col].str.strip()
    return sheet


def _check_tab_separated(columns: Iterable[str], path: Path) -> None:
    """Raise when the header holds the required names split by spaces or commas, not tabs."""
    columns = list(columns)
    if all(c in columns for c in REQUIRED_SAMPLE_COLUMNS):
        return
    for col in columns:
        words = [w for w in re.split(r"[\s,;]+", col) if w]
        if len(words) > 1 and sum(w.strip("\"'") in REQUIRED_SAMPLE_COLUMNS for w in words) >= 2:
            sep, char = (
                ("commas", ",")
                if "," in col
                else ("semicolons", ";")
                if ";" in col
                else ("spaces", " ")
            )
            raise SampleSheetError(
                f"sample sheet {path}: this sheet is not tab-separated (its header "
                f"{col!r} is split by {sep}). Separate the columns with one tab each "
                "(in a spreadsheet: save as 'Tab delimited text'; from the shell: "
                f"tr -s '{char}' '\\t' < {path.name} > {path.stem}.fixed.tsv)."
            )


def validate_samples(
    sheet: pd.DataFrame,
    config: Mapping[str, Any],
    schema: Mapping[str, Any] | None = None,
    sheet_name: str = "sample sheet",
) -> pd.DataFrame:
    """Check a sample sheet against the schema and the config; return it indexed by sample_id.

    Checks: required columns, one row per ``sample_id`` (no duplicates), IDs usable as file
    names. The contrasts and the design are checked against the sheet by
    :func:`sepsis_sc.design.check_designs` (the workflow calls it next).

    Raises
    ------
    SampleSheetError
        Naming the row, column and value at fault.
    """
    missing = [c for c in REQUIRED_SAMPLE_COLUMNS if c not in sheet.columns]
    if missing:
        raise SampleSheetError(
            f"{sheet_name} is missing required column(s) {', '.join(missing)}; it has "
            f"{', '.join(sheet.columns)}. Required: {', '.join(REQUIRED_SAMPLE_COLUMNS)}."
        )
    if sheet.empty:
        raise SampleSheetError(f"{sheet_name} has no rows; list at least one sample.")
    dup = sheet["sample_id"][sheet["sample_id"].duplicated()].unique().tolist()
    if dup:
        raise SampleSheetError(
            f"{sheet_name} has duplicate sample_id(s): {', '.join(dup)}. Each sample must "
            "appear once; give repeated samples of a donor distinct sample_ids and the same donor."
        )
    _check_duplicate_paths(sheet, sheet_name)
    schema = schema if schema is not None else load_schema("samples")
    validator = jsonschema.Draft7Validator(schema)
    for i, row in enumerate(sheet.to_dict("records")):
        for error in validator.iter_errors(row):
            raise SampleSheetError(
                f"{sheet_name} row {i + 1} (sample_id {row.get('sample_id')!r}): "
                + describe_error(error, "column").replace("column key", "column", 1)
            )
    bad_ids = [s for s in sheet["sample_id"] if not _SAMPLE_ID_RE.match(s)]
    if bad_ids:
        raise SampleSheetError(
            f"{sheet_name}: sample_id(s) {bad_ids} are not usable as file names; use letters, "
            "digits, '_', '.' and '-' only, starting with a letter or digit."
        )
    reserved = sorted(set(sheet["sample_id"]) & RESERVED_SAMPLE_IDS)
    if reserved:
        raise SampleSheetError(
            f"{sheet_name}: sample_id(s) {reserved} are reserved (the workflow writes "
            "qc/merged.h5ad for the whole cohort); rename the sample(s), e.g. 'merged_1'."
        )
    return sheet.set_index("sample_id", drop=False)


def _check_duplicate_paths(sheet: pd.DataFrame, sheet_name: str) -> None:
    """Raise when one input file is named for two or more samples."""
    norm = sheet["path"].map(lambda p: os.path.normpath(p) if p else p)
    dup = norm[norm.duplicated(keep=False) & (norm != "")]
    if dup.empty:
        return
    groups = [
        f"{p} (sample_ids {', '.join(sheet.loc[idx.index, 'sample_id'])})"
        for p, idx in dup.groupby(dup, sort=False)
    ]
    raise SampleSheetError(
        f"{sheet_name}: the same input file is given for several samples: "
        + "; ".join(groups)
        + ". Each sample needs its own counts file; fix the 'path' column (a copy-paste slip?)."
    )


def check_sample_inputs(
    samples: pd.DataFrame,
    produced: Iterable[str] = (),
    base: str | Path = ".",
    sheet_name: str = "sample sheet",
) -> None:
    """Check that every sample's input exists or will be produced by the workflow.

    A path is fine when it exists, when the sheet gives a ``url``/``archive_url`` to fetch it
    from, or when it is in ``produced`` (e.g. the demo simulator's outputs).

    Raises
    ------
    SampleSheetError
        Listing every sample whose input file is missing.
    """
    produced = {str(Path(p)) for p in produced}
    missing = []
    for sid, row in samples.iterrows():
        path = str(Path(row["path"]))
        if path in produced:
            continue
        if row.get("url") or row.get("archive_url"):
            continue
        if not (Path(base) / path).exists():
            missing.append(f"{sid}: {path}")
    if missing:
        raise SampleSheetError(
            f"input file(s) named in the {sheet_name} do not exist: "
            + "; ".join(missing)
            + ". Fix the 'path' column (paths are relative to the working directory), or add a "
            "'url' column so the workflow downloads them."
        )
