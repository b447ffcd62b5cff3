"""Load and validate the run configuration and the sample sheet.

Both are validated against JSON schemas in ``workflow/schemas/`` before any job runs. A bad
value fails at once with a message that names the key, the value and what was expected, e.g.::

    ConfigError: config key 'clustering.resolution': value -1 is not valid: -1 is less than
    the minimum of 0 (Leiden resolution used for the final clusters).

Defaults written in the schema fill in missing keys, so a config file only needs the keys
it changes.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import yaml

logger = logging.getLogger(__name__)

__all__ = [
    "ConfigError",
    "SampleSheetError",
    "schema_dir",
    "load_schema",
    "validate_config",
    "load_config",
    "load_samples",
    "validate_samples",
    "check_sample_inputs",
    "SHEET_RESERVED_COLUMNS",
    "EMBEDDING_KEYS",
]

#: sample-sheet columns that describe where data comes from; not copied into ``obs``
SHEET_RESERVED_COLUMNS = ("path", "url", "checksum", "archive_url", "archive_checksum")
#: obsm key of the latent space each ``integration.method`` writes (shared by the workflow,
#: which imports this light module at parse time, and by :mod:`sepsis_sc.integrate`)
EMBEDDING_KEYS: dict[str, str] = {"scvi": "X_scVI", "harmony": "X_harmony", "pca": "X_pca"}
_REQUIRED_SAMPLE_COLUMNS = ("sample_id", "condition", "donor", "batch", "path")
_SAMPLE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: sample_ids that would collide with a cohort-level file next to the per-sample ones
RESERVED_SAMPLE_IDS = frozenset({"merged"})


class ConfigError(ValueError):
    """A configuration value is missing or invalid."""


class SampleSheetError(ValueError):
    """The sample sheet is malformed, inconsistent or points at missing files."""


def schema_dir() -> Path:
    """Directory holding ``config.schema.yaml`` and ``samples.schema.yaml``."""
    return Path(__file__).resolve().parents[2] / "workflow" / "schemas"


def load_schema(name: str) -> dict[str, Any]:
    """Load ``workflow/schemas/<name>.schema.yaml``."""
    path = schema_dir() / f"{name}.schema.yaml"
    with open(path) as fh:
        return yaml.safe_load(fh)


def _extend_with_default(validator_class: type) -> type:
    """A validator that fills ``default`` values into the instance while validating.

    Same recipe as ``snakemake.utils.validate(set_default=True)``: sections declare
    ``default: {}`` so that their nested defaults fill in as well.
    """
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # type: ignore[no-untyped-def]
        if isinstance(instance, dict):
            for prop, subschema in properties.items():
                if "default" in subschema and prop not in instance:
                    default = subschema["default"]
                    instance[prop] = (
                        yaml.safe_load(yaml.safe_dump(default))
                        if isinstance(default, (dict, list))
                        else default
                    )
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_DefaultFillingValidator = _extend_with_default(jsonschema.Draft7Validator)


def _key_of(error: jsonschema.ValidationError) -> str:
    path = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)' was unexpected", error.message)
        if extra:
            path.append(extra[0])
    elif error.validator == "required":
        missing = re.findall(r"'([^']+)' is a required property", error.message)
        if missing:
            path.append(missing[0])
    return ".".join(path) or "<top level>"


def _explain(error: jsonschema.ValidationError, what: str) -> str:
    key = _key_of(error)
    description = error.schema.get("description") if isinstance(error.schema, dict) else None
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        return (
            f"{what} key '{key}' is not a known option. Allowed keys here: "
            f"{', '.join(allowed)}. Check the spelling (see config/README.md)."
        )
    if error.validator == "required":
        return f"{what} key '{key}' is required but missing."
    value = error.instance
    msg = f"{what} key '{key}': value {value!r} is not valid: {error.message}"
    if description:
        msg += f" ({description.strip().rstrip('.')})"
    return msg + "."


def validate_config(config: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> dict:
    """Validate a config mapping and return a copy with schema defaults filled in.

    Parameters
    ----------
    config
        The configuration as loaded from YAML (plus ``--config`` overrides).
    schema
        A JSON schema; defaults to ``workflow/schemas/config.schema.yaml``.

    Returns
    -------
    dict
        The validated config with defaults filled.

    Raises
    ------
    ConfigError
        On the first invalid value, naming the key, the value and what was expected.
    """
    schema = schema if schema is not None else load_schema("config")
    instance = yaml.safe_load(yaml.safe_dump(dict(config)))  # deep copy, plain types
    instance = _coerce(instance, schema)
    validator = _DefaultFillingValidator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise ConfigError(_explain(best, "config"))
    _check_semantics(instance)
    return instance


def _coerce(value: Any, schema: Mapping[str, Any]) -> Any:
    """Turn command-line strings into the types the schema asks for.

    ``snakemake --config integration="{max_epochs: 30}"`` delivers nested values as strings
    ('30'); they are parsed as YAML scalars where the schema expects a number, boolean or
    null, so command-line overrides behave like the same values written in the file.
    """
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return {k: _coerce(v, props.get(k, {})) for k, v in value.items()}
    if isinstance(value, list):
        return [_coerce(v, schema.get("items", {})) for v in value]
    if isinstance(value, str):
        types = schema.get("type", [])
        types = [types] if isinstance(types, str) else list(types)
        if "string" in types or not types:
            return value
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(parsed, bool) and "boolean" in types:
            return parsed
        if parsed is None and "null" in types:
            return None
        if (
            isinstance(parsed, int)
            and not isinstance(parsed, bool)
            and {"integer", "number"} & set(types)
        ):
            return parsed
        if isinstance(parsed, float) and "number" in types:
            return parsed
        if isinstance(parsed, (list, dict)) and {"array", "object"} & set(types):
            return _coerce(parsed, schema)
    return value


def _check_semantics(config: dict[str, Any]) -> None:
    """Cross-key checks that a JSON schema cannot express."""
    from sepsis_sc.design import DesignError, formula_columns, parse_contrasts

    try:
        contrasts = parse_contrasts(config)
        formulas = [config.get("stats", {}).get("design")] + [c.design for c in contrasts]
        for f in formulas:
            if f:
                formula_columns(f)
    except DesignError as err:
        raise ConfigError(str(err)) from err
    if config.get("stats", {}).get("test") == "rank" and any(formulas):
        raise ConfigError(
            "config key 'stats.test': 'rank' cannot adjust for the covariates of the design "
            f"formula(s) {[f for f in formulas if f]}; use test: t, or drop the formula."
        )
    clustering = config.get("clustering", {})
    res = clustering.get("resolution")
    resolutions = clustering.get("resolutions", [])
    if res is not None and resolutions and res not in resolutions:
        raise ConfigError(
            f"config key 'clustering.resolution': value {res!r} is not one of "
            f"'clustering.resolutions' {resolutions}; add it there or pick one of them."
        )


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict:
    """Read a YAML config file, apply ``overrides`` (top-level keys) and validate it."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as fh:
        config = yaml.safe_load(fh) or {}
    if overrides:
        config.update(overrides)
    return validate_config(config)


