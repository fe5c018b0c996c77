"""ℓ0-norm aggregation, adaptive mask expansion, and the fedavg / mask_vote baselines.

Every expected value is worked out by hand in the comments.
"""

from __future__ import annotations

import pytest
import torch

from fedspallm.errors import UserError
from fedspallm.pruners.common import num_to_prune
from fedspallm.federated.aggregation import (
    Contribution,
    aggregate,
    contribute,
    expand_mask,
    l0_average,
    mask_vote,
    merge,
    plain_average,
    prune_votes,
    upload_bytes,
)

T, F = True, False


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def b(rows):
    return torch.tensor(rows, dtype=torch.bool)


def accumulate(pairs):
    acc = None
    for weight, mask in pairs:
        acc = contribute(acc, weight, mask)
    return acc


# Two clients on a 2x3 matrix (pruned entries are 0, as a client uploads them):
#   W1 = [[1, 0, 3], [4, 5, 0]]   M1 = [[1, 0, 1], [1, 1, 0]]
#   W2 = [[3, 4, 0], [0, 7, 0]]   M2 = [[1, 1, 0], [0, 1, 0]]
# weight_sum = [[4, 4, 3], [4, 12, 0]], keep_count = [[2, 1, 1], [1, 2, 0]]
TWO = [
    (t([[1, 0, 3], [4, 5, 0]], torch.float32), b([[T, F, T], [T, T, F]])),
    (t([[3, 4, 0], [0, 7, 0]], torch.float32), b([[T, T, F], [F, T, F]])),
]

# Three clients on a 1x4 matrix:
#   W1 = [2, 0, 6, 0]    M1 = [1, 0, 1, 0]
#   W2 = [4, 3, 3, 0]    M2 = [1, 1, 1, 0]
#   W3 = [0, 0, -3, 0]   M3 = [0, 0, 1, 0]
# weight_sum = [6, 3, 6, 0], keep_count = [2, 1, 3, 0], votes = 3 - keep_count = [1, 2, 0, 3]
THREE = [
    (t([[2, 0, 6, 0]]), b([[T, F, T, F]])),
    (t([[4, 3, 3, 0]]), b([[T, T, T, F]])),
    (t([[0, 0, -3, 0]]), b([[F, F, T, F]])),
]


def test_contribute_sums_kept_weights_and_counts():
    c = accumulate(TWO)
    assert c.weight_sum.dtype == torch.float64
    assert c.keep_count.dtype == torch.int32
    assert torch.equal(c.weight_sum, t([[4, 4, 3], [4, 12, 0]]))
    assert torch.equal(c.keep_count, torch.tensor([[2, 1, 1], [1, 2, 0]], dtype=torch.int32))
    assert c.contributors == 2


def test_contribute_ignores_values_under_a_pruned_mask_and_does_not_modify_acc():
    acc = contribute(None, t([[1.0, 2.0]]), b([[T, T]]))
    before = acc.weight_sum.clone()
    new = contribute(acc, t([[5.0, 99.0]]), b([[T, F]]))
    assert torch.equal(new.weight_sum, t([[6.0, 2.0]]))
    assert torch.equal(acc.weight_sum, before) and acc.contributors == 1


def test_l0_versus_plain_average_two_clients():
    c = accumulate(TWO)
    # l0: [[4/2, 4/1, 3/1], [4/1, 12/2, 0 (nobody kept it)]]
    assert torch.equal(l0_average(c), t([[2, 4, 3], [4, 6, 0]]))
    # fedavg: weight_sum / 2, the pruned zeros pull the mean down
    assert torch.equal(plain_average(c), t([[2, 2, 1.5], [2, 6, 0]]))
    assert torch.equal(prune_votes(c), torch.tensor([[0, 1, 1], [1, 0, 2]], dtype=torch.int32))


def test_l0_versus_plain_average_three_clients():
    c = accumulate(THREE)
    # l0: [6/2, 3/1, 6/3, 0] ; fedavg: [6/3, 3/3, 6/3, 0/3]
    assert torch.equal(l0_average(c), t([[3, 3, 2, 0]]))
    assert torch.equal(plain_average(c), t([[2, 1, 2, 0]]))
    assert torch.equal(prune_votes(c), torch.tensor([[1, 2, 0, 3]], dtype=torch.int32))


