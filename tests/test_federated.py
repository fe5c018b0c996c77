"""FedSpaLLM rounds in one process: equivalences, exact targets, uncovered blocks, client base."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model, random_windows
from fedspallm.calibration import PruneSpec, prune_sequential
from fedspallm.config import FederationConfig
from fedspallm.errors import UserError
from fedspallm.federated.collectives import PlainReducer
from fedspallm.federated.rounds import clients_of_rank, plan_rounds, run_federation
from fedspallm.models import find_decoder_blocks, get_weight, prunable_modules


def weights(model) -> dict[str, torch.Tensor]:
    return {name: get_weight(layer).detach().clone() for name, layer in prunable_modules(model).items()}


def federate(model, client_windows, spec, **overrides):
    cfg = FederationConfig(**{"num_clients": len(client_windows), **overrides})
    plan = plan_rounds(cfg, len(find_decoder_blocks(model)), seed=0)
    return run_federation(model, client_windows, spec, cfg, plan, PlainReducer(), batch_size=4), plan


def test_one_client_all_blocks_one_round_is_centralized_sparsegpt_exactly():
    windows = random_windows(n=8)
    spec = PruneSpec("sparsegpt", 0.6)
    central = make_tiny_model("llama")
    prune_sequential(central, windows, spec, batch_size=4)
    federated = make_tiny_model("llama")
    federate(federated, {0: windows}, spec, sampling="all")
    for name, weight in weights(central).items():
        assert torch.equal(weight, weights(federated)[name]), name


def test_identical_clients_give_the_model_of_one_client():
    windows = random_windows(n=4)
    spec = PruneSpec("sparsegpt", 0.5)
    one = make_tiny_model("llama")
    federate(one, {0: windows}, spec, sampling="all")
    many = make_tiny_model("llama")
    federate(many, {c: windows for c in range(3)}, spec, sampling="all")
    for name, weight in weights(one).items():
        assert torch.equal(weight, weights(many)[name]), name


@pytest.mark.parametrize("pattern", [(0, 0), (2, 4)])
def test_expansion_hits_the_target_exactly_and_no_expansion_falls_short(pattern):
    n, m = pattern
    spec = PruneSpec("sparsegpt", 0.5, n, m)
    clients = {c: random_windows(n=2, seed=c) for c in range(3)}
    expanded = make_tiny_model("llama")
    federate(expanded, clients, spec, sampling="all")
    for name, weight in weights(expanded).items():
        if n:
            assert torch.all((weight == 0).reshape(weight.shape[0], -1, m).sum(-1) == n), name
        else:
            assert int((weight == 0).sum()) == round(0.5 * weight.numel()), name
    loose = make_tiny_model("llama")
    outcome, _ = federate(loose, clients, spec, sampling="all", expansion=False)
    fractions = [1 - mask.float().mean().item() for mask in outcome.masks.values()]
    assert max(fractions) < 0.5  # ℓ0 averaging keeps a weight any client kept


def test_l0_aggregation_differs_from_plain_averaging_on_distinct_clients():
    spec = PruneSpec("sparsegpt", 0.5)
    clients = {c: random_windows(n=2, seed=10 + c) for c in range(2)}
    l0 = make_tiny_model("llama")
    federate(l0, clients, spec, sampling="all")
    plain = make_tiny_model("llama")
    federate(plain, clients, spec, sampling="all", strategy="fedavg")
    differs = [not torch.equal(w, weights(plain)[name]) for name, w in weights(l0).items()]
    assert all(differs)


def test_sampled_blocks_only_and_upload_counts_them():
    spec = PruneSpec("wanda", 0.5)
    model = make_tiny_model("llama")
    outcome, plan = federate(model, {0: random_windows(n=2), 1: random_windows(n=2, seed=1)}, spec,
                             budgets=[0.34, 0.67])  # k = 1 and 2 blocks of 3
    assert plan.blocks_per_client == [1, 2]
    assert sorted(set(plan.samples[0][0]) | set(plan.samples[0][1])) == [0, 1, 2]  # systematic covers all
    per_block = {}
    for name, layer in prunable_modules(make_tiny_model("llama")).items():
        per_block.setdefault(int(name.split(".")[2]), []).append(layer.weight.numel())
    for client, blocks in enumerate(plan.samples[0]):
        numel = sum(sum(per_block[b]) for b in blocks)
        expected = sum((x + 7) // 8 for b in blocks for x in per_block[b]) + numel // 2 * 4
        assert outcome.rounds[0].upload_bytes[client] == expected


def test_uncovered_blocks_are_an_error_by_default_and_handled_when_asked():
    spec = PruneSpec("magnitude", 0.5)
    with pytest.raises(UserError, match="pruned by no client"):
        federate(make_tiny_model("llama"), {0: random_windows(n=2)}, spec, budgets=[0.34])
    model = make_tiny_model("llama")
    outcome, _ = federate(model, {0: random_windows(n=2)}, spec, budgets=[0.34], uncovered="magnitude")
    assert len(outcome.uncovered) == 2
    assert all(abs((w == 0).float().mean().item() - 0.5) < 0.01 for w in weights(model).values())
    dense = make_tiny_model("llama")
    outcome, _ = federate(dense, {0: random_windows(n=2)}, spec, budgets=[0.34], uncovered="dense")
    untouched = [name for name in weights(dense) if int(name.split(".")[2]) in outcome.uncovered]
    assert untouched and all(int((weights(dense)[n] == 0).sum()) == 0 for n in untouched)


def test_client_base_global_keeps_earlier_rounds_blocks():
    # One block per round: with client_base=global each round prunes the current global model and
    # replaces only the block it covered, so the blocks of earlier rounds stay pruned.
    spec = PruneSpec("sparsegpt", 0.5)
    model = make_tiny_model("llama")
    outcome, plan = federate(model, {0: random_windows(n=2)}, spec, budgets=[0.34], rounds=6, client_base="global")
    assert all(len(s[0]) == 1 for s in plan.samples)
    assert not outcome.uncovered
    for name, weight in weights(model).items():
        assert int((weight == 0).sum()) == round(0.5 * weight.numel()), name


def test_client_base_global_prunes_sampled_blocks_from_the_dense_cache():
    # Re-pruning an already pruned matrix to the same target would find its own zeros again. With the
    # dense cache as the starting point, a block pruned again in round 2 is a fresh SparseGPT result
    # (calibrated behind the global model's pruned blocks), at the same exact target.
    spec = PruneSpec("sparsegpt", 0.5)
    clients = {c: random_windows(n=2, seed=30 + c) for c in range(2)}
    model = make_tiny_model("llama")
    _, plan = federate(model, clients, spec, budgets=[0.67, 0.67], rounds=2, client_base="global")
    replay = make_tiny_model("llama")
    federate(replay, clients, spec, budgets=[0.67, 0.67], rounds=1)
    after_one, after_two = weights(replay), weights(model)
    for name, weight in after_two.items():
        assert int((weight == 0).sum()) == round(0.5 * weight.numel()), name
    # Blocks after the first see other inputs in round 2 (the global model's blocks, not the dense ones).
    later = [n for n in after_one if int(n.split(".")[2]) > 0]
    assert any(not torch.equal(after_one[n], after_two[n]) for n in later)
    # One client pruning every block: round 2 starts from the same dense weights behind the same pruned
    # blocks, so it reproduces round 1 bit for bit (re-pruning the pruned matrices would not).
    alone = {0: clients[0]}
    once, twice = make_tiny_model("llama"), make_tiny_model("llama")
    federate(once, alone, spec, sampling="all", rounds=1)
    federate(twice, alone, spec, sampling="all", rounds=2, client_base="global")
    assert all(torch.equal(w, weights(twice)[n]) for n, w in weights(once).items())


def test_refit_rounds_keep_the_global_mask_and_refit_the_values():
    spec = PruneSpec("sparsegpt", 0.6)
    clients = {c: random_windows(n=2, seed=40 + c) for c in range(3)}
    model = make_tiny_model("llama")
    mask_round, _ = federate(model, clients, spec, sampling="all", rounds=1)
    masks = {n: m.clone() for n, m in mask_round.masks.items()}
    after_masks = weights(model)
    refit_model = make_tiny_model("llama")
    outcome, _ = federate(refit_model, clients, spec, sampling="all", rounds=2, freeze_mask_after=1)
    refit = weights(refit_model)
    for name, mask in masks.items():
        assert torch.equal(outcome.masks[name], mask), name
        assert torch.equal(refit[name] != 0, mask), name
    assert all(not torch.equal(refit[n], after_masks[n]) for n in masks)
    # Round 2 uploads the kept values only: the server knows the mask.
    kept = {n: int(m.sum()) for n, m in masks.items()}
    assert outcome.rounds[1].upload_bytes[0] == sum(kept.values()) * 4
    assert outcome.rounds[0].upload_bytes[0] > outcome.rounds[1].upload_bytes[0]


def test_refit_with_identical_clients_is_one_client_refitting():
    spec = PruneSpec("sparsegpt", 0.5)
    windows = random_windows(n=4, seed=50)
    one = make_tiny_model("llama")
    federate(one, {0: windows}, spec, sampling="all", rounds=2, freeze_mask_after=1)
    many = make_tiny_model("llama")
    federate(many, {c: windows for c in range(3)}, spec, sampling="all", rounds=2, freeze_mask_after=1)
    for name, weight in weights(one).items():
        assert torch.equal(weight, weights(many)[name]), name


def test_mask_vote_keeps_dense_values_at_kept_positions():
    spec = PruneSpec("wanda", 0.5)
    dense = weights(make_tiny_model("llama"))
    model = make_tiny_model("llama")
    federate(model, {c: random_windows(n=2, seed=c) for c in range(3)}, spec, sampling="all", strategy="mask_vote")
    for name, weight in weights(model).items():
        kept = weight != 0
        assert torch.equal(weight[kept], dense[name][kept]), name
        assert int((~kept).sum()) == round(0.5 * weight.numel()), name


def test_clients_are_spread_contiguously_and_world_larger_than_clients_is_refused():
    assert [clients_of_rank(4, 2, r) for r in range(2)] == [[0, 1], [2, 3]]
    assert [clients_of_rank(5, 2, r) for r in range(2)] == [[0, 1], [2, 3, 4]]
    assert [clients_of_rank(16, 4, r) for r in range(4)][3] == [12, 13, 14, 15]
    with pytest.raises(UserError, match="every process needs at least one client"):
        clients_of_rank(2, 4, 0)


def test_mask_vote_breaks_ties_with_a_stream_of_its_own_per_matrix():
    """Every position tied (2 contributors, each kept every weight once): the pruned half is drawn at random,
    and two matrices of the same shape must not get the same draw; the same run draws the same again."""
    from fedspallm.federated.rounds import ClientWindows
    from fedspallm.federated.strategies import RunContext, Step, get_strategy

    def masks():
        model = make_tiny_model("llama")
        cfg = FederationConfig(strategy="mask_vote", num_clients=1, sampling="all")
        strategy = get_strategy("mask_vote")(RunContext(model, PruneSpec("magnitude", 0.5), cfg,
                                                        ClientWindows({0: random_windows(n=2)})))
        names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
        shape = get_weight(prunable_modules(model)[names[0]]).shape
        for block, name in enumerate(names):  # one part per block, as the driver hands them
            sums = {"keep_count": {name: torch.ones(shape, dtype=torch.int32)}, "contributors": {name: torch.tensor([2])}}
            strategy.aggregate(Step(0, "round 1"), sums, block)
        return [strategy.outcome.masks[n] for n in names]

    first, second = masks()
    assert first.shape == second.shape and int((~first).sum()) == int((~second).sum()) == first.numel() // 2
    assert not torch.equal(first, second)
    again = masks()
    assert torch.equal(again[0], first) and torch.equal(again[1], second)