def load_samples(path: str | Path) -> pd.DataFrame:
    """Read a tab-separated sample sheet (all columns as strings) without validating it."""
    path = Path(path)
    if not path.exists():
        raise SampleSheetError(
            f"sample sheet not found: {path}. Set the config key 'samples' to a TSV file with "
            f"columns {', '.join(_REQUIRED_SAMPLE_COLUMNS)}."
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
    if all(c in columns for c in _REQUIRED_SAMPLE_COLUMNS):
        return
    for col in columns:
        words = [w for w in re.split(r"[\s,;]+", col) if w]
        if len(words) > 1 and sum(w.strip("\"'") in _REQUIRED_SAMPLE_COLUMNS for w in words) >= 2:
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
    missing = [c for c in _REQUIRED_SAMPLE_COLUMNS if c not in sheet.columns]
    if missing:
        raise SampleSheetError(
            f"{sheet_name} is missing required column(s) {', '.join(missing)}; it has "
            f"{', '.join(sheet.columns)}. Required: {', '.join(_REQUIRED_SAMPLE_COLUMNS)}."
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
                + _explain(error, "column").replace("column key", "column", 1)
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


def schema_markdown(name: str = "config") -> str:
    """Markdown table of every key of a schema: key, type, default, description.

    ``config/README.md`` embeds this table for the config and the sample sheet; a test
    keeps the two in step.
    """
    schema = load_schema(name)
    rows = ["| key | type | default | description |", "|---|---|---|---|"]

    def walk(props: Mapping[str, Any], prefix: str) -> None:
        for key, sub in props.items():
            full = f"{prefix}{key}"
            types = sub.get("type", "")
            types = " or ".join(types) if isinstance(types, list) else types
            if "enum" in sub:
                types = " / ".join("null" if v is None else str(v) for v in sub["enum"])
            default = sub.get("default")
            shown = (
                ""
                if "default" not in sub or isinstance(default, dict)
                else f"`{json.dumps(default)}`"
            )
            desc = " ".join(str(sub.get("description", "")).split())
            if "properties" in sub:
                rows.append(f"| **`{full}`** | section | | {desc} |")
                walk(sub["properties"], f"{full}.")
            else:
                rows.append(f"| `{full}` | {types} | {shown} | {desc} |")

    walk(schema["properties"], "")
    return "\n".join(rows) + "\n"


_GENERATED = '<!-- generated by sepsis_sc.config.schema_markdown("{name}"); regenerate with `python -m sepsis_sc.config` -->\n'


def update_config_readme(path: str | Path) -> None:
    """Rewrite the generated schema tables inside ``config/README.md`` in place.

    Each table follows a marker comment and runs until the next blank line.
    """
    text = Path(path).read_text()
    for name in ("samples", "config"):
        marker = _GENERATED.format(name=name)
        if marker not in text:
            raise ValueError(f"{path} has no marker line for the {name!r} table: {marker.strip()}")
        start = text.index(marker) + len(marker)
        end = text.find("\n\n", start)
        end = len(text) if end == -1 else end + 1
        text = text[:start] + schema_markdown(name) + text[end:]
    Path(path).write_text(text)


if __name__ == "__main__":  # python -m sepsis_sc.config: refresh config/README.md
    update_config_readme(Path(__file__).resolve().parents[2] / "config" / "README.md")