def test_aggregate_with_expansion_three_clients():
    c = accumulate(THREE)
    # s = 0.5 prunes 2 of 4: by votes [1, 2, 0, 3] -> positions 3 then 1
    r = aggregate(c, "l0", expansion=True, sparsity=0.5)
    assert torch.equal(r.mask, b([[T, F, T, F]]))
    assert torch.equal(r.weight, t([[3, 0, 2, 0]]))
    assert r.weight.dtype == torch.float64
    r = aggregate(c, "fedavg", expansion=True, sparsity=0.5)
    assert torch.equal(r.weight, t([[2, 0, 2, 0]]))
    # s = 0.75 prunes 3: positions 3, 1, 0
    r = aggregate(c, "l0", expansion=True, sparsity=0.75)
    assert torch.equal(r.weight, t([[0, 0, 2, 0]]))


def test_aggregate_without_expansion_stays_below_target():
    # two clients each prune 2 of 4 (50%), at different places: only position 3 is pruned by both
    c = accumulate([(t([[1, 2, 0, 0]]), b([[T, T, F, F]])), (t([[0, 4, 6, 0]]), b([[F, T, T, F]]))])
    r = aggregate(c, "l0", expansion=False, sparsity=0.5)
    # l0 = [1/1, 6/2, 6/1, 0]: 1 of 4 zero, 25% < 50%
    assert torch.equal(r.weight, t([[1, 3, 6, 0]]))
    assert torch.equal(r.mask, b([[T, T, T, F]]))
    r = aggregate(c, "fedavg", expansion=False)
    # fedavg = [0.5, 3, 3, 0]; mask = non-zero
    assert torch.equal(r.weight, t([[0.5, 3, 3, 0]]))
    assert torch.equal(r.mask, b([[T, T, T, F]]))
    # with expansion: votes [1, 0, 1, 2] -> prune 3, then the tie at votes 1 goes to |W| 1 < 6
    r = aggregate(c, "l0", expansion=True, sparsity=0.5)
    assert torch.equal(r.weight, t([[0, 3, 6, 0]]))


def test_aggregate_rejects_unknown_method():
    with pytest.raises(UserError):
        aggregate(accumulate(THREE), "median")


@pytest.mark.parametrize("n, m", [(0, 0), (2, 4)])
def test_single_contributor_gets_its_own_weight_and_mask_back(n, m):
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(4, 8, generator=g)
    if m:
        # the 2 smallest |W| of each group of 4
        order = dense.abs().reshape(-1, 4).argsort(dim=1)
        mask = torch.ones(8, 4, dtype=torch.bool).scatter_(1, order[:, :2], False).reshape(4, 8)
    else:
        mask = dense.abs() > dense.abs().flatten().kthvalue(16).values
    weight = dense * mask
    c = contribute(None, weight, mask)
    for expansion in (True, False):
        r = aggregate(c, "l0", expansion=expansion, sparsity=0.5, n=n, m=m)
        assert torch.equal(r.mask, mask)
        assert torch.equal(r.weight, weight.double())


def test_expansion_breaks_vote_ties_by_smallest_magnitude():
    weight = t([[0.5, -0.1, 3, -2, 0.2, 1]])
    votes = torch.tensor([[1, 1, 1, 0, 0, 2]])
    # prune 3 of 6: position 5 (2 votes), then among the 1-vote positions 0, 1, 2 the smallest
    # |W|: 1 (0.1), then 0 (0.5). Position 4 has the smallest |W| of all but fewer votes.
    r = expand_mask(weight, votes, 0.5)
    assert torch.equal(r.mask, b([[F, F, T, T, T, F]]))
    assert torch.equal(r.weight, t([[0, 0, 3, -2, 0.2, 0]]))


def test_expansion_breaks_full_ties_by_index():
    # equal votes and equal |W| everywhere: the lowest indices go first, whatever the sign
    r = expand_mask(t([[1, -1, 1, -1]]), torch.zeros(1, 4, dtype=torch.int32), 0.5)
    assert torch.equal(r.mask, b([[F, F, T, T]]))


def test_expansion_hits_the_exact_unstructured_target_and_keeps_dtype():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(7, 9, generator=g).half()
    votes = torch.randint(0, 3, (7, 9), generator=g)
    r = expand_mask(weight, votes, 0.37)
    # round(0.37 * 63) = round(23.31) = 23
    assert int((~r.mask).sum()) == 23
    assert r.weight.dtype == torch.float16
    assert torch.equal(r.weight, torch.where(r.mask, weight, 0.0))
    # every pruned position outranks every kept one in (votes desc)
    assert votes[~r.mask].min() >= votes[r.mask].max()


