"""Unit tests of the pure pruning kernels, on small tensors with hand-checkable numbers."""

from __future__ import annotations

import warnings

import pytest
import torch

from fedspallm.pruners import (
    PruneResult,
    accumulate_hessian,
    accumulate_sq_norms,
    all_finite,
    check_finite,
    magnitude_prune,
    num_to_prune,
    prune_lowest,
    sparsegpt_prune,
    sparsegpt_prune_group,
    validate_pattern,
    wanda_prune,
)

PATTERNS = [(0.5, 0, 0), (0.3, 0, 0), (0.0, 2, 4), (0.0, 4, 8)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(seed: int, out: int = 16, inp: int = 64, tokens: int = 256):
    """A random weight, correlated inputs X = Z @ A (tokens x in) and their Hessian.

    Input features get log-normal scales, as LLM activations have outlier features; that is
    what makes input-aware scores (Wanda, SparseGPT) matter.
    """
    g = _gen(seed)
    weight = torch.randn(out, inp, generator=g)
    x = torch.randn(tokens, inp, generator=g) @ torch.randn(inp, inp, generator=g)
    x = x * torch.randn(inp, generator=g).exp()
    hessian, _ = accumulate_hessian(None, 0, x.reshape(4, tokens // 4, inp))
    return weight, x, hessian


def _kernels(weight, x, hessian):
    """Each kernel as f(sparsity, n, m), all fed from the same calibration inputs."""
    sq_norms, _ = accumulate_sq_norms(None, 0, x.reshape(4, -1, x.shape[1]))
    return {
        "sparsegpt": lambda s, n, m: sparsegpt_prune(weight, hessian, s, n, m),
        "wanda": lambda s, n, m: wanda_prune(weight, sq_norms, s, n, m),
        "magnitude": lambda s, n, m: magnitude_prune(weight, s, n, m),
    }


def _assert_nm(mask: torch.Tensor, n: int, m: int) -> None:
    pruned_per_group = (~mask).reshape(mask.shape[0], -1, m).sum(dim=-1)
    assert (pruned_per_group == n).all()


# ---------------------------------------------------------------- common


def test_num_to_prune_rounds_to_nearest():
    assert num_to_prune(10, 0.5) == 5
    assert num_to_prune(10, 0.34) == 3
    assert num_to_prune(10, 0.36) == 4
    assert num_to_prune(1024, 0.3) == 307  # 307.2
    assert num_to_prune(7, 0.0) == 0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((8, 1.0, 0, 0), r"sparsity must be in \[0, 1\), got 1.0"),
        ((8, -0.1, 0, 0), r"sparsity must be in \[0, 1\), got -0.1"),
        ((8, 0.5, 4, 4), "0 < N < M, got 4:4"),
        ((8, 0.5, 5, 4), "0 < N < M, got 5:4"),
        ((8, 0.5, 0, 4), "0 < N < M, got 0:4"),
        ((6, 0.5, 2, 4), "M=4 does not divide in_features=6"),
    ],
)
def test_validate_pattern_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        validate_pattern(*args)


def test_validate_pattern_accepts():
    validate_pattern(8, 0.0, 0, 0)
    validate_pattern(8, 0.99, 0, 0)
    validate_pattern(8, 0.5, 2, 4)
    validate_pattern(8, 0.5, 4, 8)


def test_prune_lowest_whole_tensor_exact_mask():
    scores = torch.tensor([[5.0, 1.0, 7.0], [0.5, 9.0, 3.0]])
    assert prune_lowest(scores, 0.5).tolist() == [[True, False, True], [False, True, False]]
    # Whole-tensor ranking: both prunes may land in one row.
    scores = torch.tensor([[1.0, 2.0, 9.0], [7.0, 8.0, 6.0]])
    assert prune_lowest(scores, 1 / 3).tolist() == [[False, False, True], [True, True, True]]


def test_prune_lowest_per_row_exact_mask():
    scores = torch.tensor([[1.0, 2.0, 9.0, 4.0], [7.0, 8.0, 6.0, 5.0]])
    assert prune_lowest(scores, 0.5, per_row=True).tolist() == [
        [False, False, True, True],
        [True, True, False, False],
    ]


def test_prune_lowest_ties_keep_exact_count_and_prune_first_positions():
    scores = torch.zeros(3, 4)
    assert (~prune_lowest(scores, 0.5)).sum() == 6
    assert prune_lowest(scores, 0.5, per_row=True).tolist() == [[False, False, True, True]] * 3
    assert prune_lowest(scores, 0.0, 2, 4).tolist() == [[False, False, True, True]] * 3


def test_prune_lowest_2_4_exact_mask():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.2, 0.4, 0.3]])
    assert prune_lowest(scores, 0.0, 2, 4).tolist() == [
        [True, False, True, False, False, False, True, True]
    ]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_prune_lowest_nm_random(n, m):
    scores = torch.rand(8, 32, generator=_gen(0))
    mask = prune_lowest(scores, 0.0, n, m)
    _assert_nm(mask, n, m)
    # Every pruned score is below every kept score of its group.
    grouped, keep = scores.reshape(8, -1, m), mask.reshape(8, -1, m)
    assert (grouped.masked_fill(keep, -1).amax(-1) < grouped.masked_fill(~keep, 2).amin(-1)).all()


