"""Integration: highly variable genes, scVI / Harmony / PCA latent spaces and scib-style metrics.

The stage reads the merged, QC-filtered AnnData (``layers["counts"]`` raw UMI counts,
``X`` log1p CP10k, ``obs`` ``sample_id``/``batch``/``donor``/``condition``) and adds

- ``var["highly_variable"]`` (plus ``highly_variable_rank``, ``highly_variable_nbatches``,
  ``variances_norm``) and ``uns["hvg"]`` (:func:`select_hvgs`, reading the counts through a
  :class:`sepsis_sc.store.CountSource`: in memory, or streamed from the ``.h5ad`` in row
  chunks at cohort scale);
- ``obsm["X_pca"]`` (:func:`run_pca`), ``obsm["X_harmony"]`` (:func:`run_harmony`),
  ``obsm["X_scVI"]`` (:func:`run_scvi`);
- ``uns["integration"]``: method, device (``cpu``/``cuda``), epochs, seed, ... of the
  embedding used downstream (the last one computed; :func:`integrate` is the dispatcher,
  :func:`integrate_methods` runs the downstream method and its comparisons and adds
  ``uns["integration_runs"]``).

:func:`integration_metrics` scores embeddings with the definitions of scib
(Luecken et al. 2022, Nat Methods 19:41) re-implemented here with numpy/scikit-learn, so
no jax-based ``scib-metrics`` is needed. Each metric is scaled to [0, 1], higher = better.

Every step takes :class:`sepsis_sc.config.IntegrationSettings` (the config's
``integration`` section) and keyword overrides of its fields.

One batch level (one sequencing run; ``batch_key: sample_id`` with one sample) is decided from
``obs[batch_key]`` in each function and logged: HVGs are chosen without a batch key, scVI is
trained without a batch covariate, Harmony is skipped as a comparison (or, downstream, writes
the PCA embedding with a warning), and the batch-mixing metrics are skipped with a ``note``.
Records say ``batch_corrected: False`` and why. Two or more levels: nothing changes.

Modules:

* :mod:`~sepsis_sc.integrate.batches`: input checks and the one-batch-level decisions;
* :mod:`~sepsis_sc.integrate.hvg`: :func:`select_hvgs` (scanpy's ``seurat_v3``, bit for bit);
* :mod:`~sepsis_sc.integrate.scvi`: :func:`run_scvi`, :func:`plateau_stopping`,
  :func:`resolve_accelerator`, :func:`default_max_epochs`, ``torch_threads``;
* :mod:`~sepsis_sc.integrate.linear`: :func:`run_pca`, :func:`run_harmony`;
* :mod:`~sepsis_sc.integrate.metrics`: :func:`lisi`, :func:`integration_metrics`;
* :mod:`~sepsis_sc.integrate.run`: :func:`integrate`, :func:`integrate_methods` (the
  downstream method and the ones compared with it).
"""

from __future__ import annotations

# torch before anything that can start numba's OpenMP pool (scanpy's HVG, neighbours, UMAP):
# otherwise torch binds to the system libgomp that numba loaded instead of its own, and scVI
# trains 2-2.5x slower on CPU (measured: 4.2 vs 1.9 s per epoch, 8,000 cells, 2 threads).
try:
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - torch is a dependency; scVI raises its own error
    pass

from sepsis_sc.config import EMBEDDING_KEYS
from sepsis_sc.integrate.batches import ONE_BATCH_NOTE
from sepsis_sc.integrate.hvg import select_hvgs
from sepsis_sc.integrate.linear import run_harmony, run_pca
from sepsis_sc.integrate.metrics import integration_metrics, lisi
from sepsis_sc.integrate.run import integrate, integrate_methods
from sepsis_sc.integrate.scvi import (
    default_max_epochs,
    plateau_stopping,
    resolve_accelerator,
    run_scvi,
)

__all__ = [
    "select_hvgs",
    "resolve_accelerator",
    "default_max_epochs",
    "plateau_stopping",
    "run_scvi",
    "run_pca",
    "run_harmony",
    "integrate",
    "integrate_methods",
    "integration_metrics",
    "lisi",
    "EMBEDDING_KEYS",
    "ONE_BATCH_NOTE",
]
