"""Config and sample-sheet validation: bad input fails early and names the problem."""

from __future__ import annotations

import pandas as pd
import pytest

from sepsis_sc.config import (
    ConfigError,
    SampleSheetError,
    check_sample_inputs,
    load_config,
    load_samples,
    validate_config,
    validate_samples,
)


def _sheet(**overrides):
    rows = [
        {"sample_id": "A", "condition": "sepsis", "donor": "d1", "batch": "b1", "path": "a.h5"},
        {"sample_id": "B", "condition": "control", "donor": "d2", "batch": "b1", "path": "b.h5"},
    ]
    df = pd.DataFrame(rows)
    for k, v in overrides.items():
        df[k] = v
    return df


def test_default_config_is_valid_and_fills_defaults(repo_root):
    cfg = load_config(repo_root / "config" / "config.yaml")
    assert cfg["run_name"] == "demo"
    assert cfg["contrast"] == {
        "column": "condition",
        "case": "sepsis",
        "control": "control",
        "design": None,
        "paired": None,
    }
    assert cfg["contrasts"] is None and cfg["stats"]["design"] is None
    # a key absent from a minimal config comes from the schema default
    minimal = validate_config({"run_name": "x"})
    assert minimal["clustering"]["resolution"] == 1.0
    assert minimal["integration"]["accelerator"] == "auto"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"clustering": {"resolution": -1}}, "clustering.resolution"),
        ({"organism": "rat"}, "organism"),
        ({"qc": {"nmad_counts": 3}}, "qc.nmad_counts"),
        ({"integration": {"accelerator": "tpu"}}, "integration.accelerator"),
        ({"run_name": "bad name/with slash"}, "run_name"),
        ({"contrast": {"case": "x", "control": "x"}}, "contrast.case"),
        ({"clustering": {"resolution": 0.5, "resolutions": [1.0, 2.0]}}, "clustering.resolution"),
    ],
)
def test_bad_config_names_the_key(config, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        validate_config(config)


def test_bad_value_message_shows_value_and_expectation():
    with pytest.raises(ConfigError) as err:
        validate_config({"organism": "rat"})
    msg = str(err.value)
    assert "'rat'" in msg and "human" in msg and "mouse" in msg


def test_sample_sheet_duplicate_ids():
    sheet = pd.concat([_sheet(), _sheet().iloc[[0]]], ignore_index=True)
    with pytest.raises(SampleSheetError, match="duplicate sample_id.*A"):
        validate_samples(sheet, validate_config({}))


def test_sample_sheet_missing_column():
    with pytest.raises(SampleSheetError, match="missing required column.*donor"):
        validate_samples(_sheet().drop(columns="donor"), validate_config({}))


def test_sample_sheet_contrast_values_must_exist():
    from sepsis_sc.design import DesignError, check_designs, parse_contrasts

    cfg = validate_config({"contrast": {"case": "septic_shock"}})
    sheet = validate_samples(_sheet(), cfg)
    with pytest.raises(DesignError, match="condition == 'septic_shock'.*values present"):
        check_designs(sheet, parse_contrasts(cfg), "~ condition")


def test_contrast_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="'contrast.case' and 'contrast.control' are both"):
        validate_config({"contrast": {"case": "x", "control": "x"}})
    with pytest.raises(ConfigError, match="must start with '~'"):
        validate_config({"stats": {"design": "age + condition"}})
    with pytest.raises(ConfigError, match="'rank' cannot adjust"):
        validate_config({"stats": {"design": "~ age + condition", "test": "rank"}})
    cfg = validate_config({"contrast": None})
    assert cfg["contrast"] is None
    cfg = validate_config({"contrasts": [{"case": "T6", "control": "T0", "column": "timepoint"}]})
    assert cfg["contrasts"][0]["column"] == "timepoint"


def test_sample_sheet_bad_checksum_names_row():
    sheet = _sheet(checksum=["sha256:abc", ""])
    with pytest.raises(SampleSheetError, match="row 1.*'A'.*checksum"):
        validate_samples(sheet, validate_config({}))


def test_sample_sheet_ids_must_be_filename_safe():
    sheet = _sheet()
    sheet.loc[0, "sample_id"] = "a b/c"
    with pytest.raises(SampleSheetError, match="file names"):
        validate_samples(sheet, validate_config({}))


def test_sample_sheet_reserved_id():
    sheet = _sheet()
    sheet.loc[1, "sample_id"] = "merged"
    with pytest.raises(SampleSheetError, match="'merged'.*reserved"):
        validate_samples(sheet, validate_config({}))


def test_missing_input_files_are_listed(tmp_path):
    (tmp_path / "a.h5").write_text("x")
    samples = validate_samples(_sheet(), validate_config({}))
    with pytest.raises(SampleSheetError, match="B: b.h5"):
        check_sample_inputs(samples, base=tmp_path)
    # produced by the workflow (demo) or downloadable: fine
    check_sample_inputs(samples, produced=["b.h5"], base=tmp_path)
    samples.loc["B", "url"] = "https://example.org/b.h5"
    check_sample_inputs(samples, base=tmp_path)


def test_demo_sheet_is_valid(repo_root):
    cfg = load_config(repo_root / "config" / "config.yaml")
    samples = validate_samples(load_samples(repo_root / cfg["samples"]), cfg)
    assert len(samples) >= 8
    assert (samples.groupby(["batch", "condition"]).size() >= 2).all()
    assert set(samples["condition"]) == {"sepsis", "control"}
    assert samples["batch"].nunique() == 2
    # the batch is not confounded with condition
    assert (samples.groupby("batch")["condition"].nunique() == 2).all()


def test_command_line_strings_are_coerced_to_schema_types():
    cfg = validate_config(
        {
            "integration": {"max_epochs": "30", "early_stopping": "false"},
            "qc": {"max_pct_mt": "null"},
        }
    )
    assert cfg["integration"]["max_epochs"] == 30
    assert cfg["integration"]["early_stopping"] is False
    assert cfg["qc"]["max_pct_mt"] is None
    with pytest.raises(ConfigError, match="integration.max_epochs"):
        validate_config({"integration": {"max_epochs": "thirty"}})


def test_config_readme_documents_every_key(repo_root):
    """config/README.md embeds the tables generated from the schemas (regenerate if this fails:
    see the comment in the file)."""
    from sepsis_sc.config import schema_markdown

    text = (repo_root / "config" / "README.md").read_text()
    assert schema_markdown("config") in text
    assert schema_markdown("samples") in text
