"""One settings class per config section, with the defaults read from the JSON schema.

The schema (``workflow/schemas/config.schema.yaml``) is the one place a default is written.
Each class below declares the keys of its section as typed fields; :func:`section` fills in
every field's default, and the class docstring, from that section of the schema, and refuses
a class whose fields and the section's keys differ. So a stage's public function takes
``(adata, settings)``::

    from sepsis_sc.config import QCSettings, load_config
    cfg = load_config("config/config.yaml")
    run_qc(adata, QCSettings.from_config(cfg["qc"]))      # the pipeline's values
    run_qc(adata, QCSettings(), nmads_mt=4)               # schema defaults, one override

:meth:`Settings.from_config` validates a section as the workflow does (defaults filled, the
bad key named); :meth:`Settings.with_overrides` changes fields by name and raises
``TypeError`` on a name that is no field, as a misspelt keyword would.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import textwrap
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar

from sepsis_sc.config.schema import section_schema, validate_section

__all__ = [
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
    "PatientSettings",
    "DownloadSettings",
    "ResourceSettings",
]

S = TypeVar("S", bound="Settings")

#: every settings class by its config section
SETTINGS: dict[str, type[Settings]] = {}


def _frozen(value: Any) -> Any:
    """Lists become tuples (settings are immutable); mappings are copied."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _frozen(v) for k, v in value.items()}
    return value


