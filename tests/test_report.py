"""Tables for people: rounding and the HTML pages the report shows inline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sepsis_sc.report import round_significant, table_html
from sepsis_sc.utils import write_table


def test_round_significant_keeps_three_digits_and_leaves_other_columns():
    df = pd.DataFrame(
        {
            "effect": [0.123456789, -12345.6789, 0.0, np.nan],
            "p": [1.23456e-10, 0.0499999, 1.0, 0.5],
            "n": [1, 2, 3, 4],
            "label": ["a", "b", "c", "d"],
        }
    )
    out = round_significant(df)
    assert out["effect"].tolist()[:3] == [0.123, -12300.0, 0.0] and np.isnan(out["effect"][3])
    assert out["p"].tolist() == [1.23e-10, 0.05, 1.0, 0.5]
    assert out["n"].tolist() == [1, 2, 3, 4] and out["label"].tolist() == list("abcd")
    assert df["effect"][0] == 0.123456789, "the input is not modified"
    with pytest.raises(ValueError, match="digits"):
        round_significant(df, 0)


def test_write_table_rounds_only_when_asked(tmp_path):
    df = pd.DataFrame({"effect": [0.123456789], "fdr": [3.14159e-7]})
    write_table(df, tmp_path / "full.tsv")
    write_table(df, tmp_path / "people.tsv", digits=3)
    assert "0.123456789" in (tmp_path / "full.tsv").read_text()
    text = (tmp_path / "people.tsv").read_text()
    assert text.splitlines()[1] == "0.123\t3.14e-07"


def test_table_html_is_a_readable_page():
    df = pd.DataFrame(
        {"state": ["<T exhaustion>", "DC"], "effect": [0.45678, -1.23456], "ok": [True, False]}
    )
    page = table_html(
        df,
        title="Therapy targets",
        description="Para one.\n\nPara two.",
        source="results/x/therapy_targets.tsv",
    )
    assert page.startswith("<!DOCTYPE html>") and "<h1>Therapy targets</h1>" in page
    assert "&lt;T exhaustion&gt;" in page, "cell text is escaped"
    assert "0.457" in page and "-1.23" in page and "0.45678" not in page
    assert page.count("<p class='desc'>") == 2 and "results/x/therapy_targets.tsv" in page
    assert "<td>yes</td>" in page and "<td>no</td>" in page
    long = pd.DataFrame({"i": range(20)})
    cut = table_html(long, title="t", max_rows=5)
    assert cut.count("<tr>") == 6 and "first 5 of 20 rows" in cut
    assert "This table is empty" in table_html(long.head(0), title="t")
