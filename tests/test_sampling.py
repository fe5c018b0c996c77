"""Client budgets and per-round block sampling (DESIGN.md, "The method", steps 1 and 2)."""

from __future__ import annotations

import math
import random

import pytest

from fedspallm.errors import UserError
from fedspallm.federated.sampling import (
    blocks_per_client,
    client_budgets,
    round_rng,
    sample_blocks,
    uncovered_blocks,
)


def test_budgets_list_is_returned_as_given():
    assert client_budgets([0.3, 1.0, 0.25], 3) == [0.3, 1.0, 0.25]


def test_budgets_uniform():
    assert client_budgets("uniform", 3) == [0.5, 0.5, 0.5]
    assert client_budgets("uniform", 2, budget=0.75) == [0.75, 0.75]


def test_budgets_linear():
    # (1.0 - 0.25) / 3 = 0.25 apart
    assert client_budgets("linear", 4) == [0.25, 0.5, 0.75, 1.0]
    # (0.5 - 0.125) / 3 = 0.125 apart
    assert client_budgets("linear", 4, budget_range=(0.125, 0.5)) == [0.125, 0.25, 0.375, 0.5]
    assert client_budgets("linear", 1) == [1.0]


@pytest.mark.parametrize(
    "budgets, k",
    [([0.5, 0.5], 3), ([0.0, 0.5], 2), ([1.5], 1), ("spread", 2), ("linear", 0)],
)
def test_budgets_rejects_bad_input(budgets, k):
    with pytest.raises(ValueError):  # the user's rules are FederationConfig's (tests/test_validation.py)
        client_budgets(budgets, k)


@pytest.mark.parametrize(
    "r, L, k",
    [
        (0.5, 5, 3),  # 2.5 rounds half up (banker's rounding would give 2)
        (0.5, 9, 5),  # 4.5 -> 5 (banker's: 4)
        (0.75, 10, 8),  # 7.5 -> 8
        (0.25, 30, 8),  # 7.5 -> 8
        (0.3, 30, 9),
        (0.01, 30, 1),  # 0.3 rounds to 0, clamped up to 1
        (0.01, 5, 1),
        (1.0, 30, 30),
        (1.0, 1, 1),
        (1.5, 5, 5),  # clamped down to L
    ],
)
def test_blocks_per_client_rounds_half_up_and_clamps(r, L, k):
    assert blocks_per_client(r, L) == k


def test_sample_all_gives_every_client_every_block():
    assert sample_blocks([1, 3], 4, "all", random.Random(0)) == [[0, 1, 2, 3], [0, 1, 2, 3]]


@pytest.mark.parametrize("method", ["systematic", "uniform"])
def test_samples_are_sorted_distinct_and_of_size_k(method):
    rng = random.Random(1)
    ks = [1, 4, 7, 7]
    for _ in range(50):
        samples = sample_blocks(ks, 7, method, rng)
        assert [len(s) for s in samples] == ks
        for s in samples:
            assert s == sorted(set(s))
            assert all(0 <= b < 7 for b in s)


def test_sample_rejects_bad_k_and_method():
    with pytest.raises(ValueError):
        sample_blocks([0, 2], 5, "systematic", random.Random(0))
    with pytest.raises(ValueError):
        sample_blocks([6], 5, "uniform", random.Random(0))
    with pytest.raises(UserError):
        sample_blocks([2], 5, "stratified", random.Random(0))


def test_systematic_covers_every_block_when_budgets_suffice():
    cases = [([1] * 6, 6), ([2, 3, 1], 6), ([4, 9, 17], 30), ([10, 10, 11], 30), ([29, 2], 30)]
    for ks, L in cases:
        assert sum(ks) >= L
        for seed in range(300):
            assert uncovered_blocks(sample_blocks(ks, L, "systematic", random.Random(seed)), L) == []


def test_systematic_partitions_the_blocks_when_budgets_sum_to_L():
    # the arcs are consecutive and do not wrap onto each other: every block exactly once
    for seed in range(100):
        samples = sample_blocks([3, 1, 4, 2], 10, "systematic", random.Random(seed))
        assert sorted(b for s in samples for b in s) == list(range(10))
    # and with fewer, exactly L - sum(k) blocks stay uncovered
    for seed in range(100):
        samples = sample_blocks([3, 1, 4], 10, "systematic", random.Random(seed))
        assert len(uncovered_blocks(samples, 10)) == 2


@pytest.mark.parametrize("method", ["systematic", "uniform"])
def test_inclusion_probability_is_k_over_L(method):
    # each block is in S_i with probability k_i/L; check every (client, block) frequency
    # against 4 binomial standard errors
    L, ks, draws = 30, [4, 9, 15, 30], 20000
    counts = [[0] * L for _ in ks]
    rng = random.Random(12345)
    for _ in range(draws):
        for i, sample in enumerate(sample_blocks(ks, L, method, rng)):
            row = counts[i]
            for b in sample:
                row[b] += 1
    for k, row in zip(ks, counts):
        p = k / L
        tolerance = 4 * math.sqrt(p * (1 - p) / draws)
        for c in row:
            assert abs(c / draws - p) <= tolerance, (method, k, c / draws, p)


def test_round_rng_is_deterministic_per_seed_and_round():
    def draw(seed, rnd):
        return sample_blocks([3, 5], 12, "systematic", round_rng(seed, rnd))

    assert draw(7, 2) == draw(7, 2)
    assert draw(7, 2) != draw(7, 3)
    assert draw(7, 2) != draw(8, 2)
    # seeded from a sha256 of (seed, round), not from hash(): the same in every process
    assert round_rng(0, 0).random() == round_rng(0, 0).random()
    # pinned: a change here changes every run's sampling
    assert round_rng(0, 0).random() == 0.9589653324064089


def test_uncovered_blocks():
    assert uncovered_blocks([[0, 2], [2, 3]], 6) == [1, 4, 5]
    assert uncovered_blocks([[0, 1], [2]], 3) == []
    assert uncovered_blocks([], 3) == [0, 1, 2]
