"""Round checkpoints and resume: interrupted after round 1 of 3, resumed, bitwise equal to an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, random_windows
from fedspallm.calibration import PruneSpec
from fedspallm.checkpoint import (
    CHECKPOINT_NAME,
    checkpoint_state,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
    start_from,
)
from fedspallm.config import DataConfig, FederationConfig, ModelConfig, PruningConfig
from fedspallm.errors import UserError
from fedspallm.federated.collectives import PlainReducer
from fedspallm.federated.rounds import plan_rounds, run_federation
from fedspallm.models import find_decoder_blocks, get_weight, prunable_modules

REPO = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    pass


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: get_weight(layer).detach().clone() for name, layer in prunable_modules(model).items()}


def _federate(cfg: FederationConfig, spec: PruneSpec, *, resume=None, on_round_end=None):
    model = make_tiny_model("llama")
    clients = {c: random_windows(n=2, seed=c) for c in range(cfg.num_clients)}
    plan = plan_rounds(cfg, len(find_decoder_blocks(model)), seed=0)
    outcome = run_federation(model, clients, spec, cfg, plan, PlainReducer(), batch_size=2, resume=resume,
                             on_round_end=on_round_end)
    return model, outcome


@pytest.mark.parametrize("overrides", [
    {},  # fedspallm, pooled over rounds (client_base dense)
    {"client_base": "global"},
    {"strategy": "mask_vote"},
    {"strategy": "fedavg", "budgets": [0.34, 0.67, 0.67], "uncovered": "magnitude"},
], ids=["pooled", "global", "mask_vote", "fedavg-budgets"])
def test_resume_after_round_one_of_three_is_bitwise_identical(overrides, tmp_path):
    cfg = FederationConfig(num_clients=3, rounds=3, **overrides)
    spec = PruneSpec("wanda", 0.5)
    whole, _ = _federate(cfg, spec)

    saved = tmp_path / CHECKPOINT_NAME

    first_round: list[list[int]] = []

    def crash_in_round_two(t, outcome):
        if t == 0:
            first_round.append(outcome.rounds[0].upload_bytes)
            torch.save(checkpoint_state(outcome, {"seed": 0}, cfg.rounds), saved)
        else:
            raise Interrupted

    with pytest.raises(Interrupted):
        _federate(cfg, spec, on_round_end=crash_in_round_two)
    state = load_checkpoint(str(tmp_path), {"seed": 0}, cfg.rounds)
    assert state["completed_rounds"] == 1
    resumed, outcome = _federate(cfg, spec, resume=start_from(state))
    assert outcome.completed_rounds == 3 and len(outcome.rounds) == 3
    assert outcome.rounds[0].upload_bytes == first_round[0] and all(first_round[0])  # the round log came back
    for name, weight in _weights(whole).items():
        assert torch.equal(weight, _weights(resumed)[name]), name


def test_a_checkpoint_of_the_last_round_resumes_to_the_same_model(tmp_path):
    cfg = FederationConfig(num_clients=2, rounds=2)
    spec = PruneSpec("magnitude", 0.5)
    states = []
    whole, _ = _federate(cfg, spec, on_round_end=lambda t, o: states.append(checkpoint_state(o, {}, 2)))
    torch.save(states[-1], tmp_path / CHECKPOINT_NAME)
    resumed, _ = _federate(cfg, spec, resume=start_from(load_checkpoint(str(tmp_path), {}, 2)))
    for name, weight in _weights(whole).items():
        assert torch.equal(weight, _weights(resumed)[name]), name


def test_resume_refuses_other_settings_with_one_line(tmp_path):
    args = (0, ModelConfig(), DataConfig(), PruningConfig(), FederationConfig(rounds=3))
    torch.save({"format": 2, "fingerprint": fingerprint(*args), "completed_rounds": 2}, tmp_path / CHECKPOINT_NAME)
    other = fingerprint(0, ModelConfig(), DataConfig(), PruningConfig(sparsity=0.5), FederationConfig(rounds=3))
    with pytest.raises(UserError, match=r"pruning\.sparsity=0\.5 differs from the checkpointed run's 0\.7"):
        load_checkpoint(str(tmp_path), other, 3)
    more_rounds = fingerprint(0, ModelConfig(), DataConfig(), PruningConfig(), FederationConfig(rounds=5))
    assert load_checkpoint(str(tmp_path), more_rounds, 5)["completed_rounds"] == 2  # rounds may grow
    with pytest.raises(UserError, match=r"federation\.rounds=1: .* completed 2 rounds"):
        load_checkpoint(str(tmp_path), fingerprint(0, ModelConfig(), DataConfig(), PruningConfig(),
                                                   FederationConfig(rounds=1)), 1)
    # Timeouts and fault injection do not shape the model: they may differ.
    injected = FederationConfig(rounds=3, collective_timeout_s=5, fail_client=0, fail_round=2, fail_mode="hang")
    assert fingerprint(0, ModelConfig(), DataConfig(), PruningConfig(), injected) == fingerprint(*args)


def test_checkpoint_is_written_atomically_with_fabric_save(tmp_path):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    path = save_checkpoint(fabric, tmp_path, {"format": 1, "x": torch.arange(3)})
    assert path == tmp_path / CHECKPOINT_NAME and sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    path.write_bytes(path.read_bytes()[:40])  # a torn file (what atomic writes prevent) is refused cleanly
    with pytest.raises(UserError, match="is not a readable checkpoint"):
        load_checkpoint(str(tmp_path), {}, 3)


# ------------------------------------------------------------------------------------------------
# End to end: three launches of the real program


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_interrupted_run_resumes_to_the_same_checksum(tiny_model_dir, tmp_path):
    """Uninterrupted (1 process) vs. killed in round 2 (fabric run, 2 processes) + resumed (python, 2 processes).

    Threads are pinned to 1 per process, so the three layouts compute the same bits (see README).
    """
    common = ["--model.name_or_path", tiny_model_dir, "--data.nsamples", "8", "--data.seqlen", "64",
              "--eval.seqlen", "64", "--eval.max_windows", "4", "--federation.num_clients", "4",
              "--federation.rounds", "3", "--runtime.threads", "1", "--runtime.progress", "false",
              "--output.save_compressed", "false"]
    main = str(REPO / "fedspallm" / "main.py")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}

    def run(command: list[str], out: Path) -> subprocess.CompletedProcess:
        out.mkdir()
        return subprocess.run(command + ["--output.dir", str(out)], capture_output=True, text=True, timeout=600,
                              env=env, cwd=out)

    whole = run([sys.executable, main, *common], tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    launcher = "import sys; from lightning.fabric.cli import _main; sys.exit(_main())"
    killed = run([sys.executable, "-c", launcher, "run", "--accelerator", "cpu", "--devices", "2", "--main-port",
                  str(_free_port()), main, *common, "--federation.fail_client", "3", "--federation.fail_round", "2"],
                 tmp_path / "killed")
    assert killed.returncode != 0 and "round 2/3 failed" in killed.stderr, killed.stderr
    run_dir = tmp_path / "killed" / "version_0"
    assert (run_dir / CHECKPOINT_NAME).is_file() and not (run_dir / "model").exists()
    resumed = run([sys.executable, main, *common, "--runtime.devices", "2", "--output.resume", str(run_dir)],
                  tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr

    results = json.loads((tmp_path / "resumed" / "version_0" / "results.json").read_text())
    assert results["resumed_from"]["completed_rounds"] == 1 and results["world_size"] == 2
    expected = _sha256(tmp_path / "whole" / "version_0" / "model" / "model.safetensors")
    got = _sha256(tmp_path / "resumed" / "version_0" / "model" / "model.safetensors")
    print(f"uninterrupted {expected}\nresumed       {got}")
    assert got == expected
    whole_results = json.loads((tmp_path / "whole" / "version_0" / "results.json").read_text())
    assert results["bytes"]["upload_per_client_per_round"] == whole_results["bytes"]["upload_per_client_per_round"]


def test_resume_with_more_rounds_aggregates_the_blocks_the_new_rounds_cover(tmp_path):
    """Seed 1, one client pruning one of 3 blocks per round: rounds 1-2 leave blocks 0 and 1 uncovered, round 3
    covers block 0. Resumed from the 2-round run's last checkpoint, block 0 must be the client's, not magnitude's."""
    spec = PruneSpec("wanda", 0.5)

    def run(rounds, resume=None, on_round_end=None):
        cfg = FederationConfig(num_clients=1, rounds=rounds, budgets=[0.34], sampling="uniform", uncovered="magnitude")
        model = make_tiny_model("llama")
        plan = plan_rounds(cfg, len(find_decoder_blocks(model)), seed=1)
        outcome = run_federation(model, {0: random_windows(n=2)}, spec, cfg, plan, PlainReducer(), seed=1,
                                 batch_size=2, resume=resume, on_round_end=on_round_end)
        return model, outcome

    states = []
    _, two = run(2, on_round_end=lambda t, o: states.append(checkpoint_state(o, {}, 2)))
    assert two.uncovered == [0, 1]
    torch.save(states[-1], tmp_path / CHECKPOINT_NAME)
    whole, three = run(3)
    resumed, outcome = run(3, resume=start_from(load_checkpoint(str(tmp_path), {}, 3)))
    assert three.uncovered == outcome.uncovered == [1]
    for name, weight in _weights(whole).items():
        assert torch.equal(weight, _weights(resumed)[name]), name
