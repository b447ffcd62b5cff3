"""Shared pytest fixtures.

Real data sets live in ``../shared/data`` beside the repository (tests and benchmarks only;
never committed). Tests that need them use :func:`shared_file` and skip with a clear reason
when the folder is absent, as it is in a user's clone.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SEPSIS_SC_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_file(name: str) -> Path:
    """Return ``../shared/data/<name>`` or skip the calling test when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data set {name} not found in {SHARED_DATA} (tests-only data)")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_run_started(tmp_path_factory):
    """The tiny demo's whole DAG, started in the background (``test_workflow.TinyRun``)."""
    from test_workflow import TinyRun

    return TinyRun(tmp_path_factory.mktemp("e2e"))


@pytest.fixture(scope="session")
def tiny_run(tiny_run_started) -> Path:
    """The finished tiny-demo run's working directory, read-only for its users: the
    end-to-end checks of ``test_workflow.py`` and the local twin of the SLURM run."""
    return tiny_run_started.wait()


def kang_pseudo_samples(a, split: str, seed: int = 0):
    """Kang PBMC (ctrl vs IFN-beta stim; no donor for most cells) split into pseudo-samples,
    the replicates of the DE and therapy-axis positive / negative controls:
    ``split="stim"`` ctrl vs stim, 3 random pseudo-samples each (``obs`` ``condition``,
    ``sample_id``); ``split="null"`` ctrl cells only, 6 random pseudo-samples, 3 called "a"
    and 3 "b". A control of the machinery, not biology."""
    import numpy as np

    rng = np.random.default_rng(seed)
    stim = a.obs["stim"].astype(str).to_numpy()
    if split == "null":
        a = a[stim == "ctrl"].copy()
        k = rng.integers(0, 6, a.n_obs)
        a.obs["condition"] = np.where(k < 3, "a", "b")
        a.obs["sample_id"] = [f"s{i}" for i in k]
    else:
        a.obs["condition"] = stim
        a.obs["sample_id"] = [f"{s}{i}" for s, i in zip(stim, rng.integers(0, 3, a.n_obs))]
    return a
