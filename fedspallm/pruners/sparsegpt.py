"""SparseGPT (Frantar & Alistarh 2023): prune column by column and let the OBS update move the
pruning error onto the columns not yet visited, using the inverse Hessian of the layer input."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .common import PruneResult, all_finite, check_finite, check_weight, prune_lowest

# Columns visited with rank-1 updates before the rest of their tile takes them as one matmul. About
# the square root of the tile width (128) minimises the memory traffic of the sweep.
SUBTILE = 16


def inverse_hessian_cholesky(
    hessian: torch.Tensor, percdamp: float = 0.01, max_damping_retries: int = 6
) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*I)^-1, i.e. (H + damp*I)^-1 = U^T U.

    Damping starts at percdamp * mean(diag H) and is multiplied by 10 on every failure, because
    a Hessian from few samples is often singular or, after rounding, slightly indefinite.

    With J the reversal of the inputs and L L^T = J (H + damp*I) J, U = J L^-1 J: one Cholesky and
    one triangular inverse, half the work of inverting H and then factoring the inverse.
    """
    damped = hessian.flip(0, 1)  # a copy, damped in place on its diagonal
    diagonal = damped.diagonal()
    undamped = diagonal.clone()
    mean_diag = undamped.mean().item()
    damp = percdamp * mean_diag
    for attempt in range(max_damping_retries + 1):
        if attempt:
            # Zero damping has nothing to multiply: fall back to the customary 1%.
            damp = 10 * damp if damp > 0 else 0.01 * mean_diag
            warnings.warn(
                f"SparseGPT: Cholesky of the Hessian failed; retry {attempt}/{max_damping_retries} "
                f"with damping {damp:.3g}",
                RuntimeWarning,
                stacklevel=3,
            )
        torch.add(undamped, damp, out=diagonal)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() != 0:
            continue
        lower_inverse = lower_triangular_inverse(lower)
        if all_finite(lower_inverse):
            return lower_inverse.flip(0, 1)
    raise FloatingPointError(
        f"SparseGPT: the Hessian is not positive definite even with damping {damp:.3g} after "
        f"{max_damping_retries} retries; use more calibration samples or a larger percdamp"
    )


def lower_triangular_inverse(lower: torch.Tensor, leaf: int = 192) -> torch.Tensor:
    """L^-1 of a lower triangular L, by halves: inv([[A, 0], [B, C]]) = [[A^-1, 0], [-C^-1 B A^-1, C^-1]].

    The off-diagonal block is two matmuls, which run near the matmul peak; a triangular solve against
    the identity does twice the arithmetic, half of it on zeros (2x slower at 1536 here).
    """
    size = lower.shape[0]
    if size <= leaf:
        eye = torch.eye(size, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    half = size // 2
    inverse = torch.zeros_like(lower)
    top, bottom = lower_triangular_inverse(lower[:half, :half], leaf), lower_triangular_inverse(lower[half:, half:], leaf)
    inverse[:half, :half], inverse[half:, half:] = top, bottom
    torch.matmul(bottom, lower[half:, :half] @ top, out=inverse[half:, :half])
    inverse[half:, :half].neg_()
    return inverse


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_damping_retries: int = 6,
    keep: torch.Tensor | None = None,
) -> PruneResult:
    """Prune ``weight`` [out, in] to ``sparsity`` (or N:M) given H = (2/n) sum X X^T [in, in].

    With ``keep`` (bool [out, in], True = kept) the mask is given rather than chosen: the OBS sweep
    only refits the kept weights to it (``sparsity``, ``n`` and ``m`` are then not used).
    """
    return sparsegpt_prune_group([weight], hessian, sparsity, n, m, blocksize, percdamp, max_damping_retries,
                                 keeps=[keep])[0]


def sparsegpt_prune_group(
    weights: Sequence[torch.Tensor],
    hessian: torch.Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_damping_retries: int = 6,
    keeps: Sequence[torch.Tensor | None] | None = None,
) -> list[PruneResult]:
    """``sparsegpt_prune`` of every weight in ``weights``, which all read the input H was gathered on.

    The same as pruning them one by one, with one inverse for all of them and one sweep over their
    stacked rows: output rows never interact in SparseGPT, and each weight still makes its own mask
    selections (its own sparsity per tile), so none takes another's budget.
    """
    keeps = [None] * len(weights) if keeps is None else list(keeps)
    if not weights or len(keeps) != len(weights):
        raise ValueError(f"need one keep (or None) per weight, got {len(keeps)} for {len(weights)} weights")
    cols = weights[0].shape[-1]
    for weight, keep in zip(weights, keeps):
        check_weight(weight, sparsity, n, m)
        if weight.shape[1] != cols:
            raise ValueError(f"weights pruned together must read the same input, got widths {cols} and {weight.shape[1]}")
        if keep is not None and keep.shape != weight.shape:
            raise ValueError(f"keep must be [{weight.shape[0]}, {cols}], got {tuple(keep.shape)}")
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be [{cols}, {cols}], got {tuple(hessian.shape)}")
    check_finite("hessian", hessian)
    # Nothing to prune and no mask to refit to: the weight stands as it is.
    active = [i for i, keep in enumerate(keeps) if keep is not None or n or sparsity]
    results: list[PruneResult | None] = [
        None if i in active else PruneResult(w.detach().clone(), torch.ones_like(w, dtype=torch.bool))
        for i, w in enumerate(weights)
    ]
    if not active:
        return results
    if n:
        # N:M groups must not straddle two tiles.
        blocksize = max(m, blocksize - blocksize % m)

    # Work on the stacked W^T, so that a weight column is a contiguous row: the column loop below is
    # then bandwidth-bound instead of stride-bound (over 10x faster on CPU).
    spans, start = [], 0
    for i in active:
        spans.append(slice(start, start + weights[i].shape[0]))
        start = spans[-1].stop
    Wt = torch.empty(cols, start, dtype=torch.float32, device=weights[0].device)
    for i, rows in zip(active, spans):
        Wt[:, rows].copy_(weights[i].detach().T)
    pruned_t = torch.zeros(Wt.shape, dtype=torch.bool, device=Wt.device)
    H = hessian.detach().to(device=Wt.device, dtype=torch.float32, copy=True)
    # An input that is always zero carries no information: its weights are free to go, and a
    # unit diagonal keeps H invertible without coupling that input to the others.
    dead = H.diagonal() == 0
    any_dead = bool(dead.any())
    H.diagonal()[dead] = 1
    choose = []
    for i, rows in zip(active, spans):
        if keeps[i] is None:
            choose.append(rows)
            if any_dead:
                Wt[dead, rows] = 0
        else:
            # A given mask stands; an input this data never uses keeps its weight.
            pruned_t[:, rows] = ~keeps[i].detach().to(device=Wt.device, dtype=torch.bool).T
    Hinv = inverse_hessian_cholesky(H, percdamp, max_damping_retries)
    del H

    _prune_tiles(Wt, Hinv, pruned_t, sparsity, n, m, blocksize, choose)
    if any_dead:
        for rows in choose:
            # Their rows of Hinv are 0 off the diagonal, so no update reached them; the mask says so too.
            pruned_t[dead, rows] = True
            Wt[dead, rows] = 0
    check_finite("pruned weight", Wt)
    for i, rows in zip(active, spans):
        weight = torch.empty_like(weights[i], memory_format=torch.contiguous_format).copy_(Wt[:, rows].T)
        results[i] = PruneResult(weight, (~pruned_t[:, rows]).T.contiguous())
    return results


