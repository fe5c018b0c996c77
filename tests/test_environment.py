"""The environment record of results.json, and the experiment driver's refusal to mix environments."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedspallm.environment import describe_environment, environment_difference, environment_key, git_state

REPO = Path(__file__).resolve().parent.parent


def test_records_versions_model_hash_code_threads_cpu_and_blas(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not really weights, but bytes to hash")
    env = describe_environment(tmp_path)
    assert env["model_files_sha256"] == {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert env["libraries"]["torch"] == torch.__version__
    assert set(env["libraries"]) >= {"torch", "transformers", "gguf", "lightning"}
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["cpu"] and env["blas"] and env["aten_cpu_kernel"] == torch.backends.cpu.get_cpu_capability()
    json.dumps(env)  # results.json must be able to hold it


def test_git_state_names_this_checkout():
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    state = git_state(REPO)
    assert state["commit"] == head and isinstance(state["dirty"], bool)
    assert git_state(Path("/")) == {"commit": None, "dirty": None}


def test_key_ignores_the_commit_but_not_the_libraries():
    env = describe_environment()
    moved = {**env, "git": {"commit": "0" * 40, "dirty": False}}
    assert environment_key(moved) == environment_key(env)
    other = {**env, "libraries": {**env["libraries"], "torch": "0.0.1"}}
    assert environment_key(other) != environment_key(env)
    assert environment_difference(env, other).startswith("libraries:")
    assert environment_key(None) != environment_key(env)


def _load_driver():
    spec = importlib.util.spec_from_file_location("experiments_run", REPO / "experiments" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_driver_refuses_a_table_from_two_environments(tmp_path, monkeypatch):
    driver = _load_driver()
    monkeypatch.setattr(driver, "OUT", tmp_path)
    env = describe_environment()
    runs = [driver.Run("a", []), driver.Run("b", [])]
    for run, environment in zip(runs, (env, {**env, "blas": "openblas"})):
        path = run.directory / "version_0" / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"environment": environment}))
    with pytest.raises(SystemExit, match="different environments .*blas"):
        driver.check_one_environment("main", runs)
    assert driver.check_one_environment("main", runs[:1]) == env
