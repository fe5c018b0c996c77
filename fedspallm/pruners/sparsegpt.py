"""SparseGPT (Frantar & Alistarh 2023): prune column by column and let the OBS update move the
pruning error onto the columns not yet visited, using the inverse Hessian of the layer input."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .common import PruneResult, check_finite, check_weight, num_to_prune, prune_lowest


def inverse_hessian_cholesky(
    hessian: torch.Tensor, percdamp: float = 0.01, max_damping_retries: int = 6
) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*I)^-1, i.e. (H + damp*I)^-1 = U^T U.

    Damping starts at percdamp * mean(diag H) and is multiplied by 10 on every failure, because
    a Hessian from few samples is often singular or, after rounding, slightly indefinite.
    """
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = hessian.diagonal().mean().item()
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
        lower, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if info.item() != 0:
            continue
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if info.item() == 0 and torch.isfinite(upper).all():
            return upper
    raise FloatingPointError(
        f"SparseGPT: the Hessian is not positive definite even with damping {damp:.3g} after "
        f"{max_damping_retries} retries; use more calibration samples or a larger percdamp"
    )


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
    check_weight(weight, sparsity, n, m)
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be [{cols}, {cols}], got {tuple(hessian.shape)}")
    if keep is not None and keep.shape != weight.shape:
        raise ValueError(f"keep must be [{rows}, {cols}], got {tuple(keep.shape)}")
    check_finite("hessian", hessian)
    if keep is None and n == 0 and sparsity == 0:
        return PruneResult(weight.detach().clone(), torch.ones_like(weight, dtype=torch.bool))
    if n:
        # N:M groups must not straddle two tiles.
        blocksize = max(m, blocksize - blocksize % m)

    # Work on W^T so that a weight column is a contiguous row: the column loop below is then
    # bandwidth-bound instead of stride-bound (over 10x faster on CPU).
    Wt = weight.detach().T.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    H = hessian.detach().to(device=Wt.device, dtype=torch.float32, copy=True)
    # An input that is always zero carries no information: its weights are free to go, and a
    # unit diagonal keeps H invertible without coupling that input to the others.
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    if keep is None:
        Wt[dead] = 0
    else:
        dead = torch.zeros_like(dead)  # a given mask stands; an input this data never uses keeps its weight
    Hinv = inverse_hessian_cholesky(H, percdamp, max_damping_retries)
    del H

    if keep is None:
        pruned_t = torch.zeros(cols, rows, dtype=torch.bool, device=Wt.device)
    else:
        pruned_t = ~keep.detach().to(device=Wt.device, dtype=torch.bool).T.contiguous()
    with _single_cpu_thread(Wt.device):
        _prune_tiles(Wt, Hinv, pruned_t, sparsity, n, m, blocksize, choose_mask=keep is None)

    mask = (~(pruned_t.T | dead)).contiguous()
    W = Wt.T.masked_fill(~mask, 0)
    check_finite("pruned weight", W)
    return PruneResult(W.to(weight.dtype).contiguous(), mask)


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
                 blocksize: int, choose_mask: bool = True) -> None:
    """The OBS sweep over column tiles, in place on W^T and the pruned-mask^T (read, not chosen, if not choose_mask).

    Per column i the pruned part of w is err = w * pruned / Hinv_ii; the later columns of the tile
    take -Hinv[i, later] x err, and w keeps only its kept entries. The column loop is bound by the
    cost of launching ops, not by arithmetic, so every per-column tensor is a view made once per
    tile (``unbind``) and each column costs four ops.
    """
    cols = Wt.shape[0]
    for c0 in range(0, cols, blocksize):
        c1 = min(c0 + blocksize, cols)
        W1, P1, Hinv1 = Wt[c0:c1], pruned_t[c0:c1], Hinv[c0:c1, c0:c1]
        d = Hinv1.diagonal()
        if choose_mask and n == 0:
            # One selection over the whole tile: rows with more to spare give up more.
            P1.copy_(~prune_lowest(W1.square() / d[:, None].square(), sparsity))
        keep = (~P1).to(W1.dtype)
        scale = P1.to(W1.dtype) / d[:, None]
        Err1 = torch.empty_like(W1)
        columns, keeps, scales, errs, hinv_rows = W1.unbind(0), keep.unbind(0), scale.unbind(0), Err1.unbind(0), Hinv1.unbind(0)
        for i in range(c1 - c0):
            if choose_mask and n and i % m == 0:
                # Each row's group of m columns gives up its n lowest scores (ties: lower column first).
                g = slice(i, i + m)
                lowest = (W1[g].square() / d[g, None].square()).argsort(dim=0, stable=True)[:n]
                P1[g] = torch.zeros_like(P1[g]).scatter_(0, lowest, True)
                keep[g] = (~P1[g]).to(W1.dtype)
                scale[g] = P1[g].to(W1.dtype) / d[g, None]
            err = torch.mul(columns[i], scales[i], out=errs[i])
            # Compensate on the columns not yet visited; keep only the kept entries, so zeros are exact zeros.
            W1[i + 1 :].addr_(hinv_rows[i][i + 1 :], err, alpha=-1)
            columns[i].mul_(keeps[i])
        # The columns after the tile receive all of its updates at once, as one matmul.
        Wt[c1:].addmm_(Hinv[c0:c1, c1:].T, Err1, alpha=-1)
