"""scVI: the device, threads and epochs it trains with, early stopping, and :func:`run_scvi`.

* :func:`resolve_accelerator`, :func:`default_max_epochs`, :func:`torch_threads`: where and
  how long scVI trains;
* :func:`plateau_stopping`: early stopping on the smoothed validation ELBO;
* :func:`run_scvi`: train scVI on the HVG counts and store its latent space and record.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sepsis_sc import store
from sepsis_sc.config import IntegrationSettings
from sepsis_sc.integrate.batches import one_level_batch, require_hvgs, require_obs
from sepsis_sc.store import CountSource

logger = logging.getLogger(__name__)

__all__ = [
    "resolve_accelerator",
    "default_max_epochs",
    "torch_threads",
    "plateau_stopping",
    "run_scvi",
]


# --------------------------------------------------------------------------------------
# devices, threads, epochs
# --------------------------------------------------------------------------------------
def resolve_accelerator(accelerator: Literal["auto", "gpu", "cpu"] = "auto") -> str:
    """Resolve the configured accelerator to the device scVI trains on.

    Parameters
    ----------
    accelerator
        ``"auto"`` (CUDA when PyTorch sees a GPU, else CPU), ``"gpu"`` (``"cuda"`` is an
        alias; must be available) or ``"cpu"``.

    Returns
    -------
    ``"cuda"`` or ``"cpu"``.

    Raises
    ------
    RuntimeError
        ``"gpu"`` requested but no CUDA device is visible to PyTorch.
    ValueError
        Unknown value.
    """
    import torch

    acc = str(accelerator).lower()
    if acc not in {"auto", "gpu", "cuda", "cpu"}:
        raise ValueError(
            f"accelerator must be 'auto', 'gpu' or 'cpu', got {accelerator!r} "
            "(config key integration.accelerator)."
        )
    if acc == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if acc in {"gpu", "cuda"} and not available:
        raise RuntimeError(
            f"accelerator={accelerator!r} was requested but PyTorch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). Run on a "
            "GPU node with a CUDA build of torch, or set integration.accelerator to 'auto' or 'cpu'."
        )
    return "cuda" if available else "cpu"


def default_max_epochs(
    n_cells: int,
    *,
    batch_size: int = 256,
    target_updates: int = 10_000,
    min_epochs: int = 10,
    max_epochs: int = 400,
) -> int:
    """Default number of scVI epochs for ``n_cells`` cells.

    scvi-tools uses ``min(400, round(400 * 20000 / n_cells))``: 400 epochs below 20,000 cells
    and ~62,500 minibatch updates (of 128 cells) above. What matters for convergence is the
    number of gradient updates, not of epochs, and the validation ELBO of scVI flattens well
    before 62,500 updates, so on CPU that default mostly buys time. This rule aims at
    ``target_updates`` minibatch updates (10,000 by default, ~6x fewer), within
    ``[min_epochs, max_epochs]``; early stopping on the validation ELBO (see :func:`run_scvi`)
    then ends training once it stops improving, so the cap is an upper bound, not the cost.

    Parameters
    ----------
    n_cells
        Number of cells trained on.
    batch_size
        Minibatch size.
    target_updates
        Gradient updates to aim for.
    min_epochs, max_epochs
        Bounds on the result.

    Returns
    -------
    Number of epochs.
    """
    if n_cells <= 0:
        raise ValueError(f"n_cells must be positive, got {n_cells}")
    epochs = round(target_updates * batch_size / n_cells)
    return int(min(max_epochs, max(min_epochs, epochs)))


@contextmanager
def torch_threads(threads: int | None):
    """Temporarily set the number of torch intra-op threads (``None``: the CPUs this process
    may use, at most torch's default); yields the number set, restores the previous one."""
    import torch

    previous = torch.get_num_threads()
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS
            threads = os.cpu_count() or 1
        threads = min(threads, previous)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(int(threads))
    try:
        yield int(threads)
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------
# training callbacks
# --------------------------------------------------------------------------------------
def _epoch_logger(max_epochs: int):
    """Lightning callback that logs the ELBOs about 10 times per training (for rule logs)."""
    import lightning.pytorch as pl

    every = max(1, max_epochs // 10)

    class _EpochLogger(pl.Callback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ARG002
            epoch = trainer.current_epoch + 1
            if epoch % every and epoch != max_epochs:
                return
            m = trainer.callback_metrics
            val = m.get("elbo_validation")
            logger.info(
                "scVI epoch %d/%d: ELBO train %.2f, validation %s (%.1f s)",
                epoch,
                max_epochs,
                float(m.get("elbo_train", float("nan"))),
                f"{float(val):.2f}" if val is not None else "n/a",
                time.perf_counter() - self.t0,
            )

    return _EpochLogger()


def plateau_stopping(
    patience: int = 10,
    min_improvement: float = 2e-3,
    window: int = 10,
    monitor: str = "elbo_validation",
):
    """Early stopping when the smoothed validation ELBO has stopped improving.

    After each validation the loss is averaged over the last ``window`` epochs and compared
    with the same average ``patience`` epochs earlier; training stops once it fell by less
    than ``min_improvement`` of its value (relative; default 0.2 % over 10 epochs).

    scvi-tools' rule (stop after ``patience`` epochs without a new best, any improvement
    counting) follows the noise of the per-epoch validation ELBO: a new best by a hundredth
    restarts the count, so on CPU runs of the same cohort it stopped after 152, 217 and 220
    epochs for three training seeds while the loss had flattened near epoch 140. Averaging
    removes that noise and a relative threshold fits cohorts whose ELBO per cell differs
    with depth and gene panel: the same seeds stop after 118-120 epochs with a validation
    ELBO 2.6-5 units (0.4-0.7 %) from the longest run's best, as good as scvi-tools'
    defaults after 400 epochs (docs/benchmarks.md).

    Returns a Lightning callback for ``model.train(callbacks=[...])`` (scvi-tools'
    ``early_stopping`` off); its ``stopped_epoch`` is 0 when it never stopped training.
    """
    import lightning.pytorch as pl

    if patience < 1 or window < 1:
        raise ValueError(f"patience and window must be >= 1, got {patience}, {window}")

    class _PlateauStopping(pl.Callback):
        def __init__(self) -> None:
            self.history: list[float] = []
            self.stopped_epoch = 0

        def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ARG002
            if trainer.sanity_checking or monitor not in trainer.callback_metrics:
                return
            self.history.append(float(trainer.callback_metrics[monitor]))
            h = np.asarray(self.history)
            if h.size < window + patience:
                return
            now = h[-window:].mean()
            then = h[-window - patience : -patience].mean()
            if (then - now) < min_improvement * abs(now):
                trainer.should_stop = True
                self.stopped_epoch = trainer.current_epoch + 1

    return _PlateauStopping()


# --------------------------------------------------------------------------------------
# scVI
# --------------------------------------------------------------------------------------
def run_scvi(
    adata: ad.AnnData,
    settings: IntegrationSettings | None = None,
    *,
    seed: int = 0,
    model_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    counts: CountSource | None = None,
    layer: str | None = "counts",
    key_added: str = "X_scVI",
    **overrides: Any,
) -> dict[str, Any]:
    """Train scVI (Lopez et al. 2018) on the HVG counts and store its latent space.

    The model sees the raw counts of the HVGs (``var["highly_variable"]``, sparse, never
    densified), with ``batch_key`` as the batch and the covariates as extra conditioning
    variables. A random ``1 - train_size`` of cells is held out; their ELBO is checked each
    epoch and, with ``early_stopping``, training stops once it has stopped improving
    (:func:`plateau_stopping`).

    Reproducibility: ``scvi.settings.seed = seed`` seeds Python, NumPy and torch; on CPU with
    the same ``threads`` the same seed gives the same latent space. GPU kernels are not
    bit-reproducible.

    Parameters
    ----------
    adata
        Merged AnnData with HVGs flagged (and raw counts in ``layers[layer]`` unless
        ``counts`` is given).
    settings
        :class:`~sepsis_sc.config.IntegrationSettings` (e.g.
        ``IntegrationSettings.from_config(cfg["integration"])``); ``None``: the defaults.
        The fields used are described below; each may also be passed as a keyword, which
        replaces the field.
    batch_key
        ``obs`` column with the batch to correct (``None``: no batch). When it has one level
        (one sequencing run; or ``sample_id`` with one sample) scVI is trained without a batch
        covariate (``batch_key=None``, the same model) and the record says so
        (``batch_corrected: False``, ``batch_key_requested``, ``note``).
    categorical_covariates, continuous_covariates
        Extra ``obs`` columns regressed out (e.g. ``donor``; ``pct_counts_mt``).
    n_latent, n_layers, n_hidden
        Latent dimensions, hidden layers and units per layer.
    gene_likelihood
        ``"nb"`` (default; UMI data show no zero inflation beyond NB), ``"zinb"``, ``"poisson"``.
    max_epochs
        Upper bound on epochs; ``None`` = :func:`default_max_epochs`.
    early_stopping, early_stopping_patience, early_stopping_min_improvement
        Stop when the validation ELBO, averaged over 10 epochs, improved by less than
        ``early_stopping_min_improvement`` of its value over the last
        ``early_stopping_patience`` epochs (:func:`plateau_stopping`).
    batch_size
        Minibatch size. 256 (scvi-tools uses 128): on 2 CPU cores it trains 1.25x more cells
        per second than 128, and with early stopping it reached a better validation ELBO
        than scvi-tools' defaults in a third of their time (``benchmarks/scvi_cpu.py``,
        docs/benchmarks.md). Larger batches were faster per epoch but needed more epochs.
    train_size
        Fraction of cells used for training; the rest gives the validation ELBO.
    accelerator
        ``"auto"``, ``"gpu"`` or ``"cpu"`` (see :func:`resolve_accelerator`).
    seed
        Random seed.
    model_dir
        Folder to save the trained model to (overwritten); ``None``: not saved.
    threads
        torch CPU threads during training (``None``: the CPUs this process may use, at most
        torch's default). Restored afterwards.
    counts
        The raw counts as a :class:`~sepsis_sc.store.CountSource` holding ``adata``'s cells
        and genes; ``None``: ``adata.layers[layer]`` (:func:`sepsis_sc.store.count_source`).
        Only the HVG columns are read.
    layer
        Layer with raw counts when ``counts`` is not given.
    key_added
        ``obsm`` key of the latent space.

    Returns
    -------
    The integration record, also stored in ``uns["integration"]``: ``method``, ``device``,
    ``epochs_trained``, ``max_epochs``, ``early_stopped``, ``seed``, ``batch_key``,
    ``n_hvg``, ``elbo_train_final``, ``elbo_validation_final``, ``seconds``,
    ``seconds_per_epoch``, ``threads`` and the model settings. Writes ``obsm[key_added]``
    (n_obs x n_latent, float32).
    """
    import scvi  # noqa: F401 - imported first, as always (it sets up torch and lightning)

    p = (settings or IntegrationSettings()).with_overrides(overrides)
    src = store.count_source(adata, counts, layer)
    hvg = require_hvgs(adata)
    keys = _scvi_obs_keys(p.batch_key, p)
    require_obs(adata, keys, "scVI batch/covariate")
    batch_key, one_batch = _scvi_batch_key(adata, p.batch_key)
    if not 0 < p.train_size <= 1:
        raise ValueError(f"train_size must be in (0, 1], got {p.train_size}")
    device = resolve_accelerator(p.accelerator)
    sub = _scvi_input(adata, src, hvg, keys)
    n_train = int(round(sub.n_obs * p.train_size))
    max_epochs = _scvi_max_epochs(p, n_train)
    model, latent, n_threads, seconds = _train_scvi(
        sub,
        p,
        batch_key=batch_key,
        device=device,
        max_epochs=max_epochs,
        n_train=n_train,
        seed=seed,
        threads=threads,
    )
    adata.obsm[key_added] = np.asarray(latent, dtype=np.float32)
    record = _scvi_record(
        adata,
        p,
        model.history,
        key_added=key_added,
        device=device,
        n_threads=n_threads,
        max_epochs=max_epochs,
        seed=seed,
        batch_key=batch_key,
        n_hvg=int(hvg.sum()),
        seconds=seconds,
        one_batch=one_batch,
    )
    if model_dir is not None:
        model.save(str(model_dir), overwrite=True, save_anndata=False)
        record["model_dir"] = str(model_dir)
        logger.info("saved scVI model to %s", model_dir)
    adata.uns["integration"] = record
    _log_scvi_done(record, seconds)
    return record


def _scvi_obs_keys(batch_key: str | None, p: IntegrationSettings) -> list[str]:
    """``obs`` columns the model sees: the batch (first) and the covariates."""
    keys = list(p.categorical_covariates) + list(p.continuous_covariates)
    if batch_key is not None:
        keys = [batch_key] + keys
    return keys


def _scvi_batch_key(adata: ad.AnnData, batch_key: str | None) -> tuple[str | None, dict]:
    """The batch key scVI is set up with and the record's one-batch entries.

    A batch key with one level gives ``None`` (the same model without a batch covariate)
    and ``batch_key_requested``, ``n_batches``, ``batch_corrected: False`` and a ``note``.
    """
    if batch_key is None:
        return None, {}
    return one_level_batch(
        adata,
        batch_key,
        "no batch correction; scVI trained without a batch covariate",
        "batch key %r has one level (%r): training scVI without a batch covariate "
        "(setup_anndata batch_key=None); no batch correction is done",
        {"batch_corrected": False},
    )


def _scvi_input(
    adata: ad.AnnData, src: CountSource, hvg: np.ndarray, keys: list[str]
) -> ad.AnnData:
    """The model's AnnData: raw HVG counts (CSR float32, never densified) and ``obs[keys]``.

    Needs at least 10 cells; cells without HVG counts are logged.
    """
    counts = sp.csr_matrix(src.columns(np.flatnonzero(hvg)), dtype=np.float32)
    sub = ad.AnnData(
        X=counts,
        obs=adata.obs[keys].copy(),
        var=pd.DataFrame(index=adata.var_names[hvg]),
    )
    if sub.n_obs < 10:
        raise ValueError(f"scVI needs at least 10 cells, got {sub.n_obs}")
    empty = np.asarray(sub.X.sum(axis=1)).ravel() == 0
    if empty.any():
        logger.warning("%d cells have no counts in the HVGs", int(empty.sum()))
    return sub


def _scvi_max_epochs(p: IntegrationSettings, n_train: int) -> int:
    """``p.max_epochs``, or :func:`default_max_epochs` for ``n_train`` cells; at least 1."""
    max_epochs = p.max_epochs
    if max_epochs is None:
        max_epochs = default_max_epochs(n_train, batch_size=p.batch_size)
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    return max_epochs


def _train_scvi(
    sub: ad.AnnData,
    p: IntegrationSettings,
    *,
    batch_key: str | None,
    device: str,
    max_epochs: int,
    n_train: int,
    seed: int,
    threads: int | None,
) -> tuple[Any, np.ndarray, int, float]:
    """Seed, set up and train the model on ``sub``; (model, latent, threads, seconds).

    ``scvi.settings.seed`` is set right before the model is built, so nothing else draws
    from the seeded generators in between.
    """
    import scvi

    use_validation = p.train_size < 1
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(
        sub,
        batch_key=batch_key,
        categorical_covariate_keys=list(p.categorical_covariates) or None,
        continuous_covariate_keys=list(p.continuous_covariates) or None,
    )
    model = scvi.model.SCVI(
        sub,
        n_latent=p.n_latent,
        n_layers=p.n_layers,
        n_hidden=p.n_hidden,
        gene_likelihood=p.gene_likelihood,
    )
    # a last minibatch of 1-2 cells breaks BatchNorm: drop it (a different remainder each epoch)
    drop_last = 0 < n_train % p.batch_size < 3
    callbacks = [_epoch_logger(max_epochs)]
    if p.early_stopping and use_validation:
        callbacks.append(
            plateau_stopping(p.early_stopping_patience, p.early_stopping_min_improvement)
        )
    t0 = time.perf_counter()
    with torch_threads(threads) as n_threads:
        logger.info(
            "training scVI on %s (%d threads): %d cells x %d HVGs, batch_key=%s, max_epochs=%d, "
            "batch_size=%d, early_stopping=%s",
            device,
            n_threads,
            sub.n_obs,
            sub.n_vars,
            batch_key,
            max_epochs,
            p.batch_size,
            p.early_stopping,
        )
        model.train(
            max_epochs=max_epochs,
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            train_size=p.train_size,
            batch_size=p.batch_size,
            early_stopping=False,  # replaced by plateau_stopping (callbacks)
            check_val_every_n_epoch=1 if use_validation else None,
            datasplitter_kwargs={"drop_last": True} if drop_last else None,
            enable_progress_bar=False,
            callbacks=callbacks,
        )
        latent = model.get_latent_representation()
    return model, latent, n_threads, time.perf_counter() - t0


def _history_last(history: Mapping[str, pd.DataFrame], name: str) -> float | None:
    """Last value of a training-history metric, ``None`` when it was not logged."""
    if name in history and len(history[name]):
        return float(history[name].iloc[-1, 0])
    return None


def _scvi_record(
    adata: ad.AnnData,
    p: IntegrationSettings,
    history: Mapping[str, pd.DataFrame],
    *,
    key_added: str,
    device: str,
    n_threads: int,
    max_epochs: int,
    seed: int,
    batch_key: str | None,
    n_hvg: int,
    seconds: float,
    one_batch: Mapping[str, Any],
) -> dict[str, Any]:
    """The integration record of a scVI run (``uns["integration"]``)."""
    import scvi

    epochs_trained = int(len(history["elbo_train"]))
    use_validation = p.train_size < 1
    return {
        "method": "scvi",
        "embedding": key_added,
        "device": device,
        "threads": n_threads,
        "epochs_trained": epochs_trained,
        "max_epochs": int(max_epochs),
        "early_stopped": bool(p.early_stopping and use_validation and epochs_trained < max_epochs),
        "seed": int(seed),
        "batch_key": batch_key,
        "categorical_covariates": list(p.categorical_covariates),
        "continuous_covariates": list(p.continuous_covariates),
        "n_hvg": n_hvg,
        "n_cells": int(adata.n_obs),
        "n_latent": int(p.n_latent),
        "n_layers": int(p.n_layers),
        "n_hidden": int(p.n_hidden),
        "gene_likelihood": p.gene_likelihood,
        "batch_size": int(p.batch_size),
        "elbo_train_final": _history_last(history, "elbo_train"),
        "elbo_validation_final": _history_last(history, "elbo_validation"),
        "seconds": round(seconds, 2),
        "seconds_per_epoch": round(seconds / max(epochs_trained, 1), 3),
        "scvi_version": scvi.__version__,
        **one_batch,
    }


def _log_scvi_done(record: Mapping[str, Any], seconds: float) -> None:
    """One log line: device, epochs, early stop, time and validation ELBO."""
    logger.info(
        "scVI done on %s: %d/%d epochs (%s), %.1f s (%.2f s/epoch), validation ELBO %s",
        record["device"],
        record["epochs_trained"],
        record["max_epochs"],
        "early stopped" if record["early_stopped"] else "no early stop",
        seconds,
        record["seconds_per_epoch"],
        record["elbo_validation_final"],
    )
