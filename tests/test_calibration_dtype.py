"""pruning.calibration_dtype: block forwards in bfloat16, statistics accumulated in float32 from the
bfloat16 activations, solves in float32, weights written back in the model's dtype."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model, random_windows
from fedspallm.calibration import PruneSpec, SequentialCalibration, prune_sequential
from fedspallm.errors import UserError


def bf16_parameters(model):
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # block 0 reads one embedding (OPT adds two: in float32, then cast)
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_bf16_statistics_are_those_of_a_bf16_forward_accumulated_in_fp32(family, method):
    model = make_tiny_model(family)
    windows = random_windows(4, 16)
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    walk = SequentialCalibration(model, windows, PruneSpec(method, calibration_dtype="bfloat16"), batch_size=2)
    got = walk.collect(0).sums()
    # the same block computed by a model whose parameters are bfloat16 (buffers kept), from its own inputs
    reference = SequentialCalibration(bf16_parameters(make_tiny_model(family)), windows, PruneSpec(method), batch_size=2)
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
