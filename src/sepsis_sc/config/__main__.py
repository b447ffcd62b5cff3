"""``python -m sepsis_sc.config``: regenerate the schema tables in ``config/README.md``."""

from pathlib import Path

from sepsis_sc.config.schema import update_config_readme

update_config_readme(Path(__file__).resolve().parents[3] / "config" / "README.md")
