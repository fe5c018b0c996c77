"""What a run leaves behind, read back the way a user would: TensorBoard events, the Hugging Face
export, the compressed export, results.json, and the ``plot`` command.

Two tiny runs (the ``tiny_model_dir`` Llama, 4 blocks, hidden 64) through the CLI entry, in process:
FedSpaLLM + SparseGPT at 70%, and centralized magnitude at 50% (no exports, for the plot).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from fedspallm.cli import main as cli_main
from fedspallm.cli import run as cli_run
from fedspallm.errors import UserError

SPARSITY = 0.7
NUM_CLIENTS = 4
EVAL_SEQLEN = 64
EVAL_WINDOWS = 8
EVAL_BATCH = 4
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _prune(model_dir: str, root: Path, *extra: str) -> Path:
    before = set(root.glob("version_*"))
    cli_main([
        "prune", "--model.name_or_path", model_dir, "--data.nsamples", "8", "--data.seqlen", "64",
        "--eval.seqlen", str(EVAL_SEQLEN), "--eval.max_windows", str(EVAL_WINDOWS),
        "--eval.batch_size", str(EVAL_BATCH), "--federation.num_clients", str(NUM_CLIENTS),
        "--output.dir", str(root), "--runtime.progress", "false", *extra,
    ])
    (run_dir,) = set(root.glob("version_*")) - before
    return run_dir


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, runs_root) -> Path:
    """FedSpaLLM (l0 + expansion) with SparseGPT at 70%, 4 clients, with both exports."""
    return _prune(tiny_model_dir, runs_root, "--pruning.sparsity", str(SPARSITY))


@pytest.fixture(scope="module")
def second_run_dir(tiny_model_dir, runs_root, run_dir) -> Path:
    """A cheap second point for the plot: centralized magnitude at 50%, no exports."""
    return _prune(tiny_model_dir, runs_root, "--federation.strategy", "centralized", "--pruning.method", "magnitude",
                  "--pruning.sparsity", "0.5", "--output.save_model", "false", "--output.save_compressed", "false")


@pytest.fixture(scope="module")
def results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def exported(run_dir):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(run_dir / "model"), output_loading_info=True)
    model.eval()
    return model, info


def _expected_matrices(num_blocks: int = 4) -> set[str]:
    return {f"model.layers.{b}.{m}" for b in range(num_blocks) for m in MODULES}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().view(torch.uint8)


# ------------------------------------------------------------------------------------------------
# results.json


def test_results_json_has_every_design_key(run_dir, results, tiny_model_dir):
    assert results["strategy"] == "fedspallm"
    assert results["pruning"] == {"method": "sparsegpt", "sparsity": SPARSITY, "pattern": "unstructured",
                                  "calibration_dtype": "float32"}  # pruning.calibration_dtype null: the model's
    assert results["num_clients"] == NUM_CLIENTS and results["rounds"] == 1 and results["seed"] == 0
    assert set(results["perplexity"]) == {"default"}
    assert results["eval"]["dtype"] == "float32"  # the model's own dtype (eval.dtype null)
    assert math.isfinite(results["perplexity"]["default"]) and results["perplexity"]["default"] > 1
    sparsity = results["sparsity"]
    assert set(sparsity) >= {"target", "overall", "per_matrix"}
    assert sparsity["target"] == SPARSITY
    assert set(sparsity["per_matrix"]) == _expected_matrices()
    assert sparsity["overall"] == pytest.approx(SPARSITY, abs=1e-3)
    upload = results["bytes"]["upload_per_client_per_round"]
    assert len(upload) == 1 and len(upload[0]) == NUM_CLIENTS and all(v > 0 for v in upload[0])
    assert results["bytes"]["dense_model"] > 0
    assert results["wall_time_s"] > 0
    assert set(results["timings"]) >= {"load_s", "prune_s", "eval_s"}
    assert all(v >= 0 for v in results["timings"].values())
    assert results["peak_rss_bytes"] > 0
    assert Path(results["model_dir"]) == run_dir / "model"
    assert (run_dir / "config.yaml").is_file()
    environment = results["environment"]
    weights = Path(tiny_model_dir) / "model.safetensors"
    assert environment["model_files_sha256"]["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert environment["libraries"]["torch"] == torch.__version__ and environment["torch_threads"] >= 1


# ------------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_events_hold_sparsity_heatmap_perplexity_bytes(run_dir, results):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = run_dir.glob("events.out.tfevents*")
    events = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    scalars = set(tags["scalars"])

    per_matrix = results["sparsity"]["per_matrix"]
    expected = {}
    for name, value in per_matrix.items():
        block, module = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name).groups()
        expected[f"sparsity/block_{block}/{module}"] = value
    assert {t for t in scalars if re.fullmatch(r"sparsity/block_\d+/.+", t)} == set(expected)
    for tag, value in expected.items():
        assert events.Scalars(tag)[-1].value == pytest.approx(value, rel=1e-6), tag  # events store float32
    assert events.Scalars("sparsity/overall")[-1].value == pytest.approx(results["sparsity"]["overall"], rel=1e-6)

    assert "sparsity/heatmap" in tags["images"]
    image = events.Images("sparsity/heatmap")[-1]
    assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > 0 and image.height > 0

    assert events.Scalars("perplexity/default")[-1].value == pytest.approx(results["perplexity"]["default"], rel=1e-6)
    for client, sent in enumerate(results["bytes"]["upload_per_client_per_round"][0]):
        assert events.Scalars(f"bytes/client_{client}")[-1].value == sent
        assert events.Scalars(f"blocks_pruned/client_{client}")[-1].value == len(results["samples"][0][client])
    assert "time/round_s" in scalars
    assert "sampled_blocks/text_summary" in tags["tensors"]


# ------------------------------------------------------------------------------------------------
# Hugging Face export


def test_export_loads_as_is_with_the_reported_zeros(exported, results, run_dir):
    model, info = exported
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    linear = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name}
    assert linear == set(results["sparsity"]["per_matrix"])
    zeros = total = 0
    for name, reported in results["sparsity"]["per_matrix"].items():
        weight = model.get_submodule(name).weight
        z = int((weight == 0).sum())
        assert z / weight.numel() == reported, name
        zeros, total = zeros + z, total + weight.numel()
    assert zeros / total == results["sparsity"]["overall"]
    for name, p in model.named_parameters():  # nothing outside the decoder projections is pruned
        if name.removesuffix(".weight") not in results["sparsity"]["per_matrix"]:
            assert (p == 0).float().mean() < 0.01, name

    card = (run_dir / "model" / "README.md").read_text()
    assert "fedspallm" in card and "sparsegpt" in card
    assert f"{results['perplexity']['default']:.3f}" in card


def test_export_reproduces_the_reported_perplexity(exported, results, run_dir):
    from lightning.fabric import Fabric
    from transformers import AutoTokenizer

    from fedspallm.data import eval_windows
    from fedspallm.lit import CausalLMModule, evaluate_perplexity

    model, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "model"))
    windows = eval_windows("default", tokenizer, EVAL_SEQLEN, EVAL_WINDOWS)
    assert windows.shape == (EVAL_WINDOWS, EVAL_SEQLEN)
    reported = results["perplexity"]["default"]

    fabric = Fabric(accelerator="cpu", devices=1)
    ppl = evaluate_perplexity(fabric, CausalLMModule(model), windows, EVAL_BATCH, progress=False)
    assert ppl == pytest.approx(reported, rel=1e-4)

    with torch.inference_mode():  # the plain Hugging Face way, independent of the project's metric
        losses = [model(windows[i : i + 1], labels=windows[i : i + 1]).loss.double() for i in range(len(windows))]
    assert math.exp(torch.stack(losses).mean().item()) == pytest.approx(reported, rel=1e-4)


# ------------------------------------------------------------------------------------------------
# Compressed export


def test_compressed_loads_bitwise_equal_to_the_export(exported, run_dir):
    from fedspallm.compressed import load_compressed

    model, _ = exported
    rebuilt = load_compressed(run_dir / "model_compressed.safetensors")
    assert type(rebuilt) is type(model)
    expected, got = model.state_dict(), rebuilt.state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(_bits(got[key]), _bits(tensor)), key


@pytest.mark.parametrize("keep", [0.5, 10])
def test_truncated_compressed_file_is_a_user_error(run_dir, tmp_path, keep):
    from fedspallm.compressed import load_compressed

    data = (run_dir / "model_compressed.safetensors").read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(UserError, match="broken.safetensors"):
        load_compressed(broken)


@pytest.mark.parametrize("written, message", [
    ("fedspallm-bitmask-v2", r"compressed format version 2, but this fedspallm reads version 1 only"),
    ("compressed-tensors", r"not a fedspallm compressed checkpoint \(format 'compressed-tensors'\)"),
])
def test_compressed_file_of_another_format_is_refused_in_one_line(run_dir, tmp_path, written, message):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from fedspallm.compressed import load_compressed

    source = run_dir / "model_compressed.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "fedspallm-bitmask-v1"
    other = tmp_path / "other.safetensors"
    save_file(load_file(source), other, metadata={**metadata, "format": written})
    with pytest.raises(UserError, match=message) as err:
        load_compressed(other)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(other))


def test_compressed_size(run_dir, results, record_property):
    """Honest sizes. The tiny model is 95% embedding (49152 x 64, tied), which is stored dense, so the
    whole file shrinks only a little; the prunable projections shrink to mask + kept values, i.e.
    1/32 + (1 - s) of their float32 size (0.33 at 70%)."""
    from safetensors import safe_open

    dense_file = (run_dir / "model" / "model.safetensors").stat().st_size
    compressed_file = (run_dir / "model_compressed.safetensors").stat().st_size
    dense_prunable = results["bytes"]["dense_prunable"]
    per_matrix = results["sparsity"]["per_matrix"]

    stored = 0
    with safe_open(str(run_dir / "model_compressed.safetensors"), framework="pt") as handle:
        shapes = json.loads(handle.metadata()["shapes"])
        for key in handle.keys():
            if "::" in key:
                tensor = handle.get_tensor(key)
                stored += tensor.numel() * tensor.element_size()
    assert {key.removesuffix(".weight") for key in shapes} == set(per_matrix)
    expected = 0
    for key, shape in shapes.items():
        numel = math.prod(shape)
        kept = round((1 - per_matrix[key.removesuffix(".weight")]) * numel)
        expected += math.ceil(numel / 8) + kept * 4
    assert stored == expected
    prunable_ratio = stored / dense_prunable
    assert prunable_ratio == pytest.approx(1 / 32 + (1 - results["sparsity"]["overall"]), rel=1e-3)
    assert prunable_ratio < 0.35

    assert compressed_file < dense_file
    whole_expected = (dense_file - dense_prunable + stored) / dense_file
    assert compressed_file / dense_file == pytest.approx(whole_expected, abs=0.01)

    # Each client uploads mask + kept values of its sampled blocks only (about 1/32 + 0.3 of them).
    block_params = dense_prunable // 4 // 4  # float32, 4 blocks
    for client, sent in enumerate(results["bytes"]["upload_per_client_per_round"][0]):
        blocks = len(results["samples"][0][client])
        assert sent == pytest.approx(blocks * block_params * (1 / 8 + (1 - SPARSITY) * 4), rel=0.02)

    sizes = {"dense_file": dense_file, "compressed_file": compressed_file, "file_ratio": compressed_file / dense_file,
             "dense_prunable": dense_prunable, "compressed_prunable": stored, "prunable_ratio": prunable_ratio}
    for key, value in sizes.items():
        record_property(key, value)
    print("tiny model sizes:", sizes)


# ------------------------------------------------------------------------------------------------
# plot


def test_plot_two_runs_at_different_sparsities(run_dir, second_run_dir, runs_root, tmp_path, capsys):
    from fedspallm.plot import plot

    assert json.loads((second_run_dir / "results.json").read_text())["pruning"]["sparsity"] == 0.5
    capsys.readouterr()
    out = tmp_path / "plots"
    written = plot([str(runs_root / "version_*")], out=str(out))  # a glob the shell did not expand
    names = sorted(Path(p).name for p in written)
    assert names == sorted(["perplexity_default.png", f"sparsity_{run_dir.name}.png",
                            f"sparsity_{second_run_dir.name}.png"])
    for path in written:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(path).stat().st_size > 1000
    assert sorted(p.name for p in out.iterdir()) == names  # no temporary files left behind
    assert capsys.readouterr().out.split() == written

    # the subcommand, with explicit directories
    out2 = tmp_path / "cli"
    assert cli_run(["plot", str(run_dir), str(second_run_dir), "--out", str(out2)]) is not None
    assert sorted(p.name for p in out2.iterdir()) == names


def test_plot_path_without_results_is_a_user_error(runs_root, run_dir, tmp_path, capsys):
    from fedspallm.plot import plot

    with pytest.raises(UserError, match="has no results.json.*version_"):
        plot([str(runs_root)], out=str(tmp_path / "p"))
    with pytest.raises(UserError, match="matches no path"):
        plot([str(tmp_path / "nothing_*")], out=str(tmp_path / "p"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "p")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: plot:") and "no results.json" in err[0]


def test_plot_standalone_and_dense_results(tmp_path):
    """Synthetic results.json files: standalone's {mean, min, max} values, a dense validate run, a pattern."""
    from fedspallm.plot import load_run, method_label, plot

    def write(name: str, payload: dict) -> str:
        path = tmp_path / name
        path.mkdir()
        (path / "results.json").write_text(json.dumps(payload))
        return str(path)

    per_matrix = {f"model.layers.{b}.mlp.up_proj": 0.5 for b in range(3)}
    standalone = [write(f"s{i}", {
        "strategy": "standalone", "pruning": {"method": "wanda", "sparsity": s, "pattern": "unstructured"},
        "perplexity": {"default": {"mean": 20.0 + i, "min": 18.0, "max": 25.0 + i, "per_client": [18.0, 25.0]}},
        "sparsity": {"target": s, "overall": s, "per_matrix": per_matrix}}) for i, s in enumerate((0.5, 0.7))]
    nm = write("nm", {"strategy": "centralized", "pruning": {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"},
                      "perplexity": {"default": 30.0, "notes.txt": float("inf")},
                      "sparsity": {"target": 0.5, "overall": 0.5, "per_matrix": per_matrix}})
    dense = write("dense", {"strategy": "dense-eval", "perplexity": {"default": 12.0},
                            "sparsity": {"target": 0.0, "overall": 0.0, "per_matrix": {}}})
    assert method_label(load_run(Path(nm)), mixed_pruners=False) == "sparsegpt 2:4"
    assert load_run(Path(dense)).dense

    written = plot([*standalone, nm, dense, standalone[0]], out=str(tmp_path / "out"))  # duplicates count once
    assert sorted(Path(p).name for p in written) == sorted([
        "perplexity_default.png", "sparsity_s0.png", "sparsity_s1.png", "sparsity_nm.png"])

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        plot([str(tmp_path / "bad")], out=str(tmp_path / "out"))
    shutil.rmtree(tmp_path / "bad")
