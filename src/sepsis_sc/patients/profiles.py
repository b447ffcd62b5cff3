"""All of a patient profile in one call (:func:`profile`, notebook and workflow entry point)
and what it returns (:class:`PatientProfiles`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from sepsis_sc import store
from sepsis_sc.config import PatientSettings
from sepsis_sc.design import sample_meta
from sepsis_sc.patients.endotypes import endotype_scores
from sepsis_sc.patients.longitudinal import trajectories
from sepsis_sc.patients.readouts import READOUTS, sample_readouts
from sepsis_sc.patients.reference import (
    NOT_ASSESSED,
    InsufficientReferenceError,
    read_reference,
    reference_ranges,
    score_samples,
)
from sepsis_sc.patients.rules import call_states, load_state_rules

logger = logging.getLogger("sepsis_sc.patients")

__all__ = ["PatientProfiles", "profile"]


@dataclass
class PatientProfiles:
    """Everything :func:`profile` computes (tables are pandas DataFrames).

    Attributes
    ----------
    status
        ``"ok"`` (in-run controls), ``"reference_file"``, ``"refused"`` (too few control
        donors: no flags) or ``"skipped"`` (no controls and no reference file).
    notes
        Plain-language notes (why refused / skipped, which reference was used).
    values
        Samples x readouts.
    profiles
        Long sample x readout table: meta, ``value``, reference centre / low / high, ``z``,
        ``percentile``, ``flag`` (see :func:`score_samples`), ``n_cells``, ``reason``.
    states
        :func:`call_states` output (with donor and condition).
    reference
        :func:`reference_ranges` output of this run's controls (empty when not built).
    endotypes, trajectories
        :func:`endotype_scores` and :func:`trajectories` outputs.
    meta
        Per-sample table (donor, condition, reference membership, timepoint).
    z_threshold
        Flag threshold used.
    """

    status: str
    notes: list[str]
    values: pd.DataFrame
    profiles: pd.DataFrame
    states: pd.DataFrame
    reference: pd.DataFrame
    endotypes: pd.DataFrame
    trajectories: pd.DataFrame
    meta: pd.DataFrame
    z_threshold: float = 2.0
    condition_key: str = "condition"
    extra: dict[str, Any] = field(default_factory=dict)

    def flags(self) -> pd.DataFrame:
        """Samples x readouts table of flags."""
        return self.profiles.pivot(index="sample_id", columns="readout", values="flag")

    def calls(self) -> pd.DataFrame:
        """Samples x states table of calls."""
        return self.states.pivot(index="sample_id", columns="state", values="call")


def profile(
    adata: ad.AnnData,
    sample_table: pd.DataFrame | str | Path | None = None,
    settings: PatientSettings | None = None,
    *,
    min_cells: int = 10,
    sample_key: str = "sample_id",
    donor_key: str = "donor",
    condition_key: str = "condition",
    counts: store.CountSource | None = None,
    layer: str | None = "counts",
    state_rules: str | Path | Sequence[Mapping[str, Any]] | None = None,
    run_name: str = "",
    external: pd.DataFrame | None = None,
    **overrides: Any,
) -> PatientProfiles:
    """Profile every sample against the control reference range and call immune states.

    Parameters
    ----------
    adata
        Scored AnnData (``targets/scored.h5ad``).
    sample_table
        :func:`sepsis_sc.stats.sample_table` output, or the path of
        ``targets/sample_table.tsv`` (computed when None).
    settings
        The config's ``patients`` section (:class:`sepsis_sc.config.PatientSettings`; None:
        the schema defaults). ``reference_column``, ``reference_value``: the reference
        (control) samples are those with ``obs[reference_column] == reference_value``; None
        (or a value no sample has): no in-run reference, then ``reference_file`` is used, or
        profiling is skipped with a note. ``reference_file``: saved
        ``patients/reference.tsv`` of another run, used when the run has no reference
        samples (never mixed with in-run controls; cross-run comparisons need the same
        preparation, chemistry and gene panel: scores and log2 CPM shift with them).
        ``min_controls``: minimum control donors (repeated samples of a donor count once);
        fewer: refused, no flags. ``z_threshold``: sets the flag's tail probability (2: about
        4.6 % of reference-like samples flagged per readout, two-sided); the threshold on
        ``|z|`` is widened for few control donors (:func:`flag_multiplier`: 3.1 with 5
        donors, 2.6 with 8). ``timepoint_column``: obs column ordering a donor's samples.
        ``endotypes``: also compute the published endotype scores. ``enabled`` is the
        workflow's.
    min_cells
        Minimum cells behind a share or pseudobulk value (and the sample table, when
        computed here); the config's ``stats.min_cells``.
    sample_key, donor_key, condition_key
        obs columns.
    counts
        The raw counts of the pseudobulk readouts, e.g.
        :meth:`sepsis_sc.store.FileCounts.matching` (streamed from the ``.h5ad``; ``adata``
        then needs no matrix). None: ``adata``'s ``layer``.
    layer
        Raw-count layer.
    state_rules
        Rules path or list (default ``resources/patient_states.yaml``).
    run_name
        Recorded as ``source_run`` in the reference table.
    external
        Values of readouts other stages computed (:func:`sample_readouts`; the workflow
        passes the neighbourhood DA's unexplained shares of the first tested contrast).
    **overrides
        Settings fields by name (``reference_value="control"``, ``min_controls=4``, ...).

    Returns
    -------
    PatientProfiles
    """
    if overrides.get("reference_file") is not None:
        overrides["reference_file"] = str(overrides["reference_file"])
    settings = (settings or PatientSettings()).with_overrides(overrides)
    timepoint_column = settings.timepoint_column
    sample_table = _read_sample_table(sample_table)
    rules = (
        load_state_rules(state_rules)
        if state_rules is None or isinstance(state_rules, str | Path)
        else list(state_rules)
    )
    meta = _profile_meta(
        adata, settings, sample_key=sample_key, donor_key=donor_key, condition_key=condition_key
    )
    values, detail = sample_readouts(
        adata,
        sample_table,
        sample_key=sample_key,
        counts=counts,
        layer=layer,
        min_cells=min_cells,
        external=external,
    )
    notes: list[str] = []
    is_ref = _reference_samples(meta, settings, notes)
    meta["is_reference"] = is_ref if is_ref is not None else False
    status, note, reference, scored = _score_against_reference(
        values,
        meta,
        is_ref,
        settings,
        run_name=run_name,
        notes=notes,
    )
    prof, m = _profile_table(scored, detail, meta, condition_key, timepoint_column)
    states = call_states(prof, rules, note=note, z_probable=settings.z_threshold)
    states = m.merge(states, on="sample_id")
    endo = (
        endotype_scores(
            adata, sample_key=sample_key, counts=counts, layer=layer, min_cells=min_cells
        )
        if settings.endotypes
        else pd.DataFrame()
    )
    traj = trajectories(prof, meta, timepoint_column=timepoint_column)
    n_yes = states[states["call"] == "yes"].groupby("state").size().to_dict() if len(states) else {}
    logger.info("patient profiles: status %s; calls %s", status, n_yes)
    return PatientProfiles(
        status=status,
        notes=notes,
        values=values,
        profiles=prof,
        states=states,
        reference=reference,
        endotypes=endo,
        trajectories=traj,
        meta=meta,
        z_threshold=settings.z_threshold,
        condition_key=condition_key,
    )


def _read_sample_table(sample_table: pd.DataFrame | str | Path | None) -> pd.DataFrame | None:
    """The per-sample table as given, or read from its TSV (empty reasons as "")."""
    if isinstance(sample_table, str | Path):
        sample_table = pd.read_csv(sample_table, sep="\t", keep_default_na=True)
        sample_table["reason"] = sample_table["reason"].fillna("")
    return sample_table


def _profile_meta(
    adata: ad.AnnData,
    settings: PatientSettings,
    *,
    sample_key: str,
    donor_key: str,
    condition_key: str,
) -> pd.DataFrame:
    """Per sample (order of appearance, index ``sample_id``): donor, condition, reference
    column and time point (:func:`sepsis_sc.design.sample_meta`)."""
    tp = settings.timepoint_column
    meta = sample_meta(
        adata,
        sample_key,
        columns=[condition_key, settings.reference_column] + ([tp] if tp else []),
        donor_key=donor_key,
        obs_order=True,
    )
    meta.index.name = "sample_id"
    return meta


def _reference_samples(
    meta: pd.DataFrame, settings: PatientSettings, notes: list[str]
) -> pd.Series | None:
    """Which samples are the in-run reference (None: none); says why not in ``notes``."""
    column, value = settings.reference_column, settings.reference_value
    if value is not None and column in meta:
        is_ref = meta[column].astype(str) == str(value)
        if not is_ref.any():
            notes.append(f"no sample has {column} == {value!r}")
            return None
        return is_ref
    if value is not None:
        notes.append(f"obs[{column!r}] missing: no in-run reference samples")
    return None


def _score_against_reference(
    values: pd.DataFrame,
    meta: pd.DataFrame,
    is_ref: pd.Series | None,
    settings: PatientSettings,
    *,
    run_name: str,
    notes: list[str],
) -> tuple[str, str, pd.DataFrame, pd.DataFrame]:
    """``(status, note, reference, scored)``: in-run controls, else the reference file,
    else nothing; when refused or skipped every value is ``not assessed`` (``note`` says why).
    """
    reference = pd.DataFrame()
    status, note = "ok", ""
    scored = None
    ref_desc = f"{settings.reference_column} == {settings.reference_value}"
    if is_ref is not None:
        try:
            reference = reference_ranges(
                values[is_ref],
                meta["donor"],
                min_controls=settings.min_controls,
                z_threshold=settings.z_threshold,
                source_run=run_name,
                reference=ref_desc,
            )
            scored = score_samples(
                values,
                meta,
                is_reference=is_ref,
                min_controls=settings.min_controls,
                z_threshold=settings.z_threshold,
            )
            n_don = meta.loc[is_ref, "donor"].nunique()
            notes.append(
                f"reference: {n_don} control donors ({ref_desc}); controls scored "
                "leave-one-out; one value per donor"
            )
        except InsufficientReferenceError as err:
            status, note = "refused", f"refused: {err}"
    elif settings.reference_file is not None:
        reference_file = settings.reference_file
        ref = read_reference(reference_file)
        scored = score_samples(
            values,
            meta,
            reference=ref,
            min_controls=settings.min_controls,
            z_threshold=settings.z_threshold,
        )
        status = "reference_file"
        runs = ", ".join(sorted(set(ref["source_run"]) - {""})) or "unnamed run"
        notes.append(
            f"no in-run controls: reference ranges from {reference_file} ({runs}); "
            "percentiles from the normal approximation; valid only for the same "
            "preparation, chemistry and gene panel"
        )
    else:
        status, note = "skipped", _skipped_note(settings)
    if note:
        notes.append(note)
        logger.warning("patient profiles %s", note)
        scored = _unscored(values, note)
    assert scored is not None
    return status, note, reference, scored


def _skipped_note(settings: PatientSettings) -> str:
    """Why profiling was skipped: no reference samples and no reference file."""
    value = settings.reference_value
    return (
        "skipped: no reference samples in this run"
        + (f" ({settings.reference_column} == {value!r} matches none)" if value is not None else "")
        + " and no reference_file given; pass patients.reference_file "
        "(patients/reference.tsv of a run with >= min_controls control donors)"
    )


def _unscored(values: pd.DataFrame, note: str) -> pd.DataFrame:
    """The :func:`score_samples` layout with every value ``not assessed`` (basis = ``note``)."""
    return pd.DataFrame(
        [
            {
                "sample_id": s,
                "readout": r,
                "value": float(values.at[s, r]),
                "ref_centre": np.nan,
                "ref_spread": np.nan,
                "ref_low": np.nan,
                "ref_high": np.nan,
                "ref_k": np.nan,
                "ref_n": 0,
                "ref_basis": note,
                "z": np.nan,
                "percentile": np.nan,
                "flag": NOT_ASSESSED,
            }
            for s in values.index
            for r in values.columns
        ]
    )


def _profile_table(
    scored: pd.DataFrame,
    detail: pd.DataFrame,
    meta: pd.DataFrame,
    condition_key: str,
    timepoint_column: str | None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The long profile table (meta, labels, cells behind each value; readouts with a reason
    are ``not assessed``) and the per-sample columns it starts with."""
    lab = {r.name: r for r in READOUTS}
    prof = scored.merge(
        detail[["sample_id", "readout", "n_cells", "reason"]],
        on=["sample_id", "readout"],
        how="left",
    )
    prof["label"] = prof["readout"].map(lambda x: lab[x].label if x in lab else x)
    prof["group"] = prof["readout"].map(lambda x: lab[x].group if x in lab else "")
    prof["flag"] = np.where(prof["reason"].fillna("") != "", NOT_ASSESSED, prof["flag"])
    m = meta.reset_index()[
        ["sample_id", "donor"]
        + [c for c in (condition_key, timepoint_column) if c and c in meta and c != "donor"]
    ]
    m = m.loc[:, ~m.columns.duplicated()]
    return m.merge(prof, on="sample_id"), m
