"""Gene sets and therapy wording in resources/: checks that keep the readouts honest."""

from __future__ import annotations

import pytest
import yaml

from sepsis_sc.resources import resource_path


def _signatures(organism: str) -> list[dict]:
    return yaml.safe_load(resource_path(f"signatures/{organism}.yaml").read_text())


def _genes(sig: dict) -> set[str]:
    return set(sig.get("up", [])) | set(sig.get("down", []))


@pytest.mark.parametrize("organism", ["human", "mouse"])
def test_confounder_checks_share_no_gene_with_the_states_they_check(organism):
    """A confounder check that shares genes with a state agrees with it by construction
    (the glucocorticoid set once carried CD163 and IL1R2 of the MS1 / HLA-DR-low sets)."""
    sigs = _signatures(organism)
    checks = [s for s in sigs if "confounder" in str(s.get("label", ""))]
    assert checks, "no confounder check found (label '... (confounder check)')"
    for check in checks:
        for other in sigs:
            if other is check:
                continue
            shared = _genes(check) & _genes(other)
            assert not shared, f"{check['name']} shares {sorted(shared)} with {other['name']}"


def test_interferon_types_are_kept_apart():
    """The type I IFN score must not recommend the type II interferon (IFN-gamma) as if it
    restored what the score measures."""
    sigs = {s["name"]: s for s in _signatures("human")}
    targets = yaml.safe_load(resource_path("therapy_targets.yaml").read_text())
    for name, target in targets.items():
        label = str(sigs.get(name, {}).get("label", ""))
        if "type I " in label + " ":
            assert "IFN-gamma" not in target["therapy"], (name, target["therapy"])
            assert "type II" in target["rationale"], "say which interferon the score reads"


def test_blood_readouts_say_what_they_cannot_say():
    """Rows whose clinical decision rests on something a blood transcript cannot measure
    (plasma cytokines, flow mHLA-DR) carry a caveat in the table itself."""
    targets = yaml.safe_load(resource_path("therapy_targets.yaml").read_text())
    assert "tissue" in targets["cytokine_storm"]["caveat"]
    assert "plasma" in targets["cytokine_storm"]["caveat"]
    assert "flow" in targets["mono_hladr_low"]["caveat"]
