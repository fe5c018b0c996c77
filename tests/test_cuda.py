"""The GPU path: placement with and without offload, NCCL runs, export and reload. Skipped without CUDA.

Run on a GPU machine with ``make test-cuda`` (``pytest -m cuda tests/test_cuda.py``). The NCCL runs need
two GPUs (NCCL refuses two ranks on one device).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, random_windows

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL runs need two CUDA devices")

REPO = Path(__file__).resolve().parents[1]
MAIN = str(REPO / "fedspallm" / "main.py")
FABRIC = str(Path(sys.executable).with_name("fabric"))
CUDA = torch.device("cuda", 0)


def run_tiny(model_dir: str, out: Path, *extra: str, devices: int = 2) -> dict:
    from test_distributed import free_port

    command = [FABRIC, "run", "--accelerator", "cuda", "--devices", str(devices), "--main-port", str(free_port()),
               MAIN, "--model.name_or_path", model_dir, "--data.nsamples", "8", "--data.seqlen", "64",
               "--eval.seqlen", "64", "--eval.max_windows", "8", "--federation.num_clients", "2",
               "--runtime.progress", "false", "--output.dir", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("version_*/results.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("offload", [False, True])
def test_prune_sequential_on_the_gpu_matches_the_cpu_and_leaves_the_model_whole(offload):
    from fedspallm.calibration import PruneSpec, prune_sequential
    from fedspallm.placement import devices_of

    spec = PruneSpec("sparsegpt", 0.5)
    windows = random_windows(4, 16)
    reference = make_tiny_model("llama")
    prune_sequential(reference, windows, spec, device="cpu")
    model = make_tiny_model("llama")
    if not offload:
        model.to(CUDA)
    prune_sequential(model, windows, spec, device=CUDA, offload=offload)
    # Offload: the whole model is back on the host after the walk (nothing split); else it stays on the GPU.
    assert devices_of(model) == ({torch.device("cpu")} if offload else {CUDA})
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        if a.dim() == 2 and "layers" in name:  # pruned matrices: the same sparsity, masks equal up to GPU rounding
            assert int((b == 0).sum()) == int((a == 0).sum()), name
            assert ((a == 0) != (b.cpu() == 0)).float().mean() < 0.01, name
        else:
            assert torch.equal(a, b.cpu()), name


def test_the_pruned_model_evaluates_on_one_device_after_an_offloaded_prune():
    from fedspallm.calibration import PruneSpec, prune_sequential
    from fedspallm.lit import CausalLMModule, evaluate_perplexity
    from fedspallm.placement import devices_of, evaluation_device, place_whole

    model = make_tiny_model("llama")
    prune_sequential(model, random_windows(4, 16), PruneSpec("wanda", 0.5), device=CUDA, offload=True)
    place_whole(model, evaluation_device(model, CUDA, offload=True))
    assert devices_of(model) == {CUDA}
    ppl = evaluate_perplexity(None, CausalLMModule(model), random_windows(4, 16, seed=1), progress=False)
    assert ppl == ppl and ppl > 1


def test_the_reducer_and_the_broadcast_stage_host_tensors_on_the_gpu_for_nccl(tmp_path):
    """A one-rank NCCL group: host tensors in, host tensors out, the sum exact."""
    import torch.distributed as dist

    from fedspallm.federated.collectives import PlainReducer, broadcast_from_rank_zero
    from fedspallm.placement import collective_device
    from test_distributed import free_port

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert collective_device() == torch.device("cuda", torch.cuda.current_device())
        reducer = PlainReducer()
        reducer.world_size = 2  # force the collective path with one rank: the sum over one party is the input
        tensors = {"w": torch.arange(6, dtype=torch.float64).reshape(2, 3), "k": torch.ones(4, dtype=torch.int32)}
        out = reducer.sum(tensors, kind="weight_sum", tag="round 1")
        assert all(out[n].device.type == "cpu" and torch.equal(out[n], tensors[n]) for n in tensors)
        assert reducer.calls == 2  # one bucket per dtype

        class OneRank:
            world_size = 2

        weight = torch.randn(3, 3)
        before = weight.clone()
        broadcast_from_rank_zero(OneRank(), {"w": weight})
        assert weight.device.type == "cpu" and torch.equal(weight, before)
    finally:
        dist.destroy_process_group()


@two_gpus
@pytest.mark.parametrize("strategy", ["fedspallm", "mask_vote", "centralized"])
@pytest.mark.parametrize("offload", ["false", "true"])
def test_two_process_nccl_runs(tiny_model_dir, tmp_path, strategy, offload):
    results = run_tiny(tiny_model_dir, tmp_path, "--federation.strategy", strategy, "--pruning.offload", offload,
                       "--pruning.sparsity", "0.5")
    assert results["world_size"] == 2
    assert results["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    assert results["perplexity"]["default"] > 1


@two_gpus
def test_two_process_nccl_run_of_fedstats(tiny_model_dir, tmp_path):
    from fedspallm.federated.strategies import STRATEGIES

    if "fedstats" not in STRATEGIES:
        pytest.skip("fedstats is not registered in this tree")
    results = run_tiny(tiny_model_dir, tmp_path, "--federation.strategy", "fedstats", "--pruning.sparsity", "0.5")
    assert results["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)


@two_gpus
def test_export_from_a_gpu_run_reloads_with_the_same_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedspallm.data import eval_windows
    from fedspallm.lit import CausalLMModule, evaluate_perplexity

    results = run_tiny(tiny_model_dir, tmp_path, "--pruning.offload", "true", "--eval.batch_size", "4")
    exported = AutoModelForCausalLM.from_pretrained(results["model_dir"]).eval()
    zeros = sum(int((p == 0).sum()) for n, p in exported.named_parameters() if n.endswith("proj.weight"))
    total = sum(p.numel() for n, p in exported.named_parameters() if n.endswith("proj.weight"))
    assert zeros / total == pytest.approx(results["sparsity"]["overall"], abs=1e-6)
    windows = eval_windows("default", AutoTokenizer.from_pretrained(results["model_dir"]), 64, 8)
    ppl = evaluate_perplexity(None, CausalLMModule(exported.to(CUDA)), windows, batch_size=4, progress=False)
    assert ppl == pytest.approx(results["perplexity"]["default"], rel=1e-4)


def test_offload_without_an_accelerator_is_one_line(monkeypatch):
    from fedspallm.errors import UserError
    from fedspallm.placement import check_offload

    check_offload(True, "auto")  # CUDA is here: accepted
    with pytest.raises(UserError, match="runtime.accelerator=cpu"):
        check_offload(True, "cpu")
