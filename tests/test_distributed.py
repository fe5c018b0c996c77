"""Real multi-process runs with gloo on the tiny model: layouts, launchers, multi-node over loopback."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAIN = str(REPO / "fedspallm" / "main.py")
FABRIC = str(Path(sys.executable).with_name("fabric"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_args(model_dir: str, out: Path, *extra: str) -> list[str]:
    return [
        "--model.name_or_path", model_dir, "--data.nsamples", "8", "--data.seqlen", "64",
        "--eval.seqlen", "64", "--eval.max_windows", "8", "--federation.num_clients", "4",
        "--runtime.progress", "false", "--runtime.threads", "1", "--output.dir", str(out), *extra,
    ]


def run(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    port = str(free_port())
    if command[:2] == [FABRIC, "run"] and "--main-port" not in command:  # not fabric's fixed 29400: runs in parallel
        command = [*command[:2], "--main-port", port, *command[2:]]
    env = {**os.environ, "MASTER_PORT": port}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def model_sha(out: Path) -> str:
    (model,) = out.glob("version_*/model/model.safetensors")
    return hashlib.sha256(model.read_bytes()).hexdigest()


def results(out: Path) -> dict:
    (path,) = out.glob("version_*/results.json")
    return json.loads(path.read_text())


def test_process_layouts_give_bitwise_identical_models(tiny_model_dir, tmp_path):
    one = tmp_path / "one"
    run([sys.executable, MAIN, *tiny_args(tiny_model_dir, one)])
    two = tmp_path / "two"  # Fabric launches the second process itself
    run([sys.executable, MAIN, *tiny_args(tiny_model_dir, two, "--runtime.devices", "2")])
    four = tmp_path / "four"  # the launcher creates the processes
    run([FABRIC, "run", "--devices", "4", MAIN, *tiny_args(tiny_model_dir, four)])
    assert model_sha(one) == model_sha(two) == model_sha(four)
    assert results(one)["perplexity"]["default"] == pytest.approx(results(four)["perplexity"]["default"], rel=1e-9)
    assert results(four)["world_size"] == 4
    sent = results(four)["bytes"]["upload_per_client_per_round"]
    assert len(sent) == 1 and len(sent[0]) == 4 and all(b > 0 for b in sent[0])
    assert sent == results(one)["bytes"]["upload_per_client_per_round"]
    seconds = results(four)["client_seconds_per_round"]
    assert len(seconds) == 1 and len(seconds[0]) == 4 and all(s > 0 for s in seconds[0])


def test_two_nodes_over_loopback_match_one_node(tiny_model_dir, tmp_path):
    port = str(free_port())
    out = tmp_path / "nodes"
    launchers = [
        subprocess.Popen(
            [FABRIC, "run", "--num-nodes", "2", "--node-rank", str(rank), "--main-address", "127.0.0.1",
             "--main-port", port, "--devices", "1", MAIN, *tiny_args(tiny_model_dir, out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=240) for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    single = tmp_path / "single"
    run([sys.executable, MAIN, *tiny_args(tiny_model_dir, single, "--runtime.devices", "2")])
    assert results(out)["world_size"] == 2
    assert model_sha(out) == model_sha(single)


def test_standalone_and_centralized_across_processes(tiny_model_dir, tmp_path):
    solo = tmp_path / "solo"
    run([sys.executable, MAIN, *tiny_args(tiny_model_dir, solo, "--federation.strategy", "standalone")])
    spread = tmp_path / "spread"
    run([FABRIC, "run", "--devices", "2", MAIN, *tiny_args(tiny_model_dir, spread, "--federation.strategy", "standalone")])
    a, b = results(solo)["perplexity"]["default"], results(spread)["perplexity"]["default"]
    assert len(set(a["per_client"])) == 4  # four different clients, four different models
    assert a["per_client"] == pytest.approx(b["per_client"], rel=1e-9)
    assert a["min"] <= a["mean"] <= a["max"]
    # A seeded sample of the clients: the same models as in the full run, the statistics over the sample.
    sampled = tmp_path / "sampled"
    run([FABRIC, "run", "--devices", "2", MAIN, *tiny_args(tiny_model_dir, sampled, "--federation.strategy", "standalone",
                                                          "--federation.standalone_clients", "2")])
    c = results(sampled)["perplexity"]["default"]
    assert len(c["clients"]) == 2 and c["per_client"] == pytest.approx([a["per_client"][i] for i in c["clients"]], rel=1e-9)
    assert c["mean"] == pytest.approx(sum(c["per_client"]) / 2)
    assert results(sampled)["sparsity"] == results(solo)["sparsity"]
    central_one = tmp_path / "central1"
    run([sys.executable, MAIN, *tiny_args(tiny_model_dir, central_one, "--federation.strategy", "centralized")])
    central_two = tmp_path / "central2"
    run([FABRIC, "run", "--devices", "2", MAIN, *tiny_args(tiny_model_dir, central_two, "--federation.strategy", "centralized")])
    assert model_sha(central_one) == model_sha(central_two)
