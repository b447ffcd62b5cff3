"""The run configuration and the sample sheet: validation, defaults, settings per section.

* :mod:`~sepsis_sc.config.schema`: the JSON schema, :func:`load_config` /
  :func:`validate_config` (defaults filled, the bad key named);
* :mod:`~sepsis_sc.config.settings`: one frozen settings class per config section
  (:class:`QCSettings`, :class:`IntegrationSettings`, ...), defaults read from the schema;
* :mod:`~sepsis_sc.config.sheet`: the sample sheet (:func:`load_samples`,
  :func:`validate_samples`, :func:`check_sample_inputs`);
* :mod:`~sepsis_sc.config.run`: :func:`validate_run`, the cross-checks of config and sheet the
  workflow makes before any job.

This package imports no scanpy: the workflow imports it when it parses the Snakefile.
"""

from sepsis_sc.config.run import RunPlan, validate_run
from sepsis_sc.config.schema import (
    EMBEDDING_KEYS,
    ConfigError,
    describe_error,
    load_config,
    load_schema,
    schema_dir,
    schema_markdown,
    section_schema,
    update_config_readme,
    validate_config,
    validate_section,
)
from sepsis_sc.config.settings import (
    SETTINGS,
    AnnotationSettings,
    CCCSettings,
    ClusteringSettings,
    DASettings,
    DemoSettings,
    DESettings,
    DownloadSettings,
    IngestSettings,
    IntegrationSettings,
    PatientSettings,
    PreflightSettings,
    QCSettings,
    ResourceSettings,
    ScoringSettings,
    Settings,
    StatsSettings,
    section,
    settings_for,
)
from sepsis_sc.config.sheet import (
    REQUIRED_SAMPLE_COLUMNS,
    RESERVED_SAMPLE_IDS,
    SHEET_RESERVED_COLUMNS,
    SampleSheetError,
    check_sample_inputs,
    load_samples,
    validate_samples,
)

__all__ = [
    "ConfigError",
    "SampleSheetError",
    "EMBEDDING_KEYS",
    "schema_dir",
    "load_schema",
    "section_schema",
    "validate_config",
    "validate_section",
    "load_config",
    "describe_error",
    "schema_markdown",
    "update_config_readme",
    "Settings",
    "section",
    "settings_for",
    "SETTINGS",
    "IngestSettings",
    "PreflightSettings",
    "DemoSettings",
    "QCSettings",
    "IntegrationSettings",
    "ClusteringSettings",
    "AnnotationSettings",
    "ScoringSettings",
    "StatsSettings",
    "DESettings",
    "DASettings",
    "CCCSettings",
    "PatientSettings",
    "DownloadSettings",
    "ResourceSettings",
    "load_samples",
    "validate_samples",
    "check_sample_inputs",
    "SHEET_RESERVED_COLUMNS",
    "REQUIRED_SAMPLE_COLUMNS",
    "RESERVED_SAMPLE_IDS",
    "validate_run",
    "RunPlan",
]
