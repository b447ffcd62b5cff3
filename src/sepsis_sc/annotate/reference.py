"""Reference-based annotation: label transfer with scANVI / scArches, consensus with markers.

The user provides the reference: an ``.h5ad`` (or AnnData) with raw counts and a label column.
Nothing is downloaded. The route (issue #16 item 2):

1. genes shared by reference and query; highly variable genes chosen on the reference;
2. scVI on the reference counts, then scANVI initialised from it
   (:meth:`scvi.model.SCANVI.from_scvi_model`) with the reference labels;
3. the query is mapped with scArches surgery (:meth:`scvi.model.SCANVI.load_query_data`, only
   the new batch's parameters are trained) and classified by the scANVI head;
4. per-cell probability of the best label and uncertainty ``1 - probability``;
5. :func:`annotation_consensus` combines the transferred lineage with the marker-based one and
   returns an agreement table.

CellTypist with a local model (majority voting optional) is
:func:`sepsis_sc.annotate.annotate_celltypist` (:mod:`sepsis_sc.annotate.celltypist`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from sepsis_sc.annotate.celltypist import label_lineages, label_summary
from sepsis_sc.annotate.markers import UNASSIGNED, load_vocabulary
from sepsis_sc.data import counts_csr

logger = logging.getLogger(__name__)

__all__ = ["transfer_labels", "annotation_consensus"]

_UNLABELLED = "Unknown"


def _counts_adata(adata: AnnData, layer: str | None, genes: pd.Index, obs: pd.DataFrame) -> AnnData:
    counts = counts_csr(adata, layer)
    names = pd.Index(adata.var_names.astype(str))
    keep = ~names.duplicated()
    pos = pd.Series(np.flatnonzero(keep), index=names[keep])
    X = sp.csr_matrix(counts[:, pos.reindex(genes).to_numpy()])
    return AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))


def _reference_hvgs(ref: AnnData, n_top: int) -> pd.Index:
    import scanpy as sc

    work = ref.copy()
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    work = work[:, np.asarray((work.X > 0).sum(axis=0)).ravel() >= 3].copy()
    sc.pp.highly_variable_genes(work, n_top_genes=int(min(n_top, work.n_vars)), flavor="seurat")
    return work.var_names[work.var["highly_variable"].to_numpy()]


def _read_reference(reference: AnnData | str | PathLike[str]) -> AnnData:
    if isinstance(reference, AnnData):
        return reference
    path = Path(reference)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference {path} not found; references are never downloaded here: provide an "
            ".h5ad with raw counts and labels."
        )
    import anndata as ad

    return ad.read_h5ad(path)


def _prepare_pair(
    query: AnnData,
    reference: AnnData,
    label_key: str,
    layer: str | None,
    reference_layer: str | None,
    reference_batch_key: str | None,
    n_top_genes: int,
) -> tuple[AnnData, AnnData]:
    """Reference and query count matrices on the reference's HVGs among the shared genes."""
    if label_key not in reference.obs:
        raise KeyError(f"label_key {label_key!r} not in reference.obs ({list(reference.obs)}).")
    shared = pd.Index(reference.var_names.astype(str)).intersection(
        pd.Index(query.var_names.astype(str))
    )
    shared = shared[~shared.duplicated()]
    if len(shared) < 200:
        raise ValueError(
            f"reference and query share only {len(shared)} gene symbols; both need symbols "
            "(sepsis_sc.io.ensure_symbols) of the same organism."
        )
    labels = reference.obs[label_key].astype(object).where(reference.obs[label_key].notna())
    batch = (
        reference.obs[reference_batch_key].astype(str).to_numpy()
        if reference_batch_key
        else "reference"
    )
    ref_obs = pd.DataFrame(
        {"_label": labels.fillna(_UNLABELLED).astype(str).to_numpy(), "_batch": batch},
        index=reference.obs_names.astype(str),
    )
    ref = _counts_adata(reference, reference_layer, shared, ref_obs)
    genes = _reference_hvgs(ref, n_top_genes)
    q_obs = pd.DataFrame(
        {"_label": _UNLABELLED, "_batch": "query"}, index=query.obs_names.astype(str)
    )
    return ref[:, genes].copy(), _counts_adata(query, layer, genes, q_obs)


