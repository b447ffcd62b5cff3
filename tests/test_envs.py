"""The per-rule software environment stays consistent with pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~ ;\[]", req.strip(), maxsplit=1)[0].lower()


def _spec(req: str) -> str:
    return re.sub(r"\s+|#.*$", "", req.split(";")[0])[len(_name(req)) :]


def test_conda_env_pins_match_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): _spec(r) for r in project["dependencies"]}
    env_files = sorted((REPO / "workflow" / "envs").glob("*.yaml"))
    assert env_files
    for env_file in env_files:
        env = yaml.safe_load(env_file.read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
        reqs = [r for r in pip if not r.startswith(("-", "torch"))]
        got = {_name(r): _spec(r) for r in reqs}
        missing = set(wanted) - set(got)
        assert not missing, f"{env_file.name} lacks {sorted(missing)} from pyproject.toml"
        differ = {k: (got[k], wanted[k]) for k in wanted if got[k] != wanted[k]}
        assert not differ, f"{env_file.name} pins differ from pyproject.toml: {differ}"
        assert any(r.strip().startswith("-e") for r in pip), "the env must install sepsis_sc itself"


def test_every_rule_declares_the_env():
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        n_rules = len(re.findall(r"^\s*rule\s*\w*\s*:", text, flags=re.M))
        n_conda = text.count('"../envs/sepsis_sc.yaml"')
        if "rule all" in text:
            n_rules -= 1
        assert n_conda >= n_rules, f"{smk.name}: {n_rules} rules but {n_conda} conda directives"
