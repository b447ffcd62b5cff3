"""A contrast resolved on a set of samples: units, pairing, covariates, estimability.

:func:`resolve_design` turns a :class:`~sepsis_sc.design.contrasts.Contrast` and the sample
sheet into a :class:`SampleDesign` (one unit per donor and contrast level, donor blocks when
donors are seen at both levels, covariate columns from the model formula, the case
indicator :data:`~sepsis_sc.design.contrasts.COEF`); :func:`check_designs` does it for every
contrast of a run before any job; :func:`feature_design` gives the design rows of the units
where one feature has a value. :class:`ContrastArgs` holds the contrast keywords of the
sample-level tests.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sepsis_sc.design.contrasts import COEF, Contrast, DesignError, formula_columns, formula_terms


@dataclass
class SampleDesign:
    """A contrast resolved on a set of samples: units, design matrix, pairing, notes.

    ``matrix`` (units x columns, float) always holds the column :data:`COEF` (1 = case);
    ``sample_unit`` maps each sample of the contrast to its unit; ``units`` has ``donor``,
    ``level`` (case / control value), ``n_samples`` and the covariate values per unit.
    ``testable`` is False (and ``reason`` says why) when the design has no residual degree of
    freedom or a group has no unit; effect sizes are still estimable when both groups exist.
    """

    contrast: Contrast
    formula: str
    units: pd.DataFrame
    sample_unit: pd.Series
    matrix: pd.DataFrame
    paired: bool
    notes: list[str] = field(default_factory=list)
    testable: bool = True
    reason: str = ""

    @property
    def n_case(self) -> int:
        return int((self.units["level"] == self.contrast.case).sum())

    @property
    def n_control(self) -> int:
        return int((self.units["level"] == self.contrast.control).sum())

    @property
    def n_pairs(self) -> int:
        return int(self.units["donor"].nunique()) if self.paired else 0

    @property
    def df_resid(self) -> int:
        return int(self.matrix.shape[0] - self.matrix.shape[1])

    def description(self) -> str:
        """One line: model, units and pairing, e.g. ``~ age + condition; 5 vs 3 donors``."""
        cols = [c for c in self.matrix.columns if c != "Intercept" and not c.startswith("donor[")]
        what = "donors" if not self.paired else "paired donors"
        blocks = " + donor blocks" if self.paired else ""
        return f"{self.formula}{blocks} (columns: {', '.join(cols)}); {self.n_case} vs {self.n_control} {what}"

    def restrict(self, keep: np.ndarray | pd.Series) -> tuple[pd.DataFrame | None, str]:
        """Design rows for a subset of units (boolean over ``units``), kept full rank.

        Pairing is kept only for donors with both units left; columns that become constant
        are dropped. Returns ``(matrix, note)``, matrix None when the contrast is no longer
        estimable (a group without units); the note says what was left out.
        """
        return feature_design(self, np.asarray(keep, dtype=bool))

    def aggregate_mean(self, values: pd.Series) -> pd.Series:
        """Per-sample values (index sample_id) -> per-unit means (NaN samples skipped)."""
        v = values.reindex(self.sample_unit.index)
        return v.groupby(self.sample_unit, observed=True).mean().reindex(self.units.index)

    def aggregate_sum(self, table: pd.DataFrame) -> pd.DataFrame:
        """Per-sample rows (index sample_id) -> per-unit sums (e.g. counts)."""
        t = table.reindex(self.sample_unit.index)
        return t.groupby(self.sample_unit.to_numpy(), observed=True).sum().reindex(self.units.index)


@dataclass(frozen=True, eq=False)
class ContrastArgs:
    """The contrast of a sample-level test, in one place.

    :func:`sepsis_sc.stats.condition_effects` and :func:`sepsis_sc.stats.composition_test`
    build one from their keywords (``case=``, ``control=``, ``contrast=``, ``meta=``) and
    their :class:`~sepsis_sc.config.StatsSettings` (``design``: the formula, or a resolved
    :class:`SampleDesign`; ``paired``).

    Attributes
    ----------
    case, control
        Values of the ``condition`` column to compare (shorthand for ``contrast``).
    contrast, design
        A :class:`Contrast` (any sheet column), or an already resolved :class:`SampleDesign`.
    meta
        Per-sample sheet (index sample_id; e.g. :func:`sample_meta`), needed for contrasts on
        other columns and for covariates (each test says what it defaults to).
    formula
        Model formula over sheet columns, e.g. ``"~ age + sex + condition"``.
    paired
        ``"auto"`` (pair when >= 2 donors are seen at both levels), True / "yes", False / "no".
    """

    case: str | None = None
    control: str | None = None
    contrast: Contrast | None = None
    design: SampleDesign | None = None
    meta: pd.DataFrame | None = None
    formula: str | None = None
    paired: bool | str = "auto"

    def shorthand(self) -> Contrast:
        """``case`` vs ``control`` of the ``condition`` column as a :class:`Contrast`."""
        return Contrast(
            f"{self.case}_vs_{self.control}", "condition", str(self.case), str(self.control)
        )

    def resolve(self, meta: pd.DataFrame) -> SampleDesign:
        """The design on the samples of ``meta``: ``design`` when given, else ``contrast``
        (or the ``case`` vs ``control`` shorthand) resolved by :func:`resolve_design`.

        Raises ``ValueError`` when neither a contrast nor both of case and control are given,
        for an unknown ``paired``, and when the case or control value is not in ``meta``.
        """
        if self.design is not None:
            return self.design
        contrast = self.contrast
        if contrast is None:
            if self.case is None or self.control is None:
                raise ValueError("give case= and control= (or contrast= / design=)")
            contrast = self.shorthand()
        if self.paired not in ("auto", "yes", "no", True, False):
            raise ValueError(f"paired must be 'auto', True or False, got {self.paired!r}")
        present = set(meta[contrast.column].astype(str)) if contrast.column in meta else set()
        for c in (contrast.case, contrast.control):
            if c not in present:
                raise ValueError(
                    f"condition {c!r} not in the table; conditions present: {sorted(present)}"
                )
        return resolve_design(meta, contrast, self.formula, paired=self.paired)


def _is_numeric(values: pd.Series) -> bool:
    return bool(pd.to_numeric(values, errors="coerce").notna().all())


def _unit_table(
    meta: pd.DataFrame, contrast: Contrast, covariates: Sequence[str], numeric: set[str]
) -> tuple[pd.DataFrame, pd.Series, list[str]]:
    """Aggregate samples per donor x contrast level; ``numeric`` covariates are averaged,
    the others must agree within a unit."""
    notes: list[str] = []
    keys = meta["donor"].astype(str) + "|" + meta[contrast.column].astype(str)
    rows = []
    for key, grp in meta.groupby(keys, sort=True):
        row: dict[str, Any] = {
            "unit": key,
            "donor": str(grp["donor"].iloc[0]),
            "level": str(grp[contrast.column].iloc[0]),
            "n_samples": len(grp),
        }
        for cov in covariates:
            vals = grp[cov]
            if cov in numeric:
                row[cov] = float(pd.to_numeric(vals).mean())
            else:
                uniq = vals.astype(str).unique()
                if len(uniq) > 1:
                    raise DesignError(
                        f"design covariate {cov!r} differs between the samples of donor "
                        f"{row['donor']!r} at {contrast.column} == {row['level']!r} "
                        f"({', '.join(sorted(uniq))}); those samples are aggregated into one "
                        f"unit, so {cov!r} must be constant per donor there. Drop {cov!r} from "
                        "the design, or give the samples different donor IDs if they are "
                        "truly different donors."
                    )
                row[cov] = str(uniq[0])
        rows.append(row)
    units = pd.DataFrame(rows).set_index("unit")
    n_rep = int((units["n_samples"] > 1).sum())
    if n_rep:
        notes.append(
            f"{n_rep} donor(s) with several samples at one level: aggregated into one unit each "
            "(values averaged, counts summed)"
        )
    return units, pd.Series(keys.to_numpy(), index=meta.index, name="unit"), notes


def _rank(x: np.ndarray) -> int:
    return int(np.linalg.matrix_rank(x)) if x.size else 0


def resolve_design(
    meta: pd.DataFrame,
    contrast: Contrast,
    formula: str | None = None,
    *,
    paired: str | bool | None = None,
    donor_key: str = "donor",
) -> SampleDesign:
    """Resolve a contrast on the samples of ``meta`` into units and a design matrix.

    Parameters
    ----------
    meta
        One row per sample (index = sample_id) with the contrast column, ``donor_key`` and
        every covariate of the formula (sample-sheet columns).
    contrast
        What to compare.
    formula
        Model formula over sheet columns (default ``contrast.design`` or ``~ <column>``).
        The contrast column's term becomes the case indicator :data:`COEF`; it is appended
        when the formula does not name it.
    paired
        ``"auto"`` (default: pair when >= 2 donors have units at both levels), ``"yes"`` /
        True, ``"no"`` / False.

    Returns
    -------
    SampleDesign

    Raises
    ------
    DesignError
        A formula column missing from ``meta``, an interaction with the contrast column, a
        covariate confounded with the contrast or making the design rank deficient, or a
        categorical covariate that differs within an aggregated unit.
    """
    paired = _paired_mode(contrast, paired)
    formula = formula or contrast.design or f"~ {contrast.column}"
    _check_contrast_column(meta, contrast)
    meta = _with_donor(meta, donor_key)
    cov_terms = _covariate_terms(formula, contrast.column)
    covariates = _covariate_columns(formula, contrast.column, meta)
    sub = meta[meta[contrast.column].astype(str).isin([contrast.case, contrast.control])]
    if sub.empty:
        return _empty_design(contrast, formula)
    numeric = {c for c in covariates if _is_numeric(sub[c])}
    units, sample_unit, notes = _unit_table(sub, contrast, covariates, numeric)
    units, sample_unit, use_paired = _pair_donors(units, sample_unit, contrast, paired, notes)
    cov_x = _covariate_matrix(units, cov_terms, covariates, numeric, formula)
    base = _base_columns(units, use_paired)
    kept = _informative_covariates(base, cov_x, use_paired, contrast, formula, notes)
    matrix = _design_matrix(base, cov_x, kept, units, contrast)
    testable, reason = _estimability(matrix, kept, contrast, formula, use_paired)
    return SampleDesign(
        contrast, formula, units, sample_unit, matrix, use_paired, notes, testable, reason
    )


def _paired_mode(contrast: Contrast, paired: str | bool | None) -> str:
    """``paired`` (or the contrast's own setting) as ``"auto"``, ``"yes"`` or ``"no"``."""
    paired = contrast.paired if paired is None else paired
    paired = {None: "auto", True: "yes", False: "no"}.get(paired, paired)  # type: ignore[arg-type]
    if paired not in ("auto", "yes", "no"):
        raise DesignError(f"paired must be 'auto', 'yes' or 'no', got {paired!r}")
    return paired


def _check_contrast_column(meta: pd.DataFrame, contrast: Contrast) -> None:
    """The sheet must have the contrast's column."""
    col = contrast.column
    if col not in meta.columns:
        raise DesignError(
            f"contrast {contrast.name!r}: the sample sheet has no column {col!r} "
            f"(columns: {', '.join(map(str, meta.columns))})"
        )


def _with_donor(meta: pd.DataFrame, donor_key: str) -> pd.DataFrame:
    """A copy of the sheet with a ``donor`` column (the sample ID when there is none)."""
    meta = meta.copy()
    if donor_key not in meta.columns:
        meta["donor"] = meta.index.astype(str)
    elif donor_key != "donor":
        meta["donor"] = meta[donor_key].astype(str)
    return meta


def _covariate_terms(formula: str, col: str) -> list[str]:
    """The formula's terms other than the contrast column's (no interaction with it)."""
    cov_terms = []
    for factors in formula_terms(formula):
        names = {n for f in factors for n in re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", f)}
        if col in names:
            if len(factors) > 1:
                raise DesignError(
                    f"design formula {formula!r}: interactions with the contrast column {col!r} "
                    "are not supported (the contrast is one case-vs-control coefficient)"
                )
            continue
        cov_terms.append(":".join(factors))
    return cov_terms


def _covariate_columns(formula: str, col: str, meta: pd.DataFrame) -> list[str]:
    """Sheet columns of the covariates; each must be in the sheet."""
    covariates = [c for c in formula_columns(formula) if c != col]
    missing = [c for c in covariates if c not in meta.columns]
    if missing:
        raise DesignError(
            f"design formula {formula!r} names column(s) {missing} that the sample sheet does "
            f"not have (columns: {', '.join(map(str, meta.columns))})"
        )
    return covariates


def _empty_design(contrast: Contrast, formula: str) -> SampleDesign:
    """The untestable design of a contrast that no sample of the sheet belongs to."""
    units = pd.DataFrame(columns=["donor", "level", "n_samples"])
    return SampleDesign(
        contrast,
        formula,
        units,
        pd.Series(dtype=str),
        pd.DataFrame(),
        False,
        [],
        False,
        f"no sample has {contrast.column} == {contrast.case!r} or {contrast.control!r}",
    )


def _pair_donors(
    units: pd.DataFrame, sample_unit: pd.Series, contrast: Contrast, paired: str, notes: list[str]
) -> tuple[pd.DataFrame, pd.Series, bool]:
    """Decide pairing; a paired design keeps only donors with a unit at both levels.

    Appends to ``notes`` what pairing left out (or that donors seen twice stay independent).
    """
    both = units.groupby("donor")["level"].nunique()
    paired_donors = both.index[both == 2]
    use_paired = paired == "yes" or (paired == "auto" and len(paired_donors) >= 2)
    if use_paired:
        left = units[~units["donor"].isin(paired_donors)]
        if len(left):
            notes.append(
                f"paired on {len(paired_donors)} donor(s); {left['donor'].nunique()} donor(s) seen at one level left out"
            )
        units = units[units["donor"].isin(paired_donors)]
        sample_unit = sample_unit[sample_unit.isin(units.index)]
    elif len(paired_donors):
        notes.append(
            f"{len(paired_donors)} donor(s) seen at both levels treated as independent units"
        )
    return units, sample_unit, use_paired


def _covariate_matrix(
    units: pd.DataFrame,
    cov_terms: Sequence[str],
    covariates: Sequence[str],
    numeric: set[str],
    formula: str,
) -> pd.DataFrame:
    """Covariate columns from formulaic on the unit table (no intercept)."""
    cov_x = pd.DataFrame(index=units.index)
    if not cov_terms:
        return cov_x
    from formulaic import model_matrix

    data = units.copy()
    for c in covariates:
        if c in numeric:
            data[c] = pd.to_numeric(data[c])
        else:
            data[c] = data[c].astype(str)
    try:
        mm = model_matrix("~ " + " + ".join(cov_terms), data, na_action="raise")
    except Exception as err:
        raise DesignError(
            f"design formula {formula!r} cannot be evaluated on the sheet: {err}"
        ) from err
    cov_x = pd.DataFrame(np.asarray(mm, dtype=float), index=units.index, columns=list(mm.columns))
    return cov_x.drop(columns=[c for c in cov_x.columns if c == "Intercept"])


def _base_columns(units: pd.DataFrame, use_paired: bool) -> pd.DataFrame:
    """Donor blocks (paired design) or the intercept."""
    if use_paired:
        donors = sorted(units["donor"].unique())
        return pd.DataFrame(
            {f"donor[{d}]": (units["donor"] == d).astype(float) for d in donors},
            index=units.index,
        )
    return pd.DataFrame({"Intercept": np.ones(len(units))}, index=units.index)


def _informative_covariates(
    base: pd.DataFrame,
    cov_x: pd.DataFrame,
    use_paired: bool,
    contrast: Contrast,
    formula: str,
    notes: list[str],
) -> list[str]:
    """Covariate columns kept: those that carry something beyond the base columns.

    A constant column (or one absorbed by the donor blocks) is dropped with a note; one that
    is collinear with columns kept before it is a :class:`DesignError`.
    """
    x_base = base.to_numpy()
    kept: list[str] = []
    for c in cov_x.columns:
        trial = np.column_stack([x_base] + [cov_x[k].to_numpy() for k in kept + [c]])
        if _rank(trial) == trial.shape[1]:
            kept.append(c)
            continue
        # is it redundant with the intercept / donor blocks alone (constant or absorbed)?
        alone = np.column_stack([x_base, cov_x[c].to_numpy()])
        if _rank(alone) <= x_base.shape[1]:
            why = "absorbed by the donor blocks" if use_paired else "constant in this contrast"
            notes.append(f"covariate column {c!r} dropped ({why})")
            continue
        raise DesignError(
            f"contrast {contrast.name!r}, design {formula!r}: column {c!r} is collinear with "
            f"{', '.join(kept) or 'the intercept'} on the {len(base)} units; the design is rank "
            "deficient. Drop or merge that covariate."
        )
    return kept


def _design_matrix(
    base: pd.DataFrame,
    cov_x: pd.DataFrame,
    kept: list[str],
    units: pd.DataFrame,
    contrast: Contrast,
) -> pd.DataFrame:
    """Base columns, kept covariates and the case indicator :data:`COEF` (last)."""
    x_cov = np.column_stack([base.to_numpy()] + [cov_x[k].to_numpy() for k in kept])
    matrix = pd.DataFrame(x_cov, index=units.index, columns=list(base.columns) + kept)
    matrix[COEF] = (units["level"] == contrast.case).astype(float).to_numpy()
    return matrix


def _estimability(
    matrix: pd.DataFrame, kept: list[str], contrast: Contrast, formula: str, use_paired: bool
) -> tuple[bool, str]:
    """``(testable, reason)``: both groups have units and a residual degree of freedom is left.

    Raises :class:`DesignError` when the contrast is confounded with the covariates kept.
    """
    n_case = int(matrix[COEF].sum())
    n_ctrl = int(len(matrix) - matrix[COEF].sum())
    if n_case == 0 or n_ctrl == 0:
        return (
            False,
            f"one group has no unit ({contrast.case}: {n_case}, {contrast.control}: {n_ctrl})",
        )
    full = matrix.to_numpy()
    if _rank(full) < full.shape[1]:
        culprits = kept or ["donor blocks"]
        raise DesignError(
            f"contrast {contrast.name!r} ({contrast.label()}) is confounded with "
            f"{', '.join(culprits)} in design {formula!r}: the case-vs-control difference "
            "cannot be separated from it. Drop that covariate from the design, or choose a "
            "contrast it does not determine."
        )
    if full.shape[0] - full.shape[1] < 1:
        return False, (
            f"no residual degree of freedom ({n_case} vs {n_ctrl} "
            f"{'paired donors' if use_paired else 'donors'}, {full.shape[1]} model columns): "
            "effect size only, no p-value"
        )
    return True, ""


def check_designs(
    meta: pd.DataFrame,
    contrasts: Sequence[Contrast],
    formula: str,
    *,
    paired: str = "auto",
    sheet_name: str = "sample sheet",
) -> dict[str, SampleDesign | str]:
    """Resolve every contrast on the sample sheet before any job.

    Returns ``{contrast name: SampleDesign}`` for contrasts that can be estimated and
    ``{name: reason}`` (a string) for those that cannot be tested on this sheet because one
    of their values is absent when the column has a single value (e.g. a one-condition
    cohort): those are reported as "not tested", not errors.

    Raises
    ------
    DesignError
        A contrast column missing from the sheet; a case / control value absent while the
        column has other values (most likely a typo: the message lists the values present); a
        bad formula, confounding or rank deficiency (message names the columns).
    """
    out: dict[str, SampleDesign | str] = {}
    for c in contrasts:
        if c.column not in meta.columns:
            raise DesignError(
                f"contrast {c.name!r}: column {c.column!r} is not in the {sheet_name} "
                f"(columns: {', '.join(map(str, meta.columns))})"
            )
        present = sorted(set(meta[c.column].astype(str)))
        absent = [v for v in (c.case, c.control) if v not in present]
        if absent:
            if len(present) == 1:
                out[c.name] = (
                    f"not tested: one {c.column} ({present[0]!r}) in the {sheet_name}, "
                    f"nothing to compare {c.case!r} vs {c.control!r} with"
                )
                continue
            raise DesignError(
                f"contrast {c.name!r}: no sample in the {sheet_name} has {c.column} == "
                f"{absent[0]!r} (values present: {', '.join(present)}). Fix the contrast's "
                "case / control, or set 'contrast: null' to run without a contrast."
            )
        out[c.name] = resolve_design(meta, c, c.design or formula, paired=c.paired or paired)
    return out


def feature_design(design: SampleDesign, ok: np.ndarray) -> tuple[pd.DataFrame | None, str]:
    """Rows of the design for the units with a value (``ok``, boolean over ``design.units``).

    Pairing is kept only for donors with both units left, and columns are dropped until the
    matrix has full rank. Returns ``(matrix, note)``, matrix None when the contrast is not
    estimable on those units; the note says what was left out.
    """
    if ok.all():
        return design.matrix, ""
    X = design.matrix[ok]
    note = f"{int((~ok).sum())} unit(s) without a value left out"
    if design.paired:
        units = design.units[ok]
        both = units.groupby("donor")["level"].nunique()
        keep_donors = set(both.index[both == 2])
        keep = units["donor"].isin(keep_donors).to_numpy()
        if (~keep).any():
            note += f"; {int((~keep).sum())} unit(s) lost their pair"
        X = X[keep]
        X = X.loc[:, (X != 0).any(axis=0) | (X.columns == COEF)]
        if X.empty or not (X[COEF] == 1).any() or not (X[COEF] == 0).any():
            return None, note
    cols = [c for c in X.columns if c != COEF]
    kept: list[str] = []
    for c in cols:
        trial = X[kept + [c]].to_numpy()
        if _rank(trial) == trial.shape[1]:
            kept.append(c)
    X = X[kept + [COEF]]
    if _rank(X.to_numpy()) < X.shape[1]:
        return None, note + "; contrast not estimable on the units left"
    return X, note
