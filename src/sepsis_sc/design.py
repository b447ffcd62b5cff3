"""One design engine for every sample-level test: composition, state metrics, pseudobulk DE.

Every condition effect in sepsis-sc is estimated from *units of replication*, never from cells.
This module decides, once and for every test, what a unit is and which model compares them:

1. **Contrast** (:class:`Contrast`): a sample-sheet column and two of its values (``case`` vs
   ``control``), e.g. ``condition: sepsis vs control``, ``timepoint: T6 vs T0`` or
   ``outcome: nonsurvivor vs survivor``. Samples with other values are not part of it.
2. **Units** (:func:`resolve_design`): samples of one donor at one level of the contrast are
   *aggregated* into one unit (their metric values averaged, their counts summed). A patient
   sampled at T0 and T6 is one septic unit in "sepsis vs control", never two independent
   ones: counting repeated samples as donors treats within-patient variation as if it were
   between-patient variation, which inflates false positives (58 % of null p-values below 0.05
   on a 5-patients x 2-time-points design, before this module) and can reverse the sign.
   Aggregation was chosen over a donor random effect or limma's ``duplicateCorrelation``
   because it is exact for the question asked (a between-donor contrast has one observation
   per donor), needs no variance-component estimate from 3-10 donors (unstable at that size),
   and is the same operation for proportions, scores and counts; Crowell et al. 2020
   (DOI 10.1038/s41467-020-19894-4) and Squair et al. 2021 (DOI 10.1038/s41467-021-25960-2)
   recommend it for pseudobulk. The null calibration is tested (``tests/test_design.py``).
3. **Pairing**: donors with a unit at *both* levels (e.g. T6 vs T0 in the same patients) are
   compared within donor: donor blocks enter the model (``~ donor + ... + contrast``), which is
   the paired t-test for two levels, and donors seen at one level only are left out with a
   note. ``paired="auto"`` pairs when at least two donors are seen at both levels.
4. **Covariates**: a model formula (``stats.design``, default ``~ condition``) written with
   sample-sheet columns and parsed by `formulaic <https://matthewwardrop.github.io/formulaic/>`_;
   the contrast column's term is replaced by the case-vs-control indicator (coefficient
   ``case_vs_control``), other terms are covariates (numbers when every value parses as one,
   categories otherwise). Covariates constant within the contrast's units (or absorbed by the
   donor blocks of a paired design) are dropped with a note; a covariate that makes the
   design rank deficient, or that is confounded with the contrast, is an error that names it.

:func:`linear_test` fits the resolved design to many features at once (labels of a
composition table, states x metrics) with limma-style empirical-Bayes variance moderation
(Smyth 2004, DOI 10.2202/1544-6115.1027) and returns effect, moderated-t CI and p per feature.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats

logger = logging.getLogger(__name__)

__all__ = [
    "DesignError",
    "sample_meta",
    "Contrast",
    "SampleDesign",
    "ContrastArgs",
    "parse_contrasts",
    "formula_columns",
    "resolve_design",
    "check_designs",
    "linear_test",
    "squeeze_var",
    "COEF",
    "ConfigSettings",
    "StatsSettings",
]

#: name of the case-vs-control coefficient in every design matrix
COEF = "case_vs_control"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigSettings:
    """Base of the frozen settings dataclasses (:class:`StatsSettings`,
    :class:`sepsis_sc.de.DESettings`, :class:`sepsis_sc.patients.PatientSettings`)."""

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> Any:
        """From a config section (e.g. ``config["de"]``): its keys that are fields (lists
        become tuples); fields it lacks keep their defaults, other keys are ignored."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items() if k in names}
        return cls(**kw)


@dataclass(frozen=True)
class StatsSettings(ConfigSettings):
    """The config's ``stats`` section: sample-level tests of every contrast.

    Field defaults equal the schema's (checked by ``tests/test_design.py``).

    Attributes
    ----------
    min_cells
        Fewest cells of a state's population per sample (:func:`sepsis_sc.stats.sample_table`).
    design
        Model formula over sheet columns (None: ``~ <contrast column>``).
    paired
        ``"auto"``, ``"yes"`` or ``"no"``.
    alpha
        FDR level.
    test
        ``"t"`` (moderated t) or ``"rank"``.
    """

    min_cells: int = 20
    design: str | None = None
    paired: str = "auto"
    alpha: float = 0.05
    test: str = "t"


class DesignError(ValueError):
    """The sample-level design cannot answer the contrast (confounded, rank deficient, ...)."""