@contextmanager
def _single_cpu_thread(device: torch.device) -> Iterator[None]:
    """The column loop issues thousands of tiny ops; on a CPU, waking worker threads for each costs
    far more than the op (50x slower with 2 threads on a busy 2-core machine), so it runs on one."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _prune_tiles(Wt: torch.Tensor, Hinv: torch.Tensor, pruned_t: torch.Tensor, sparsity: float, n: int, m: int,
                 blocksize: int, choose: Sequence[slice] = (slice(None),)) -> None:
    """The OBS sweep over column tiles, in place on W^T and the pruned-mask^T.

    The mask is chosen in the ``choose`` spans of W^T's columns (each span one weight's rows, with its
    own selections) and read elsewhere. Per column i the pruned part of w is err = w * pruned / Hinv_ii;
    the later columns take -Hinv[i, later] x err. The updates are applied lazily at three ranges, which
    is the same arithmetic in another order: rank-1 updates within a sub-tile of ``SUBTILE`` columns,
    one matmul per sub-tile for the rest of its tile, one per tile for the columns after it. The column
    loop is bound by the cost of launching ops, so it costs two ops per column on views made once per
    tile. Pruned entries end as exact zeros (-0.0 where the weight was negative).
    """
    cols = Wt.shape[0]
    subtile = m * max(1, SUBTILE // m) if n else SUBTILE  # N:M groups must not straddle two sub-tiles
    for c0 in range(0, cols, blocksize):
        c1 = min(c0 + blocksize, cols)
        W1, P1, Hinv1 = Wt[c0:c1], pruned_t[c0:c1], Hinv[c0:c1, c0:c1]
        d = Hinv1.diagonal()
        if n == 0:
            # One selection over the whole tile: rows with more to spare give up more.
            for rows in choose:
                P1[:, rows] = ~prune_lowest(W1[:, rows].square() / d[:, None].square(), sparsity)
        scale = P1.to(W1.dtype) / d[:, None]
        Err1 = torch.empty_like(W1)
        columns, scales, errs = W1.unbind(0), scale.unbind(0), Err1.unbind(0)
        with _single_cpu_thread(Wt.device):
            for s0 in range(0, c1 - c0, subtile):
                s1 = min(s0 + subtile, c1 - c0)
                # Each column updates its whole sub-tile: Hinv is upper triangular, so the earlier
                # columns get exactly nothing and the column itself w - Hinv_ii * err, which leaves
                # its kept entries exactly as they are (err is 0 there). No per-column slicing.
                sub_tile, hinv_rows = W1[s0:s1], Hinv1[s0:s1, s0:s1].unbind(0)
                for j in range(s1 - s0):
                    i = s0 + j
                    if n and j % m == 0:
                        _choose_nm(W1, P1, scale, d, i, n, m, choose)
                    sub_tile.addr_(hinv_rows[j], torch.mul(columns[i], scales[i], out=errs[i]), alpha=-1)
                W1[s1:].addmm_(Hinv1[s0:s1, s1:].T, Err1[s0:s1], alpha=-1)
        W1.mul_(~P1)  # pruned entries to (signed) zero while the tile is in cache; 5x faster than masked_fill_
        Wt[c1:].addmm_(Hinv[c0:c1, c1:].T, Err1, alpha=-1)


def _choose_nm(W1: torch.Tensor, P1: torch.Tensor, scale: torch.Tensor, d: torch.Tensor, start: int, n: int, m: int,
               choose: Sequence[slice]) -> None:
    """In the group of m columns from ``start``, each row gives up its n lowest scores (ties: lower column
    first), scored on the weights as all earlier columns' updates have left them."""
    g = slice(start, start + m)
    scores = W1[g].square() / d[g, None].square()
    for rows in choose:
        lowest = scores[:, rows].argsort(dim=0, stable=True)[:n]
        P1[g, rows] = torch.zeros_like(P1[g, rows]).scatter_(0, lowest, True)
    scale[g] = P1[g].to(W1.dtype) / d[g, None]
