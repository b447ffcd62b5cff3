"""Locate and load the data files in ``resources/`` (markers, signatures, vocabulary).

The resources live at the repository root (``resources/``) so that they are data, reviewed
like code, with their literature sources beside each set. They are found, in this order:

1. the directory in the environment variable ``SEPSIS_SC_RESOURCES``;
2. ``resources/`` of the checkout this package was installed from (``pip install -e .``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

__all__ = ["resource_dir", "resource_path", "load_yaml"]


def resource_dir() -> Path:
    """Return the directory that holds sepsis-sc's resource files.

    Raises
    ------
    FileNotFoundError
        If neither ``SEPSIS_SC_RESOURCES`` nor the checkout's ``resources/`` exists.
    """
    env = os.environ.get("SEPSIS_SC_RESOURCES")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise FileNotFoundError(
                f"SEPSIS_SC_RESOURCES={env!r} is not a directory; point it at the "
                "'resources/' folder of a sepsis-sc checkout."
            )
        return path
    path = Path(__file__).resolve().parents[2] / "resources"
    if path.is_dir():
        return path
    raise FileNotFoundError(
        "Cannot find sepsis-sc's 'resources/' folder. Install the package from a checkout "
        "with `pip install -e .`, or set SEPSIS_SC_RESOURCES to the resources folder."
    )


def resource_path(*parts: str) -> Path:
    """Path of a file inside the resources directory; raises if it does not exist."""
    path = resource_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"resource file not found: {path}")
    return path


@lru_cache(maxsize=32)
def _load_yaml_cached(path: str, mtime: float) -> Any:
    with open(path) as fh:
        return yaml.safe_load(fh)


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """Load a YAML file (cached on path and modification time)."""
    p = Path(path)
    return _load_yaml_cached(str(p.resolve()), p.stat().st_mtime)