def _train_and_map(
    ref: AnnData,
    q: AnnData,
    *,
    n_latent: int,
    epochs: Mapping[str, int],
    seed: int,
    accelerator: str,
):
    """scVI -> scANVI on the reference; scArches surgery of the query; the query model."""
    import scvi

    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(ref, batch_key="_batch", labels_key="_label")
    arches = {
        "use_layer_norm": "both",
        "use_batch_norm": "none",
        "encode_covariates": True,
        "dropout_rate": 0.2,
        "n_layers": 2,
    }  # scArches-ready architecture (scvi-tools reference mapping tutorial)
    quiet = {"accelerator": accelerator, "enable_progress_bar": False}
    vae = scvi.model.SCVI(ref, n_latent=n_latent, **arches)
    vae.train(max_epochs=epochs["scvi"], **quiet)
    lvae = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=_UNLABELLED)
    lvae.train(max_epochs=epochs["scanvi"], **quiet)
    scvi.model.SCANVI.prepare_query_anndata(q, lvae)
    qm = scvi.model.SCANVI.load_query_data(q, lvae)
    qm.train(
        max_epochs=epochs["query"],
        plan_kwargs={"weight_decay": 0.0},
        check_val_every_n_epoch=None,
        **quiet,
    )
    return qm


def transfer_labels(
    query: AnnData,
    reference: AnnData | str | PathLike[str],
    *,
    label_key: str,
    layer: str | None = "counts",
    reference_layer: str | None = "counts",
    reference_batch_key: str | None = None,
    label_map: Mapping[str, str] | None = None,
    n_top_genes: int = 2000,
    n_latent: int = 10,
    scvi_epochs: int = 50,
    scanvi_epochs: int = 20,
    query_epochs: int = 50,
    seed: int = 0,
    accelerator: str = "auto",
    key_added: str = "reference",
) -> pd.DataFrame:
    """Transfer labels from a user-provided reference with scANVI and scArches surgery.

    Parameters
    ----------
    query
        Cells x genes (symbols) with raw counts in ``layers[layer]`` or integer ``X``.
    reference
        AnnData or path of an ``.h5ad`` with raw counts and ``obs[label_key]``; cells whose
        label is missing are treated as unlabelled.
    label_key
        Reference ``obs`` column with the labels to transfer.
    layer, reference_layer
        Layers with raw counts (integer ``X`` is used when absent).
    reference_batch_key
        Reference ``obs`` column with batches (donor / sample), if any.
    label_map
        Mapping of reference labels to vocabulary labels or lineages, used for the lineage
        column (see :func:`sepsis_sc.annotate.annotation_agreement`).
    n_top_genes, n_latent
        Highly variable genes (chosen on the reference, among shared genes) and latent size.
    scvi_epochs, scanvi_epochs, query_epochs
        Training epochs of scVI on the reference, of scANVI, and of the query surgery.
    seed
        Random seed (``scvi.settings.seed``).
    accelerator
        Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"``).
    key_added
        Prefix of the written ``obs`` / ``obsm`` keys.

    Returns
    -------
    pandas.DataFrame
        One row per transferred label: ``n_cells``, ``lineage``, ``mean_probability``.

    Notes
    -----
    Writes ``obs``: ``<key>_label``, ``<key>_probability`` (best label's probability),
    ``<key>_uncertainty`` (``1 - probability``), ``<key>_lineage``; ``obsm``:
    ``<key>_latent`` (scArches latent space shared with the reference); ``uns[key]``: genes,
    epochs, reference labels.

    Raises
    ------
    ImportError
        If scvi-tools is not installed.
    FileNotFoundError, KeyError, ValueError
        Missing reference file, label column, or fewer than 200 shared genes.
    """
    try:
        import scvi
    except ImportError as err:  # pragma: no cover - scvi-tools is a dependency
        raise ImportError("transfer_labels needs scvi-tools (pip install scvi-tools).") from err
    ref, q = _prepare_pair(
        query,
        _read_reference(reference),
        label_key,
        layer,
        reference_layer,
        reference_batch_key,
        n_top_genes,
    )
    epochs = {"scvi": scvi_epochs, "scanvi": scanvi_epochs, "query": query_epochs}
    qm = _train_and_map(
        ref, q, n_latent=n_latent, epochs=epochs, seed=seed, accelerator=accelerator
    )
    probs = qm.predict(q, soft=True)
    best = probs.to_numpy().argmax(axis=1)
    label = pd.Series(np.asarray(probs.columns)[best], index=query.obs_names)
    p = probs.to_numpy().max(axis=1).astype(np.float32)
    lineage = label_lineages(label, load_vocabulary(), label_map)
    query.obs[f"{key_added}_label"] = pd.Categorical(label)
    query.obs[f"{key_added}_probability"] = p
    query.obs[f"{key_added}_uncertainty"] = (1.0 - p).astype(np.float32)
    query.obs[f"{key_added}_lineage"] = pd.Categorical(lineage.to_numpy())
    query.obsm[f"{key_added}_latent"] = np.asarray(qm.get_latent_representation(q))
    query.uns[key_added] = {
        "method": "scANVI + scArches surgery (scvi-tools)",
        "scvi_version": scvi.__version__,
        "n_genes": ref.n_vars,
        "n_latent": n_latent,
        "epochs": epochs,
        "reference_labels": sorted(set(ref.obs["_label"]) - {_UNLABELLED}),
        "seed": seed,
    }
    summary = label_summary(label, lineage, p)
    logger.info(
        "scANVI label transfer: %d query cells, %d genes, %d labels, median probability %.2f",
        query.n_obs,
        ref.n_vars,
        len(summary),
        float(np.median(p)),
    )
    return summary


