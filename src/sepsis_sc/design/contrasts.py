"""What a sample-level test compares: contrasts, model formulas and their errors.

* :class:`Contrast`: two values of one sample-sheet column (effect = case vs control), and
  :func:`parse_contrasts`, the run's contrasts from the config;
* :func:`formula_terms` and :func:`formula_columns`: a model formula's right-hand-side
  terms and the sheet columns it uses (parsed by formulaic);
* :data:`COEF`, the name of the case-vs-control coefficient, and :class:`DesignError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: name of the case-vs-control coefficient in every design matrix
COEF = "case_vs_control"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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


def formula_terms(formula: str) -> list[list[str]]:
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
    for factors in formula_terms(formula):
        for f in factors:
            for name in re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", f):
                if (
                    name not in ("C", "np", "log", "center", "scale", "poly", "Treatment")
                    and name not in cols
                ):
                    cols.append(name)
    return cols