@dataclass(frozen=True)
class Contrast:
    """Two values of one sample-sheet column to compare (effect = case vs control).

    Attributes
    ----------
    name
        Used in output paths (``targets/<name>/``, ``de/<name>/``); default
        ``<case>_vs_<control>``.
    column, case, control
        Sample-sheet column and its two values.
    design
        Model formula over sample-sheet columns (None: the run's ``stats.design``).
    paired
        ``"auto"``, ``"yes"`` or ``"no"`` (None: the run's ``stats.paired``).
    """

    name: str
    column: str
    case: str
    control: str
    design: str | None = None
    paired: str | None = None

    def label(self) -> str:
        """Human-readable form, e.g. ``condition: sepsis vs control``."""
        return f"{self.column}: {self.case} vs {self.control}"


def parse_contrasts(config: Mapping[str, Any]) -> list[Contrast]:
    """The run's contrasts from a validated config.

    ``contrasts`` (a list) wins; otherwise the one-item shorthand ``contrast`` (``null`` = no
    contrast: per-sample tables only). Names are checked to be unique and usable as folders.
    """
    items = config.get("contrasts")
    if items is None:
        one = config.get("contrast")
        items = [] if one is None else [one]
    out = []
    for i, item in enumerate(items):
        case, control = str(item["case"]), str(item["control"])
        name = str(item.get("name") or f"{case}_vs_{control}")
        key = f"contrasts[{i}]" if config.get("contrasts") is not None else "contrast"
        if not _NAME_RE.match(name):
            raise DesignError(
                f"config key '{key}.name': {name!r} is not usable as a folder name; use letters, "
                "digits, '_', '.' and '-' (set 'name:' explicitly)"
            )
        if case == control:
            raise DesignError(
                f"config keys '{key}.case' and '{key}.control' are both {case!r}; name two "
                "different values to compare"
            )
        out.append(
            Contrast(
                name=name,
                column=str(item.get("column", "condition")),
                case=case,
                control=control,
                design=item.get("design"),
                paired=item.get("paired"),
            )
        )
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DesignError(f"contrast name(s) {dup} used twice; give each contrast its own 'name'")
    return out


def sample_meta(
    adata: Any,
    sample_key: str = "sample_id",
    *,
    columns: Sequence[str] | None = None,
    donor_key: str | None = "donor",
    obs_order: bool = False,
) -> pd.DataFrame:
    """Per-sample sheet columns from ``adata.obs``: the one per-sample metadata builder.

    The workflow copies every sample-sheet column into ``obs``; this recovers the sheet (index
    = sample IDs, values as text) so that the design can be resolved inside a job or a
    notebook, and gives :mod:`sepsis_sc.stats` and :mod:`sepsis_sc.patients` their condition
    and donor per sample.

    Parameters
    ----------
    adata
        AnnData (or anything with ``obs``) holding ``obs[sample_key]``.
    sample_key
        obs column of the sample IDs.
    columns
        None: every obs column that is constant within every sample (columns of floats are
        per-cell measurements and are skipped). Otherwise exactly these columns (absent ones
        skipped), which must be constant within each sample (``ValueError`` names the ones
        that are not); the result then starts with ``donor``: ``obs[donor_key]``, or the
        sample ID when ``donor_key`` is None or not in obs (each sample its own donor).
    donor_key
        obs column of the donors (used with ``columns``).
    obs_order
        Rows in order of first appearance in obs (default: sorted by sample ID).
    """
    obs = adata.obs
    if sample_key not in obs:
        raise KeyError(f"obs[{sample_key!r}] is missing; it comes from the sample sheet")
    codes = obs[sample_key].astype(str).to_numpy()
    if columns is None:
        keep = _constant_columns(obs, sample_key, codes)
    else:
        keep = _checked_columns(obs, sample_key, codes, columns, donor_key)
    meta = obs[keep].astype(str).groupby(codes, observed=True, sort=not obs_order).first()
    meta.index.name = sample_key
    if columns is None:
        return meta
    if donor_key is not None and donor_key in obs:
        return meta.rename(columns={donor_key: "donor"})
    meta.insert(0, "donor", meta.index)
    return meta


def _varies(values: pd.Series, codes: np.ndarray) -> bool:
    """Whether a column takes more than one value (as text) within some sample."""
    return bool(values.astype(str).groupby(codes, observed=True).nunique().max() > 1)


def _constant_columns(obs: pd.DataFrame, sample_key: str, codes: np.ndarray) -> list[str]:
    """The obs columns that are sheet columns: text, constant within every sample."""
    keep = []
    for c in obs.columns:
        if c == sample_key:
            continue
        s = obs[c]
        if s.dtype.kind in "fc":  # per-cell measurements, never sheet columns (those are text)
            continue
        if not _varies(s, codes):
            keep.append(c)
    return keep


