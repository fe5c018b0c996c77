"""The sequential engine on tiny models of every supported family (GPT-2's Conv1D included)."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, make_tiny_model, random_windows
from fedspallm.calibration import PruneSpec, capture_block_inputs, prune_sequential
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


def test_first_block_kwargs_are_caught_generically():
    model = make_tiny_model("llama")
    captured = capture_block_inputs(model, random_windows(n=3), batch_size=2, device=torch.device("cpu"))
    assert [h.shape[0] for h, _ in captured] == [2, 1]
    kwargs = captured[0][1]
    assert "position_embeddings" in kwargs  # transformers 5 passes (cos, sin) to every layer


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
