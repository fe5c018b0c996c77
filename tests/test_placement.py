"""The placement rule on the CPU (the GPU side is in test_cuda.py): offload's walk, its bad input, collective devices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, random_windows

REPO = Path(__file__).resolve().parents[1]


def test_an_offloaded_walk_prunes_exactly_as_a_resident_one_and_leaves_the_model_on_the_host():
    from fedspallm.calibration import PruneSpec, prune_sequential
    from fedspallm.placement import devices_of

    spec, windows = PruneSpec("sparsegpt", 0.5), random_windows(4, 16)
    resident, offloaded = make_tiny_model("llama"), make_tiny_model("llama")
    prune_sequential(resident, windows, spec, device="cpu")
    prune_sequential(offloaded, windows, spec, device="cpu", offload=True)
    assert devices_of(offloaded) == {torch.device("cpu")}
    for (name, a), (_, b) in zip(resident.state_dict().items(), offloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_offload_needs_an_accelerator(monkeypatch):
    import fedspallm.placement as placement
    from fedspallm.errors import UserError

    placement.check_offload(False, "cpu")  # no offload: nothing to check
    monkeypatch.setattr(placement, "accelerator_available", lambda: False)
    with pytest.raises(UserError, match=r"^pruning.offload=true .* \(no CUDA or MPS device is available\); set "
                                        r"pruning.offload false$"):
        placement.check_offload(True, "auto")


def test_offload_on_the_cpu_is_one_error_line_before_any_weights_load(tiny_model_dir, tmp_path):
    out = tmp_path / "logs"
    proc = subprocess.run(
        [sys.executable, str(REPO / "fedspallm" / "main.py"), "prune", "--model.name_or_path", tiny_model_dir,
         "--output.dir", str(out), "--pruning.offload", "true", "--runtime.accelerator", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: pruning.offload=true keeps the model on the CPU and moves one block at a time to an "
                     "accelerator, but this run has none (runtime.accelerator=cpu); set pruning.offload false"]
    assert not out.exists()


def test_collectives_of_a_gloo_group_stay_on_the_host():
    from fedspallm.placement import collective_device

    assert collective_device("gloo") == torch.device("cpu")
    assert collective_device(None) == torch.device("cpu")
