"""fedstats: summed statistics, block by block, in fixed point; exact against centralized and across layouts."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import make_tiny_model, random_windows

from fedspallm.calibration import BlockStatistics, PruneSpec, Statistic
from fedspallm.config import FederationConfig
from fedspallm.errors import UserError
from fedspallm.federated.collectives import PlainReducer
from fedspallm.federated.driver import run_steps
from fedspallm.federated.rounds import ClientWindows
from fedspallm.federated.strategies import RunContext, get_strategy
from fedspallm.federated.secure_aggregation import DEFAULT_ENCODINGS, Encoding, encode_into, fixed_point_sum
from fedspallm.federated.summed_statistics import BlockWords, StatisticCodec
from fedspallm.models import get_weight, prunable_modules

FAMILIES = ("llama", "opt", "gpt2")


def client_windows(clients: int, per_client: int = 3, seqlen: int = 16, seed: int = 0) -> dict[int, torch.Tensor]:
    every = random_windows(clients * per_client, seqlen, seed=seed)
    return {c: every[c * per_client:(c + 1) * per_client] for c in range(clients)}


def run(strategy: str, model, windows: dict[int, torch.Tensor], spec: PruneSpec, **federation):
    cfg = FederationConfig(strategy=strategy, num_clients=len(windows), **federation)
    ctx = RunContext(model, spec, cfg, ClientWindows(windows), batch_size=2)
    runner = get_strategy(strategy)(ctx)
    run_steps(runner, PlainReducer())
    return runner


def weights(model) -> dict[str, torch.Tensor]:
    return {name: get_weight(layer).detach().clone() for name, layer in prunable_modules(model).items()}


SPECS = {"sparsegpt": PruneSpec("sparsegpt", 0.5), "wanda-2:4": PruneSpec("wanda", 0.5, 2, 4)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS)
def test_one_client_is_centralized_bit_for_bit(family, spec):
    windows = client_windows(1, per_client=5)
    central = make_tiny_model(family)
    run("centralized", central, windows, spec)
    fed = make_tiny_model(family)
    run("fedstats", fed, windows, spec, sampling="all")
    mine, theirs = fed.state_dict(), central.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert any(torch.count_nonzero(w) < w.numel() for w in weights(fed).values())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS)
def test_k_clients_prune_as_centralized_on_the_union_bit_for_bit(family, spec):
    """3 windows per client in batches of 2: centralized batches the union client by client, so every batch
    is the same float32 computation in both, and the fixed-point sums of the batches are equal."""
    windows = client_windows(4)
    central = make_tiny_model(family)
    run("centralized", central, windows, spec)
    fed = make_tiny_model(family)
    runner = run("fedstats", fed, windows, spec, sampling="all")
    mine, theirs = fed.state_dict(), central.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert any(torch.count_nonzero(w) < w.numel() for w in weights(fed).values())
    communication = runner.summary()["communication"]
    assert communication["synchronisations"] == 3  # one per block
    assert len(communication["upload_per_client_per_block"]) == 3


def test_bytes_are_the_upper_triangles_and_counts_of_each_distinct_input():
    windows, spec = client_windows(2), PruneSpec("sparsegpt", 0.5)
    runner = run("fedstats", make_tiny_model("llama"), windows, spec, budgets=[1.0, 0.34], sampling="systematic")
    # Llama block: q/k/v read one 64-wide input, o_proj one, gate/up one, down_proj a 128-wide one; int64 words.
    per_block = ((64 * 65 // 2 + 1) * 3 + 128 * 129 // 2 + 1) * 8
    communication = runner.summary()["communication"]
    sampled = runner.summary()["contributing_blocks"]
    assert sampled[0] == [0, 1, 2] and len(sampled[1]) == 1
    assert communication["upload_per_client_per_block"] == [
        [per_block, per_block if b in sampled[1] else 0] for b in range(3)]
    assert communication["upload_per_client"] == [3 * per_block, per_block]
    assert communication["fedspallm_upload_per_client"][0] > communication["fedspallm_upload_per_client"][1] > 0
    assert communication["dense_upload_per_client"][0] == 3 * communication["dense_upload_per_client"][1]


def test_a_block_is_pruned_from_the_clients_that_sampled_it():
    """Client 1 samples one block: that block is pruned from both clients' windows, the others from client 0's
    alone. Block 0 therefore has the mask of Wanda on the union or on client 0's windows (masks, not bits:
    the public token count that scales the words differs between the runs)."""
    windows, spec = client_windows(2), PruneSpec("wanda", 0.5)
    fed = make_tiny_model("llama")
    runner = run("fedstats", fed, windows, spec, budgets=[1.0, 0.34], sampling="systematic")
    (extra,) = runner.summary()["contributing_blocks"][1]
    alone = make_tiny_model("llama")
    run("centralized", alone, {0: windows[0]}, spec)
    both = make_tiny_model("llama")
    run("centralized", both, windows, spec)
    block0 = [n for n in weights(fed) if ".layers.0." in n]
    reference = weights(both if extra == 0 else alone)
    assert all(torch.equal(weights(fed)[n] != 0, reference[n] != 0) for n in block0)


def test_uncovered_blocks_follow_federation_uncovered():
    with pytest.raises(UserError, match=r"^blocks \[.*\] are pruned by no client in 1 round\(s\)"):
        get_strategy("fedstats").configure(FederationConfig(strategy="fedstats", num_clients=1, budgets=[0.34]), 3, 0)
    model = make_tiny_model("llama")
    dense = weights(model)
    runner = run("fedstats", model, {0: client_windows(1)[0]}, PruneSpec("sparsegpt", 0.5), budgets=[0.34],
                 uncovered="dense")
    (covered,) = runner.summary()["contributing_blocks"][0]
    for name, weight in weights(model).items():
        assert torch.equal(weight, dense[name]) == (f".layers.{covered}." not in name), name
    assert runner.summary()["communication"]["synchronisations"] == 1


def test_a_statistic_that_is_not_finite_names_its_client_block_and_layer():
    model = make_tiny_model("llama")
    windows = client_windows(3)
    token = 127
    for c in (0, 1):
        windows[c][windows[c] == token] = 1
    windows[2][0, 3] = token
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    with pytest.raises(UserError) as err:
        run("fedstats", model, windows, PruneSpec("sparsegpt", 0.5), sampling="all")
    assert str(err.value) == ("client 2: the statistic of block 0 self_attn.q_proj is not finite (NaN or inf); "
                              "nothing of it was sent")


def test_more_processes_than_clients_is_one_line_before_launch():
    from fedspallm.config import DataConfig, EvalConfig, ModelConfig, OutputConfig, PruningConfig, RuntimeConfig
    from fedspallm.preflight import validate_config

    with pytest.raises(UserError, match=r"^runtime.devices=4 x num_nodes=1: 4 processes but federation.num_clients=2; "
                                        r"every process needs at least one client"):
        validate_config(ModelConfig(), DataConfig(), EvalConfig(), PruningConfig(),
                        FederationConfig(strategy="fedstats", num_clients=2), OutputConfig(), RuntimeConfig(devices=4))


def test_magnitude_exchanges_nothing_and_equals_centralized():
    spec, windows = PruneSpec("magnitude", 0.5), client_windows(2)
    fed, central = make_tiny_model("opt"), make_tiny_model("opt")
    runner = run("fedstats", fed, windows, spec)
    run("centralized", central, windows, spec)
    assert all(torch.equal(a, b) for a, b in zip(weights(fed).values(), weights(central).values()))
    communication = runner.summary()["communication"]
    assert communication["synchronisations"] == 0 and communication["upload_per_client"] == [0, 0]
    assert communication["exchanged"].startswith("nothing")


# -- the codec --------------------------------------------------------------------------------------


def test_the_codec_sends_the_upper_triangle_and_mirrors_it():
    x = torch.randn(40, 6)
    h = (x.T @ x).float()  # not bitwise symmetric in general; the upper triangle is what travels
    stat = Statistic("hessian", h * 2 / 5, samples=5, tokens=40)
    codec = StatisticCodec(total_tokens=40)
    words = codec.encode(stat)
    assert words.dtype == torch.int64 and words.numel() == 6 * 7 // 2
    back = codec.decode("hessian", codec.on_grid("hessian", words), 5, 6)
    assert torch.equal(back.value, back.value.T)
    assert torch.allclose(back.value, stat.value, rtol=1e-5, atol=1e-5)
    assert back.samples == 5


def test_sums_cannot_overflow_and_stay_exact_in_float64_whatever_the_number_of_clients():
    """Each client's words stay within its token share of bound · 2^f, so all of them together stay below
    2^53 quanta: integer sums cannot overflow and float64 sums of the decoded values are exact."""
    encoding = DEFAULT_ENCODINGS["sq_norms"]
    codec, width = StatisticCodec(total_tokens=4096), 3
    words = []
    for tokens in (1, 5, 4090):  # three clients whose tokens add up to the public count, each at its bound
        stat = Statistic("sq_norms", torch.full((width,), encoding.bound), samples=tokens, tokens=tokens)
        assert codec.problem(stat) is None
        words.append(codec.encode(stat))
    assert sum(int(w.abs().max()) for w in words) <= encoding.max_word() + 3 < 2 ** 53
    beyond = Statistic("sq_norms", torch.full((width,), encoding.bound * 1.01), samples=1, tokens=1)
    assert codec.problem(beyond).startswith("is outside the public fixed-point bound")
    nan = Statistic("hessian", torch.full((width, width), float("nan")), samples=1, tokens=1)
    assert codec.problem(nan) == "is not finite (NaN or inf)"


def test_grid_values_add_exactly_in_any_grouping_arbitrary_floats_do_not():
    encoding = Encoding(2.0 ** 10, 24)
    values = [torch.tensor([0.1, 1e-7, 3.3333333, -2.5e-3], dtype=torch.float64) * (i + 1) ** 3 for i in range(7)]
    layouts = ([list(range(7))], [[0, 1, 2], [3, 4, 5, 6]], [[6, 5], [4], [3, 2, 1, 0]])

    def total(parts, layout):
        return sum((sum((parts[i] for i in group), torch.zeros(4, dtype=torch.float64)) for group in layout),
                   torch.zeros(4, dtype=torch.float64))

    codec = StatisticCodec(1, {"sq_norms": encoding})
    grid = []
    for v in values:
        words = torch.empty(4, dtype=torch.int64)
        encode_into(words, v, encoding)
        grid.append(codec.on_grid("sq_norms", words))
    on_grid = [total(grid, layout) for layout in layouts]
    assert all(torch.equal(on_grid[0], other) for other in on_grid[1:])
    raw = [total(values, layout) for layout in layouts]
    assert not all(torch.equal(raw[0], other) for other in raw[1:])  # the problem the grid solves


def test_what_a_process_hands_the_reducer_is_summed_bitwise_alike_by_secure_aggregation():
    """Values on the encoding's grid: secure aggregation's fixed-point sum (what SecureReducer.sum returns,
    bit for bit) equals the plain float64 sum."""
    codec = StatisticCodec(total_tokens=3 * 50)
    parts = []
    for seed in range(3):
        x = torch.randn(50, 8, generator=torch.Generator().manual_seed(seed)) * 3
        stat = Statistic("hessian", (x.T @ x) * 2 / 7, samples=7, tokens=50)
        parts.append(codec.on_grid("hessian", codec.encode(stat)))
    plain = parts[0] + parts[1] + parts[2]
    assert torch.equal(fixed_point_sum(parts, DEFAULT_ENCODINGS["hessian"], parties=3), plain)
    assert torch.equal(parts[2] + (parts[1] + parts[0]), plain)


def test_centralized_names_the_block_and_layer_of_a_bad_statistic():
    model, windows = make_tiny_model("llama"), client_windows(2)
    with torch.no_grad():
        model.get_input_embeddings().weight[int(windows[1][0, 3])] = float("inf")
    with pytest.raises(UserError, match=r"^block 0 self_attn.q_proj: the statistic is not finite \(NaN or inf\)$"):
        run("centralized", model, windows, PruneSpec("wanda", 0.5))


def test_block_words_are_the_sum_of_each_batchs_words_and_drop_a_key_with_a_bad_batch():
    codec = StatisticCodec(total_tokens=64)
    words = BlockWords(codec)
    batches = [Statistic("sq_norms", torch.tensor([1.0, 2.0]), 2, 16), Statistic("sq_norms", torch.tensor([3.0, 0.5]), 2, 16)]
    for stat in batches:
        words.add(BlockStatistics("sq_norms", {"fc": "fc"}, {"fc": stat}))
    # each batch: round(sum / 64 * 2^24), sum = value * samples
    expected = [round(1.0 * 2 / 64 * 2**24) + round(3.0 * 2 / 64 * 2**24), round(2.0 * 2 / 64 * 2**24) + round(0.5 * 2 / 64 * 2**24)]
    assert words.words["fc"].tolist() == expected and words.samples["fc"] == 4
    words.add(BlockStatistics("sq_norms", {"fc": "fc"}, {"fc": Statistic("sq_norms", torch.tensor([1.0, float("nan")]), 1, 8)}))
    words.add(BlockStatistics("sq_norms", {"fc": "fc"}, {"fc": batches[0]}))
    assert "fc" not in words.words and "fc" not in words.samples
    assert words.problems == {"fc": "is not finite (NaN or inf)"}


def test_clients_spread_over_1_2_or_4_processes_give_the_same_model_bit_for_bit(tiny_model_dir, tmp_path):
    """Budget 0.5, systematic: every block is summed from 2 of the 4 clients, so with 4 processes some
    processes contribute nothing to a block and others one client; the integer sums make that irrelevant."""
    from test_distributed import FABRIC, MAIN, free_port, model_sha, results, run as launch, tiny_args

    extra = ("--federation.strategy", "fedstats", "--output.save_compressed", "false")
    one, two, four = tmp_path / "one", tmp_path / "two", tmp_path / "four"
    launch([sys.executable, MAIN, *tiny_args(tiny_model_dir, one, *extra)])
    launch([sys.executable, MAIN, *tiny_args(tiny_model_dir, two, *extra, "--runtime.devices", "2")])
    launch([FABRIC, "run", "--main-port", str(free_port()), "--devices", "4", MAIN,
            *tiny_args(tiny_model_dir, four, *extra)])
    assert model_sha(one) == model_sha(two) == model_sha(four)
    communication = [results(out)["communication"] for out in (one, two, four)]
    assert communication[0] == communication[1] == communication[2]
    assert communication[0]["synchronisations"] == 4
    assert sorted(map(sum, zip(*[[b > 0 for b in row] for row in communication[0]["upload_per_client_per_block"]]))) \
        == [2, 2, 2, 2]  # each client sent statistics for its 2 sampled blocks


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
