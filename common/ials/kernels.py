"""Batched linear algebra of iALS: solve many small ridge systems over ragged segments at once.

Every half-step of :mod:`common.ials.steps` solves, per user or item, ``(G + Σ_j w_j w_jᵀ + λ I) x =
Σ_j c_j w_j`` with a shared Gram ``G`` and a few rows ``w_j`` of its own. ``G`` is diagonalised once
(``eigh``); rows are grouped into segments (one per user or item), padded to a common width in
buckets of similar length, and each bucket is solved in one batched ``numpy.linalg.solve``: through
the k×k push-through (Woodbury) system when a segment has fewer rows than d, else the d×d system.
:data:`_CHUNK_ELEMENTS` bounds a batch's memory. Written by hand because no library solves ragged
batches of this shape (``implicit`` solves one row at a time in compiled code).
"""

import numpy as np

_CHUNK_ELEMENTS = 1 << 22  # padded rows × width per batched solve: 32 MB of float64
_PIVOT_RTOL = 1e-10  # a pivot this small (relative to the factor's scale) is a zero pivot
_CHOLESKY_RTOL = 1e-6  # a Gram's Cholesky pivot this small may be rounding (about 1.5e-8): QR decides


# --- the exact solver shared by both half-steps ----------------------------------------------


def segment_starts(lengths: np.ndarray) -> np.ndarray:
    """Where each of consecutive segments of ``lengths`` starts in their concatenation."""
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _padded(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Rows of each segment in a ``(segments, width, ...)`` block, zero-padded at the bottom."""
    offsets = np.arange(width)
    valid = offsets[None, :] < lengths[:, None]
    index = np.where(valid, starts[:, None] + offsets[None, :], 0)
    block = values[index] if len(values) else np.zeros((*index.shape, *values.shape[1:]))
    block[~valid] = 0.0
    return block


def _buckets(lengths: np.ndarray, width: int) -> list[tuple[int, np.ndarray]]:
    """Segments grouped by padded length (powers of two), in chunks of bounded memory."""
    groups = []
    nonzero = lengths > 0
    padded = np.where(nonzero, 1 << np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64), 0)
    for size in np.unique(padded[nonzero]):
        members = np.flatnonzero(padded == size)
        per_chunk = max(1, _CHUNK_ELEMENTS // (int(size) * width))
        groups.extend((int(size), members[i : i + per_chunk]) for i in range(0, len(members), per_chunk))
    return groups


def _solve_segments(
    gram: np.ndarray,
    rows: np.ndarray,
    targets: np.ndarray,
    lengths: np.ndarray,
    regularization: np.ndarray,
    prior: np.ndarray | None = None,
    eigenbasis: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Solve ``(G + F_sᵀF_s + λ_s I) v_s = F_sᵀ t_s + p_s`` for every segment ``s`` of consecutive rows.

    Parameters
    ----------
    gram : np.ndarray
        ``(d, d)`` the shared PSD Gram ``G``.
    rows : np.ndarray
        ``(m, d)`` rows ``F`` (segment after segment).
    targets : np.ndarray
        ``(m,)`` targets ``t``.
    lengths : np.ndarray
        ``(s,)`` rows per segment.
    regularization : np.ndarray
        ``(s,)`` λ per segment.
    prior : np.ndarray, optional
        ``(s, d)`` an extra right-hand side ``p`` per segment (default zero): with ``μ`` added
        to ``λ_s``, ``p_s = μ·y⁰_s`` pulls the solution toward ``y⁰_s`` (:func:`solve_items_toward`).
    eigenbasis : tuple of np.ndarray, optional
        ``numpy.linalg.eigh(gram)``, when the caller has it; ``rows`` are then already in the
        eigenbasis (``F @ Q``): a caller that looks rows up from a table rotates the table once
        instead of every looked-up row (:func:`common.ials.steps.solve_users`).

    Returns
    -------
    np.ndarray
        ``(s, d)`` solutions; ``(G + λ_s I)⁻¹p_s`` (zero without a prior) for empty segments.
    """
    dim = gram.shape[0]
    if eigenbasis is None:
        eigenvalues, basis = np.linalg.eigh(gram)
        rotated = rows @ basis  # F in the eigenbasis, where G + λI is the diagonal D
    else:
        (eigenvalues, basis), rotated = eigenbasis, rows
    inverse = 1.0 / (np.clip(eigenvalues, 0.0, None)[None, :] + regularization[:, None])  # D⁻¹ per segment
    starts = segment_starts(lengths)
    # q = D⁻¹p: the solution of a segment without rows, and where the push-through starts from.
    shifted = (
        np.zeros((len(lengths), dim)) if prior is None else inverse * (np.asarray(prior, dtype=np.float64) @ basis)
    )
    solution = shifted.copy()
    for size, members in _buckets(lengths, dim):
        block = _padded(rotated, starts[members], lengths[members], size)  # (n, k, d)
        target = _padded(targets, starts[members], lengths[members], size)  # (n, k)
        inv = inverse[members]
        if size < dim:  # push-through: v = q + D⁻¹Fᵀ(I + FD⁻¹Fᵀ)⁻¹(t − Fq), a k×k solve; padded rows give I
            capacitance = (block * inv[:, None, :]) @ block.transpose(0, 2, 1)
            capacitance[:, np.arange(size), np.arange(size)] += 1.0
            residual = target - (block @ shifted[members][..., None])[..., 0]
            weights = np.linalg.solve(capacitance, residual[..., None])[..., 0]
            solution[members] = shifted[members] + inv * (weights[:, None, :] @ block)[:, 0]
        else:  # (D + FᵀF) v = Fᵀt + p, a d×d solve
            matrix = block.transpose(0, 2, 1) @ block
            matrix[:, np.arange(dim), np.arange(dim)] += 1.0 / inv
            right = (target[:, None, :] @ block)[:, 0] + shifted[members] / inv
            solution[members] = np.linalg.solve(matrix, right[..., None])[..., 0]
    return solution @ basis.T


def _group(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stable order grouping equal ``keys``, the distinct keys and each group's size."""
    order = np.argsort(keys, kind="stable")
    distinct, lengths = np.unique(keys[order], return_counts=True)
    return order, distinct, lengths


def _factor_segments(rows: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per segment of ``rows``, the upper-trapezoidal ``R`` with ``RᵀR = Σ z zᵀ`` (non-negative diagonal).

    Returns each factor's row count and the factors stacked, ``(Σ ranks, width)``.
    """
    width = rows.shape[1]
    ranks = np.minimum(lengths, width)
    starts = segment_starts(lengths)
    pieces, owners = [], []
    for size, members in _buckets(lengths, width):
        block = _padded(rows, starts[members], lengths[members], size)
        triangle = _triangle(block)
        height = triangle.shape[1]
        diagonal = np.diagonal(triangle, axis1=1, axis2=2)
        triangle *= np.where(diagonal < 0, -1.0, 1.0)[:, :, None]
        scale = np.abs(triangle).max(axis=(1, 2))
        within = np.arange(height)[None, :] < ranks[members, None]
        pivots = np.abs(np.diagonal(triangle, axis1=1, axis2=2))
        for position in np.flatnonzero(np.any(within & (pivots <= _PIVOT_RTOL * scale[:, None]), axis=1)):
            segment = members[position]
            summed = rows[starts[segment] : starts[segment] + lengths[segment]]
            rank, factor = _canonical_factor(summed.T @ summed)
            ranks[segment] = rank
            triangle[position] = 0.0
            triangle[position, :rank] = factor
        within = np.arange(height)[None, :] < ranks[members, None]
        pieces.append(triangle[within])
        owners.append(np.repeat(members, ranks[members]))
    if not pieces:
        return ranks, np.zeros((0, width))
    order = np.argsort(np.concatenate(owners), kind="stable")
    return ranks, np.concatenate(pieces)[order]


def _triangle(block: np.ndarray) -> np.ndarray:
    """The R of each padded ``(n, k, w)`` block's QR (its sign free), ``(n, min(k, w), w)``.

    Zero padding rows stay zero under Householder QR, so the first r rows are the factor. A
    block taller than wide (usually a full-rank factor) is factored from its Gram instead,
    through Cholesky: ``w`` rows, the same R up to rounding, a matrix product and a ``w³/3``
    solve instead of a QR of ``k`` rows (four times faster at k = 256 and d = 128). Cholesky of
    a singular Gram may succeed on rounding, leaving pivots of about √ε of the scale that are
    residue of the rows' order, not of their sum: a block with a pivot below
    :data:`_CHOLESKY_RTOL` of its scale (or a batch Cholesky cannot factor) goes through QR
    and the caller's pivot check, so that a rank-deficient sum still gets its canonical factor.
    """
    height, width = block.shape[1:]
    if height <= width:
        return np.linalg.qr(block, mode="r")
    try:
        triangle = np.linalg.cholesky(block.transpose(0, 2, 1) @ block).transpose(0, 2, 1)
    except np.linalg.LinAlgError:
        return np.linalg.qr(block, mode="r")
    pivots = np.diagonal(triangle, axis1=1, axis2=2)
    scale = np.abs(triangle).max(axis=(1, 2))
    doubtful = np.any(pivots <= _CHOLESKY_RTOL * scale[:, None], axis=1)
    if doubtful.any():
        triangle[doubtful] = np.linalg.qr(block[doubtful], mode="r")
    return triangle


def _canonical_factor(summed: np.ndarray) -> tuple[int, np.ndarray]:
    """An upper-trapezoidal factor computed from the PSD sum alone (for zero-pivot cases)."""
    eigenvalues, vectors = np.linalg.eigh(summed)
    keep = eigenvalues > _PIVOT_RTOL * max(eigenvalues.max(initial=0.0), 1e-300)
    root = np.sqrt(eigenvalues[keep])[:, None] * vectors[:, keep].T
    triangle = np.linalg.qr(root, mode="r")
    triangle *= np.where(np.diagonal(triangle) < 0, -1.0, 1.0)[:, None]
    return int(keep.sum()), triangle
