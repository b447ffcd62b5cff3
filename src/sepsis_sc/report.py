"""Tables for people: rounded numbers, and HTML pages the Snakemake report shows inline.

The workflow's TSVs are for programs and people alike; the report shows each table as an
HTML page (:func:`table_html`) instead of a download link, with numbers rounded to three
significant digits (:func:`round_significant`), the table's description and the path of the
TSV it came from.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["round_significant", "table_html"]


def round_significant(df: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """A copy of ``df`` with every float column rounded to ``digits`` significant digits.

    Integers, strings, booleans and NaN are left as they are; 0.000123456 becomes 0.000123
    and 12345.6 becomes 12300.0 (no switch of scale within a column, unlike ``%g``).
    """
    if digits < 1:
        raise ValueError(f"digits must be >= 1, not {digits}.")
    out = df.copy()
    for col in out.columns:
        if not pd.api.types.is_float_dtype(out[col]):
            continue
        x = out[col].to_numpy(dtype=np.float64, copy=True)
        finite = np.isfinite(x) & (x != 0)
        mag = np.floor(np.log10(np.abs(x[finite])))
        scale = 10.0 ** (digits - 1 - mag)
        x[finite] = np.round(x[finite] * scale) / scale
        out[col] = x
    return out


_CSS = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 1em; color: #222; }
h1 { font-size: 18px; margin: 0 0 0.3em 0; }
p.desc { max-width: 60em; line-height: 1.4; }
p.src { color: #666; font-size: 12px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.long { min-width: 22em; max-width: 40em; }
tr:hover td { background: #fafafa; }
"""


def _cell(value: object) -> tuple[str, bool]:
    """HTML text of one cell and whether it is numeric."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "", False
    if isinstance(value, bool | np.bool_):
        return ("yes" if value else "no"), False
    if isinstance(value, int | np.integer):
        return f"{int(value)}", True
    if isinstance(value, float | np.floating):
        v = float(value)
        text = f"{v:.3g}" if (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6)) else f"{v:,.6g}"
        return text, True
    return html.escape(str(value)), False


def table_html(
    df: pd.DataFrame,
    *,
    title: str,
    description: str = "",
    source: str = "",
    max_rows: int = 500,
    digits: int = 3,
    columns: Sequence[str] | None = None,
) -> str:
    """A self-contained HTML page showing ``df`` (first ``max_rows`` rows) for a person.

    Parameters
    ----------
    df
        The table.
    title, description
        Shown above the table (the description is the report caption of the table).
    source
        Path of the full TSV, named under the title.
    max_rows
        Longer tables are cut, with a line saying how many rows the TSV has.
    digits
        Significant digits of float columns (:func:`round_significant`).
    columns
        Columns to show (default: all).
    """
    shown = round_significant(df if columns is None else df[list(columns)], digits)
    n = len(shown)
    shown = shown.head(max_rows)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    # prose columns (rationale, caveat, meaning) get room to wrap into a few lines, not 20
    long = [
        shown[c].dtype == object and shown[c].astype(str).str.len().mean() > 40
        for c in shown.columns
    ]
    rows = []
    for rec in shown.itertuples(index=False, name=None):
        cells = []
        for v, is_long in zip(rec, long, strict=True):
            text, numeric = _cell(v)
            if numeric:
                cells.append(f'<td class="num">{text}</td>')
            else:
                cells.append(f'<td class="long">{text}</td>' if is_long else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cut = (
        f"<p class='src'>Showing the first {max_rows} of {n} rows; the TSV has them all.</p>"
        if n > max_rows
        else ""
    )
    desc = "".join(
        f"<p class='desc'>{html.escape(par.strip())}</p>"
        for par in description.split("\n\n")
        if par.strip()
    )
    src = f"<p class='src'>Full table: {html.escape(source)} ({n} rows)</p>" if source else ""
    empty = "<p><em>This table is empty.</em></p>" if n == 0 else ""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{desc}{src}{empty}"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{cut}"
        "</body></html>"
    )
