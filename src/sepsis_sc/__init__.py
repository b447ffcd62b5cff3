"""sepsis-sc: sepsis single-cell immunophenotyping.

Library functions operate on :class:`anndata.AnnData` objects and write into the slots
documented in ``docs/architecture.md``. The Snakemake workflow in this repository calls the
same functions, so every pipeline step can be reproduced from a notebook.

Modules are imported lazily so that ``import sepsis_sc`` stays cheap::

    import sepsis_sc as ss
    ss.annotate.annotate(adata, organism="human")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "annotate",
    "cluster",
    "config",
    "data",
    "de",
    "design",
    "download",
    "integrate",
    "io",
    "patients",
    "pl",
    "qc",
    "store",
    "resources",
    "score",
    "sim",
    "stats",
}

__all__ = sorted(_SUBMODULES) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'sepsis_sc' has no attribute {name!r}")