# N:M on a 2x8 matrix, groups [0:4] and [4:8] of each row:
NM_WEIGHT = t([[1, 2, 3, 4, 4, -3, 2, -1], [5, 1, 1, 1, 2, 2, -2, 2]])
NM_VOTES = torch.tensor([[0, 1, 2, 3, 1, 1, 1, 1], [2, 2, 0, 0, 0, 3, 3, 3]])


def test_expansion_2_4():
    # row 0: group 0 prunes votes 3, 2 (positions 3, 2); group 1 ties at 1 vote -> |W| 1, 2 (7, 6)
    # row 1: group 0 prunes the 2-vote positions 0, 1; group 1 has three 3-vote positions of |W| 2:
    #        the index decides, 5 and 6
    r = expand_mask(NM_WEIGHT, NM_VOTES, 0.0, n=2, m=4)
    assert torch.equal(r.mask, b([[T, T, F, F, T, T, F, F], [F, F, T, T, T, F, F, T]]))
    assert torch.equal(r.weight, t([[1, 2, 0, 0, 4, -3, 0, 0], [0, 0, 1, 1, 2, 0, 0, 2]]))
    assert torch.equal((~r.mask).reshape(-1, 4).sum(1), torch.full((4,), 2))


def test_expansion_4_8():
    # row 0: votes 3, 2 (positions 3, 2), then among the 1-vote positions 1, 4, 5, 6, 7 with |W|
    #        2, 4, 3, 2, 1: position 7 (1), then 1 and 6 tie at |W| 2 -> index 1
    # row 1: the 3-vote positions 5, 6, 7, then the 2-vote ones 0 (|W| 5), 1 (|W| 1) -> 1
    r = expand_mask(NM_WEIGHT, NM_VOTES, 0.0, n=4, m=8)
    assert torch.equal(r.mask, b([[T, F, F, F, T, T, T, F], [T, F, T, T, T, F, F, F]]))
    assert torch.equal((~r.mask).sum(1), torch.tensor([4, 4]))


def test_expansion_rejects_bad_patterns():
    w = torch.zeros(2, 6)
    v = torch.zeros(2, 6, dtype=torch.int32)
    with pytest.raises(ValueError):
        expand_mask(w, v, 0.0, n=2, m=4)  # 6 columns are not groups of 4
    with pytest.raises(ValueError):
        expand_mask(w, v, 0.0, n=3, m=2)  # n > m
    with pytest.raises(ValueError):
        expand_mask(w, v, 1.0)
    with pytest.raises(ValueError):
        expand_mask(w, v[:, :3], 0.5)


# mask_vote: the dense weight and the prune votes of 3 clients
MV_DENSE = t([[1, 2, 3, 4], [5, 6, 7, 8]], torch.float32)
MV_VOTES = torch.tensor([[3, 0, 3, 1], [0, 2, 0, 1]])