def annotation_consensus(
    adata: AnnData,
    *,
    marker_key: str = "lineage",
    reference_key: str = "reference_lineage",
    probability_key: str | None = "reference_probability",
    min_probability: float = 0.8,
    key_added: str = "consensus_lineage",
) -> pd.DataFrame:
    """Consensus of marker-based and reference-based lineages, with an agreement table.

    Rules per cell: both agree -> that lineage (``agree``); markers Unassigned and the
    reference confident (probability >= ``min_probability``) -> the reference lineage
    (``reference_only``); reference without a lineage -> the marker call (``markers_only``);
    a disagreement -> ``Unassigned`` (``disagree``), never a forced label.

    Returns
    -------
    pandas.DataFrame
        Marker lineage x reference lineage counts; ``.attrs`` holds ``agreement`` (fraction of
        cells with a lineage in both calls that agree) and ``n_compared``.

    Notes
    -----
    Writes ``obs[key_added]`` and ``obs[key_added + "_source"]``.
    """
    for k in (marker_key, reference_key):
        if k not in adata.obs:
            raise KeyError(f"{k!r} not in adata.obs.")
    m = adata.obs[marker_key].astype(str).to_numpy()
    r = adata.obs[reference_key].astype(str).to_numpy()
    p = (
        adata.obs[probability_key].to_numpy(dtype=float)
        if probability_key and probability_key in adata.obs
        else np.ones(adata.n_obs)
    )
    out = np.full(adata.n_obs, UNASSIGNED, dtype=object)
    why = np.full(adata.n_obs, "disagree", dtype=object)
    agree = m == r
    out[agree] = m[agree]
    why[agree] = "agree"
    ref_only = (m == UNASSIGNED) & (r != UNASSIGNED) & (p >= min_probability)
    out[ref_only] = r[ref_only]
    why[ref_only] = "reference_only"
    mk_only = (r == UNASSIGNED) & (m != UNASSIGNED)
    out[mk_only] = m[mk_only]
    why[mk_only] = "markers_only"
    why[(m == UNASSIGNED) & (r == UNASSIGNED)] = "neither"
    why[(m == UNASSIGNED) & (r != UNASSIGNED) & ~ref_only] = "reference_uncertain"
    adata.obs[key_added] = pd.Categorical(out)
    adata.obs[f"{key_added}_source"] = pd.Categorical(why)
    table = pd.crosstab(
        pd.Series(m, name=f"markers:{marker_key}"), pd.Series(r, name=f"reference:{reference_key}")
    )
    both = (m != UNASSIGNED) & (r != UNASSIGNED)
    table.attrs["agreement"] = float(agree[both].mean()) if both.any() else float("nan")
    table.attrs["n_compared"] = int(both.sum())
    logger.info(
        "consensus: %.1f%% agreement over %d cells; %s",
        100 * table.attrs["agreement"],
        table.attrs["n_compared"],
        pd.Series(why).value_counts().to_dict(),
    )
    return table
