"""scVI on CPU: training throughput and quality of training settings against scvi-tools' defaults.

A simulated cohort (the demo simulator; ``--samples`` samples of ``--cells`` cells, two
batches, no doublets or low-quality cells, planted cell types as labels) is reduced to 2,000
HVGs (seurat_v3 across batches), then scVI is trained with each setting below. For each:
wall seconds of ``train()``, epochs run, throughput (cells x epochs per second), the validation
ELBO of the same held-out 10 % of cells (computed after training, so no setting pays for
per-epoch validation it does not use), and the integration metrics of the latent space
(``sepsis_sc.integrate.integration_metrics``: iLISI, batch ASW, NMI, ARI against the planted
cell types).

Settings:

* ``scvi-tools default``: ``SCVI(adata)`` (1 layer, 10 latent) and ``train()`` with no
  arguments: batch 128, ``min(400, 400 * 20000 / n)`` epochs, no early stopping, torch's
  default thread count;
* ``sepsis-sc default``: ``sepsis_sc.integrate.run_scvi`` defaults (2 layers, 30 latent,
  batch 256, ``default_max_epochs`` with early stopping on the validation ELBO) with
  ``threads`` = the cores;
* variants given with ``--variants``, each ``name:key=value,...`` with keys ``bs`` (batch
  size), ``epochs`` (cap), ``es`` (early stopping 1/0), ``layers``, ``latent``, ``lr``,
  ``threads``, ``mi`` (early stopping's minimum relative improvement of the smoothed
  validation ELBO; 0 = scvi-tools' rule), ``pat`` (its patience) and ``dense`` (1 = densify
  the HVG counts first); unset keys take the
  sepsis-sc defaults. Example: ``b512:bs=512,epochs=200,lr=0.002``.

Usage::

    python benchmarks/scvi_cpu.py --samples 4 --cells 1500 [--out benchmarks/out]
    # more training seeds for the two default rows, added to the saved table
    python benchmarks/scvi_cpu.py --samples 8 --cells 1000 --train-seeds 1 2 --append

``--train-seeds`` trains every setting once per seed (the cohort and the metrics' Leiden seed
stay ``--seed``); ``benchmarks/report.py`` reports the mean over seeds and the spread.

Run with nothing else on the machine: scVI on CPU slows ~10x when another process shares the
cores.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def _cohort(n_samples: int, cells: int, seed: int):
    import anndata as ad

    from sepsis_sc.integrate import select_hvgs
    from sepsis_sc.qc import normalize
    from sepsis_sc.sim import simulate_cohort

    sheet = pd.DataFrame(
        {
            "sample_id": [f"S{i}" for i in range(n_samples)],
            "condition": ["sepsis" if i % 2 == 0 else "control" for i in range(n_samples)],
            "donor": [f"D{i}" for i in range(n_samples)],
            "batch": [f"b{(i // 2) % 2}" for i in range(n_samples)],
        }
    )
    adatas, truth = simulate_cohort(
        sheet,
        cells_per_sample=cells,
        n_genes=12000,
        seed=seed,
        doublets=False,
        low_quality_rate=0.0,
    )
    adata = ad.concat(list(adatas.values()), merge="same")
    adata.obs["cell_type"] = truth.set_index("cell_id").loc[adata.obs_names, "cell_type"].to_numpy()
    adata = adata[:, np.asarray((adata.X > 0).sum(axis=0)).ravel() >= 3].copy()
    adata.layers["counts"] = adata.X.copy()
    normalize(adata)
    select_hvgs(adata, n_hvg=2000, batch_key="batch")
    return adata


def _train(
    adata,
    *,
    n_layers,
    n_latent,
    batch_size,
    max_epochs,
    early_stopping,
    threads,
    seed,
    dense=False,
    lr=None,
    min_improvement=0.0,
    patience=10,
):
    import scvi

    from sepsis_sc.integrate.scvi import torch_threads

    # None = leave torch's own default thread count, as a plain scvi-tools user would
    with contextlib.nullcontext() if threads is None else torch_threads(threads):
        scvi.settings.seed = seed
        hvg = adata[:, adata.var["highly_variable"]].copy()
        if dense:  # minibatches sliced from a dense array instead of a CSR matrix
            hvg.layers["counts"] = np.asarray(hvg.layers["counts"].toarray(), dtype=np.float32)
        scvi.model.SCVI.setup_anndata(hvg, layer="counts", batch_key="batch")
        model = scvi.model.SCVI(hvg, n_layers=n_layers, n_latent=n_latent)
        kwargs = {"enable_progress_bar": False, "accelerator": "cpu"}
        if lr:
            kwargs["plan_kwargs"] = {"lr": lr}
        if batch_size:
            kwargs["batch_size"] = batch_size
        if max_epochs:
            kwargs["max_epochs"] = max_epochs
        if early_stopping and min_improvement:  # sepsis-sc's rule on the smoothed ELBO
            from sepsis_sc.integrate import plateau_stopping

            kwargs.update(
                check_val_every_n_epoch=1, callbacks=[plateau_stopping(patience, min_improvement)]
            )
        elif early_stopping:  # scvi-tools' own rule (patience epochs without a new best)
            kwargs.update(
                early_stopping=True, early_stopping_patience=patience, check_val_every_n_epoch=1
            )
        t0 = time.perf_counter()
        model.train(**kwargs)
        seconds = time.perf_counter() - t0
        epochs = len(model.history["elbo_train"])
        val_idx = model.validation_indices
        elbo_val = float(model.get_elbo(indices=val_idx))
        latent = model.get_latent_representation()
        return seconds, epochs, elbo_val, latent, int(model.train_indices.size)


def _sepsis_defaults(n_train: int, cores: int) -> dict:
    """The settings :func:`sepsis_sc.integrate.run_scvi` uses when given none."""
    from sepsis_sc.config import IntegrationSettings
    from sepsis_sc.integrate import default_max_epochs

    d = IntegrationSettings()
    return dict(
        n_layers=d.n_layers,
        n_latent=d.n_latent,
        batch_size=d.batch_size,
        max_epochs=default_max_epochs(n_train, batch_size=d.batch_size),
        early_stopping=d.early_stopping,
        threads=cores,
        lr=getattr(d, "lr", None),
        min_improvement=d.early_stopping_min_improvement,
        patience=d.early_stopping_patience,
    )


def _variant(spec: str, base: dict) -> tuple[str, dict]:
    """Parse ``name:key=value,...`` into a setting, starting from ``base``."""
    name, _, rest = spec.partition(":")
    keys = {
        "bs": ("batch_size", int),
        "epochs": ("max_epochs", int),
        "layers": ("n_layers", int),
        "latent": ("n_latent", int),
        "lr": ("lr", float),
        "threads": ("threads", int),
        "es": ("early_stopping", lambda v: v == "1"),
        "dense": ("dense", lambda v: v == "1"),
        "mi": ("min_improvement", float),
        "pat": ("patience", int),
    }
    kw = dict(base)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in keys:
            raise SystemExit(f"--variants {spec!r}: unknown key {key!r} (known: {sorted(keys)})")
        field, conv = keys[key]
        kw[field] = conv(value)
    return name, kw


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--cells", type=int, default=1500)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--variants",
        nargs="*",
        default=[],
        help="extra settings name:key=value,... (keys bs, epochs, es, layers, latent, "
        "lr, threads, dense; unset keys take the sepsis-sc defaults)",
    )
    ap.add_argument("--skip-default", action="store_true", help="skip the scvi-tools default run")
    ap.add_argument("--skip-ours", action="store_true", help="skip the sepsis-sc default run")
    ap.add_argument(
        "--cap-epochs",
        type=int,
        default=None,
        help="cap every setting's epochs (smoke tests only: breaks the comparison)",
    )
    ap.add_argument(
        "--train-seeds",
        type=int,
        nargs="+",
        default=None,
        help="scVI training seeds (default: --seed); each setting runs once per seed",
    )
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep the saved rows of other (setting, seed) pairs on the same cohort",
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/out")
    args = ap.parse_args(argv)

    from sepsis_sc.integrate import integration_metrics

    adata = _cohort(args.samples, args.cells, args.seed)
    n = adata.n_obs
    settings = []
    if not args.skip_default:
        settings.append(
            (
                "scvi-tools default",
                dict(
                    n_layers=1,
                    n_latent=10,
                    batch_size=None,
                    max_epochs=None,
                    early_stopping=False,
                    threads=None,
                ),
            )
        )
    sepsis = _sepsis_defaults(int(0.9 * n), args.cores)
    if not args.skip_ours:
        settings.append(("sepsis-sc default", sepsis))
    for v in args.variants:
        settings.append(_variant(v, sepsis))
    if args.cap_epochs:
        for _, kw in settings:
            kw["max_epochs"] = min(kw["max_epochs"] or 400, args.cap_epochs)
    out_file = args.out / "scvi_cpu.tsv"
    args.out.mkdir(parents=True, exist_ok=True)
    kept = pd.DataFrame()
    if args.append and out_file.exists():
        kept = pd.read_csv(out_file, sep="\t")
        if "seed" not in kept:  # tables written before --train-seeds used the cohort seed
            kept.insert(1, "seed", args.seed)
        kept = kept[kept["cells"] == n].drop(
            columns=["speed-up vs scvi-tools default"], errors="ignore"
        )
    rows = []
    runs = [(name, kw, seed) for seed in (args.train_seeds or [args.seed]) for name, kw in settings]
    for name, kw, seed in runs:
        seconds, epochs, elbo_val, latent, n_train = _train(adata, seed=seed, **kw)
        key = "X_" + name.replace(" ", "_")
        adata.obsm[key] = latent
        m = integration_metrics(
            adata, embed_keys=[key], batch_key="batch", label_key="cell_type", seed=args.seed
        ).iloc[0]
        rows.append(
            {
                "setting": name,
                "seed": seed,
                "cells": n,
                "layers/latent": f"{kw['n_layers']}/{kw['n_latent']}",
                "batch_size": kw["batch_size"] or 128,
                "lr": kw.get("lr") or 0.001,
                "max_epochs": kw["max_epochs"] or 400,
                "early_stopping": bool(kw["early_stopping"]),
                "stopping": (
                    f"smoothed ELBO < {kw['min_improvement']:g} over {kw['patience']}"
                    if kw["early_stopping"] and kw.get("min_improvement")
                    else f"no new best in {kw.get('patience', 10)}"
                    if kw["early_stopping"]
                    else "none"
                ),
                "threads": kw["threads"] or "torch default",
                "data": "dense" if kw.get("dense") else "sparse",
                "epochs_run": epochs,
                "train_s": round(seconds, 1),
                "cells_x_epochs_per_s": round(n_train * epochs / seconds),
                "elbo_validation": round(elbo_val, 1),
                "ilisi": round(float(m["ilisi"]), 3),
                "batch_asw": round(float(m["batch_asw"]), 3),
                "nmi": round(float(m["nmi"]), 3),
                "ari": round(float(m["ari"]), 3),
            }
        )
        print(rows[-1], flush=True)
        new = pd.DataFrame(rows)
        if len(kept):
            done = set(zip(new["setting"], new["seed"], strict=True))
            old = kept[
                [(a, b) not in done for a, b in zip(kept["setting"], kept["seed"], strict=True)]
            ]
            new = pd.concat([old, new], ignore_index=True)
        new.to_csv(out_file, sep="\t", index=False)
    table = new
    if "scvi-tools default" in set(table["setting"]):
        base = table.loc[table["setting"] == "scvi-tools default", "train_s"].mean()
        table["speed-up vs scvi-tools default"] = (base / table["train_s"]).round(2)
    table.to_csv(out_file, sep="\t", index=False)
    print(table.to_string(index=False))
    return None


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main(sys.argv[1:])
