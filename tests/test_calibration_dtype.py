"""pruning.calibration_dtype: block forwards in bfloat16, statistics accumulated in float32 from the
bfloat16 activations, solves in float32, weights written back in the model's dtype."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model, random_windows
from fedspallm.calibration import PruneSpec, SequentialCalibration, prune_sequential
from fedspallm.errors import UserError
from test_moe import make_moe


def bf16_parameters(model):
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


def build(family: str):
    return make_moe(family) if family == "mixtral" else make_tiny_model(family)


# block 0 reads one embedding (OPT adds two: in float32, then cast); mixtral: every expert's routed tokens
@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_bf16_statistics_are_those_of_a_bf16_forward_accumulated_in_fp32(family, method):
    model = build(family)
    windows = random_windows(4, 16)
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    walk = SequentialCalibration(model, windows, PruneSpec(method, calibration_dtype="bfloat16"), batch_size=2)
    got = walk.collect(0).sums()
    # the same block computed by a model whose parameters are bfloat16 (buffers kept), from its own inputs
    reference = SequentialCalibration(bf16_parameters(build(family)), windows, PruneSpec(method), batch_size=2)
    expected = reference.collect(0).sums()
    assert got.keys() == expected.keys()
    for key in got:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    assert all(h.dtype == torch.bfloat16 for h in walk.hidden)
    # the float32 parameters were only lent: the same tensors, bit for bit
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.data_ptr() == before[name][0] and torch.equal(p, before[name][1])


def test_bf16_calibration_prunes_float32_weights_to_the_target():
    model = make_tiny_model("llama")
    windows = random_windows(4, 16)
    result = prune_sequential(model, windows, PruneSpec("sparsegpt", 0.5, calibration_dtype="bfloat16"), batch_size=2)
    fp32 = prune_sequential(make_tiny_model("llama"), windows, PruneSpec("sparsegpt", 0.5), batch_size=2)
    assert result.pruned.keys() == fp32.pruned.keys()
    differ = 0
    for name, r in result.pruned.items():
        assert r.weight.dtype == torch.float32 and model.get_parameter(f"{name}.weight").dtype == torch.float32
        assert int((~r.mask).sum()) == int((~fp32.pruned[name].mask).sum())
        differ += not torch.equal(r.weight, fp32.pruned[name].weight)
    assert differ > 0  # the bf16 activations do change the solve


def test_calibration_dtype_of_the_model_itself_changes_nothing():
    windows = random_windows(4, 16)
    a = prune_sequential(make_tiny_model("llama"), windows, PruneSpec("wanda", 0.5, calibration_dtype="float32"))
    b = prune_sequential(make_tiny_model("llama"), windows, PruneSpec("wanda", 0.5))
    assert all(torch.equal(a.pruned[k].weight, b.pruned[k].weight) for k in a.pruned)


def test_float16_calibration_on_the_cpu_is_one_clear_line():
    with pytest.raises(UserError, match="pruning.calibration_dtype=float16: CPUs"):
        prune_sequential(make_tiny_model("llama"), random_windows(2, 8), PruneSpec("wanda", 0.5, calibration_dtype="float16"))
    with pytest.raises(UserError, match="pruning.calibration_dtype='int8'"):
        PruneSpec("wanda", 0.5, calibration_dtype="int8")


def _run_strategy(strategy: str, model, windows: dict[int, torch.Tensor], spec: PruneSpec, **federation):
    from fedspallm.config import FederationConfig
    from fedspallm.federated.collectives import PlainReducer
    from fedspallm.federated.driver import run_steps
    from fedspallm.federated.rounds import ClientWindows
    from fedspallm.federated.strategies import RunContext, get_strategy

    cfg = FederationConfig(strategy=strategy, num_clients=len(windows), **federation)
    run_steps(get_strategy(strategy)(RunContext(model, spec, cfg, ClientWindows(windows), batch_size=2)), PlainReducer())
    return model.state_dict()


@pytest.mark.parametrize("strategy,federation", [("centralized", {}), ("fedstats", {"sampling": "all"}),
                                                 ("fedspallm", {"sampling": "all"})])
def test_every_strategy_calibrates_in_the_spec_dtype(strategy, federation):
    """The strategies all walk the one engine (SequentialCalibration), so the spec's dtype reaches each:
    bf16 forwards change the pruned float32 weights, and one fedstats client stays centralized bit for bit."""
    every = random_windows(6, 16)
    windows = {0: every[:3], 1: every[3:]}
    bf16 = _run_strategy(strategy, make_tiny_model("llama"), windows, PruneSpec("sparsegpt", 0.5, calibration_dtype="bfloat16"),
                         **federation)
    fp32 = _run_strategy(strategy, make_tiny_model("llama"), windows, PruneSpec("sparsegpt", 0.5), **federation)
    assert all(v.dtype == fp32[k].dtype for k, v in bf16.items())
    assert any(not torch.equal(v, fp32[k]) for k, v in bf16.items())
    if strategy == "fedstats":
        one = {0: every}
        spec = PruneSpec("sparsegpt", 0.5, calibration_dtype="bfloat16")
        mine = _run_strategy("fedstats", make_tiny_model("llama"), one, spec, sampling="all")
        central = _run_strategy("centralized", make_tiny_model("llama"), one, spec)
        assert all(torch.equal(mine[k], central[k]) for k in central)
