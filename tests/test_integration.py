"""End to end on the embedded default model and corpus (SmolLM2-135M, Wikipedia leads)."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MAIN = str(REPO / "fedspallm" / "main.py")
FABRIC = str(Path(sys.executable).with_name("fabric"))

pytestmark = pytest.mark.integration


def only_results(out: Path) -> dict:
    (path,) = out.glob("version_*/results.json")
    return json.loads(path.read_text())


def direct_perplexity(model, windows: torch.Tensor) -> float:
    """SparseGPT's *_eval: exp of the mean HF loss over equal windows."""
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.double() for w in windows]
    return math.exp(torch.stack(losses).mean().item())


def test_dense_perplexity_of_the_default_model_on_its_test_split_matches_a_direct_computation(tmp_path):
    from fedspallm.config import ModelConfig
    from fedspallm.data import eval_windows
    from fedspallm.models import load_model

    out = tmp_path / "dense"
    command = [sys.executable, "-m", "fedspallm.cli", "validate", "--eval.seqlen", "256", "--eval.max_windows", "6",
               "--output.dir", str(out), "--runtime.progress", "false"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    reported = only_results(out)["perplexity"]["default"]
    assert only_results(out)["eval"]["dtype"] == "float32"
    loaded = load_model(ModelConfig())
    windows = eval_windows("default", loaded.tokenizer, 256, 6)
    assert reported == pytest.approx(direct_perplexity(loaded.model, windows), rel=1e-3)
    assert 5 < reported < 100  # an instruct model of this size on encyclopaedic text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_federated_run_on_the_default_model_with_three_processes_and_secure_aggregation(tmp_path):
    out = tmp_path / "fed"
    command = [
        FABRIC, "run", "--main-port", str(free_port()), "--devices", "3", MAIN, "--config",
        str(REPO / "configs" / "default.yaml"),
        "--pruning.sparsity", "0.5", "--data.nsamples", "8", "--data.seqlen", "128",
        "--eval.seqlen", "256", "--eval.max_windows", "4", "--runtime.progress", "false",
        "--output.dir", str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    results = only_results(out)
    assert results["strategy"] == "fedspallm" and results["num_clients"] == 4 and results["world_size"] == 3
    assert results["secure_aggregation"] is True  # configs/default.yaml turns it on
    per_matrix = results["sparsity"]["per_matrix"]
    assert len(per_matrix) == 30 * 7
    assert all(abs(value - 0.5) < 1e-3 for value in per_matrix.values())
    assert math.isfinite(results["perplexity"]["default"])
    for key in ("bytes", "timings", "wall_time_s", "peak_rss_bytes", "model_dir"):
        assert key in results
    assert results["bytes"]["upload_per_client_per_round"][0][0] < results["bytes"]["dense_model"]
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(results["model_dir"])
    q = exported.model.layers[0].self_attn.q_proj.weight
    assert abs((q == 0).float().mean().item() - 0.5) < 1e-3
