"""The run configuration: JSON schema, validation with defaults, and the schema's tables.

The config is validated against ``workflow/schemas/config.schema.yaml`` before any job runs.
A bad value fails at once with a message that names the key, the value and what was
expected, e.g.::

    ConfigError: config key 'clustering.resolution': value -1 is not valid: -1 is less than
    the minimum of 0 (Leiden resolution used for the final clusters).

The schema is the one source of every default: they fill in missing keys here, and the
settings classes (:mod:`sepsis_sc.config.settings`) read theirs from it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

logger = logging.getLogger(__name__)

__all__ = [
    "ConfigError",
    "schema_dir",
    "load_schema",
    "section_schema",
    "validate_config",
    "validate_section",
    "load_config",
    "describe_error",
    "schema_markdown",
    "update_config_readme",
    "EMBEDDING_KEYS",
]

#: obsm key of the latent space each ``integration.method`` writes (shared by the workflow,
#: which imports this light module at parse time, and by :mod:`sepsis_sc.integrate`)
EMBEDDING_KEYS: dict[str, str] = {"scvi": "X_scVI", "harmony": "X_harmony", "pca": "X_pca"}


class ConfigError(ValueError):
    """A configuration value is missing or invalid."""


def schema_dir() -> Path:
    """Directory holding ``config.schema.yaml`` and ``samples.schema.yaml``."""
    return Path(__file__).resolve().parents[3] / "workflow" / "schemas"


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


def describe_error(error: jsonschema.ValidationError, what: str) -> str:
    """One sentence naming the key (or sheet column) at fault, its value and what the schema
    expects, with the key's description; ``what`` is ``"config"`` or ``"column"``."""
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


def section_schema(section: str, schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The schema of one config section (e.g. ``"qc"``): its ``properties`` and constraints."""
    schema = schema if schema is not None else load_schema("config")
    props = schema["properties"]
    if section not in props or "properties" not in props[section]:
        sections = sorted(k for k, v in props.items() if "properties" in v)
        raise KeyError(f"no config section {section!r}; sections: {', '.join(sections)}")
    sub = dict(props[section])
    sub["type"] = "object"  # a section given as null is checked as the empty section
    return sub


def validate_section(section: str, values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate one config section (``None``: empty) and return it with the schema's
    defaults filled in; :class:`ConfigError` names the key as ``<section>.<key>``."""
    sub = section_schema(section)
    instance = _coerce(yaml.safe_load(yaml.safe_dump(dict(values or {}))), sub)
    errors = sorted(
        _DefaultFillingValidator(sub).iter_errors(instance), key=lambda e: list(e.absolute_path)
    )
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise ConfigError(
            describe_error(best, "config").replace("config key '", f"config key '{section}.", 1)
        )
    return instance


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
        raise ConfigError(describe_error(best, "config"))
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
