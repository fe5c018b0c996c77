"""Client faults and numerical faults.

- A client process that dies or hangs mid-round stops the whole run within a bound, with one line
  that names the clients and the round (real 2-process runs under ``fabric run``, fault injection).
- The diagnosis itself, on an in-process store.
- NaN/inf in statistics is reported with the layer's name (through the engine and the federation);
  bf16/fp16 models keep their statistics in fp32.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, random_windows
from fedspallm.calibration import PruneSpec, prune_sequential
from fedspallm.config import FederationConfig
from fedspallm.errors import UserError
from fedspallm.federated.faults import ClientFailure, RoundWatch
from fedspallm.federated.collectives import PlainReducer
from fedspallm.federated.rounds import plan_rounds, run_federation
from fedspallm.models import find_decoder_blocks, get_weight, prunable_modules

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Whole runs: a rank dies or hangs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_with_fault(model_dir: str, out: Path, fail_client: int, mode: str, timeout_s: int) -> dict:
    """``fabric run --devices 2`` with 4 clients and 2 rounds; client ``fail_client`` fails in round 2.

    Checks that the run failed with exactly one error line; returns it and the seconds from the
    injected fault to the run's exit.
    """
    launcher = "import sys; from lightning.fabric.cli import _main; sys.exit(_main())"
    command = [sys.executable, "-c", launcher, "run", "--accelerator", "cpu", "--devices", "2",
               "--main-port", str(_free_port()), str(REPO / "fedspallm" / "main.py"),
               "--model.name_or_path", model_dir, "--data.nsamples", "8", "--data.seqlen", "64",
               "--eval.seqlen", "64", "--eval.max_windows", "4", "--federation.num_clients", "4",
               "--federation.rounds", "2", "--federation.fail_client", str(fail_client),
               "--federation.fail_round", "2", "--federation.fail_mode", mode,
               "--federation.collective_timeout_s", str(timeout_s), "--runtime.threads", "1",
               "--runtime.progress", "false", "--output.dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=out)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s + 240)
    finally:
        proc.kill()
    ended = time.monotonic()
    reader.join(timeout=10)
    injected = [t for t, line in lines if line.startswith("fedspallm: injected fault")]
    errors = [line for _, line in lines if line.startswith("error: ")]
    everything = "\n".join(line for _, line in lines)
    assert code != 0 and injected, everything
    assert len(errors) == 1, everything  # one line for the whole run, whichever process prints it
    return {"error": errors[0], "seconds": ended - injected[0]}


def test_a_client_process_that_dies_stops_the_run_at_once_and_is_named(tiny_model_dir, tmp_path):
    timeout_s = 60
    result = _run_with_fault(tiny_model_dir, tmp_path, fail_client=3, mode="exit", timeout_s=timeout_s)
    error = result["error"]
    assert "round 2/2 failed" in error and "clients 2, 3 (rank 1" in error and "exited" in error, error
    # A death is seen at once (the connection closes); it does not wait for the collective timeout.
    assert result["seconds"] < timeout_s, result["seconds"]
    print(f"killed rank -> run exit: {result['seconds']:.1f} s")


def test_a_client_process_that_hangs_stops_the_run_after_the_timeout_and_is_named(tiny_model_dir, tmp_path):
    timeout_s = 20
    result = _run_with_fault(tiny_model_dir, tmp_path, fail_client=1, mode="hang", timeout_s=timeout_s)
    error = result["error"]
    assert "round 2/2 failed" in error and "clients 0, 1 (rank 0)" in error, error
    assert "did not reach the round's aggregation within federation.collective_timeout_s=20 s" in error, error
    assert result["seconds"] < timeout_s + 30, result["seconds"]
    print(f"hung rank -> run exit: {result['seconds']:.1f} s")


# ------------------------------------------------------------------------------------------------
# The diagnosis, on an in-process store


@pytest.fixture
def store():
    import torch.distributed as dist

    return dist.HashStore()


def _watches(store, world_size: int = 2, num_clients: int = 4, rounds: int = 3) -> list[RoundWatch]:
    return [RoundWatch(r, world_size, num_clients, rounds, 20.0, store) for r in range(world_size)]


def _finished_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_diagnosis_names_the_dead_process_its_clients_and_the_round(store):
    rank0, _ = _watches(store)
    store.set(f"{rank0.prefix}/proc/1", f"{socket.gethostname()}:{_finished_pid()}")
    rank0.started(1)
    rank0.arrived(1)
    message = rank0.diagnose(1, "a peer closed its connection", timed_out=False)
    assert message.startswith("round 2/3 failed: the process of clients 2, 3 (rank 1, pid ")
    assert "exited before the round's aggregation" in message


def test_diagnosis_names_a_live_process_that_never_arrived_as_hung(store):
    _, rank1 = _watches(store)  # rank 0's process (this one) is alive and never arrives
    rank1.arrived(0)
    message = rank1.diagnose(0, "a collective timed out", timed_out=True)
    assert "clients 0, 1 (rank 0) did not reach the round's aggregation within federation.collective_timeout_s=20 s" \
        in message
    assert message.startswith("round 1/3 failed")


def test_a_client_error_is_recorded_for_the_others_and_reported_once(store):
    rank0, rank1 = _watches(store)
    with pytest.raises(ClientFailure) as failure:
        with rank1.client(1, 3):
            raise UserError("model.layers.0.mlp.up_proj: hessian: contains NaN or inf")
    assert str(failure.value) == ("round 2/3 failed: client 3 (rank 1) failed: "
                                  "model.layers.0.mlp.up_proj: hessian: contains NaN or inf")
    assert not failure.value.quiet and failure.value.exit_code == 2
    # The survivor's collective then fails; it finds the recorded reason and leaves the report to rank 1.
    with pytest.raises(ClientFailure) as seen:
        with rank0.round(1):
            raise torch.distributed.DistBackendError("Connection closed by peer")
    assert str(seen.value) == str(failure.value) and seen.value.quiet


def test_a_bug_in_a_client_keeps_its_traceback(store):
    rank0, _ = _watches(store)
    with pytest.raises(ZeroDivisionError):
        with rank0.client(0, 0):
            1 / 0
    assert "ZeroDivisionError" in store.get(f"{rank0.prefix}/failed/0").decode()


# ------------------------------------------------------------------------------------------------
# Numerics


def _poison_statistics(model, block: int = 1) -> None:
    """NaN in a norm (not pruned, so the weight check passes): the next projections see NaN inputs."""
    with torch.no_grad():
        find_decoder_blocks(model)[block].input_layernorm.weight[0] = float("nan")


@pytest.mark.parametrize("method,statistic", [("sparsegpt", "hessian"), ("wanda", "sq_norms")])
def test_nan_in_statistics_names_the_layer(method, statistic):
    model = make_tiny_model("llama")
    _poison_statistics(model)
    with pytest.raises(UserError, match=rf"model\.layers\.1\.self_attn\.q_proj: {statistic}: contains NaN or inf"):
        prune_sequential(model, random_windows(n=4), PruneSpec(method, 0.5), batch_size=4)


def test_nan_in_a_federated_round_names_the_client_round_and_layer():
    model = make_tiny_model("llama")
    _poison_statistics(model)
    cfg = FederationConfig(num_clients=2, rounds=1, sampling="all")
    plan = plan_rounds(cfg, len(find_decoder_blocks(model)), seed=0)
    with pytest.raises(ClientFailure, match=r"^round 1/1 failed: client 0 \(rank 0\) failed: "
                                            r"model\.layers\.1\.self_attn\.q_proj: hessian: contains NaN or inf$"):
        run_federation(model, {0: random_windows(n=2), 1: random_windows(n=2, seed=1)}, PruneSpec("sparsegpt", 0.5),
                       cfg, plan, PlainReducer(), batch_size=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_keep_statistics_in_float32(dtype, monkeypatch):
    import fedspallm.calibration as engine

    seen: list[tuple[torch.dtype, torch.dtype]] = []
    for name in ("accumulate_hessian", "accumulate_sq_norms"):
        original = getattr(engine, name)

        def spy(stat, nsamples, inputs, original=original):
            out, count = original(stat, nsamples, inputs)
            seen.append((inputs.dtype, out.dtype))
            return out, count

        monkeypatch.setattr(engine, name, spy)
    for method in ("sparsegpt", "wanda"):
        model = make_tiny_model("llama", dtype=dtype)
        cfg = FederationConfig(num_clients=2, rounds=1, sampling="all")
        plan = plan_rounds(cfg, len(find_decoder_blocks(model)), seed=0)
        outcome = run_federation(model, {0: random_windows(n=2), 1: random_windows(n=2, seed=1)},
                                 PruneSpec(method, 0.5), cfg, plan, PlainReducer(), batch_size=2)
        for name, layer in prunable_modules(model).items():
            weight, mask = get_weight(layer), outcome.masks[name]
            assert weight.dtype == dtype and torch.isfinite(weight).all(), name
            assert int((~mask).sum()) == round(0.5 * weight.numel()) and not weight[~mask].any(), name
    assert seen and {inputs for inputs, _ in seen} == {dtype} and {stat for _, stat in seen} == {torch.float32}