def _plain(value: Any) -> Any:
    """Tuples back to lists, numpy scalars to Python ones: what YAML and the schema take."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


class Settings:
    """Base of the per-section settings: a frozen dataclass whose fields are the section's
    keys (built by :func:`section`)."""

    #: the config section these settings hold (set by :func:`section`)
    section: ClassVar[str]

    @classmethod
    def from_config(cls: type[S], values: Mapping[str, Any] | None = None) -> S:
        """From a config section (e.g. ``config["qc"]``), validated against the schema with
        its defaults filled in; :class:`sepsis_sc.config.ConfigError` names a bad key."""
        checked = validate_section(cls.section, _plain(dict(values or {})))
        return cls(**{k: _frozen(v) for k, v in checked.items()})

    def with_overrides(self: S, overrides: Mapping[str, Any] | None = None, /, **kw: Any) -> S:
        """A copy with the given fields changed (keyword overrides of a stage function).

        Raises ``TypeError`` naming a name that is no field of this section.
        """
        changes = {**(overrides or {}), **kw}
        names = {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(
                f"unexpected keyword argument(s) {unknown}: not settings of the config "
                f"section {self.section!r} (its keys: {', '.join(sorted(names))})"
            )
        if not changes:
            return self
        return dataclasses.replace(self, **{k: _frozen(v) for k, v in changes.items()})  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain config section (lists, not tuples)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def _docstring(cls: type, props: Mapping[str, Any]) -> str:
    head = inspect.cleandoc(cls.__doc__ or "")
    lines = [head, "", "Attributes", "----------"]
    for name in props:
        sub = props[name]
        default = sub.get("default")
        lines.append(f"{name}")
        text = " ".join(str(sub.get("description", "")).split())
        lines += textwrap.wrap(
            f"{text} (default ``{default!r}``)", 88, initial_indent="    ", subsequent_indent="    "
        )
    return "\n".join(lines) + "\n"


def section(name: str):
    """Class decorator: make ``cls`` the frozen settings dataclass of config section ``name``.

    Every annotated field must be a key of the section and every key a field (``TypeError``
    otherwise, at import). Defaults are the schema's (lists as tuples, mappings copied per
    instance); the docstring lists each key with the schema's description and default.
    """

    def wrap(cls: type[S]) -> type[S]:
        props = section_schema(name)["properties"]
        own = [
            k
            for k, v in cls.__dict__.get("__annotations__", {}).items()
            if "ClassVar" not in str(v)
        ]
        if set(own) != set(props):
            missing, extra = sorted(set(props) - set(own)), sorted(set(own) - set(props))
            raise TypeError(
                f"{cls.__name__}: fields and the schema's {name!r} keys differ "
                f"(keys without a field: {missing}; fields without a key: {extra})"
            )
        for key in own:
            if key in cls.__dict__:
                raise TypeError(
                    f"{cls.__name__}.{key}: the default comes from the schema, not the class"
                )
            if "default" not in props[key]:
                raise TypeError(f"{cls.__name__}.{key}: the schema gives no default")
            default = _frozen(props[key]["default"])
            if isinstance(default, dict):
                setattr(
                    cls, key, dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d))
                )
            else:
                setattr(cls, key, default)
        cls.section = name
        cls.__doc__ = _docstring(cls, {k: props[k] for k in own})
        out = dataclasses.dataclass(frozen=True)(cls)
        SETTINGS[name] = out
        return out

    return wrap


def settings_for(config: Mapping[str, Any], name: str) -> Settings:
    """The settings of section ``name`` of a whole config (``load_config``'s result)."""
    if name not in SETTINGS:
        raise KeyError(f"no settings class for config section {name!r}; known: {sorted(SETTINGS)}")
    return SETTINGS[name].from_config(config.get(name))


@section("ingest")
class IngestSettings(Settings):
    """Reading one sample's raw counts (``sepsis_sc.io``)."""

    min_cells: int


@section("preflight")
class PreflightSettings(Settings):
    """Cheap checks of every input file before any job (:func:`sepsis_sc.io.preflight`)."""

    enabled: bool
    max_cells: int


@section("demo")
class DemoSettings(Settings):
    """The simulated demo cohort (``sepsis_sc.sim``)."""

    simulate: bool
    dir: str
    cells_per_sample: int
    n_genes: int
    effects: bool


@section("qc")
class QCSettings(Settings):
    """Per-sample QC: adaptive thresholds, doublets, ambient RNA, low-RNA rescue, merging
    (``sepsis_sc.qc``)."""

    nmads_counts: float
    nmads_genes: float
    nmads_mt: float
    min_counts: float | None
    min_genes: float | None
    max_counts: float | None
    max_genes: float | None
    max_pct_mt: float | None
    mt_threshold_floor: float | None
    rescue_low_rna_immune: bool
    rescue_markers: Mapping[str, tuple[str, ...]] | None
    rescue_max_pct_mt: float | None
    rescue_min_counts: int
    rescue_min_genes: int
    rescue_min_markers: int
    rescue_min_enrichment: float
    rescue_alpha: float
    doublet_method: Literal["scrublet", "none"]
    doublet_threshold: float | None
    remove_doublets: bool
    expected_doublet_rate: float | None
    upper_tail: Literal["lineage", "sample", "none"]
    ambient: Literal["auto", "none"]
    ambient_without_raw: Literal["report", "correct"]
    soup_max_counts: float
    flag_soup_droplets: bool
    platelet_monocyte: Literal["flag", "remove"]
    downstream_layer: Literal["soupx_counts", "counts"]
    min_cells_per_gene: int
    on_empty: Literal["error", "drop"]
    min_cells_per_sample: int
    on_small_sample: Literal["drop", "stop"]

    @property
    def nmads(self) -> dict[str, float]:
        """MADs per ``obs`` QC metric, in the order the thresholds are reported."""
        return {
            "log1p_total_counts": self.nmads_counts,
            "log1p_n_genes_by_counts": self.nmads_genes,
            "pct_counts_mt": self.nmads_mt,
        }


@section("integration")
class IntegrationSettings(Settings):
    """HVGs and the latent space: scVI, Harmony, PCA and their metrics (``sepsis_sc.integrate``)."""

    method: Literal["scvi", "harmony", "pca"]
    compare: tuple[str, ...]
    metrics: bool
    batch_key: str
    categorical_covariates: tuple[str, ...]
    continuous_covariates: tuple[str, ...]
    n_hvg: int
    n_pcs: int
    n_latent: int
    n_layers: int
    n_hidden: int
    gene_likelihood: Literal["nb", "zinb", "poisson"]
    max_epochs: int | None
    early_stopping: bool
    early_stopping_min_improvement: float
    early_stopping_patience: int
    train_size: float
    batch_size: int
    accelerator: Literal["auto", "gpu", "cpu"]
    metrics_label_key: str | None
    metrics_labels: str | None


@section("clustering")
class ClusteringSettings(Settings):
    """kNN graph, Leiden at several resolutions, markers (``sepsis_sc.cluster``)."""

    n_neighbors: int
    resolutions: tuple[float, ...]
    resolution: float
    n_marker_genes: int


@section("annotation")
class AnnotationSettings(Settings):
    """Hierarchical immune annotation (``sepsis_sc.annotate``)."""

    markers: str | None
    cluster_key: str | None
    resolution: float
    min_score: float
    min_margin: float
    subset_min_score: float
    cluster_weight: float
    celltypist_model: str | None
    reference: str | None
    reference_label_key: str | None
    reference_profiles: str | None
    third_opinion_min_probability: float | None


@section("scoring")
class ScoringSettings(Settings):
    """Therapy-target state scores and calls (``sepsis_sc.score``)."""

    signatures: str | None
    min_genes_fraction: float
    call_rule: Literal["control_quantile", "otsu"]
    reference: Mapping[str, str] | None
    call_quantile: float
    max_rank: int


@section("stats")
class StatsSettings(Settings):
    """Sample-level tests of every contrast (``sepsis_sc.stats``)."""

    min_cells: int
    design: str | None
    paired: Literal["auto", "yes", "no"]
    alpha: float
    test: Literal["t", "rank"]
    moderation: Literal["none", "plain", "robust", "trend", "robust_trend"]
    unit_weights: bool


@section("de")
class DESettings(Settings):
    """Pseudobulk differential expression (``sepsis_sc.de``)."""

    enabled: bool
    levels: tuple[str, ...]
    min_cells: int
    min_samples_per_group: int
    min_total_count: int
    min_count: int
    shrink: bool


@section("da")
class DASettings(Settings):
    """Neighbourhood differential abundance, Milo with donors as units (``sepsis_sc.da``)."""

    enabled: bool
    k: int
    prop: float
    max_nhoods: int
    min_mean_count: float
    alpha: float
    min_fraction: float


@section("ccc")
class CCCSettings(Settings):
    """Therapy axes between cells: per-sample ligand-receptor scores (``sepsis_sc.ccc``)."""

    enabled: bool
    axes_file: str | None
    min_cells: int
    liana: bool
    resource: str
    expr_prop: float
    n_perms: int


@section("patients")
class PatientSettings(Settings):
    """Patient immune profiles against the control reference range (``sepsis_sc.patients``)."""

    enabled: bool
    reference_column: str
    reference_value: str | None
    reference_file: str | None
    min_controls: int
    z_threshold: float
    timepoint_column: str | None
    endotypes: bool


@section("download")
class DownloadSettings(Settings):
    """Fetching public cohort files (``sepsis_sc.download``)."""

    dir: str
    retries: int
    timeout: float


@section("resources")
class ResourceSettings(Settings):
    """Threads, GPU and memory requests of the workflow's jobs."""

    threads: int
    gpu: bool
    mem_mb_per_10k_cells: int | None
