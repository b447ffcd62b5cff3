"""Figures of the sepsis-sc stages (``import sepsis_sc.pl as pl``; like scanpy's ``sc.pl``).

Every figure of the library is here, one module per stage module: ``sepsis_sc.pl.<stage>``
draws what ``sepsis_sc.<stage>`` computes. The stage modules hold the science and import no
matplotlib (``tests/test_architecture.py`` checks this).

* :mod:`sepsis_sc.pl.qc`: per-sample QC violins, counts-vs-genes scatter, removed cells.
* :mod:`sepsis_sc.pl.integrate`: integration metrics bars, UMAP of each embedding.
* :mod:`sepsis_sc.pl.cluster`: Leiden resolution summary, cluster UMAPs.
* :mod:`sepsis_sc.pl.annotate`: marker dot plot, UMAP by cell type.
* :mod:`sepsis_sc.pl.stats`: forest plot, per-sample values, state-score UMAPs,
  composition bars, therapy-target summary.
* :mod:`sepsis_sc.pl.de`: pseudobulk differential expression (volcano small multiples,
  heatmap of the top genes).
* :mod:`sepsis_sc.pl.ccc`: therapy axes x samples (z vs controls).
* :mod:`sepsis_sc.pl.patients`: patient immune cards, cohort heatmap, trajectories.
* :mod:`sepsis_sc.pl.style`: the shared palettes (``lineage_palette``,
  ``cell_type_palette``, ``condition_palette``), :func:`~sepsis_sc.pl.style.set_style` and
  :func:`~sepsis_sc.pl.style.savefig`.

Every figure function returns a matplotlib Figure and writes nothing; save it with
:func:`sepsis_sc.pl.style.savefig`. ``pl`` only draws: what a figure shows is computed by its
stage (e.g. :func:`sepsis_sc.annotate.dotplot_markers` for :func:`pl.annotate.marker_dotplot`).

Submodules are imported on first use, so ``import sepsis_sc.pl`` loads neither matplotlib nor
the stage modules.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = {"annotate", "ccc", "cluster", "de", "integrate", "patients", "qc", "stats", "style"}

__all__ = sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'sepsis_sc.pl' has no attribute {name!r}")
