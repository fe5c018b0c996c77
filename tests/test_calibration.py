"""The sequential engine on tiny models of every supported family (GPT-2's Conv1D included)."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, make_tiny_model, random_windows
from fedspallm.calibration import (
    batch_bounds,
    BlockStatistics,
    PruneSpec,
    SequentialCalibration,
    capture_block_inputs,
    first_reader,
    prune_sequential,
)
from fedspallm.errors import UserError
from fedspallm.models import find_decoder_blocks, find_prunable_layers, get_weight, prunable_modules


def own_block_outputs(model, windows):
    """Each block's output in the model's own forward pass, captured with forward hooks."""
    outputs: dict[int, list[torch.Tensor]] = {}
    blocks = find_decoder_blocks(model)

    def hook(index):
        def record(module, args, output):
            outputs.setdefault(index, []).append((output[0] if isinstance(output, tuple) else output).detach().clone())
        return record

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]
    with torch.no_grad():
        for start in range(0, windows.shape[0], 4):
            model(input_ids=windows[start:start + 4], use_cache=False)
    for handle in handles:
        handle.remove()
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_outputs_through_engine_match_the_models_own_forward(family):
    model = make_tiny_model(family)
    windows = random_windows(n=6)
    expected = own_block_outputs(model, windows)
    seen: dict[int, list[torch.Tensor]] = {}
    prune_sequential(model, windows, PruneSpec("magnitude", 0.0), blocks_to_prune=[], batch_size=4,
                     on_block_output=lambda i, hidden: seen.__setitem__(i, [h.clone() for h in hidden]))
    assert sorted(seen) == sorted(expected)
    for index in expected:
        for got, want in zip(seen[index], expected[index]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_every_family_is_pruned_to_the_exact_target(family, method):
    model = make_tiny_model(family)
    result = prune_sequential(model, random_windows(n=8), PruneSpec(method, 0.5), batch_size=4)
    layers = prunable_modules(model)
    assert set(result.pruned) == set(layers)
    for name, layer in layers.items():
        weight = get_weight(layer)
        assert torch.equal(weight, result.pruned[name].weight.to(weight.dtype)), name
        zeros = int((weight == 0).sum())
        assert abs(zeros / weight.numel() - 0.5) <= 1e-3 + 1 / weight.numel(), name
        assert torch.equal(result.pruned[name].mask, weight != 0), name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_two_four_pattern_holds_in_every_group(family):
    model = make_tiny_model(family)
    prune_sequential(model, random_windows(n=4), PruneSpec("sparsegpt", 0.5, 2, 4), batch_size=4)
    for name, layer in prunable_modules(model).items():
        groups = (get_weight(layer) == 0).reshape(get_weight(layer).shape[0], -1, 4).sum(-1)
        assert torch.all(groups == 2), name


def test_layers_reading_one_input_share_one_statistic():
    model = make_tiny_model("llama")
    result = prune_sequential(model, random_windows(n=4), PruneSpec("sparsegpt", 0.5), batch_size=4)
    blocks = len(find_decoder_blocks(model))
    # Llama: {q,k,v} share the normed input, {gate, up} share another; o and down have their own.
    assert result.stats.statistic_updates == blocks * 4
    assert result.stats.layers_pruned == blocks * 7


def test_first_reader_shares_a_live_input_and_not_a_reused_address():
    seen: dict = {}
    base = torch.zeros(4, 6)
    normed = base.view(6, 4)
    assert first_reader(seen, "q", normed) == "q"
    assert first_reader(seen, "k", normed) == "q"  # the same tensor: one statistic
    assert first_reader(seen, "v", base.view(6, 4)) == "q"  # another view of the same live memory
    del normed  # the views die: their address may now hold a different input
    assert first_reader(seen, "o", base.view(6, 4)) == "o"
    assert first_reader(seen, "gate", base.view(4, 6)) == "gate"  # same address, another shape
    assert first_reader(seen, "up", torch.zeros(6, 4)) == "up"


def test_sparsegpt_inverts_each_shared_hessian_once(monkeypatch):
    import fedspallm.calibration as engine

    groups: list[int] = []
    real = engine.sparsegpt_prune_group

    def counting(weights, hessian, *args, **kwargs):
        groups.append(len(weights))
        return real(weights, hessian, *args, **kwargs)

    monkeypatch.setattr(engine, "sparsegpt_prune_group", counting)
    model = make_tiny_model("llama")
    prune_sequential(model, random_windows(n=4), PruneSpec("sparsegpt", 0.5), batch_size=4)
    # Per block: q/k/v together, o, gate/up together, down.
    assert groups == [3, 1, 2, 1] * len(find_decoder_blocks(model))


def test_only_selected_blocks_are_pruned_and_restore_dense_leaves_the_model_unchanged():
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune_sequential(model, random_windows(n=4), PruneSpec("sparsegpt", 0.6), blocks_to_prune=[1],
                              batch_size=2, restore_dense=True)
    assert {name.split(".")[2] for name in result.pruned} == {"1"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    in_place = make_tiny_model("llama")
    prune_sequential(in_place, random_windows(n=4), PruneSpec("sparsegpt", 0.6), blocks_to_prune=[1], batch_size=2)
    for name, layer in prunable_modules(in_place).items():
        assert torch.equal(get_weight(layer), result.pruned[name].weight) if ".1." in name else True


def test_every_blocks_kwargs_are_caught_generically():
    model = make_tiny_model("llama")
    captured = capture_block_inputs(model, random_windows(n=3), batch_size=2, device=torch.device("cpu"), through=1)
    assert [h.shape[0] for h in captured.hidden] == [2, 1]
    assert len(captured.kwargs) == 2 and all(len(per_batch) == 2 for per_batch in captured.kwargs)
    kwargs = captured.kwargs[0][0]
    assert "position_embeddings" in kwargs  # transformers 5 passes (cos, sin) to every layer
    # The model's own objects, shared by the blocks that receive them, not copies.
    assert captured.kwargs[1][0]["position_embeddings"][0] is kwargs["position_embeddings"][0]
    for block in find_decoder_blocks(model):
        assert "forward" not in block.__dict__  # the recording forward is gone again


def test_statistics_are_float32_for_bfloat16_models():
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    result = prune_sequential(model, random_windows(n=4), PruneSpec("sparsegpt", 0.5), batch_size=4)
    for name, layer in prunable_modules(model).items():
        assert layer.weight.dtype == torch.bfloat16
        zeros = int((get_weight(layer) == 0).sum())
        assert abs(zeros / layer.weight.numel() - 0.5) < 0.02, name
    assert result.stats.layers_pruned == 21


def test_bad_requests_fail_with_one_clear_line():
    model = make_tiny_model("llama")
    with pytest.raises(UserError, match="block index 7 is out of range"):
        prune_sequential(model, random_windows(), PruneSpec("sparsegpt", 0.5), blocks_to_prune=[7])
    with pytest.raises(UserError, match="divide"):
        prune_sequential(model, random_windows(), PruneSpec("sparsegpt", 0.5, 2, 5))
    with pytest.raises(UserError, match="at least one calibration window"):
        prune_sequential(model, torch.zeros((0, 16), dtype=torch.long), PruneSpec("sparsegpt", 0.5))
    with pytest.raises(UserError, match="pruning.method"):
        PruneSpec("obs", 0.5)


def test_nan_in_weights_names_the_layer():
    model = make_tiny_model("llama")
    with torch.no_grad():
        find_prunable_layers(find_decoder_blocks(model)[0])["mlp.up_proj"].weight[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"layers\.0\.mlp\.up_proj"):
        prune_sequential(model, random_windows(), PruneSpec("wanda", 0.5))


def test_magnitude_pruning_runs_no_forward_pass_and_is_per_matrix_magnitude():
    from fedspallm.pruners import magnitude_prune

    model = make_tiny_model("llama")
    dense = {name: get_weight(layer).detach().clone() for name, layer in prunable_modules(model).items()}
    result = prune_sequential(model, random_windows(n=4), PruneSpec("magnitude", 0.6), batch_size=4)
    assert result.stats.forward_passes == 0
    for name, weight in dense.items():
        assert torch.equal(result.pruned[name].weight, magnitude_prune(weight, 0.6).weight), name


def sliding_window_model(family: str) -> torch.nn.Module:
    """Tiny models whose layers get different masks: a sliding window of 8 tokens (shorter than the
    64-token windows below) on some layers, full attention on others."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=128, num_hidden_layers=4, max_position_embeddings=128, hidden_size=64,
                  intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    if family == "gemma2":
        config = Gemma2Config(sliding_window=8, **common)  # alternates sliding and full attention
    elif family == "gemma3":
        config = Gemma3TextConfig(sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2, **common)
    elif family == "qwen2-sliding":
        config = Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=2, **common)
    elif family == "mistral-sliding":
        config = MistralConfig(sliding_window=8, **common)
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen2-sliding", "mistral-sliding", *FAMILIES])
def test_every_block_gets_its_own_inputs(family):
    """On the dense model the engine's input to every block is the model's own hidden state, exactly:
    the same kernels on the same inputs and the same masks, batch for batch."""
    model = sliding_window_model(family) if family not in FAMILIES else make_tiny_model(family)
    windows = random_windows(n=6, seqlen=64 if family not in FAMILIES else 16)
    calibration = SequentialCalibration(model, windows, PruneSpec("magnitude", 0.0), batch_size=4)
    blocks = find_decoder_blocks(model)
    with torch.no_grad():
        expected = [model(input_ids=windows[s:s + 4], output_hidden_states=True, use_cache=False).hidden_states
                    for s in (0, 4)]
    for index in range(len(blocks)):
        for batch, got in enumerate(calibration.inputs(index)):
            assert torch.equal(got, expected[batch][index]), (family, index, batch)
        calibration.advance(index)
    if family in ("gemma2", "gemma3", "qwen2-sliding"):
        # The test means something: the layer types really get different masks.
        kwargs = calibration._inputs.kwargs
        types = model.config.layer_types
        full, sliding = types.index("full_attention"), types.index("sliding_attention")
        assert kwargs[full][0]["attention_mask"] is not kwargs[sliding][0]["attention_mask"]


