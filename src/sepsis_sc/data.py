"""The data contract: where raw counts live, what counts are, which organism, log-CP10k.

Every stage reads its input through these functions, so one rule decides each question:

* :func:`get_counts`: the raw-count matrix, from ``layers["counts"]`` (or a named layer) or,
  when that layer is absent, from an integer-valued ``X``; with the slot it came from.
* :func:`check_counts`: raise unless a matrix holds raw counts (finite, non-negative,
  whole numbers), with one message per problem that names the sample and the source.
* :func:`looks_like_counts`: whether ``X`` still holds unnormalised counts (a stage that
  needs log-normalised ``X`` refuses it).
* :func:`detect_organism`, :func:`organism_evidence`, :func:`resolve_organism`: human or
  mouse from the gene names (Ensembl ID prefixes, ``MT-``/``mt-`` genes, well-known probe
  genes, the case of the symbols), and the mismatch errors (mouse genes under
  ``organism: human`` ...).
* :func:`log_normalise`: ``log1p(CP10k)``, size factors from all genes.
* :func:`pseudobulk`: counts summed per group of cells (from a
  :class:`sepsis_sc.store.CountSource`), and :func:`log2cpm` of such sums.
* :func:`require_layer`: a layer that must be present, with the fix in the error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    from sepsis_sc.store import CountSource

logger = logging.getLogger(__name__)

__all__ = [
    "NoRawCountsError",
    "OrganismEvidence",
    "check_counts",
    "counts_layer",
    "detect_organism",
    "get_counts",
    "log_normalise",
    "log2cpm",
    "looks_like_counts",
    "organism_evidence",
    "pseudobulk",
    "require_layer",
    "resolve_organism",
]

#: the fix named when no raw counts are found
_COUNTS_FIX = (
    "give raw UMI counts (the 10x filtered matrix, or keep them in adata.layers['counts'] "
    "before normalising: adata.layers['counts'] = adata.X.copy())"
)

#: well-known, broadly expressed genes (human HGNC spelling) used to guess the organism.
#: Mouse spellings are the MGI names (title case, ``mt-`` for mitochondrial genes).
ORGANISM_PROBES: dict[str, str] = {
    "PTPRC": "Ptprc",
    "CD3E": "Cd3e",
    "CD3D": "Cd3d",
    "CD74": "Cd74",
    "CD14": "Cd14",
    "CD79A": "Cd79a",
    "NKG7": "Nkg7",
    "ACTB": "Actb",
    "GAPDH": "Gapdh",
    "B2M": "B2m",
    "MALAT1": "Malat1",
    "TMSB4X": "Tmsb4x",
    "FTL": "Ftl1",
    "RPL13": "Rpl13",
    "RPS27A": "Rps27a",
    "EEF1A1": "Eef1a1",
    "MT-CO1": "mt-Co1",
    "MT-CO2": "mt-Co2",
    "MT-ND1": "mt-Nd1",
    "MT-CYB": "mt-Cytb",
    "MT-ATP6": "mt-Atp6",
}


class NoRawCountsError(ValueError, KeyError):
    """No raw counts where they were looked for (a ``ValueError`` and a ``KeyError``).

    Both bases, so callers that caught the missing layer (``KeyError``) and those that
    caught non-count values (``ValueError``) keep working.
    """

    __str__ = ValueError.__str__  # KeyError would quote the message


# --------------------------------------------------------------------------------------
# counts
# --------------------------------------------------------------------------------------
def _stored_values(x: Any, max_values: int | None) -> np.ndarray:
    """Stored values of a sparse or dense matrix; at most ``max_values``, evenly spaced."""
    values = x.data if sp.issparse(x) else np.asarray(x).ravel()
    values = np.asarray(values)
    if max_values is not None and values.size > max_values:
        step = -(-values.size // max_values)  # ceil: never more than max_values
        values = values[::step]
    return values


def _who(sample_id: str | None, source: str | None) -> str:
    what = " ".join(
        s
        for s in (f"sample {sample_id}" if sample_id else "", f"({source})" if source else "")
        if s
    )
    return what or "the count matrix"


def counts_csr(
    adata: ad.AnnData, layer: str | None = "counts", *, max_values: int | None = 100_000
):
    """Raw counts (:func:`get_counts`, checked) as a CSR float32 matrix, for stages that
    normalise counts themselves (annotation, reference mapping, the marker dot plot).

    ``scipy.sparse.csr_matrix(x, dtype=float32)``: no copy when ``x`` is CSR float32
    already, so the caller must not modify it in place.
    """
    x, _ = get_counts(adata, layer, max_values=max_values)
    return sp.csr_matrix(x, dtype=np.float32)


def check_counts(
    adata_or_matrix: ad.AnnData | sp.spmatrix | np.ndarray,
    *,
    sample_id: str | None = None,
    source: str | None = None,
    layer: str | None = None,
    max_values: int | None = None,
) -> None:
    """Raise ``ValueError`` unless the matrix holds raw counts (finite non-negative integers).

    Parameters
    ----------
    adata_or_matrix
        An AnnData (``X``, or ``layers[layer]`` when ``layer`` is given) or a sparse/dense
        matrix.
    sample_id, source
        Named in the error message, so that the user knows which sample/file/slot is wrong.
    layer
        Layer to check for an AnnData (default ``X``).
    max_values
        Check at most this many stored values, evenly spaced over the matrix (None: all).

    Raises
    ------
    ValueError
        One message per problem, checked in this order: non-finite values (NaN/inf),
        negative values (scaled or batch-corrected data), non-integer values
        (log-normalised or scaled data). Each names an example value and the fix.
    """
    if isinstance(adata_or_matrix, ad.AnnData):
        x = adata_or_matrix.layers[layer] if layer else adata_or_matrix.X
    else:
        x = adata_or_matrix
    values = _stored_values(x, max_values)
    what = _who(sample_id, source)
    if values.size == 0:
        return
    finite = np.isfinite(values)
    if not finite.all():
        bad = values[~finite][0]
        raise ValueError(
            f"{what} contains non-finite values (e.g. {bad}); give raw UMI counts "
            '(the 10x filtered matrix or layers["counts"]).'
        )
    neg = values < 0
    if neg.any():
        raise ValueError(
            f"{what} contains negative values (e.g. {values[neg][0]:g}), so it is not raw "
            "counts (scaled or batch-corrected data?); give raw UMI counts (the 10x filtered "
            'matrix or layers["counts"]).'
        )
    frac = values != np.round(values)
    if frac.any():
        raise ValueError(
            f"{what} contains non-integer values (e.g. {values[frac][0]:.4g}); it looks "
            "log-normalised or scaled, not raw counts. Give raw UMI counts (the 10x filtered matrix, or the "
            'h5ad\'s layers["counts"]).'
        )


def get_counts(
    adata: ad.AnnData,
    layer: str | None = "counts",
    *,
    check: bool = True,
    max_values: int | None = 1_000_000,
    sample_id: str | None = None,
) -> tuple[Any, str]:
    """The raw-count matrix and the slot it came from.

    ``layers[layer]`` when present; otherwise ``X`` when ``X`` is integer-valued (finite,
    non-negative whole numbers). The matrix is returned as stored (not copied).

    Parameters
    ----------
    adata
        The AnnData.
    layer
        Layer holding raw counts (default ``"counts"``); None looks at ``X`` only.
    check
        Also check that the layer found holds raw counts (:func:`check_counts`).
    max_values
        Stored values checked (evenly spaced; None: all).
    sample_id
        Named in error messages (default: the first three of ``obs["sample_id"]``).

    Returns
    -------
    tuple
        The matrix and its slot: ``'layers["counts"]'`` or ``"X"``.

    Raises
    ------
    NoRawCountsError
        When ``layers[layer]`` is absent and ``X`` is not integer-valued (the message says
        why X was refused and how to keep counts).
    ValueError
        When ``check`` and the layer holds no raw counts.
    """
    if sample_id is None and "sample_id" in adata.obs and adata.n_obs:
        sample_id = ", ".join(pd.unique(adata.obs["sample_id"].astype(str))[:3])
    if layer is not None and layer in adata.layers:
        slot = f'layers["{layer}"]'
        x = adata.layers[layer]
        if check:
            check_counts(x, sample_id=sample_id, source=slot, max_values=max_values)
        return x, slot
    try:
        check_counts(adata.X, sample_id=sample_id, source="X", max_values=max_values)
    except ValueError as err:
        where = f'layers["{layer}"] is absent and X' if layer is not None else "X"
        raise NoRawCountsError(
            f"no raw counts found: {where} does not hold raw counts ({err}). Keep raw UMI "
            "counts in adata.layers['counts'] (as ingest does: adata.layers['counts'] = "
            "adata.X.copy() before normalising)"
            + (" or pass layer=<name of the raw-count layer>" if layer is not None else "")
            + "."
        ) from err
    if layer is not None:
        logger.info('layers["%s"] absent; using integer-valued X as raw counts', layer)
    return adata.X, "X"


def pseudobulk(
    counts: CountSource,
    groups: np.ndarray | Sequence[np.ndarray],
    n_groups: int | Sequence[int],
    *,
    chunk_rows: int = 10_000,
) -> np.ndarray | list[np.ndarray]:
    """Counts summed per group of cells: ``(n_groups, n_genes)`` float64, exact for counts.

    The one pseudobulk of the pipeline (per sample, per sample x label, per state's parent
    cells): ``groups`` gives each cell's group code (0..n_groups-1; -1 leaves the cell out).
    Several groupings (a list of code vectors and a list of sizes) are summed in the same
    pass and returned as a list. The matrix is read in row chunks of ``chunk_rows`` from
    ``counts`` (:class:`sepsis_sc.store.CountSource`, in memory or streamed from the file),
    only the rows some grouping selects, each chunk copied to float64 only while it is
    summed, so neither the selected rows nor a float64 copy of the matrix is ever made.
    """
    many = not isinstance(groups, np.ndarray)
    codes = [np.asarray(g) for g in groups] if many else [np.asarray(groups)]
    sizes = [int(n) for n in n_groups] if many else [int(n_groups)]
    for c in codes:
        if c.shape != (counts.shape[0],):
            raise ValueError(
                f"group codes for {c.shape[0]} cells; the counts hold {counts.shape[0]}"
            )
    totals = [np.zeros((n, counts.shape[1])) for n in sizes]
    wanted = (
        np.logical_or.reduce([c >= 0 for c in codes]) if codes else np.zeros(counts.shape[0], bool)
    )
    if not wanted.any():
        return totals if many else totals[0]
    for start, stop, chunk in counts.chunks(chunk_rows, rows=wanted):
        if not chunk.shape[0]:
            continue
        block = chunk.astype(np.float64)  # exact integer sums
        for c, n, total in zip(codes, sizes, totals, strict=True):
            g = c[start:stop][wanted[start:stop]]
            sel = np.flatnonzero(g >= 0)
            if sel.size:
                ind = sp.csr_matrix((np.ones(sel.size), (g[sel], sel)), shape=(n, block.shape[0]))
                total += (ind @ block).toarray()
    return totals if many else totals[0]


def log2cpm(sums: Any, prior_count: float = 1.0) -> Any:
    """``log2(CPM + prior_count)`` of units x genes summed counts (library size = the row's
    total over all genes, at least 1): the pipeline's one log-CPM (sample tables, patient
    readouts, DE heatmaps). A DataFrame stays a DataFrame; sparse input becomes dense."""
    if isinstance(sums, pd.DataFrame):
        return pd.DataFrame(
            log2cpm(sums.to_numpy(dtype=float), prior_count), index=sums.index, columns=sums.columns
        )
    x = sums.toarray() if sp.issparse(sums) else np.asarray(sums, dtype=float)
    lib = np.maximum(x.sum(axis=1), 1.0)
    return np.log2(x * (1e6 / lib[:, None]) + prior_count)


def looks_like_counts(x: Any, *, max_values: int = 100_000, min_max: float = 30.0) -> bool:
    """Whether a matrix still holds unnormalised counts (for stages that need log data).

    True when the first ``max_values`` stored values are whole numbers and their maximum
    exceeds ``min_max``: log1p(CP10k) never reaches 30, while any real count matrix has
    genes above it. Integer-valued data with small values (binarised, toy) are not
    called counts.

    Parameters
    ----------
    x
        Sparse or dense matrix.
    max_values
        Leading stored values inspected.
    min_max
        The largest value must exceed this.

    Returns
    -------
    bool
    """
    vals = x.data[:max_values] if sp.issparse(x) else np.asarray(x).ravel()[:max_values]
    vals = np.asarray(vals)
    return bool(vals.size) and np.allclose(vals, np.round(vals)) and float(vals.max()) > min_max


def require_layer(adata: ad.AnnData, layer: str, *, why: str = "this step needs it") -> Any:
    """``adata.layers[layer]``, or a ``KeyError`` that says how to create it.

    Parameters
    ----------
    adata
        The AnnData.
    layer
        Layer name.
    why
        Why the layer is needed, for the message.

    Returns
    -------
    The layer's matrix.
    """
    if layer not in adata.layers:
        have = list(adata.layers) or "none"
        raise KeyError(
            f"adata.layers[{layer!r}] is missing ({why}; layers present: {have}). Raw UMI "
            "counts belong in layers['counts'] (qc_merge keeps them there). If your object "
            "has counts in X, run adata.layers['counts'] = adata.X.copy() before normalising."
        )
    return adata.layers[layer]


def counts_layer(adata: ad.AnnData | Iterable[str], preferred: str | None = "counts") -> str:
    """The count layer the stages after QC read: ``preferred`` when ``adata`` has it, else
    ``"counts"``. ``adata`` may also be the layer names a file holds
    (``sepsis_sc.store.layer_names``), so a stage can choose before reading any matrix.

    ``preferred`` is config ``qc.downstream_layer``: ``"soupx_counts"`` (ambient-corrected
    counts, :mod:`sepsis_sc.qc.ambient`) or ``"counts"`` (raw). QC writes ``soupx_counts`` only
    when some sample was corrected (no second copy of the raw counts otherwise), so a cohort
    without correction reads the raw counts; ``layers["counts"]`` always holds them.
    """
    names = set(adata.layers) if isinstance(adata, ad.AnnData) else set(adata)
    if preferred and preferred in names:
        return preferred
    if preferred and preferred != "counts":
        logger.info("no layers[%r] (nothing was corrected): the raw counts are used", preferred)
    return "counts"


# --------------------------------------------------------------------------------------
# organism
# --------------------------------------------------------------------------------------
@dataclass
class OrganismEvidence:
    """What the gene names say about the organism.

    Attributes
    ----------
    organism
        ``"human"``, ``"mouse"`` or None (undecidable).
    human, mouse
        Votes: probe genes found, one for any ``MT-``/``mt-`` gene, one per Ensembl ID.
    probes
        Probe genes found per organism (a few, for messages).
    ensembl
        Ensembl gene IDs per organism (``ENSG...``, ``ENSMUSG...``).
    upper, title
        Fractions of upper-case and title-case alphabetic symbols (NaN with < 50 symbols).
    n_genes
        Names inspected.
    """

    organism: str | None
    human: int = 0
    mouse: int = 0
    probes: dict[str, list[str]] = field(default_factory=lambda: {"human": [], "mouse": []})
    ensembl: dict[str, int] = field(default_factory=lambda: {"human": 0, "mouse": 0})
    upper: float = float("nan")
    title: float = float("nan")
    n_genes: int = 0

    def describe(self) -> str:
        """One line of evidence for an error message."""
        parts = []
        for org in ("human", "mouse"):
            seen = self.probes[org][:3]
            bits = []
            if seen:
                bits.append(", ".join(seen))
            if self.ensembl[org]:
                bits.append(f"{self.ensembl[org]} {'ENSG' if org == 'human' else 'ENSMUSG'} IDs")
            parts.append(f"{org}: {'; '.join(bits) if bits else 'none'}")
        text = "; ".join(parts)
        if np.isfinite(self.upper):
            text += (
                f"; symbols {self.upper:.0%} upper case (human style), "
                f"{self.title:.0%} title case (mouse style)"
            )
        return f"{self.n_genes} genes; {text}"


def organism_evidence(var_names: Iterable[str]) -> OrganismEvidence:
    """Weigh human against mouse gene naming.

    Votes: each probe gene of :data:`ORGANISM_PROBES` present (``CD3E``/``MT-CO1`` vs
    ``Cd3e``/``mt-Co1``), one for any ``MT-`` (``mt-``) gene and one per Ensembl gene ID
    (``ENSG`` vs ``ENSMUSG``). The side with more votes wins; on a tie (including none),
    at least 50 alphabetic symbols decide by their case: > 80% upper case is human,
    > 60% title case is mouse; otherwise undecidable.

    Parameters
    ----------
    var_names
        Gene names (symbols or Ensembl IDs).

    Returns
    -------
    OrganismEvidence
    """
    names = pd.Index([str(n) for n in var_names])
    ev = OrganismEvidence(None, n_genes=len(names))
    if len(names) == 0:
        return ev
    ens_h = int(names.str.match(r"^ENSG\d").sum())
    ens_m = int(names.str.match(r"^ENSMUSG\d").sum())
    nameset = set(names)
    ev.probes = {
        "human": [h for h in ORGANISM_PROBES if h in nameset],
        "mouse": [m for m in ORGANISM_PROBES.values() if m in nameset],
    }
    ev.ensembl = {"human": ens_h, "mouse": ens_m}
    ev.human = len(ev.probes["human"]) + int(names.str.startswith("MT-").sum() > 0) + ens_h
    ev.mouse = len(ev.probes["mouse"]) + int(names.str.startswith("mt-").sum() > 0) + ens_m
    alpha = names[names.str.match(r"^[A-Za-z][A-Za-z0-9]+$")]
    if len(alpha) >= 50:
        ev.upper = float(np.mean(alpha.str.upper() == alpha))
        ev.title = float(np.mean(alpha.str.match(r"^[A-Z][a-z0-9]+$")))
    if ev.human != ev.mouse and max(ev.human, ev.mouse) >= 1:
        ev.organism = "human" if ev.human > ev.mouse else "mouse"
    elif np.isfinite(ev.upper):
        if ev.upper > 0.8:
            ev.organism = "human"
        elif ev.title > 0.6:
            ev.organism = "mouse"
    return ev


def detect_organism(var_names: Iterable[str]) -> str | None:
    """Guess ``"human"`` or ``"mouse"`` from gene names (symbols or Ensembl IDs); None when
    undecidable: the ``organism`` of :func:`organism_evidence`, which gives the rule."""
    return organism_evidence(var_names).organism


def resolve_organism(
    var_names: Iterable[str],
    organism: str = "auto",
    expected: str | None = None,
    *,
    what: str = "the data",
) -> str:
    """The organism to use, checked against the gene names.

    Parameters
    ----------
    var_names
        Gene names.
    organism
        ``"auto"`` (detect), ``"human"`` or ``"mouse"``.
    expected
        Organism the config expects (None: no expectation).
    what
        Names the data in messages (``"sample S1"``).

    Returns
    -------
    str
        ``"human"`` or ``"mouse"``.

    Raises
    ------
    ValueError
        For an unknown ``organism``/``expected``; when ``"auto"`` cannot decide; when the
        genes contradict a given ``organism`` (mouse genes under ``organism: human``) or
        ``expected``. Messages give the evidence and the fix.
    """
    if organism not in ("auto", "human", "mouse"):
        raise ValueError(f"organism must be 'human', 'mouse' or 'auto', not {organism!r}.")
    if expected not in (None, "human", "mouse"):
        raise ValueError(f"expected organism must be 'human', 'mouse' or None, not {expected!r}.")
    ev = organism_evidence(var_names)
    if organism == "auto":
        if ev.organism is None:
            raise ValueError(
                f"cannot infer the organism of {what} from the gene names ({ev.describe()}); "
                "pass organism='human' or 'mouse' (config key 'organism'), and make sure "
                "var_names hold gene symbols (sepsis_sc.io.ensure_symbols)."
            )
        chosen = ev.organism
    else:
        if ev.organism is not None and ev.organism != organism:
            raise ValueError(
                f"organism: {organism} but the genes of {what} are {ev.organism} "
                f"({ev.describe()}); set organism: {ev.organism} (config key 'organism'), "
                "or check the input files."
            )
        chosen = organism
    if expected is not None and chosen != expected:
        raise ValueError(
            f"{what} look {chosen} ({ev.describe()}) but the config expects organism "
            f"{expected!r}; check the sample sheet / input files, or fix the config key "
            "'organism'."
        )
    return chosen


# --------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------
def log_normalise(
    adata_or_counts: ad.AnnData | sp.spmatrix | np.ndarray,
    *,
    target_sum: float = 1e4,
    columns: np.ndarray | None = None,
    totals: np.ndarray | None = None,
) -> sp.csr_matrix | None:
    """``log1p(counts / total * target_sum)``, size factors from all genes.

    Two forms with one definition of the transform:

    * a count matrix: returns a new sparse CSR float32 matrix (only ``columns`` when given;
      their size factors still come from all genes). Size factors are
      ``target_sum / total`` in float64, cast to float32, multiplied in; cells with no counts
      stay 0. The caller's matrix is untouched.
    * an AnnData: ``X`` is normalised in place with scanpy (``normalize_total`` then
      ``log1p``, which divides by ``total / target_sum``; it differs from the matrix form in
      the last float32 bit, so the pipeline's ``X`` keeps scanpy's floats). Returns None.

    Parameters
    ----------
    adata_or_counts
        Raw counts (cells x genes), or an AnnData whose ``X`` holds them.
    target_sum
        Counts per cell after scaling (1e4: CP10k).
    columns
        Matrix form only: integer positions of the genes to return.
    totals
        Matrix form only: the cells' counts over all genes, when the matrix passed holds only
        some genes (read by columns from a file, :class:`sepsis_sc.store.CountSource`).

    Returns
    -------
    scipy.sparse.csr_matrix or None
    """
    if isinstance(adata_or_counts, ad.AnnData):
        import scanpy as sc

        if columns is not None or totals is not None:
            raise ValueError("columns= and totals= are only for the matrix form of log_normalise")
        sc.pp.normalize_total(adata_or_counts, target_sum=target_sum)
        sc.pp.log1p(adata_or_counts)
        return None
    counts = sp.csr_matrix(adata_or_counts)
    totals = np.asarray(counts.sum(axis=1)).ravel() if totals is None else np.asarray(totals)
    scale = np.divide(
        target_sum, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0
    )
    sub = counts if columns is None else counts[:, columns]
    sub = sub.tocsr().astype(np.float32)
    out = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ sub)
    out.data = np.log1p(out.data)
    return out
