"""Server-side configuration of a round: client budgets and which blocks each client prunes.

Pure functions (DESIGN.md, "The method", steps 1 and 2). All randomness comes from a
``random.Random`` that :func:`round_rng` derives from ``(seed, round)`` alone, so every process of
a collective run draws the same samples without anything being broadcast.
"""

from __future__ import annotations

import hashlib
import math
import random

from fedspallm.errors import UserError

BUDGET_SPREADS = ("uniform", "linear")
SAMPLING_METHODS = ("systematic", "uniform", "all")


def client_budgets(
    budgets: list[float] | str,
    num_clients: int,
    budget: float = 0.5,
    budget_range: tuple[float, float] = (0.25, 1.0),
) -> list[float]:
    """Resource fraction r_i in (0, 1] of every client.

    A list is returned as given (one value per client); ``"uniform"`` gives every client ``budget``;
    ``"linear"`` spreads the clients evenly from ``budget_range[0]`` to ``budget_range[1]``
    (a single client gets the upper end).
    """
    if isinstance(budgets, str) and budgets not in BUDGET_SPREADS:
        raise ValueError(f"budgets must be a list or one of {BUDGET_SPREADS}, got {budgets!r}")
    if budgets == "uniform":
        values = [float(budget)] * num_clients
    elif budgets == "linear":
        low, high = (float(x) for x in budget_range)
        step = (high - low) / (num_clients - 1) if num_clients > 1 else 0.0
        values = [low + i * step for i in range(num_clients - 1)] + [high]
    else:
        values = [float(x) for x in budgets]
    # The user's rules are FederationConfig's; here a bad value is a programming error.
    if num_clients < 1 or len(values) != num_clients or not all(0.0 < r <= 1.0 for r in values):
        raise ValueError(f"client budgets {values} for {num_clients} clients: need one in (0, 1] per client")
    return values


def blocks_per_client(resource: float, num_blocks: int) -> int:
    """k_i = clamp(round(r_i * L), 1, L), rounding halves up (0.5 * 5 = 2.5 -> 3)."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    return min(max(math.floor(resource * num_blocks + 0.5), 1), num_blocks)


def sample_blocks(
    blocks_per_client: list[int], num_blocks: int, method: str, rng: random.Random
) -> list[list[int]]:
    """The sorted block indices S_i, |S_i| = k_i, that client i prunes this round.

    ``"all"``: every client gets every block (k_i is ignored).
    ``"uniform"``: an independent simple random sample of k_i blocks per client.
    ``"systematic"``: one random permutation pi of the blocks and one random offset u; the clients
    take consecutive arcs of the circle pi[u], pi[u+1], ... (indices mod L), client i starting where
    client i-1 stopped. Each block is in S_i with probability k_i/L, and the arcs cover every block
    whenever sum(k_i) >= L.
    """
    num = num_blocks
    for k in blocks_per_client:
        if not 1 <= k <= num:
            raise ValueError(f"blocks per client must be in [1, {num}], got {k}")
    if method == "all":
        return [list(range(num)) for _ in blocks_per_client]
    if method == "uniform":
        return [sorted(rng.sample(range(num), k)) for k in blocks_per_client]
    if method == "systematic":
        perm = list(range(num))
        rng.shuffle(perm)
        start = rng.randrange(num)
        samples = []
        for k in blocks_per_client:
            samples.append(sorted(perm[(start + j) % num] for j in range(k)))
            start += k
        return samples
    raise UserError(f"federation.sampling must be one of {SAMPLING_METHODS}, got {method!r}")


def round_rng(seed: int, round_index: int) -> random.Random:
    """A generator that depends only on (seed, round), not on the process or PYTHONHASHSEED."""
    digest = hashlib.sha256(f"fedspallm/sampling/{int(seed)}/{int(round_index)}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def uncovered_blocks(samples: list[list[int]], num_blocks: int) -> list[int]:
    """Blocks that no client's sample contains, in increasing order."""
    covered = {b for sample in samples for b in sample}
    return [b for b in range(num_blocks) if b not in covered]
