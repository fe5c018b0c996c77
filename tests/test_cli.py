"""The ``fedspallm`` command line: --print_config round trip, dotted overrides, --help, bad values,
and the shipped configs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from fedspallm.cli import build_parser
from fedspallm.cli import main as cli_main
from fedspallm.cli import run as cli_run

REPO = Path(__file__).resolve().parents[1]
# Configs of the prune command; finetune.yaml configures `fit` and is checked below.
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "finetune.yaml")


def _tiny_args(model_dir: str, root: Path) -> list[str]:
    return ["--model.name_or_path", model_dir, "--data.nsamples", "8", "--data.seqlen", "64", "--eval.seqlen", "64",
            "--eval.max_windows", "8", "--federation.num_clients", "4", "--output.dir", str(root),
            "--runtime.progress", "false"]


def _print_config(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv + ["--print_config"])
    assert exit_info.value.code in (None, 0)
    return capsys.readouterr().out


def _resolved(path: Path) -> dict:
    parser, subparsers, _ = build_parser()
    cfg = parser.parse_args(["prune", "--config", str(path)])
    return subparsers["prune"].instantiate(cfg["prune"])


# ------------------------------------------------------------------------------------------------
# Round trip and overrides (two tiny runs)


def test_print_config_round_trip_reproduces_the_run(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    root = tmp_path / "runs"
    args = ["prune", *_tiny_args(tiny_model_dir, str(root)), "--pruning.sparsity", "0.5"]
    printed = _print_config(args, capsys)
    assert yaml.safe_load(printed)["pruning"]["sparsity"] == 0.5
    default_printed = yaml.safe_load(_print_config(["prune"], capsys))
    assert default_printed["pruning"]["sparsity"] == 0.7  # so the override is what changes it
    config = tmp_path / "run.yaml"
    config.write_text(printed)

    first = cli_run(args)
    second = cli_run(["prune", "--config", str(config)])
    dir1, dir2 = Path(first["model_dir"]).parent, Path(second["model_dir"]).parent
    assert dir1 != dir2 and dir1.parent == dir2.parent == root

    # the dotted override changed the run
    for results in (first, second):
        assert results["pruning"]["sparsity"] == 0.5 and results["sparsity"]["target"] == 0.5
        assert results["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    on_disk = json.loads((dir1 / "results.json").read_text())
    assert on_disk["sparsity"]["target"] == 0.5

    # the config file reproduces it: bitwise-equal weights, equal perplexity
    weights1, weights2 = load_file(dir1 / "model" / "model.safetensors"), load_file(dir2 / "model" / "model.safetensors")
    assert set(weights1) == set(weights2)
    for key in weights1:
        assert torch.equal(weights1[key].view(torch.uint8), weights2[key].view(torch.uint8)), key
    packed1, packed2 = (load_file(d / "model_compressed.safetensors") for d in (dir1, dir2))
    assert set(packed1) == set(packed2)  # (the files' bytes may differ: safetensors orders metadata keys freely)
    for key in packed1:
        assert torch.equal(packed1[key].view(torch.uint8), packed2[key].view(torch.uint8)), key
    assert first["perplexity"] == second["perplexity"]
    assert first["sparsity"] == second["sparsity"]
    # and the run's own resolved config.yaml is exactly what --print_config printed
    assert (dir1 / "config.yaml").read_text() == printed == (dir2 / "config.yaml").read_text()


# ------------------------------------------------------------------------------------------------
# One contract for prune, validate and fit

SHARED = {"seed", "model", "eval", "output", "runtime"}
OVERRIDES = {  # a value off its default in every shared section, and one of the subcommand's own
    "prune": ["--pruning.sparsity", "0.5"],
    "validate": [],
    "fit": ["--fit.lr", "0.001"],
}


@pytest.mark.parametrize("command", ["prune", "validate", "fit"])
def test_print_config_round_trips_through_config_for_every_command(command, tmp_path, capsys):
    argv = [command, "--seed", "7", "--model.dtype", "bfloat16", "--eval.seqlen", "64", "--output.dir",
            str(tmp_path / "runs"), "--runtime.threads", "1", *OVERRIDES[command]]
    printed = _print_config(argv, capsys)
    shown = yaml.safe_load(printed)
    assert SHARED <= set(shown)
    assert (shown["seed"], shown["model"]["dtype"], shown["eval"]["seqlen"], shown["output"]["dir"],
            shown["runtime"]["threads"]) == (7, "bfloat16", 64, str(tmp_path / "runs"), 1)
    config = tmp_path / f"{command}.yaml"
    config.write_text(printed)
    assert _print_config([command, "--config", str(config)], capsys) == printed
    parser, subparsers, _ = build_parser()
    init = subparsers[command].instantiate(parser.parse_args([command, "--config", str(config)])[command])
    assert (init.seed, init.model.dtype, init.eval.seqlen, init.output.dir, init.runtime.threads) == \
        (7, "bfloat16", 64, str(tmp_path / "runs"), 1)


def test_shared_options_have_one_meaning(capsys):
    helps = {}
    for command in ("prune", "validate", "fit"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    for option, doc in [("--output.dir", "root of the run directories (version_N is created inside)"),
                        ("--model.name_or_path", "a hub id, a local Hugging Face directory"),
                        ("--eval.max_windows", "evaluate at most this many windows per dataset"),
                        ("--runtime.threads", "torch threads per process"), ("--config", "A YAML config file"),
                        ("--print_config", ""), ("--seed", "")]:
        for command, text in helps.items():
            assert f"{option} " in text and doc in text, (command, option)
    assert "--output_dir" not in helps["validate"]


@pytest.mark.parametrize("command", ["prune", "validate", "fit"])
@pytest.mark.parametrize("args, fragments", [
    (["--output.nope", "1"], ["unrecognized arguments: --output.nope 1"]),
    (["--eval.seqlen", "long"], ['Parser key "eval.seqlen":', "Expected a <class 'int'>. Got value: long"]),
    (["--model.dtype", "float8"], ['Parser key "model.dtype":', "Expected a typing.Literal['float32', 'bfloat16', "
                                   "'float16']. Got value: float8"]),
    (["--eval.max_windows", "many"], ['Parser key "eval.max_windows":', "Given value: many"]),
    (["--runtime.devices", "0"], ["runtime.devices=0: must be >= 1"]),
])
def test_bad_shared_options_give_jsonargparse_or_the_config_one_line(command, args, fragments, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--output.dir", str(tmp_path / "runs"), *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "runs").exists()


def test_validate_writes_into_output_dir(tiny_model_dir, tmp_path):
    root = tmp_path / "evals"
    results = cli_run(["validate", "--model.name_or_path", tiny_model_dir, "--eval.seqlen", "64", "--eval.max_windows",
                       "2", "--output.dir", str(root), "--runtime.progress", "false"])
    (run,) = root.glob("version_*")
    assert json.loads((run / "results.json").read_text())["perplexity"] == results["perplexity"]
    assert yaml.safe_load((run / "config.yaml").read_text())["output"] == {"dir": str(root)}


def test_every_command_checks_windows_against_the_context_alike(tiny_model_dir, tmp_path, capsys):
    for command, key in [("validate", "eval.seqlen"), ("fit", "fit.seqlen")]:
        with pytest.raises(SystemExit) as exit_info:
            cli_main([command, "--model.name_or_path", tiny_model_dir, f"--{key}", "300", "--output.dir",
                      str(tmp_path / command), "--runtime.progress", "false"])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2
        assert lines == [f"error: {key}=300: above the model's context of 256 tokens"]


# ------------------------------------------------------------------------------------------------
# --help


def test_help_shows_documented_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["prune", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for key, doc in [
        ("--model.name_or_path", "a hub id, a local Hugging Face directory"),
        ("--data.nsamples", "total number of calibration windows, over all clients"),
        ("--eval.max_windows", "evaluate at most this many windows per dataset"),
        ("--pruning.sparsity", "target fraction of zeros per pruned matrix"),
        ("--pruning.method", "sparsegpt, wanda or magnitude"),
        ("--federation.strategy", "fedspallm, centralized"),
        ("--federation.aggregation", "l0 (average only the non-zeros)"),
        ("--output.dir", "root of the run directories"),
        ("--seed", "seeds calibration sampling"),
    ]:
        assert key in text and doc in text, key

    with pytest.raises(SystemExit):
        cli_main(["--help"])
    top = capsys.readouterr().out
    for command in ("prune", "validate", "test", "plot"):
        assert command in top

    with pytest.raises(SystemExit):
        cli_main(["plot", "--help"])
    plot_help = " ".join(capsys.readouterr().out.split())
    assert "runs [runs ...]" in plot_help and "--out" in plot_help and "glob patterns" in plot_help


# ------------------------------------------------------------------------------------------------
# Bad values: one `error:` line, exit 2, no traceback, nothing written (real subprocesses)


@pytest.mark.parametrize("flag, value, mentions", [
    ("--pruning.sparsity", "1.5", "pruning.sparsity=1.5"),
    ("--pruning.method", "obs", "obs"),
    ("--federation.strategy", "nope", "nope"),
    ("--eval.dtype", "float16", "float16"),
    ("--pruning.calibration_dtype", "float16", "pruning.calibration_dtype=float16: CPUs"),  # before launch
])
def test_bad_value_exits_2_with_one_error_line(tiny_model_dir, tmp_path, flag, value, mentions):
    out = tmp_path / "logs"
    proc = subprocess.run(
        [sys.executable, str(REPO / "fedspallm" / "main.py"), "prune", "--model.name_or_path", tiny_model_dir,
         "--output.dir", str(out), flag, value],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert mentions in lines[0]
    assert proc.stdout == ""
    assert not out.exists()


def test_console_script_exit_status_is_zero_on_success(tmp_path):
    run = tmp_path / "version_0"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({
        "strategy": "centralized", "pruning": {"method": "magnitude", "sparsity": 0.5, "pattern": "unstructured"},
        "perplexity": {"default": 10.0}, "sparsity": {"target": 0.5, "overall": 0.5, "per_matrix": {}}}))
    with pytest.raises(SystemExit) as exit_info:  # what the generated `fedspallm` script does
        sys.exit(cli_main(["plot", str(run), "--out", str(tmp_path / "plots")]))
    assert exit_info.value.code in (None, 0)


# ------------------------------------------------------------------------------------------------
# The shipped configs parse, validate and say what they promise


def test_every_config_parses_and_validates(capsys):
    from fedspallm.prune import validate_all

    assert {p.name for p in CONFIGS} >= {"default.yaml", "demo.yaml", "opt-125m.yaml", "llama-2-7b.yaml",
                                          "fedprllm.yaml", "ablation.yaml"}
    for path in CONFIGS:
        init = _resolved(path)
        # A config that turns secure aggregation on is launched on 3+ processes (make demo: fabric run --devices 4).
        runtime = replace(init.runtime, devices=4) if init.federation.secure_aggregation else init.runtime
        validate_all(init.model, init.data, init.eval, init.pruning, init.federation, init.output, runtime)
        printed = _print_config(["prune", "--config", str(path)], capsys)
        assert yaml.safe_load(printed)["model"]["name_or_path"] == init.model.name_or_path


def test_the_fit_config_parses(capsys):
    printed = _print_config(["fit", "--config", str(REPO / "configs" / "finetune.yaml")], capsys)
    assert "model" in yaml.safe_load(printed)


@pytest.mark.parametrize("name", ["opt-125m", "llama-2-7b"])
def test_sparsegpt_protocol_configs(name):
    init = _resolved(REPO / "configs" / f"{name}.yaml")
    assert init.model.name_or_path == {"opt-125m": "facebook/opt-125m", "llama-2-7b": "meta-llama/Llama-2-7b-hf"}[name]
    assert (init.data.calibration, init.data.nsamples, init.data.seqlen) == ("c4", 128, 2048)
    assert init.eval.datasets == ["wikitext2", "ptb", "c4"]
    assert (init.eval.seqlen, init.eval.max_windows) == (2048, None)
    assert init.pruning.method == "sparsegpt"
    if name == "llama-2-7b":
        assert init.model.dtype in ("float16", "bfloat16") and init.pruning.offload is True


def test_fedprllm_demo_and_ablation_configs(capsys):
    fedprllm = _resolved(REPO / "configs" / "fedprllm.yaml")
    assert (fedprllm.federation.num_clients, fedprllm.data.nsamples) == (64, 128)  # 2 windows per client
    assert fedprllm.federation.strategy == "mask_vote" and fedprllm.federation.sampling == "all"
    assert fedprllm.pruning.method == "wanda" and fedprllm.pruning.sparsity == 0.7
    assert fedprllm.model.name_or_path == "default" and fedprllm.data.calibration == "default"

    demo = _resolved(REPO / "configs" / "demo.yaml")
    assert (demo.data.nsamples, demo.data.seqlen, demo.eval.max_windows, demo.federation.num_clients) == (8, 128, 8, 2)

    # ablation.yaml is the default run with the switches spelled out
    raw = yaml.safe_load((REPO / "configs" / "ablation.yaml").read_text())
    assert {"aggregation", "expansion", "sampling", "client_base"} <= set(raw["federation"])
    assert _print_config(["prune", "--config", str(REPO / "configs" / "ablation.yaml")], capsys) == \
        _print_config(["prune", "--config", str(REPO / "configs" / "default.yaml")], capsys)


def test_an_unreachable_hub_fails_at_once_with_one_line(tmp_path):
    # A closed local port stands in for a hub with no route: the probe sees it, and transformers goes
    # straight to the (empty) local cache instead of retrying for half a minute.
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    env = {**__import__("os").environ, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port}",
           "HF_HOME": str(tmp_path / "hf-home")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "fedspallm.cli", "validate", "--model.name_or_path", "nobody/no-model",
                             "--runtime.progress", "false"], capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.monotonic() - started
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines == [lines[-1]] and lines[-1].startswith("error: could not load 'nobody/no-model'"), lines
    assert "unreachable" in lines[-1] and "local directory" in lines[-1]
    assert elapsed < 120, elapsed


def test_paired_aggregation_equals_a_separate_run_of_the_other_rule(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    base = ["prune", *_tiny_args(tiny_model_dir, str(tmp_path / "runs")), "--runtime.threads", "1"]
    paired = cli_run([*base, "--federation.paired_aggregation", "fedavg"])
    alone = cli_run(base)
    plain = cli_run([*base, "--federation.strategy", "fedavg"])
    # The paired model is the other rule on the same uploads: a separate fedavg run, to the last digit.
    assert paired["paired"]["aggregation"] == "fedavg"
    assert paired["paired"]["perplexity"] == plain["perplexity"]
    assert paired["paired"]["sparsity_overall"] == plain["sparsity"]["overall"]
    # The primary (exported) model is the one the run would give without pairing.
    assert paired["perplexity"] == alone["perplexity"] != plain["perplexity"]
    first, second = (load_file(Path(r["model_dir"]) / "model.safetensors") for r in (paired, alone))
    assert all(torch.equal(first[key], second[key]) for key in first)