def test_mask_vote_prunes_the_most_voted_positions_of_the_dense_weight():
    # 3 of 8: the votes 3, 3, 2 at (0,0), (0,2), (1,1); no tie, whatever the generator
    for seed in range(5):
        r = mask_vote(MV_DENSE, MV_VOTES, 0.375, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(r.mask, b([[F, T, F, T], [T, F, T, T]]))
        assert torch.equal(r.weight, t([[0, 2, 0, 4], [5, 0, 7, 8]], torch.float32))
    # 2:4: row 0 prunes the 3-vote positions 0, 2; row 1 the 2- and 1-vote positions 1, 3
    r = mask_vote(MV_DENSE, MV_VOTES, 0.0, n=2, m=4)
    assert torch.equal(r.mask, b([[F, T, F, T], [T, F, T, F]]))


def _tied_outcomes(seeds, **pattern):
    out = set()
    for seed in seeds:
        r = mask_vote(MV_DENSE, MV_VOTES, generator=torch.Generator().manual_seed(seed), **pattern)
        again = mask_vote(MV_DENSE, MV_VOTES, generator=torch.Generator().manual_seed(seed), **pattern)
        assert torch.equal(r.mask, again.mask)  # reproducible
        out.add(tuple(r.mask.flatten().tolist()))
    return out


def test_mask_vote_breaks_ties_at_random_reproducibly():
    # 4 of 8: the 3 most voted, then one of the two 1-vote positions (0,3) and (1,3), at random
    outcomes = _tied_outcomes(range(20), sparsity=0.5)
    assert outcomes == {(F, T, F, F, T, F, T, T), (F, T, F, T, T, F, T, F)}


def test_mask_vote_nm_ties_at_random():
    # 1:4: row 0 ties between the two 3-vote positions 0 and 2; row 1 prunes position 1 (2 votes)
    outcomes = _tied_outcomes(range(20), sparsity=0.0, n=1, m=4)
    assert outcomes == {(F, T, T, T, T, F, T, T), (T, T, F, T, T, F, T, T)}


def test_mask_vote_without_generator():
    r = mask_vote(MV_DENSE, MV_VOTES, 0.375)
    assert int((~r.mask).sum()) == 3


def test_upload_bytes():
    mask = b([[T, F, T, F, F], [F, T, T, F, F], [T, F, F, F, T]])
    # 15 positions -> ceil(15/8) = 2 bytes of bitmask; 6 kept values
    assert upload_bytes(mask, torch.float16) == 2 + 6 * 2
    assert upload_bytes(mask, torch.bfloat16) == 14
    assert upload_bytes(mask, torch.float32) == 2 + 6 * 4
    assert upload_bytes(torch.ones(4, 4, dtype=torch.bool), torch.float32) == 2 + 16 * 4


def test_merge_equals_one_accumulator():
    pairs = TWO[:1] + [(t([[0, 0, 1], [2, 0, 3]]), b([[F, F, T], [T, F, T]]))] + TWO[1:]
    whole = accumulate(pairs)
    for split in range(1, 3):
        merged = merge(accumulate(pairs[:split]), accumulate(pairs[split:]))
        assert torch.equal(merged.weight_sum, whole.weight_sum)
        assert torch.equal(merged.keep_count, whole.keep_count)
        assert merged.contributors == whole.contributors == 3


def test_merge_rejects_different_shapes():
    with pytest.raises(ValueError):
        merge(accumulate(TWO), accumulate(THREE))


def test_contribution_is_a_plain_record():
    c = Contribution(
        weight_sum=torch.zeros(1, 2, dtype=torch.float64),
        keep_count=torch.zeros(1, 2, dtype=torch.int32),
        contributors=0,
    )
    assert torch.equal(l0_average(c), torch.zeros(1, 2, dtype=torch.float64))
    with pytest.raises(ValueError):
        plain_average(c)


# -- expansion by selection against the full stable sort it replaced ----------------------------
# The oracle is the former implementation: a stable sort by magnitude gives the preorder, a stable
# sort by descending votes over it gives the pruning order. The selection must give the same masks
# bitwise, ties included.


def _oracle_mask_by_votes(votes, preorder, sparsity, n, m):
    votes = votes.to(torch.float64 if votes.is_floating_point() else torch.int64)
    grouped = votes.reshape(1, -1) if m == 0 else votes.reshape(-1, m)
    count = n if m else num_to_prune(votes.numel(), sparsity)
    by_votes = torch.sort(-grouped.gather(1, preorder), dim=1, stable=True).indices
    pruned = preorder.gather(1, by_votes[:, :count])
    return torch.ones_like(grouped, dtype=torch.bool).scatter_(1, pruned, False).reshape(votes.shape)


def _oracle_expand_mask(weight, votes, sparsity, n=0, m=0):
    magnitude = weight.abs().reshape(1, -1) if m == 0 else weight.abs().reshape(-1, m)
    return _oracle_mask_by_votes(votes, torch.sort(magnitude, dim=1, stable=True).indices, sparsity, n, m)


def _oracle_mask_vote(dense, votes, sparsity, n=0, m=0, generator=None):
    if m:
        preorder = torch.rand(dense.numel() // m, m, generator=generator).argsort(dim=1)
    else:
        preorder = torch.randperm(dense.numel(), generator=generator).reshape(1, -1)
    return _oracle_mask_by_votes(votes, preorder, sparsity, n, m)


def _random_weight(kind, shape, g):
    if kind == "normal":
        return torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "few values":  # heavy ties in |W|, both signs
        return torch.randint(-2, 3, shape, generator=g).double()
    if kind == "signed zeros":  # -0.0 and 0.0 must tie
        zeros = torch.where(torch.rand(shape, generator=g) < 0.5, -0.0, 0.0)
        return torch.where(torch.rand(shape, generator=g) < 0.6, zeros, torch.randint(-1, 2, shape, generator=g).float())
    if kind == "half":
        return torch.randn(shape, generator=g).half()
    if kind == "bfloat16 ties":
        return torch.randint(-3, 4, shape, generator=g).bfloat16()
    # non-finite entries: NaN sorts after +inf
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    w[torch.rand(shape, generator=g) < 0.2] = float("nan")
    w[torch.rand(shape, generator=g) < 0.1] = float("inf")
    w[torch.rand(shape, generator=g) < 0.1] = -0.0
    return w


def _random_votes(kind, shape, g):
    if kind == "int32":
        return torch.randint(0, 3, shape, generator=g, dtype=torch.int32)
    if kind == "all equal":
        return torch.zeros(shape, dtype=torch.int64)
    if kind == "wide int64":  # a range too wide to count (the kthvalue path), with ties
        return torch.randint(-2, 3, shape, generator=g) * 2**40
    if kind == "float":
        return torch.randint(0, 4, shape, generator=g).double() / 3
    if kind == "float signed zeros":
        return torch.randint(-1, 2, shape, generator=g).float() * torch.where(torch.rand(shape, generator=g) < 0.5, -0.0, 1.0)
    v = torch.randint(0, 3, shape, generator=g).double()
    v[torch.rand(shape, generator=g) < 0.2] = float("nan")
    v[torch.rand(shape, generator=g) < 0.1] = float("-inf")
    return v


WEIGHT_KINDS = ("normal", "few values", "signed zeros", "half", "bfloat16 ties", "non-finite")
VOTE_KINDS = ("int32", "all equal", "wide int64", "float", "float signed zeros", "float non-finite")
PATTERNS = ((0, 0), (1, 2), (2, 4), (1, 4), (4, 8), (3, 8), (5, 16))


@pytest.mark.parametrize("weight_kind", WEIGHT_KINDS)
@pytest.mark.parametrize("vote_kind", VOTE_KINDS)
def test_expansion_by_selection_equals_the_stable_sort(weight_kind, vote_kind):
    g = torch.Generator().manual_seed(len(weight_kind) * 31 + len(vote_kind))
    cases = 0
    for trial in range(8):
        shape = (int(torch.randint(1, 7, (1,), generator=g)), 16 * int(torch.randint(1, 4, (1,), generator=g)))
        weight, votes = _random_weight(weight_kind, shape, g), _random_votes(vote_kind, shape, g)
        for n, m in PATTERNS:
            sparsity = 0.0 if m else float(torch.rand(1, generator=g)) * 0.999
            got = expand_mask(weight, votes, sparsity, n, m)
            assert torch.equal(got.mask, _oracle_expand_mask(weight, votes, sparsity, n, m)), (trial, n, m, sparsity)
            cases += 1
    assert cases == 8 * len(PATTERNS)


def test_expansion_by_selection_equals_the_stable_sort_on_model_sized_matrices():
    shape = (768, 576)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=g, dtype=torch.float64)
    weight[torch.rand(shape, generator=g) < 0.3] = 0.0  # positions nobody kept: a large |W| tie
    votes = torch.randint(0, 5, shape, generator=g, dtype=torch.int32)
    for sparsity in (0.5, 0.123):
        expected = _oracle_expand_mask(weight, votes, sparsity)
        assert torch.equal(expand_mask(weight, votes, sparsity).mask, expected)
        float_votes = votes.double() / 4  # the same order, float path (kthvalue)
        assert torch.equal(expand_mask(weight, float_votes, sparsity).mask, expected)
    for n, m in ((2, 4), (4, 8)):
        assert torch.equal(expand_mask(weight, votes, 0.0, n, m).mask, _oracle_expand_mask(weight, votes, 0.0, n, m))


@pytest.mark.parametrize("vote_kind", ("int32", "all equal", "float"))
def test_mask_vote_by_selection_equals_the_stable_sort(vote_kind):
    g = torch.Generator().manual_seed(7)
    dense = torch.randn(24, 32, generator=g)
    for trial in range(20):
        votes = _random_votes(vote_kind, dense.shape, g)
        for n, m in PATTERNS:
            sparsity = 0.0 if m else float(torch.rand(1, generator=g)) * 0.999
            got = mask_vote(dense, votes, sparsity, n, m, torch.Generator().manual_seed(trial))
            expected = _oracle_mask_vote(dense, votes, sparsity, n, m, torch.Generator().manual_seed(trial))
            assert torch.equal(got.mask, expected), (trial, n, m)
