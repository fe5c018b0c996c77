"""Mixture of experts (fused 3-D expert parameters), module selection (pruning.targets / ignore), and
models whose decoder blocks can't be found."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny_model, random_windows
from fedspallm.calibration import PruneSpec, SequentialCalibration, prune_sequential
from fedspallm.errors import UserError
from fedspallm.models import (
    ExpertMatrix,
    find_decoder_blocks,
    find_prunable_layers,
    get_weight,
    matches,
    prunable_modules,
    select_prunable,
    set_weight,
)
from fedspallm.outputs import sparsity_report

EXPERTS = 4


def make_moe(family: str = "mixtral") -> nn.Module:
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    common = dict(vocab_size=128, num_hidden_layers=2, max_position_embeddings=64, hidden_size=64,
                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2)
    if family == "mixtral":
        config = MixtralConfig(intermediate_size=96, num_local_experts=EXPERTS, **common)
    else:
        config = Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=96,
                                num_experts=EXPERTS, **common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def routers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))}


def test_experts_are_named_two_d_matrices_and_routers_are_not_prunable():
    model = make_moe("mixtral")
    names = list(find_prunable_layers(find_decoder_blocks(model)[0]))
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     *[f"mlp.experts.gate_up_proj[{e}]" for e in range(EXPERTS)],
                     *[f"mlp.experts.down_proj[{e}]" for e in range(EXPERTS)]]
    experts = model.model.layers[0].mlp.experts
    matrix = prunable_modules(model)["model.layers.0.mlp.experts.down_proj[2]"]
    assert isinstance(matrix, ExpertMatrix)
    assert get_weight(matrix).shape == (64, 96) and get_weight(matrix).data_ptr() == experts.down_proj[2].data_ptr()
    set_weight(matrix, torch.zeros(64, 96))
    assert not experts.down_proj[2].any() and experts.down_proj[1].any()
    qwen = make_moe("qwen2moe")
    names = list(find_prunable_layers(find_decoder_blocks(qwen)[0]))
    assert "mlp.shared_expert.gate_proj" in names and "mlp.shared_expert_gate" not in names


@pytest.mark.parametrize("family", ["mixtral", "qwen2moe"])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_every_expert_matrix_reaches_the_target_and_the_router_is_unchanged(family, method):
    model = make_moe(family)
    before = routers(model)
    assert before
    result = prune_sequential(model, random_windows(n=8), PruneSpec(method, 0.5), batch_size=4)
    for name, matrix in prunable_modules(model).items():
        weight = get_weight(matrix)
        assert int((weight == 0).sum()) == round(0.5 * weight.numel()), name
        assert torch.equal(result.pruned[name].weight, weight), name
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    report = sparsity_report(model, 0.5)
    assert report["overall"] == 0.5 and any("experts.down_proj[3]" in n for n in report["per_matrix"])


def test_each_expert_is_pruned_from_the_tokens_routed_to_it():
    """The statistics of expert e are those of exactly the tokens the router sends to e (gate_up) and
    of their activations (down), computed here independently from the experts' own inputs."""
    model = make_moe("mixtral")
    block = find_decoder_blocks(model)[0]
    experts = block.mlp.experts
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = experts.register_forward_pre_hook(lambda module, args: seen.append((args[0].detach(), args[1].detach())))
    calibration = SequentialCalibration(model, random_windows(n=8), PruneSpec("sparsegpt", 0.5), batch_size=4)
    stats = calibration.collect(0)
    handle.remove()
    for e in range(EXPERTS):
        tokens = [h[(index == e).any(dim=-1)] for h, index in seen]
        x = torch.cat(tokens).double()
        gate, up = (x @ experts.gate_up_proj[e].double().T).chunk(2, dim=-1)
        act = experts.act_fn(gate) * up
        for param, inputs in (("gate_up_proj", x), ("down_proj", act)):
            stat = stats.values[stats.readers[f"mlp.experts.{param}[{e}]"]]
            assert stat.tokens == x.shape[0] > 0
            torch.testing.assert_close(stat.to_sum(), inputs.T @ inputs, rtol=1e-4, atol=1e-4)


def never_route_to_last_expert(model: nn.Module) -> None:
    """A router that never chooses expert EXPERTS-1 (its logit is -inf), for the uncovered-expert case."""
    for block in find_decoder_blocks(model):
        router = block.mlp.gate
        forward = router.forward

        def masked(hidden, _forward=forward, _router=router):
            logits = nn.functional.linear(hidden.reshape(-1, _router.hidden_dim), _router.weight)
            logits[:, -1] = float("-inf")
            probs = logits.float().softmax(dim=-1)
            top, index = probs.topk(_router.top_k, dim=-1)
            return logits, top / top.sum(dim=-1, keepdim=True), index

        router.forward = masked


