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