def test_prune_lowest_per_row_random_counts():
    mask = prune_lowest(torch.rand(5, 30, generator=_gen(1)), 0.3, per_row=True)
    assert ((~mask).sum(dim=1) == 9).all()


def test_accumulate_hessian_matches_one_shot():
    g = _gen(0)
    a, b = torch.randn(2, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    h, nsamples = accumulate_hessian(None, 0, a)
    h, nsamples = accumulate_hessian(h, nsamples, b)
    x = torch.cat([a, b]).reshape(-1, 8).double()
    assert nsamples == 5
    assert h.dtype == torch.float32
    torch.testing.assert_close(h.double(), 2 / 5 * x.T @ x, rtol=1e-5, atol=1e-5)


def test_accumulate_hessian_2d_input_is_one_sample_and_bf16_accumulates_in_fp32():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.bfloat16)
    h, nsamples = accumulate_hessian(None, 0, x)
    assert nsamples == 1 and h.dtype == torch.float32
    assert h.tolist() == [[20.0, 4.0], [4.0, 8.0]]  # 2 * X^T X
    h, nsamples = accumulate_hessian(h, nsamples, x)
    assert nsamples == 2 and h.tolist() == [[20.0, 4.0], [4.0, 8.0]]


def test_accumulate_sq_norms_matches_one_shot():
    g = _gen(1)
    a, b = torch.randn(2, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    s, nsamples = accumulate_sq_norms(None, 0, a)
    s, nsamples = accumulate_sq_norms(s, nsamples, b)
    x = torch.cat([a, b]).reshape(-1, 8)
    assert nsamples == 5 and s.shape == (8,)
    torch.testing.assert_close(s, x.square().sum(0) / 5)
    s, nsamples = accumulate_sq_norms(None, 0, torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    assert nsamples == 1 and s.tolist() == [10.0, 4.0]


def test_check_finite():
    check_finite("x", torch.ones(3))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(FloatingPointError, match="^hessian: contains NaN or inf$"):
            check_finite("hessian", torch.tensor([1.0, bad]))


# ---------------------------------------------------------------- all kernels


@pytest.mark.parametrize("kernel", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize(("sparsity", "n", "m"), PATTERNS)
def test_kernels_exact_counts_and_mask_matches_zeros(kernel, sparsity, n, m):
    weight, x, hessian = _layer(0)
    result = _kernels(weight, x, hessian)[kernel](sparsity, n, m)
    assert isinstance(result, PruneResult)
    assert result.mask.dtype == torch.bool and result.mask.shape == weight.shape
    assert torch.equal(result.mask, result.weight != 0)
    if n:
        _assert_nm(result.mask, n, m)
    elif kernel == "wanda":
        assert ((~result.mask).sum(dim=1) == num_to_prune(64, sparsity)).all()
    else:  # one 64-column tile for SparseGPT, one matrix for magnitude
        assert (~result.mask).sum() == num_to_prune(weight.numel(), sparsity)
    if kernel != "sparsegpt":  # no weight update: kept weights are untouched
        assert torch.equal(result.weight[result.mask], weight[result.mask])


@pytest.mark.parametrize("kernel", ["sparsegpt", "wanda", "magnitude"])
def test_kernels_sparsity_zero_is_identity(kernel):
    weight, x, hessian = _layer(1)
    result = _kernels(weight, x, hessian)[kernel](0.0, 0, 0)
    assert torch.equal(result.weight, weight) and result.mask.all()


@pytest.mark.parametrize("kernel", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize(("sparsity", "n", "m"), [(0.5, 0, 0), (0.0, 2, 4)])
def test_kernels_preserve_dtype_and_leave_input_alone(kernel, sparsity, n, m):
    weight, x, hessian = _layer(2)
    weight = weight.to(torch.bfloat16)
    before = weight.clone()
    result = _kernels(weight, x, hessian)[kernel](sparsity, n, m)
    assert result.weight.dtype == torch.bfloat16
    assert torch.equal(weight, before)
    assert torch.equal(result.weight == 0, ~result.mask)


@pytest.mark.parametrize("kernel", ["sparsegpt", "wanda", "magnitude"])
def test_kernels_reject_nan_weight(kernel):
    weight, x, hessian = _layer(3)
    weight[2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="^weight: contains NaN or inf$"):
        _kernels(weight, x, hessian)[kernel](0.5, 0, 0)


@pytest.mark.parametrize("kernel", ["sparsegpt", "wanda", "magnitude"])
def test_kernels_reject_bad_pattern(kernel):
    weight, x, hessian = _layer(3)
    with pytest.raises(ValueError, match="sparsity"):
        _kernels(weight, x, hessian)[kernel](1.0, 0, 0)
    with pytest.raises(ValueError, match="does not divide"):
        _kernels(weight, x, hessian)[kernel](0.0, 2, 7)


# ---------------------------------------------------------------- magnitude and Wanda


def test_magnitude_hand_checked():
    weight = torch.tensor([[1.5, -3.0, 0.1, 2.0], [-0.2, 4.0, -1.0, 0.3]])
    result = magnitude_prune(weight, 0.5)  # one ranking over all 8: 0.1, 0.2, 0.3, 1 go
    assert result.weight.tolist() == [[1.5, -3.0, 0.0, 2.0], [0.0, 4.0, 0.0, 0.0]]
    result = magnitude_prune(weight, 0.0, 2, 4)
    assert result.weight.tolist() == [[0.0, -3.0, 0.0, 2.0], [0.0, 4.0, -1.0, 0.0]]


def test_wanda_hand_checked():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 30.0, 20.0, 1.0]])
    sq_norms = torch.tensor([100.0, 1.0, 1.0, 0.25])  # input norms 10, 1, 1, 0.5
    # scores: row 0 = 10, 2, 3, 2; row 1 = 40, 30, 20, 0.5. Two go in every row (the tie at 2
    # goes to the first position); a whole-matrix ranking would take three from row 0.
    result = wanda_prune(weight, sq_norms, 0.5)
    assert result.weight.tolist() == [[1.0, 0.0, 3.0, 0.0], [4.0, 30.0, 0.0, 0.0]]
    assert wanda_prune(weight, sq_norms, 0.0, 1, 2).weight.tolist() == [
        [1.0, 0.0, 3.0, 0.0],
        [4.0, 0.0, 20.0, 0.0],
    ]


def test_wanda_rejects_bad_sq_norms():
    weight = torch.ones(2, 4)
    with pytest.raises(ValueError, match="sq_norms must be"):
        wanda_prune(weight, torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="negative"):
        wanda_prune(weight, torch.tensor([1.0, -1.0, 1.0, 1.0]), 0.5)
    with pytest.raises(FloatingPointError, match="^sq_norms: contains NaN or inf$"):
        wanda_prune(weight, torch.tensor([1.0, float("inf"), 1.0, 1.0]), 0.5)


# ---------------------------------------------------------------- SparseGPT


def test_sparsegpt_two_inputs_hand_checked():
    # H = [[2, 1], [1, 2]], no damping. With H^-1 = U^T U: U00^2 = 2/3, U01/U00 = -1/2,
    # U11^2 = 1/2, so scores are w0^2 * 3/2 and w1^2 * 2, and pruning w0 moves
    # w0 * H01/H11 = w0/2 onto w1 (the least-squares compensation).
    hessian = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    # scores [[1.5, 18], [13.5, 2]]: one prune per row; the last column has nothing after it.
    weight = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    result = sparsegpt_prune(weight, hessian, 0.5, percdamp=0.0)
    torch.testing.assert_close(result.weight, torch.tensor([[0.0, 3.5], [3.0, 0.0]]))
    # scores [[1.5, 18], [24, 50]]: the tile-wide choice takes a whole row.
    weight = torch.tensor([[1.0, 3.0], [4.0, 5.0]])
    result = sparsegpt_prune(weight, hessian, 0.5, percdamp=0.0)
    assert result.mask.tolist() == [[False, False], [True, True]]
    assert result.weight.tolist() == [[0.0, 0.0], [4.0, 5.0]]


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    # Uncorrelated inputs of equal scale: every score is w^2 times one constant and Hinv has no
    # off-diagonal terms, so nothing is compensated; one tile ranks like one |W| threshold.
    weight = torch.randn(16, 64, generator=_gen(4))
    hessian = 3.0 * torch.eye(64)
    for sparsity, n, m in PATTERNS:
        ours = sparsegpt_prune(weight, hessian, sparsity, n, m, blocksize=64)
        ref = magnitude_prune(weight, sparsity, n, m)
        assert torch.equal(ours.mask, ref.mask) and torch.equal(ours.weight, ref.weight)


def test_sparsegpt_with_diagonal_hessian_nm_is_wanda():
    # Diagonal H = 2 * sq_norms: score w^2 * H_jj = 2 (|w| ||X_j||)^2, ranked like Wanda's within
    # each group, and still no compensation.
    weight = torch.randn(16, 64, generator=_gen(5))
    sq_norms = torch.rand(64, generator=_gen(6)) + 0.1
    ours = sparsegpt_prune(weight, torch.diag(2 * sq_norms), 0.0, 2, 4, percdamp=0.0)
    ref = wanda_prune(weight, sq_norms, 0.0, 2, 4)
    assert torch.equal(ours.mask, ref.mask) and torch.equal(ours.weight, ref.weight)


def test_sparsegpt_nm_does_not_depend_on_blocksize():
    # The lazy batched update after each tile must equal applying every column update at once,
    # and N:M masks are chosen per group, so the tiling is invisible up to rounding.
    weight, _, hessian = _layer(7, out=8, inp=64)
    results = [sparsegpt_prune(weight, hessian, 0.0, 2, 4, blocksize=b) for b in (8, 16, 128)]
    for other in results[1:]:
        assert torch.equal(other.mask, results[0].mask)
        torch.testing.assert_close(other.weight, results[0].weight, rtol=1e-4, atol=1e-4)


def test_sparsegpt_unstructured_counts_per_tile():
    weight, _, hessian = _layer(8, out=8, inp=64)
    result = sparsegpt_prune(weight, hessian, 0.3, blocksize=16)
    per_tile = (~result.mask).reshape(8, 4, 16).sum(dim=(0, 2))
    assert per_tile.tolist() == [num_to_prune(8 * 16, 0.3)] * 4  # 38 of 128 in each tile


def test_sparsegpt_blocksize_rounds_to_multiple_of_m():
    weight, _, hessian = _layer(9, out=4, inp=64)
    _assert_nm(sparsegpt_prune(weight, hessian, 0.0, 4, 8, blocksize=20).mask, 4, 8)


@pytest.mark.parametrize(("sparsity", "n", "m"), [(0.5, 0, 0), (0.0, 2, 4)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(sparsity, n, m):
    for seed in range(4):
        weight, x, hessian = _layer(seed, out=64, inp=128, tokens=512)
        kernels = _kernels(weight, x, hessian)
        kernels["sparsegpt"] = lambda s, n, m: sparsegpt_prune(weight, hessian, s, n, m, blocksize=32)

        def error(name: str) -> float:
            return torch.linalg.norm(x @ (weight - kernels[name](sparsity, n, m).weight).T).item()

        sgpt, wanda, mag = error("sparsegpt"), error("wanda"), error("magnitude")
        assert sgpt < wanda < mag, (seed, sgpt, wanda, mag)


def _reference_obs_sweep(weight: torch.Tensor, hinv: torch.Tensor, sparsity: float, n: int, m: int, blocksize: int):
    """SparseGPT's sweep transcribed column by column, with the full (not lazy) update W[:, i:] -= err x Hinv[i, i:]."""
    w = weight.clone()
    rows, cols = w.shape
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for c0 in range(0, cols, blocksize):
        c1 = min(c0 + blocksize, cols)
        if n == 0:
            scores = w[:, c0:c1] ** 2 / torch.diagonal(hinv)[c0:c1] ** 2
            k = num_to_prune(scores.numel(), sparsity)
            flat = scores.T.flatten()  # the kernel scans a tile column-major
            chosen = torch.zeros(flat.numel(), dtype=torch.bool)
            chosen[flat.argsort(stable=True)[:k]] = True
            pruned[:, c0:c1] = chosen.reshape(c1 - c0, rows).T
        for i in range(c0, c1):
            if n and (i - c0) % m == 0:
                scores = w[:, i : i + m] ** 2 / torch.diagonal(hinv)[i : i + m] ** 2
                pruned[:, i : i + m] = False
                pruned[:, i : i + m].scatter_(1, scores.argsort(dim=1, stable=True)[:, :n], True)
            err = torch.where(pruned[:, i], w[:, i], 0.0) / hinv[i, i]
            w[:, i:] -= torch.outer(err, hinv[i, i:])
            w[:, i] = torch.where(pruned[:, i], 0.0, w[:, i])
    return w, ~pruned


@pytest.mark.parametrize(("sparsity", "n", "m"), [(0.6, 0, 0), (0.0, 2, 4), (0.0, 4, 8)])
def test_sparsegpt_sweep_equals_the_column_by_column_algorithm(sparsity, n, m):
    from fedspallm.pruners.sparsegpt import _prune_tiles, inverse_hessian_cholesky

    weight, _, hessian = _layer(13, out=24, inp=80, tokens=512)
    weight, hessian = weight.double(), hessian.double()
    hinv = inverse_hessian_cholesky(hessian)
    expected_w, expected_keep = _reference_obs_sweep(weight, hinv, sparsity, n, m, blocksize=32)
    wt = weight.T.contiguous()
    pruned_t = torch.zeros(wt.shape, dtype=torch.bool)
    _prune_tiles(wt, hinv, pruned_t, sparsity, n, m, blocksize=32)
    assert torch.equal(~pruned_t.T, expected_keep)
    torch.testing.assert_close(wt.T.masked_fill(pruned_t.T, 0), expected_w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("size", [1, 7, 64, 193, 500])
def test_lower_triangular_inverse_by_halves(size):
    from fedspallm.pruners.sparsegpt import lower_triangular_inverse

    x = torch.randn(2 * size, size, generator=_gen(size), dtype=torch.float64)
    lower = torch.linalg.cholesky(x.T @ x / size + 0.1 * torch.eye(size, dtype=torch.float64))  # as from a Hessian
    inverse = lower_triangular_inverse(lower, leaf=16)
    assert torch.equal(inverse, inverse.tril())
    torch.testing.assert_close(inverse @ lower, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-9)


def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    from fedspallm.pruners import inverse_hessian_cholesky

    _, _, hessian = _layer(14, inp=48)
    hessian = hessian.double()
    upper = inverse_hessian_cholesky(hessian, percdamp=0.01)
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(48, dtype=torch.float64)
    assert torch.equal(upper, upper.triu()) and (upper.diagonal() > 0).all()
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped), rtol=1e-9, atol=1e-12)
    # The factor is unique, so it is the one factoring the inverse directly would give.
    torch.testing.assert_close(upper, torch.linalg.cholesky(torch.linalg.inv(damped), upper=True), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(("sparsity", "n", "m"), [(0.6, 0, 0), (0.0, 2, 4)])
def test_sparsegpt_group_is_each_weight_pruned_on_its_own(sparsity, n, m):
    # Three projections of one input, of different heights (q and a grouped-query k/v), one with a
    # given mask: stacking them must not let one take another's budget or change anyone's sweep.
    _, x, hessian = _layer(15, inp=96, tokens=512)
    g = _gen(16)
    weights = [torch.randn(rows, 96, generator=g) for rows in (24, 8, 8)]
    given = magnitude_prune(weights[2], 0.5).mask
    group = sparsegpt_prune_group(weights, hessian, sparsity, n, m, blocksize=32, keeps=[None, None, given])
    alone = [sparsegpt_prune(w, hessian, sparsity, n, m, blocksize=32, keep=k)
             for w, k in zip(weights, [None, None, given])]
    for together, single in zip(group, alone):
        assert torch.equal(together.mask, single.mask)
        torch.testing.assert_close(together.weight, single.weight, rtol=1e-5, atol=1e-6)
        assert torch.equal(together.weight != 0, together.mask)
    for result in group[:2]:
        if n:
            _assert_nm(result.mask, n, m)
        else:
            rows = result.mask.shape[0]  # SparseGPT rounds its budget per tile of 32 columns
            assert (~result.mask).sum() == 3 * num_to_prune(rows * 32, sparsity)
    assert torch.equal(group[2].mask, given)


def test_sparsegpt_group_rejects_weights_of_different_inputs():
    _, _, hessian = _layer(17, inp=16)
    with pytest.raises(ValueError, match="same input"):
        sparsegpt_prune_group([torch.randn(4, 16), torch.randn(4, 8)], hessian, 0.5)
    with pytest.raises(ValueError, match="one keep"):
        sparsegpt_prune_group([torch.randn(4, 16)], hessian, 0.5, keeps=[None, None])


def test_radix_selection_finds_the_same_kth_value_as_kthvalue():
    from fedspallm.pruners.common import kth_smallest_float

    g = _gen(19)
    cases = {
        "normal": torch.randn(20000, generator=g),
        "squares": torch.randn(20000, generator=g).square(),
        "huge and tiny": torch.randn(20000, generator=g) * torch.logspace(-30, 30, 20000),
        "three values": torch.randint(0, 3, (9000,), generator=g).float() - 1,
        "signed zeros": torch.cat([torch.zeros(3000), -torch.zeros(3000), torch.ones(100)]),
        "float64": torch.randn(20000, generator=g, dtype=torch.float64) * torch.logspace(-30, 30, 20000),
    }
    for name, values in cases.items():
        for k in (1, 2, values.numel() // 3, values.numel() // 2, values.numel()):
            assert kth_smallest_float(values, k).item() == values.kthvalue(k).values.item(), (name, k)
        k = values.numel() // 2
        order = values.argsort(stable=True)[:k]
        expected = torch.zeros(values.numel(), dtype=torch.bool)
        expected[order] = True
        if values.dtype == torch.float32:  # the pruners' scores are float32
            assert torch.equal(~prune_lowest(values.reshape(1, -1), 0.5).reshape(-1), expected), name


def test_all_finite_sees_nan_and_inf_in_any_layout():
    x = torch.randn(6, 5, generator=_gen(18))
    assert all_finite(x) and all_finite(x.T) and all_finite(torch.empty(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[4, 1] = bad
        assert not all_finite(y) and not all_finite(y.T) and not all_finite(y.half())


def test_sparsegpt_given_its_own_mask_reproduces_its_own_weights():
    # Unstructured SparseGPT fixes a tile's mask before sweeping it, so handing it back that mask
    # must replay the same sweep, bit for bit.
    weight, _, hessian = _layer(11, out=32, inp=96)
    chosen = sparsegpt_prune(weight, hessian, 0.6, blocksize=32)
    refit = sparsegpt_prune(weight, hessian, 0.6, blocksize=32, keep=chosen.mask)
    assert torch.equal(refit.mask, chosen.mask) and torch.equal(refit.weight, chosen.weight)


def test_sparsegpt_refit_under_a_given_mask_beats_masking_alone():
    for seed in range(3):
        weight, x, hessian = _layer(20 + seed, out=32, inp=64, tokens=512)
        keep = magnitude_prune(weight, 0.7).mask
        refit = sparsegpt_prune(weight, hessian, 0.7, keep=keep)
        assert torch.equal(refit.mask, keep)
        assert torch.equal(refit.weight != 0, keep)  # kept weights stay, pruned ones are exact zeros

        def error(w: torch.Tensor) -> float:
            return torch.linalg.norm(x @ (weight - w).T).item()

        assert error(refit.weight) < 0.97 * error(weight * keep), seed


def test_sparsegpt_rejects_a_misshaped_mask():
    weight, _, hessian = _layer(12, out=8, inp=16)
    with pytest.raises(ValueError, match="keep must be"):
        sparsegpt_prune(weight, hessian, 0.5, keep=torch.ones(16, 8, dtype=torch.bool))


def test_sparsegpt_dead_input_column_is_zeroed():
    weight, x, _ = _layer(10, out=8, inp=16)
    x[:, 5] = 0
    hessian, _ = accumulate_hessian(None, 0, x)
    result = sparsegpt_prune(weight, hessian, 0.25)
    assert (result.weight[:, 5] == 0).all() and not result.mask[:, 5].any()
    assert (~result.mask).sum() == num_to_prune(8 * 16, 0.25)  # 32, the 8 dead ones among them
    assert torch.equal(result.mask, result.weight != 0)


def test_sparsegpt_indefinite_hessian_retries_with_more_damping():
    # Eigenvalues 4 and -2, mean diagonal 1: damping 0.01, 0.1, 1 leave it indefinite; 10 works.
    hessian = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    weight = torch.tensor([[1.0, 2.0]])
    with pytest.warns(RuntimeWarning, match="retry") as record:
        result = sparsegpt_prune(weight, hessian, 0.5)
    assert [str(w.message).split("damping ")[-1] for w in record] == ["0.1", "1", "10"]
    assert (result.weight == 0).sum() == 1
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match="not positive definite"):
        sparsegpt_prune(weight, hessian, 0.5, max_damping_retries=2)


def test_sparsegpt_singular_hessian_without_damping_retries_once():
    # Rank one: the second Cholesky pivot is exactly 0. Zero damping falls back to 1% of diag.
    hessian = torch.ones(2, 2)
    with pytest.warns(RuntimeWarning, match="retry 1/6 with damping 0.01$"):
        result = sparsegpt_prune(torch.tensor([[1.0, 2.0]]), hessian, 0.5, percdamp=0.0)
    assert torch.isfinite(result.weight).all()


def test_sparsegpt_well_conditioned_hessian_does_not_warn():
    weight, _, hessian = _layer(11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsegpt_prune(weight, hessian, 0.5)


def test_sparsegpt_rejects_nan_or_misshaped_hessian():
    weight, _, hessian = _layer(12)
    hessian[1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="^hessian: contains NaN or inf$"):
        sparsegpt_prune(weight, hessian, 0.5)
    with pytest.raises(ValueError, match=r"hessian must be \[64, 64\]"):
        sparsegpt_prune(weight, torch.eye(32), 0.5)