def test_an_expert_no_token_reaches_is_handled_as_uncovered_says():
    name = "model.layers.0.mlp.experts.gate_up_proj[3]"
    model = make_moe("mixtral")
    never_route_to_last_expert(model)
    with pytest.raises(UserError, match=r"^model\.layers\.0\.mlp\.experts\.gate_up_proj\[3\]: no calibration token"):
        prune_sequential(model, random_windows(n=4), PruneSpec("sparsegpt", 0.5), batch_size=4)
    for policy in ("magnitude", "dense"):
        model = make_moe("mixtral")
        never_route_to_last_expert(model)
        dense = get_weight(prunable_modules(model)[name]).clone()
        result = prune_sequential(model, random_windows(n=4), PruneSpec("sparsegpt", 0.5), batch_size=4,
                                  uncovered=policy)
        uncovered = {n for n in result.uncovered if n.endswith("[3]")}
        assert uncovered == {f"model.layers.{b}.mlp.experts.{p}[3]" for b in (0, 1) for p in ("gate_up_proj", "down_proj")}
        assert set(result.uncovered.values()) == {policy}
        weight = get_weight(prunable_modules(model)[name])
        if policy == "dense":
            assert torch.equal(weight, dense) and name not in result.pruned
        else:
            from fedspallm.pruners import magnitude_prune

            assert torch.equal(weight, magnitude_prune(dense, 0.5).weight)
        covered = get_weight(prunable_modules(model)["model.layers.0.mlp.experts.gate_up_proj[2]"])
        assert int((covered == 0).sum()) == covered.numel() // 2


def test_targets_and_ignore_select_by_suffix_glob_or_regex():
    assert matches("down_proj", "model.layers.1.mlp.down_proj")
    assert matches("mlp.down_proj", "model.layers.1.mlp.down_proj")
    assert not matches("proj", "model.layers.1.mlp.down_proj")  # a suffix stops at a dot
    assert matches("*.self_attn.*", "model.layers.0.self_attn.q_proj")
    assert matches("re:.*layers\\.[01]\\..*", "model.layers.1.mlp.up_proj")
    assert not matches("re:layers", "model.layers.1.mlp.up_proj")  # a regex matches the whole name
    assert matches("experts.down_proj", "model.layers.0.mlp.experts.down_proj[3]")
    assert matches("re:.*down_proj\\[3\\]", "model.layers.0.mlp.experts.down_proj[3]")
    assert not matches("re:.*down_proj\\[3\\]", "model.layers.0.mlp.experts.down_proj[2]")

    model = make_tiny_model("llama")
    select_prunable(model, targets=["re:.*layers\\.[01]\\..*"], ignore=["mlp.down_proj", "*.k_proj"])
    names = set(prunable_modules(model))
    assert names == {f"model.layers.{b}.{n}" for b in (0, 1) for n in
                     ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")}
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune_sequential(model, random_windows(n=4), PruneSpec("sparsegpt", 0.5), batch_size=4)
    assert set(result.pruned) == names
    for key, value in model.state_dict().items():
        touched = key.removesuffix(".weight") in names
        assert torch.equal(value, dense[key]) != touched, key
    report = sparsity_report(model, 0.5)
    assert set(report["per_matrix"]) == names and report["overall"] == 0.5


def test_a_pattern_that_matches_nothing_is_one_line():
    model = make_tiny_model("llama")
    with pytest.raises(UserError, match=r"^pruning\.targets: 'mlp\.nope' matches no prunable matrix"):
        select_prunable(model, targets=["mlp.nope"])
    with pytest.raises(UserError, match=r"^pruning\.ignore: 're:\(' is not a valid regular expression"):
        select_prunable(model, ignore=["re:("])
    with pytest.raises(UserError, match="leave no matrix to prune"):
        select_prunable(model, ignore=["*"])


def test_a_model_without_decoder_blocks_is_one_line():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UserError, match=r"^unsupported architecture Flat: no stack of decoder blocks"):
        find_decoder_blocks(Flat())
    with pytest.raises(UserError, match="no stack of decoder blocks"):
        prune_sequential(Flat(), random_windows(n=2), PruneSpec("sparsegpt", 0.5))


@pytest.mark.parametrize("strategy", ["centralized", "fedstats", "fedspallm"])
def test_moe_prunes_every_expert_under_each_strategy(strategy):
    from test_fedstats import client_windows, run

    model = make_moe()
    windows = client_windows(3, per_client=4, seqlen=32)
    run(strategy, model, windows, PruneSpec("sparsegpt", 0.5), uncovered="magnitude",
        **({} if strategy == "centralized" else {"sampling": "all"}))
    experts = {n: get_weight(m) for n, m in prunable_modules(model).items() if "experts" in n}
    assert len(experts) == 2 * 2 * EXPERTS  # 2 blocks x (gate_up_proj, down_proj) x experts
    for name, weight in experts.items():
        assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-2), name


def test_fedstats_of_one_client_is_centralized_bit_for_bit_on_experts():
    from test_fedstats import client_windows, run

    windows = client_windows(1, per_client=6, seqlen=32)
    central, fed = make_moe(), make_moe()
    run("centralized", central, windows, PruneSpec("sparsegpt", 0.5), uncovered="error")
    run("fedstats", fed, windows, PruneSpec("sparsegpt", 0.5), uncovered="error", sampling="all")
    mine, theirs = fed.state_dict(), central.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert any("experts" in k and (v == 0).any() for k, v in mine.items())
