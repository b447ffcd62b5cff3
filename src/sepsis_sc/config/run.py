"""Cross-checks of a validated config against its sample sheet, made before any job runs.

:func:`validate_run` is what the workflow calls when it parses the Snakefile (and what a
notebook can call to check a run without Snakemake): it validates the sheet, checks that
every input file exists or will be made, that every config key naming a sheet column names
one (and one of its values where it names a value), and resolves each contrast's design on
the sheet. Errors name the config key or sheet column at fault and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sepsis_sc.config.sheet import check_sample_inputs, validate_samples

__all__ = ["RunPlan", "validate_run", "QC_OBS_METRICS"]

#: per-cell QC metrics that QC writes to ``obs`` (usable as scVI continuous covariates)
QC_OBS_METRICS = frozenset(
    {
        "total_counts",
        "n_genes_by_counts",
        "pct_counts_mt",
        "pct_counts_ribo",
        "pct_counts_hb",
        "log1p_total_counts",
        "log1p_n_genes_by_counts",
        "doublet_score",
    }
)


@dataclass
class RunPlan:
    """What :func:`validate_run` resolved.

    Attributes
    ----------
    samples
        The validated sheet, indexed by ``sample_id``.
    contrasts
        Every configured contrast (:class:`sepsis_sc.design.Contrast`), in config order.
    designs
        Contrast name -> its :class:`sepsis_sc.design.SampleDesign` on the sheet, or the
        reason (a string) why it is not tested.
    notes
        Messages for the user (one batch level, contrasts not tested).
    """

    samples: pd.DataFrame
    contrasts: list[Any] = field(default_factory=list)
    designs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def tested(self) -> list[str]:
        """Names of the contrasts that are tested (a design, not a reason)."""
        return [c.name for c in self.contrasts if not isinstance(self.designs[c.name], str)]

    @property
    def not_tested(self) -> dict[str, str]:
        """Contrast name -> why it is not tested."""
        return {n: r for n, r in self.designs.items() if isinstance(r, str)}


def _check_column(samples: pd.DataFrame, key: str, column: str, sheet_name: str) -> None:
    """A config key that names a sample-sheet column must name one."""
    if column not in samples.columns:
        raise ValueError(
            f"config key '{key}' is {column!r}, but the {sheet_name} has no such column "
            f"(columns: {', '.join(samples.columns)})."
        )


def _check_value(
    samples: pd.DataFrame, column_key: str, column: str, value_key: str, value: Any, sheet_name: str
) -> None:
    """Config keys that name a sheet column and one of its values must name both."""
    _check_column(samples, column_key, column, sheet_name)
    present = sorted(set(samples[column].astype(str)))
    if str(value) not in present:
        raise ValueError(
            f"config key '{value_key}' is {value!r}, but no sample in the {sheet_name} has "
            f"{column} == {value!r} (values: {', '.join(present)})."
        )


def validate_run(
    config: Mapping[str, Any],
    sheet: pd.DataFrame,
    *,
    produced: Iterable[str] = (),
    base: str | Path = ".",
    sheet_name: str | None = None,
) -> RunPlan:
    """Check a validated config (:func:`sepsis_sc.config.validate_config`) against its sheet.

    Parameters
    ----------
    config
        The validated config (defaults filled).
    sheet
        The sample sheet as read by :func:`sepsis_sc.config.load_samples`.
    produced
        Input paths the workflow makes itself (the demo simulator's samples).
    base
        Directory the sheet's relative paths start from.
    sheet_name
        How messages name the sheet (default ``sample sheet <config samples>``).

    Returns
    -------
    RunPlan
        The sheet indexed by ``sample_id``, the contrasts and their designs, notes.

    Raises
    ------
    SampleSheetError
        A malformed sheet or missing input files.
    ValueError
        A config key names a sheet column (or value) the sheet lacks.
    sepsis_sc.design.DesignError
        A contrast's design cannot be fitted on the sheet (confounded, rank deficient).
    """
    from sepsis_sc.design import check_designs, parse_contrasts

    name = sheet_name or f"sample sheet {config['samples']}"
    samples = validate_samples(sheet, config, sheet_name=name)
    check_sample_inputs(samples, produced=produced, base=base, sheet_name=name)
    integ = config["integration"]
    _check_column(samples, "integration.batch_key", integ["batch_key"], name)
    for col in integ["categorical_covariates"]:
        _check_column(samples, "integration.categorical_covariates", col, name)
    for col in integ["continuous_covariates"]:
        if col not in QC_OBS_METRICS:  # QC adds these to obs
            _check_column(samples, "integration.continuous_covariates", col, name)
    ref = config["scoring"]["reference"]
    if ref:
        _check_value(
            samples,
            "scoring.reference.column",
            ref["column"],
            "scoring.reference.value",
            ref["value"],
            name,
        )
    pat = config["patients"]
    if pat["enabled"] and pat["reference_value"] is not None:
        _check_value(
            samples,
            "patients.reference_column",
            pat["reference_column"],
            "patients.reference_value",
            pat["reference_value"],
            name,
        )
    plan = RunPlan(samples=samples)
    if samples[integ["batch_key"]].nunique() == 1:
        plan.notes.append(
            f"one level of {integ['batch_key']!r} in the sheet: integration runs without a batch "
            "covariate and skips the batch-mixing metrics"
        )
    plan.contrasts = parse_contrasts(config)
    plan.designs = check_designs(
        samples,
        plan.contrasts,
        config["stats"]["design"],
        paired=config["stats"]["paired"],
        sheet_name=name,
    )
    plan.notes += [f"contrast {n!r} {r}" for n, r in plan.not_tested.items()]
    return plan
