"""Figures of the sepsis-sc stages (``import sepsis_sc.pl as pl``; like scanpy's ``sc.pl``).

* :mod:`sepsis_sc.pl.de`: pseudobulk differential expression (volcano small multiples,
  heatmap of the top genes).
* :mod:`sepsis_sc.pl.patients`: patient immune cards, cohort heatmap, trajectories.

Every function returns a matplotlib Figure; save it with :func:`sepsis_sc.plotting.savefig`.
"""

from sepsis_sc.pl import de, patients

__all__ = ["de", "patients"]
