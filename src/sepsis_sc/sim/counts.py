"""The count model: one sample's cells drawn from the cohort model.

:func:`simulate_sample` draws, from the sample's own generator and in this order: the cell
types (base fractions, sepsis shifts, age, donor and sample noise), the state flags, the
low-quality cells, library sizes and ambient fractions, the negative-binomial counts (in
chunks of ``_CHUNK`` cells, with each flagged cell's programmes and the soup mixed in),
heterotypic doublets and the barcodes; :func:`sample_anndata` wraps the counts and the sheet
row as AnnData. The cohort model it reads (:class:`sepsis_sc.sim.cohort.CohortModel`) and the
whole generative model are described in :mod:`sepsis_sc.sim.cohort`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sepsis_sc.sim.profiles import (
    AGE_REF,
    AGE_SLOPE,
    INTENSITY,
    SAMPLE_SD,
    STATE_CASE_RATE_BY_TYPE,
    STATE_RATES,
    STATE_TYPE_ODDS,
    STATES,
    UNNAMED_STATES,
)

if TYPE_CHECKING:
    from sepsis_sc.sim.cohort import CohortModel

_CHUNK = 512  # cells per dense block while sampling
_EXACT_MU = 0.1  # below this mean, NB draws use the fast exact-zero scheme (_sample_nb)


def random_barcodes(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unique 10x-style barcodes (16 nt + ``-1``)."""
    codes = np.unique(rng.integers(0, 4**16, size=n + 16))
    while codes.size < n:  # pragma: no cover - collisions are ~1e-9 per pair
        codes = np.unique(np.concatenate([codes, rng.integers(0, 4**16, size=n)]))
    codes = rng.permutation(codes)[:n]
    letters = np.array(list("ACGT"))
    digits = (codes[:, None] // (4 ** np.arange(15, -1, -1, dtype=np.int64))[None, :]) % 4
    return np.array(["".join(row) + "-1" for row in letters[digits]], dtype=object).astype(str)


def _sample_nb(mu: np.ndarray, shape: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Negative binomial counts with mean ``mu`` and dispersion ``1/shape`` (float32).

    Entries with ``mu >= _EXACT_MU`` are drawn exactly as gamma-Poisson. The many entries
    with smaller means are drawn from the exact NB probability of a non-zero count,
    ``1 - (1 + phi mu)^(-1/phi)``, and a non-zero is 1, or 2 with probability
    ``mu (1 + phi) / 2`` (counts >= 3 have probability < 0.3 % there). This is ~4x faster
    than gamma-Poisson on every entry and keeps the zero fraction exact.
    """
    phi = np.reciprocal(shape)
    p_nz = -np.expm1(-np.log1p(phi * mu) / phi)
    u = rng.random(mu.shape, dtype=np.float32)
    out = (u < p_nz).astype(np.float32)
    # the same uniform gives 2 with probability p_nz * q, i.e. P(2 | non-zero) = q
    out += u < p_nz * np.minimum(mu * (1 + phi) * 0.5, 1.0)
    hi = np.flatnonzero(mu >= _EXACT_MU)
    shp = shape.ravel()[hi]
    lam = rng.standard_gamma(shp, dtype=np.float32) * (mu.ravel()[hi] / shp)
    out.ravel()[hi] = rng.poisson(lam)
    return out


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.asarray(p, dtype=float)
    return np.log(p / (1 - p))


def simulate_sample(
    model: CohortModel,
    row: Mapping[str, Any],
    rng: np.random.Generator,
    *,
    cells_per_sample: int,
    effects: bool,
    case: str,
    ambient: float,
    low_quality_rate: float,
    doublets: bool,
) -> tuple[str, sp.csr_matrix, pd.DataFrame]:
    """One sample's counts (cells x genes, CSR) and truth table, drawn from ``rng``.

    Steps, in the order they draw random numbers: composition, states, low quality,
    library sizes, counts, doublets, barcodes.
    """
    sid, cond, donor, batch = (str(row[k]) for k in ("sample_id", "condition", "donor", "batch"))
    is_case = effects and cond == case
    n_cells = int(row.get("n_cells", cells_per_sample) or cells_per_sample)
    d_rate = min(0.03 + 0.01 * n_cells / 1000, 0.12) if doublets else 0.0
    n_dbl = int(round(d_rate * n_cells))
    n_gen = n_cells + n_dbl  # singlets generated; n_dbl partners are merged away
    # the unnamed states draw from a stream of their own (spawning does not move ``rng``):
    # adding one changes no other state's cells and no other cell's counts
    side = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])
    ctype = _sample_cell_types(model, rng, is_case=is_case, donor=donor, n_gen=n_gen)
    flags = _sample_states(model, rng, ctype, is_case=is_case, donor=donor, side=side)
    low_q = rng.random(n_gen) < low_quality_rate
    lib, mt_target, amb = _sample_libraries(model, rng, ctype, low_q, batch, ambient)
    gene_fac = model.batch_gene[batch] * model.sex_factor(donor)
    counts = _sample_counts(
        model, rng, ctype, flags, low_q, lib, mt_target, amb, gene_fac, side=side
    )
    counts, is_dbl, partner_type, drop = _add_doublets(model, rng, counts, ctype, low_q, n_dbl)
    keep = np.flatnonzero(~drop)[:n_cells]
    counts = counts[keep]
    counts.sort_indices()
    barcodes = random_barcodes(len(keep), rng)
    truth = pd.DataFrame(
        {
            "cell_id": np.array([f"{sid}_{bc}" for bc in barcodes]),
            "sample_id": sid,
            "barcode": barcodes,
            "condition": cond,
            "donor": donor,
            "batch": batch,
            "cell_type": np.array(model.types)[ctype[keep]],
            "lineage": model.type_lineage[ctype[keep]],
            "is_doublet": is_dbl[keep],
            "doublet_partner_type": partner_type[keep].astype(str),
            "is_low_quality": low_q[keep],
            **{s: flags[s][keep] for s in STATES},
            "total_counts": np.asarray(counts.sum(1)).ravel().astype(np.int64),
        }
    )
    return sid, counts, truth


def _sample_cell_types(
    model: CohortModel, rng: np.random.Generator, *, is_case: bool, donor: str, n_gen: int
) -> np.ndarray:
    """Cell type index of each generated cell: base fractions (x the sepsis shifts in a
    case), with donor and sample noise on the log scale."""
    n_types = len(model.types)
    logf = np.log(model.base_frac * (model.sepsis_mult if is_case else 1.0))
    age_shift = np.array([AGE_SLOPE.get(t, 0.0) for t in model.types])
    logf = logf + age_shift * (model.donor_age[donor] - AGE_REF)
    logf = logf + model.donor_frac[donor] + rng.normal(0, SAMPLE_SD, n_types)
    frac = np.exp(logf) / np.exp(logf).sum()
    return rng.choice(n_types, size=n_gen, p=frac)


def _sample_states(
    model: CohortModel,
    rng: np.random.Generator,
    ctype: np.ndarray,
    *,
    is_case: bool,
    donor: str,
    side: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Boolean state flags per cell (:data:`STATES`): per-type rates (case or control) with
    donor and sample noise on the logit scale, among the types each state applies to."""
    n_types, n_gen = len(model.types), ctype.size
    type_idx_of = model.type_idx_of
    flags = {s: np.zeros(n_gen, dtype=bool) for s in STATES}
    for j, (state, (applies, p_ctrl, p_case)) in enumerate(STATE_RATES.items()):
        by_type = STATE_CASE_RATE_BY_TYPE.get(state, {}) if is_case else {}
        p_type = np.full(n_types, p_case if is_case else p_ctrl)
        for t, rate in by_type.items():
            p_type[type_idx_of[t]] = rate
        odds = STATE_TYPE_ODDS.get(state, {})
        lo = np.log([odds.get(t, 1.0) for t in model.types])
        r = side if state in UNNAMED_STATES else rng
        lp = _logit(p_type) + lo + model.donor_state[donor][j] + r.normal(0, SAMPLE_SD)
        p = (1 / (1 + np.exp(-lp)))[ctype]
        eligible = np.isin(ctype, [type_idx_of[t] for t in applies])
        flags[state] = eligible & (r.random(n_gen) < p)
    flags["hla_low"] |= flags["ms1_like"]
    flags["trem2_high"] = ctype == type_idx_of["TREM2-high macrophage"]
    return flags


def _sample_libraries(
    model: CohortModel,
    rng: np.random.Generator,
    ctype: np.ndarray,
    low_q: np.ndarray,
    batch: str,
    ambient: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Library size per cell (low-quality cells 15-50 % of it), the mitochondrial fraction
    targeted in low-quality cells, and the ambient fraction per cell."""
    n_gen = ctype.size
    log_lib = rng.normal(model.lib_mu[ctype] + model.batch_lib[batch], model.lib_sd[ctype])
    log_lib[low_q] += np.log(rng.uniform(0.15, 0.5, low_q.sum()))
    lib = np.exp(log_lib)
    mt_target = rng.uniform(0.2, 0.6, n_gen)
    amb = np.clip(ambient * np.exp(rng.normal(0, 0.3, n_gen)), 0, 0.5)
    return lib, mt_target, amb


def _sample_counts(
    model: CohortModel,
    rng: np.random.Generator,
    ctype: np.ndarray,
    flags: Mapping[str, np.ndarray],
    low_q: np.ndarray,
    lib: np.ndarray,
    mt_target: np.ndarray,
    amb: np.ndarray,
    gene_fac: np.ndarray,
    *,
    side: np.random.Generator,
) -> sp.csr_matrix:
    """Negative-binomial counts of every generated cell, in chunks of ``_CHUNK`` cells.

    Each cell's profile: its type's, times the per-gene factors of the sample (``gene_fac``:
    batch, sex-linked genes), with its states' programmes at the cell's own intensity
    (up genes from max(level, ``profiles._FOLD_REF``) x fold ** w, down genes x fold ** w); low-quality cells get ``mt_target`` of it on mitochondrial genes; then a
    fraction ``amb`` of the library comes from the soup (the sample's library-weighted mean
    profile). Cells of an unnamed state (:data:`profiles.UNNAMED_STATES`) are drawn again,
    whole, from ``side`` with that programme on top: the other cells' counts and the draws
    of ``rng`` are those of a cohort without it.
    """
    n_gen, n = ctype.size, model.profiles.shape[1]
    # ---- soup: the sample's expected mean expression profile (library-weighted)
    weights = np.bincount(ctype, weights=lib, minlength=len(model.types))
    soup = (weights[:, None] * model.profiles).sum(0) * gene_fac
    soup /= soup.sum()
    soup32 = soup.astype(np.float32)
    mt_cols = np.flatnonzero(model.is_mt)
    blocks = []
    bfac32 = gene_fac.astype(np.float32)
    prog_cols = {s: np.flatnonzero(v[0] != 1) for s, v in model.state_vecs.items()}
    unnamed = [st for st in model.state_vecs if st in UNNAMED_STATES]

    def programme(p: np.ndarray, rows: np.ndarray, state: str, r: np.random.Generator) -> None:
        vec, cols = model.state_vecs[state], prog_cols[state]
        w = r.uniform(*INTENSITY, rows.size).astype(np.float32)
        sub = np.maximum(p[np.ix_(rows, cols)], vec[1][cols] * bfac32[cols])
        p[np.ix_(rows, cols)] = sub * vec[0][cols].astype(np.float32)[None, :] ** w[:, None]

    def mean(p: np.ndarray, sl: slice | np.ndarray) -> np.ndarray:
        p /= p.sum(1, keepdims=True)
        lq = np.flatnonzero(low_q[sl])
        if lq.size:
            mt_sum = p[np.ix_(lq, mt_cols)].sum(1)
            scale_mt = mt_target[sl][lq] / np.maximum(mt_sum, 1e-12)
            scale_other = (1 - mt_target[sl][lq]) / np.maximum(1 - mt_sum, 1e-12)
            p[lq] *= scale_other[:, None]
            p[np.ix_(lq, mt_cols)] *= (scale_mt / scale_other)[:, None]
        a_ = amb[sl][:, None].astype(np.float32)
        return lib[sl][:, None].astype(np.float32) * ((1 - a_) * p + a_ * soup32[None, :])

    for start in range(0, n_gen, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n_gen))
        ct = ctype[sl]
        p = model.profiles32[ct] * bfac32[None, :]
        for state in model.state_vecs:
            rows = np.flatnonzero(flags[state][sl])
            if rows.size and state not in unnamed:
                programme(p, rows, state, rng)
        redo = np.flatnonzero(np.logical_or.reduce([flags[st][sl] for st in unnamed]))
        p_redo = p[redo].copy() if (unnamed and redo.size) else None
        block = _sample_nb(mean(p, sl), model.shape[ct], rng)
        if p_redo is not None:  # cells of an unnamed state: drawn whole from ``side``
            for state in unnamed:
                rows = np.flatnonzero(flags[state][sl][redo])
                if rows.size:
                    programme(p_redo, rows, state, side)
            cells = np.arange(n_gen)[sl][redo]
            block[redo] = _sample_nb(mean(p_redo, cells), model.shape[ct[redo]], side)
        blocks.append(sp.csr_matrix(block))
        del p, block
    return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n))


def _add_doublets(
    model: CohortModel,
    rng: np.random.Generator,
    counts: sp.csr_matrix,
    ctype: np.ndarray,
    low_q: np.ndarray,
    n_dbl: int,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """Heterotypic doublets: ``n_dbl`` good-quality cells each get the counts of a partner
    of another type, and the partners are dropped.

    Returns (counts, is_doublet, partner type name ("" for singlets), dropped partner).
    """
    n_gen = ctype.size
    is_dbl = np.zeros(n_gen, dtype=bool)
    partner_type = np.full(n_gen, "", dtype=object)
    drop = np.zeros(n_gen, dtype=bool)
    if not n_dbl:
        return counts, is_dbl, partner_type, drop
    cand = rng.permutation(np.flatnonzero(~low_q))
    prim, part = [], []
    used = np.zeros(n_gen, dtype=bool)
    for i in cand:
        if len(prim) == n_dbl:
            break
        if used[i]:
            continue
        pool = cand[(ctype[cand] != ctype[i]) & ~used[cand]]
        pool = pool[pool != i]
        if pool.size == 0:
            continue
        j = pool[rng.integers(pool.size)]
        used[i] = used[j] = True
        prim.append(i)
        part.append(j)
    prim_a, part_a = np.array(prim, dtype=int), np.array(part, dtype=int)
    add = sp.csr_matrix(
        (np.ones(len(prim_a), dtype=np.float32), (prim_a, part_a)), shape=(n_gen, n_gen)
    )
    counts = (counts + add @ counts).tocsr()
    is_dbl[prim_a] = True
    partner_type[prim_a] = np.array(model.types)[ctype[part_a]]
    drop[part_a] = True
    return counts, is_dbl, partner_type, drop


def sample_anndata(
    model: CohortModel,
    row: Mapping[str, Any],
    counts: sp.csr_matrix,
    truth: pd.DataFrame,
    uns: Mapping[str, Any],
    mouse: tuple[np.ndarray, pd.Index] | None,
) -> ad.AnnData:
    """The sample as AnnData: counts in ``X`` and ``layers["counts"]``, the sheet row in
    ``obs`` (categorical), gene IDs and symbols in ``var`` (mouse names for a mouse cohort)."""
    cell_ids = truth["cell_id"].to_numpy()
    obs = pd.DataFrame(index=pd.Index(cell_ids))
    obs["barcode"] = truth["barcode"].to_numpy()
    for key, value in row.items():
        if key in ("path", "url", "n_cells") or key == "barcode":
            continue
        obs[key] = pd.Categorical([str(value)] * len(cell_ids))
    var_sym = model.gene_table["gene_symbol"].to_numpy()
    adata = ad.AnnData(
        X=counts,
        obs=obs,
        var=pd.DataFrame(
            {"gene_ids": model.gene_table["gene_id"].to_numpy(), "gene_symbols": var_sym},
            index=pd.Index(var_sym),
        ),
    )
    adata.layers["counts"] = counts.copy()
    adata.uns["simulation"] = dict(uns)
    if mouse is not None:
        keep_g, mouse_names = mouse
        adata = adata[:, keep_g].copy()
        adata.var = pd.DataFrame(
            {"gene_ids": "", "gene_symbols": np.asarray(mouse_names)}, index=mouse_names
        )
    return adata