def _checked_columns(
    obs: pd.DataFrame,
    sample_key: str,
    codes: np.ndarray,
    columns: Sequence[str],
    donor_key: str | None,
) -> list[str]:
    """The donor column and ``columns`` present in obs; error when one varies in a sample."""
    donor = [donor_key] if donor_key is not None and donor_key in obs else []
    cols = [c for c in dict.fromkeys(columns) if c in obs and c not in (sample_key, donor_key)]
    keep = donor + cols
    bad = [c for c in keep if _varies(obs[c], codes)]
    if bad:
        raise ValueError(
            f"obs column(s) {bad} vary within a sample; sample-sheet columns such as condition "
            f"and donor must be constant per {sample_key} (fix the sample sheet)"
        )
    return keep


def _terms(formula: str) -> list[list[str]]:
    """The formula's right-hand-side terms, each as its list of factor expressions."""
    from formulaic import Formula

    text = formula.strip()
    if not text.startswith("~"):
        raise DesignError(
            f"design formula {formula!r} must start with '~' (e.g. '~ age + condition')"
        )
    try:
        parsed = Formula(text)
    except Exception as err:  # formulaic raises several parser error types
        raise DesignError(f"design formula {formula!r} cannot be parsed: {err}") from err
    out = []
    for term in parsed:
        factors = [str(f) for f in term.factors]
        if factors == ["1"] or not factors:
            continue
        out.append(factors)
    return out


