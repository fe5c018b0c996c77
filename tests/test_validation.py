"""Bad input at the edge: every case gives one line naming the key and value, exit 2, no traceback,
and nothing is loaded or launched first.

The table runs in-process through ``fedspallm.cli.main`` with Fabric and model loading replaced by
tripwires; two cases also run as real processes (``python fedspallm/main.py`` and ``fabric run``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedspallm.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--data.nsamples", "8", "--data.seqlen", "64", "--eval.seqlen", "64", "--eval.max_windows", "4",
         "--federation.num_clients", "2", "--runtime.progress", "false"]


def _write_gguf(path: Path, truncate_by: int = 0) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.ones((64, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate_by:
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size - truncate_by)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model_dir) -> Path:
    """A folder of broken inputs."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n  \n\t\n")
    (root / "latin1.txt").write_bytes("caf\xe9 na\xefve text\n".encode("latin-1") * 50)
    (root / "short.txt").write_text("just a few words\n")
    (root / "broken.jsonl").write_text('{"text": "fine"}\nnot json\n')
    (root / "afile").write_text("x")
    (root / "noconfig").mkdir()
    (root / "random.gguf").write_bytes(os.urandom(4096))
    (root / "header.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    _write_gguf(root / "truncated.gguf", truncate_by=1000)
    truncated = root / "truncated-model"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    noweights = root / "no-weights"
    noweights.mkdir()
    shutil.copy(Path(tiny_model_dir) / "config.json", noweights / "config.json")
    return root


# (id, extra arguments, substrings the one error line must contain). {tiny}: the tiny model; {bad}: the folder above.
CASES = [
    ("sparsity-one", ["--pruning.sparsity", "1.0"], ["pruning.sparsity=1.0", "[0, 1)"]),
    ("sparsity-negative", ["--pruning.sparsity", "-0.1"], ["pruning.sparsity=-0.1", "[0, 1)"]),
    ("sparsity-not-a-number", ["--pruning.sparsity", "abc"], ['"pruning.sparsity"', "Expected a <class 'float'>", "abc"]),
    ("nm-n-not-below-m", ["--pruning.pattern", "4:2"], ["pruning.pattern='4:2'", "0 < N < M"]),
    ("nm-syntax", ["--pruning.pattern", "2-4"], ["pruning.pattern='2-4'", "N:M"]),
    ("nm-m-does-not-divide", ["--pruning.pattern", "2:5"], ["pruning.pattern='2:5'", "does not divide", "64, 128"]),
    ("nm-m-does-not-divide-3", ["--pruning.pattern", "1:3"], ["pruning.pattern='1:3'", "M=3"]),
    ("unknown-method", ["--pruning.method", "obs"], ['"pruning.method"', "'sparsegpt', 'wanda', 'magnitude'", "obs"]),
    ("unknown-strategy", ["--federation.strategy", "fedprox"], ["federation.strategy", "fedprox", "fedspallm"]),
    ("unknown-partition", ["--data.partition", "random"], ['"data.partition"', "'iid', 'topic', 'dirichlet'", "random"]),
    ("unknown-sampling", ["--federation.sampling", "poisson"], ['"federation.sampling"', "'systematic'", "poisson"]),
    ("unknown-aggregation", ["--federation.aggregation", "median"], ['"federation.aggregation"', "'l0'", "median"]),
    ("unknown-dtype", ["--model.dtype", "float8"], ['"model.dtype"', "'bfloat16'", "float8"]),
    ("budget-out-of-range", ["--federation.budgets", "[0.5, 1.5]"], ["federation.budgets", "1.5", "(0, 1]"]),
    ("budgets-wrong-length", ["--federation.budgets", "[0.5]"], ["federation.budgets", "one per client"]),
    ("budgets-not-a-list", ["--federation.budgets", "lots"], ['"federation.budgets"', "'uniform', 'linear'", "lots"]),
    ("budget-zero", ["--federation.budget", "0"], ["federation.budget=0.0", "(0, 1]"]),
    ("no-clients", ["--federation.num_clients", "0"], ["federation.num_clients=0", ">= 1"]),
    ("more-clients-than-samples", ["--federation.num_clients", "16"], ["federation.num_clients=16", "data.nsamples=8"]),
    ("no-samples", ["--data.nsamples", "0"], ["data.nsamples=0"]),
    ("no-rounds", ["--federation.rounds", "0"], ["federation.rounds=0"]),
    ("uncovered-blocks", ["--federation.budget", "0.1"], ["pruned by no client", "federation.uncovered"]),
    ("seqlen-one", ["--data.seqlen", "1"], ["data.seqlen=1", "> 1"]),
    ("seqlen-above-context", ["--data.seqlen", "1000"], ["data.seqlen=1000", "context of 256"]),
    ("eval-seqlen-zero", ["--eval.seqlen", "0"], ["eval.seqlen=0"]),
    ("eval-seqlen-above-context", ["--eval.seqlen", "300"], ["eval.seqlen=300", "context of 256"]),
    ("corpus-shorter-than-window", ["--data.calibration", "{bad}/short.txt"], ["data.calibration=", "too short"]),
    ("missing-model-dir", ["--model.name_or_path", "{bad}/nope"], ["model.name_or_path=", "no such file"]),
    ("model-dir-without-config", ["--model.name_or_path", "{bad}/noconfig"], ["model.name_or_path=", "config.json"]),
    ("model-dir-without-weights", ["--model.name_or_path", "{bad}/no-weights"], ["model.name_or_path=", "no weights"]),
    ("truncated-safetensors", ["--model.name_or_path", "{bad}/truncated-model"],
     ["model.name_or_path=", "model.safetensors is truncated"]),
    ("corrupt-gguf", ["--model.name_or_path", "{bad}/random.gguf"], ["model.name_or_path=", "not a GGUF file"]),
    ("corrupt-gguf-header", ["--model.name_or_path", "{bad}/header.gguf"],
     ["model.name_or_path=", "not a readable GGUF file"]),
    ("truncated-gguf", ["--model.name_or_path", "{bad}/truncated.gguf"], ["model.name_or_path=", "truncated or corrupt"]),
    ("missing-corpus-file", ["--data.calibration", "{bad}/nope.txt"], ["data.calibration=", "not found"]),
    ("unknown-corpus-kind", ["--data.calibration", "{bad}/data.csv"], ["data.calibration=", ".txt or .jsonl"]),
    ("empty-corpus", ["--data.calibration", "{bad}/empty.txt"], ["data.calibration=", "empty"]),
    ("blank-corpus", ["--data.calibration", "{bad}/blank.txt"], ["data.calibration=", "empty"]),
    ("non-utf8-corpus", ["--data.calibration", "{bad}/latin1.txt"], ["data.calibration=", "not valid UTF-8"]),
    ("non-utf8-eval-corpus", ["--eval.datasets", "[{bad}/latin1.txt]"], ["eval.datasets=", "not valid UTF-8"]),
    ("broken-jsonl", ["--data.calibration", "{bad}/broken.jsonl"], ["data.calibration=", "line 2 is not valid JSON"]),
    ("unknown-eval-dataset", ["--eval.datasets", "[wikitext3]"], ["eval.datasets='wikitext3'", "wikitext2"]),
    ("output-dir-is-a-file", ["--output.dir", "{bad}/afile"], ["output.dir=", "not a directory"]),
    ("more-devices-than-clients", ["--runtime.devices", "4"], ["runtime.devices=4", "num_clients=2"]),
    ("negative-threads", ["--runtime.threads", "-1"], ["runtime.threads=-1"]),
    ("zero-timeout", ["--federation.collective_timeout_s", "0"], ["federation.collective_timeout_s=0.0"]),
    ("fail-client-out-of-range", ["--federation.fail_client", "5"], ["federation.fail_client=5", "0..1"]),
    ("fail-round-out-of-range", ["--federation.fail_round", "3"], ["federation.fail_round=3", "1..1"]),
    ("unknown-fail-mode", ["--federation.fail_mode", "crash"], ['"federation.fail_mode"', "'exit', 'hang'", "crash"]),
    ("resume-missing", ["--output.resume", "{bad}/no-run"], ["output.resume=", "no such run directory"]),
    ("resume-without-checkpoint", ["--output.resume", "{bad}/noconfig"], ["output.resume=", "no federation.ckpt"]),
    ("resume-not-a-checkpoint", ["--output.resume", "{bad}/afile"], ["output.resume=", "not a readable checkpoint"]),
    ("freeze-mask-not-before-last-round", ["--federation.freeze_mask_after", "1"],
     ["federation.freeze_mask_after=1", "federation.rounds=1"]),
    ("freeze-mask-with-mask-vote", ["--federation.rounds", "2", "--federation.freeze_mask_after", "1",
                                    "--federation.strategy", "mask_vote"],
     ["federation.freeze_mask_after=1", "mask_vote"]),
    ("nm-without-expansion", ["--pruning.pattern", "2:4", "--federation.expansion", "false"],
     ["pruning.pattern=2:4", "federation.expansion=false"]),
    ("freeze-mask-at-the-last-round", ["--federation.rounds", "3", "--federation.freeze_mask_after", "3"],
     ["federation.freeze_mask_after=3", "federation.rounds=3"]),
    ("standalone-sample-too-large", ["--federation.standalone_clients", "3"],
     ["federation.standalone_clients=3", "1..2"]),
    ("paired-with-itself", ["--federation.paired_aggregation", "l0"],
     ["federation.paired_aggregation=l0", "already aggregates with l0"]),
    ("paired-with-mask-vote", ["--federation.paired_aggregation", "fedavg", "--federation.strategy", "mask_vote"],
     ["federation.paired_aggregation=fedavg", "mask_vote"]),
    ("secure-with-one-process", ["--federation.secure_aggregation", "true"],
     ["runtime.devices=1", "federation.secure_aggregation=true needs at least 3 processes, got 1"]),
    ("secure-bounds-unknown-kind", ["--federation.secure_bounds", "{weights: 8}"],
     ["federation.secure_bounds", "unknown kind 'weights'"]),
    ("secure-bounds-overflow", ["--federation.secure_bounds", "{weight_sum: 1e9}"],
     ["'weight_sum' would overflow", "3 parties x bound 1e+09 x 2^36"]),
    ("secure-bounds-two-limb-statistics", ["--federation.secure_bounds", "{hessian: {limbs: 2}}"],
     ["federation.secure_bounds.hessian", "limbs must be 1"]),
    ("unknown-key", ["--pruning.foo", "1"], ["unrecognized arguments", "--pruning.foo"]),
    ("missing-config-file", ["--config", "{bad}/none.yaml"], ['"config"', "does not exist", "none.yaml"]),
]


def _expand(args: list[str], tiny: str, bad: Path) -> list[str]:
    return [a.replace("{tiny}", tiny).replace("{bad}", str(bad)) for a in args]


@pytest.fixture
def tripwires(monkeypatch):
    """Nothing may be launched or loaded before the input is known to be good."""
    import fedspallm.prune as prune_module

    def tripped(*args, **kwargs):
        raise AssertionError("launched or loaded a model before rejecting bad input")

    monkeypatch.setattr(prune_module, "make_fabric", tripped)
    monkeypatch.setattr(prune_module, "load_model", tripped)


def test_the_table_has_at_least_twenty_distinct_cases():
    assert len({case[0] for case in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("name,args,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clean_line(name, args, expected, tiny_model_dir, bad, tripwires, capsys, tmp_path):
    argv = ["prune", "--model.name_or_path", tiny_model_dir, "--output.dir", str(tmp_path / "runs"), *SMALL,
            *_expand(args, tiny_model_dir, bad)]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def test_a_real_process_prints_one_line_for_a_truncated_model(tiny_model_dir, bad, tmp_path):
    command = [sys.executable, str(REPO / "fedspallm" / "main.py"), "--model.name_or_path",
               str(bad / "truncated-model"), "--output.dir", str(tmp_path), *SMALL]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "model.safetensors is truncated" in lines[0], done.stderr


def test_fabric_run_with_more_devices_than_clients(tiny_model_dir, tmp_path):
    """Every process finds the error before Fabric starts; only rank 0 prints it.

    torchrun (behind ``fabric run``) then adds its own failure report after our line; that report
    is the launcher's, and a script cannot suppress it.
    """
    launcher = "import sys; from lightning.fabric.cli import _main; sys.exit(_main())"
    command = [sys.executable, "-c", launcher, "run", "--accelerator", "cpu", "--devices", "4",
               "--main-port", str(_free_port()), str(REPO / "fedspallm" / "main.py"),
               "--model.name_or_path", tiny_model_dir, "--output.dir", str(tmp_path), *SMALL]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    ours = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode != 0
    assert len(ours) == 1, done.stderr
    assert "fabric run --devices 4" in ours[0] and "federation.num_clients=2" in ours[0]
    before = done.stderr.split(ours[0])[0]
    assert "Traceback" not in before and not re.search(r'File "[^"]*fedspallm/', done.stderr), done.stderr


def test_each_section_checks_its_own_keys_when_built():
    """The rules live on the dataclasses: a config object that exists is valid (no CLI involved)."""
    import dataclasses

    from fedspallm.config import DataConfig, FederationConfig, FitConfig, PruningConfig, check_prune
    from fedspallm.errors import UserError

    with pytest.raises(UserError, match=r"^federation.freeze_mask_after=2 with federation.rounds=2: "):
        FederationConfig(rounds=2, freeze_mask_after=2)
    with pytest.raises(UserError, match=r"^federation.budgets contains 1.5: every budget must be in \(0, 1\]$"):
        FederationConfig(num_clients=2, budgets=[0.5, 1.5])
    with pytest.raises(UserError, match=r"^fit.lr=0.0: must be > 0$"):
        FitConfig(lr=0.0)
    with pytest.raises(UserError, match=r"^data.seqlen=1: must be > 1"):
        dataclasses.replace(DataConfig(), seqlen=1)  # replace builds a new object: checked again
    with pytest.raises(UserError, match=r"^federation.num_clients=8: .*\(data.nsamples=4\)"):
        check_prune(DataConfig(nsamples=4), PruningConfig(), FederationConfig(num_clients=8))
    check_prune(DataConfig(nsamples=4), PruningConfig(pattern="2:4"), FederationConfig(num_clients=4))