def test_statistics_travel_as_plain_sums_and_come_back_bit_for_bit():
    model = make_tiny_model("llama")
    for method in ("sparsegpt", "wanda"):
        calibration = SequentialCalibration(model, random_windows(n=6), PruneSpec(method, 0.5), batch_size=4)
        stats = calibration.collect(0)
        x = torch.cat([h for h in calibration.inputs(0)]).double()
        normed = find_decoder_blocks(model)[0].input_layernorm(x.float()).double().reshape(-1, x.shape[-1])
        plain = normed.T @ normed if method == "sparsegpt" else normed.square().sum(0)
        key = stats.readers["self_attn.k_proj"]
        assert key == "self_attn.q_proj" and stats.readers["mlp.up_proj"] == "mlp.gate_proj"
        assert stats.counts()[key] == (6, 6 * 16)
        torch.testing.assert_close(stats.sums()[key], plain, rtol=1e-5, atol=1e-4)
        back = BlockStatistics.from_sums(stats.kind, stats.readers, stats.sums(), stats.counts())
        for k, stat in stats.values.items():
            assert torch.equal(back.values[k].value, stat.value), (method, k)
        assert calibration.readers(0) == stats.readers


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_stepwise_clients_summing_statistics_match_pruning_on_the_union(method):
    """The fedstats recipe on the engine's steps: two clients collect, the sums are added, every
    client prunes from the sum and advances. One client through sums = prune_sequential bitwise;
    two clients = the union of their windows up to float rounding of the statistics."""
    spec = PruneSpec(method, 0.5)
    windows = random_windows(n=8)
    reference = make_tiny_model("llama")
    prune_sequential(reference, windows, spec, batch_size=4)

    def stepwise(parts):
        model = make_tiny_model("llama")
        clients = [SequentialCalibration(model, part, spec, batch_size=4) for part in parts]
        for index in range(len(find_decoder_blocks(model))):
            collected = [client.collect(index) for client in clients]
            sums = {k: sum(c.sums()[k] for c in collected) for k in collected[0].values}
            counts = {k: tuple(map(sum, zip(*(c.counts()[k] for c in collected)))) for k in collected[0].values}
            clients[0].prune(index, BlockStatistics.from_sums(collected[0].kind, collected[0].readers, sums, counts))
            for client in clients:
                client.advance(index)
        return model

    one = stepwise([windows])
    for (name, got), want in zip(one.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(got, want), name
    two = stepwise([windows[:4], windows[4:]])
    agree = total = 0
    for name, layer in prunable_modules(two).items():
        a, b = get_weight(layer) != 0, get_weight(prunable_modules(reference)[name]) != 0
        agree += int((a == b).sum())
        total += a.numel()
    assert agree / total >= 0.999


def test_batches_never_straddle_two_clients_windows():
    assert batch_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert batch_bounds(7, 3, [3, 0, 4]) == [(0, 3), (3, 6), (6, 7)]
    assert batch_bounds(9, 2, [3, 3, 3]) == [(0, 2), (2, 3), (3, 5), (5, 6), (6, 8), (8, 9)]
    with pytest.raises(ValueError, match="do not split 9 windows"):
        batch_bounds(9, 2, [3, 3])