def formula_columns(formula: str) -> list[str]:
    """Sample-sheet columns a formula uses (``C(batch)`` -> ``batch``), in order."""
    cols: list[str] = []
    for factors in _terms(formula):
        for f in factors:
            for name in re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", f):
                if (
                    name not in ("C", "np", "log", "center", "scale", "poly", "Treatment")
                    and name not in cols
                ):
                    cols.append(name)
    return cols


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
        return _feature_design(self, np.asarray(keep, dtype=bool))

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
    """The contrast keywords of the sample-level tests, in one place.

    :func:`sepsis_sc.stats.condition_effects` and :func:`sepsis_sc.stats.composition_test`
    take these as keyword arguments (``case=``, ``control=``, ``contrast=``, ``design=``,
    ``meta=``, ``formula=``, ``paired=``) and build one of these from them.

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
    for factors in _terms(formula):
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


# --------------------------------------------------------------------------------------
# linear model with empirical-Bayes moderated variances
# --------------------------------------------------------------------------------------
def _trigamma_inverse(x: float) -> float:
    """Solve trigamma(y) = x by Newton's method (limma's trigammaInverse)."""
    x = float(x)
    if x > 1e7:
        return 1 / np.sqrt(x)
    if x < 1e-6:
        return 1 / x
    y = 0.5 + 1 / x
    for _ in range(50):
        tri = special.polygamma(1, y)
        dif = tri * (1 - tri / x) / special.polygamma(2, y)
        y += dif
        if -dif / y < 1e-8:
            break
    return y


def squeeze_var(s2: np.ndarray, df: np.ndarray | float) -> tuple[np.ndarray, float]:
    """Empirical-Bayes moderated variances (limma ``squeezeVar`` without covariate).

    ``df`` may differ per feature (features with NA samples have fewer residual degrees of
    freedom). Returns the posterior variances and the prior degrees of freedom ``d0``
    (``inf`` when the sample variances are no more spread than chance: all shrink to the
    common value). With fewer than 3 features nothing is moderated (``d0 = 0``).
    """
    s2 = np.maximum(np.asarray(s2, dtype=float), 1e-12)
    df = np.broadcast_to(np.asarray(df, dtype=float), s2.shape)
    n = s2.size
    if n < 3:
        return s2.copy(), 0.0
    z = np.log(s2)
    e = z - special.digamma(df / 2) + np.log(df / 2)
    emean = e.mean()
    evar = np.sum((e - emean) ** 2) / (n - 1) - np.mean(special.polygamma(1, df / 2))
    if evar > 0:
        d0 = 2 * _trigamma_inverse(evar)
        s0 = np.exp(emean + special.digamma(d0 / 2) - np.log(d0 / 2))
        return (d0 * s0 + df * s2) / (d0 + df), float(d0)
    return np.full_like(s2, np.exp(emean)), float("inf")


def linear_test(
    design: SampleDesign,
    values: pd.DataFrame,
    *,
    moderate: bool = True,
    level: float = 0.95,
) -> pd.DataFrame:
    """Fit ``values ~ design`` per feature and test the case-vs-control coefficient.

    Parameters
    ----------
    design
        From :func:`resolve_design`.
    values
        Units x features (index = ``design.units`` index), on the test scale; NaN = no value
        for that unit (e.g. too few cells). A feature uses the units where it has a value;
        its design is then the design's rows for those units (pairing is kept only for donors
        with both units present; a covariate that becomes constant is dropped).
    moderate
        Moderate the residual variances across features (limma eBayes; needs >= 3 features).
    level
        Confidence level of the interval.

    Returns
    -------
    pandas.DataFrame
        Index = features: ``effect`` (coefficient), ``se``, ``ci_low``, ``ci_high``, ``t``,
        ``df`` (residual + prior), ``pvalue``, ``n_case``, ``n_control`` (units used),
        ``df_resid``, ``d0``, ``note``.
    """
    values = values.reindex(design.units.index)
    rows: list[dict[str, Any]] = []
    fits = []
    for feat in values.columns:
        row, fit = _fit_feature(design, feat, values[feat].to_numpy(float))
        if fit is not None:
            fits.append((len(rows), *fit))
        rows.append(row)
    out = pd.DataFrame(rows).set_index("feature") if rows else pd.DataFrame()
    for c in ("se", "ci_low", "ci_high", "t", "df", "pvalue", "d0"):
        out[c] = np.nan
    if fits:
        _moderated_t(out, fits, moderate=moderate, level=level)
    cols = [
        "effect",
        "se",
        "ci_low",
        "ci_high",
        "t",
        "df",
        "pvalue",
        "n_case",
        "n_control",
        "df_resid",
        "d0",
        "note",
    ]
    return out[cols]


def _fit_feature(
    design: SampleDesign, feat: Any, y: np.ndarray
) -> tuple[dict[str, Any], tuple[float, int, float] | None]:
    """Least-squares fit of one feature on the units where it has a value.

    Returns the feature's row (``effect``, units used, ``df_resid``, ``note``) and, when a
    residual degree of freedom is left, ``(residual variance, df_resid, unscaled variance of
    the coefficient)`` for :func:`_moderated_t`; else None (effect only, or the plain
    difference of group means when the design cannot estimate the contrast on those units).
    """
    X_all = design.matrix
    ok = np.isfinite(y)
    X, note = _feature_design(design, ok)
    n_case = int(X[COEF].sum()) if X is not None else int((X_all[COEF].to_numpy()[ok]).sum())
    n_ctrl = int(ok.sum()) - n_case
    row = {"feature": feat, "n_case": n_case, "n_control": n_ctrl, "note": note}
    yy = y[ok]
    if X is None or n_case == 0 or n_ctrl == 0:
        a, b = yy[X_all[COEF].to_numpy()[ok] == 1], yy[X_all[COEF].to_numpy()[ok] == 0]
        row["effect"] = float(a.mean() - b.mean()) if a.size and b.size else np.nan
        row["df_resid"] = 0
        return row, None
    xm = X.to_numpy()
    xtx_inv = np.linalg.pinv(xm.T @ xm)
    beta = xtx_inv @ xm.T @ yy
    resid = yy - xm @ beta
    j = list(X.columns).index(COEF)
    df_res = xm.shape[0] - xm.shape[1]
    row["effect"] = float(beta[j])
    row["df_resid"] = df_res
    if df_res >= 1:
        return row, (float(resid @ resid) / df_res, df_res, float(xtx_inv[j, j]))
    if not row["note"]:
        row["note"] = "no residual degree of freedom: effect size only, no p-value"
    return row, None


def _moderated_t(
    out: pd.DataFrame, fits: list[tuple[int, float, int, float]], *, moderate: bool, level: float
) -> None:
    """Fill ``se``, ``t``, ``df``, CI, ``pvalue`` and ``d0`` of the fitted rows of ``out``.

    ``fits`` holds ``(row position, residual variance, df_resid, unscaled variance)``; the
    variances are moderated across features (:func:`squeeze_var`) when ``moderate``.
    """
    idx = [f[0] for f in fits]
    s2 = np.array([f[1] for f in fits])
    dfr = np.array([f[2] for f in fits], dtype=float)
    unscaled = np.array([f[3] for f in fits])
    if moderate:
        post, d0 = squeeze_var(s2, dfr)
    else:
        post, d0 = s2, 0.0
    df_tot = dfr + d0 if np.isfinite(d0) else np.full_like(dfr, 1e6)
    se = np.sqrt(post * unscaled)
    eff = out["effect"].to_numpy()[idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = eff / se
    tcrit = stats.t.ppf(0.5 + level / 2, df_tot)
    names = out.index[idx]
    out.loc[names, "se"] = se
    out.loc[names, "t"] = t
    out.loc[names, "df"] = df_tot
    out.loc[names, "ci_low"] = eff - tcrit * se
    out.loc[names, "ci_high"] = eff + tcrit * se
    out.loc[names, "pvalue"] = 2 * stats.t.sf(np.abs(t), df_tot)
    out.loc[names, "d0"] = d0


def _feature_design(design: SampleDesign, ok: np.ndarray) -> tuple[pd.DataFrame | None, str]:
    """Rows of the design for the units with a value; keeps pairing and full rank."""
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
