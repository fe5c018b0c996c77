"""Sparse fine-tuning: masks kept bit for bit, subsets frozen, export, FedAvg (pure and over 2 processes)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_tiny_model

from fedspallm.errors import UserError
from fedspallm.federated.aggregation import WeightedSum, weighted_average
from fedspallm.finetune import compare_zero_sets, fedavg, zero_sets
from fedspallm.lit import CausalLMModule, evaluate_perplexity, lr_factor, trainable_names
from fedspallm.models import prunable_modules

REPO = Path(__file__).resolve().parents[1]
MAIN = str(REPO / "fedspallm" / "main.py")
FABRIC = str(Path(sys.executable).with_name("fabric"))


@torch.no_grad()
def prune_half(model: torch.nn.Module) -> torch.nn.Module:
    """Magnitude-prune every prunable matrix to 50%: the masks the fine-tuning must keep."""
    for layer in prunable_modules(model).values():
        w = layer.weight
        w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
    return model


def pattern_windows(n: int = 16, seqlen: int = 24, period: int = 7, vocab: int = 128) -> torch.Tensor:
    """Highly repetitive token windows: a periodic sequence a model can learn in a few steps."""
    base = torch.arange(n * seqlen) % period * 5 % vocab
    return base.reshape(n, seqlen).long()


def trainer(max_steps: int, precision: str = "32-true", **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, precision=precision, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, **kwargs)


def loader(windows: torch.Tensor, batch_size: int = 4) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(windows, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# The module, under the Trainer


@pytest.mark.parametrize("optimizer,precision", [("adamw", "32-true"), ("sgd", "bf16-mixed"), ("adamw", "bf16-true")])
def test_zero_set_is_bitwise_identical_after_training(optimizer, precision):
    model = prune_half(make_tiny_model("llama"))
    before = zero_sets(model)
    start = state(model)
    module = CausalLMModule(model, optimizer=optimizer, lr=5e-2, weight_decay=0.1, momentum=0.9)
    trainer(8, precision, gradient_clip_val=1.0, accumulate_grad_batches=2).fit(module, loader(pattern_windows()))
    after = zero_sets(model)
    report = compare_zero_sets(before, after)
    assert report["identical"], report
    assert all((before[k] == after[k]).all() for k in before)
    moved = [name for name, p in model.named_parameters() if not torch.equal(p.detach().to(start[name].dtype), start[name])]
    assert any(".mlp." in name for name in moved)  # the kept weights did train
    assert len(module.masks) == len(prunable_modules(model))


def test_without_masks_the_zeros_move():
    """The control: the same training with keep_masks=False fills pruned positions in."""
    model = prune_half(make_tiny_model("llama"))
    before = zero_sets(model)
    module = CausalLMModule(model, optimizer="adamw", lr=5e-2, keep_masks=False)
    trainer(4).fit(module, loader(pattern_windows()))
    assert compare_zero_sets(before, zero_sets(model))["pruned_now_nonzero"] > 0


def test_gradients_are_masked_before_the_step():
    model = prune_half(make_tiny_model("opt"))
    module = CausalLMModule(model)
    module.prepare_training()
    module.training_step(pattern_windows(2), 0).backward()
    module.on_after_backward()
    for name, zero in module.masks.items():
        grad = dict(model.named_modules())[name].weight.grad
        assert grad[zero].abs().max() == 0 and grad[~zero].abs().max() > 0


def test_loss_and_perplexity_decrease_on_repetitive_text():
    model = prune_half(make_tiny_model("llama"))
    windows, val = pattern_windows(16), pattern_windows(4, seqlen=32)
    module = CausalLMModule(model, lr=1e-2, schedule="cosine", warmup_steps=2, total_steps=30)
    before = evaluate_perplexity(None, module, val, progress=False)
    first = module.training_step(windows[:4], 0).item()
    trainer(30).fit(module, loader(windows))
    last = module.training_step(windows[:4], 0).item()
    after = evaluate_perplexity(None, module, val, progress=False)
    assert last < first * 0.5
    assert after < before / 10


@pytest.mark.parametrize("spec", ["last_n_blocks:1", "norms_and_biases"])
def test_trainable_subset_leaves_everything_else_bitwise_unchanged(spec):
    model = prune_half(make_tiny_model("llama"))
    start = state(model)
    module = CausalLMModule(model, lr=1e-2, trainable=spec)
    trainer(5).fit(module, loader(pattern_windows()))
    chosen = set(trainable_names(model, spec))
    assert chosen and len(chosen) < len(start)
    if spec == "last_n_blocks:1":
        assert all(name.startswith("model.layers.2.") for name in chosen)
    else:
        assert all(start[name].dim() == 1 for name in chosen)
    for name, p in model.named_parameters():
        assert p.requires_grad == (name in chosen)
        if name not in chosen:
            assert torch.equal(p.detach(), start[name]), name
    assert any(not torch.equal(dict(model.named_parameters())[n].detach(), start[n]) for n in chosen)
    optimizer = trainer_optimizer(module)
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == \
        {id(p) for n, p in model.named_parameters() if n in chosen}  # no optimizer state for frozen ones


def trainer_optimizer(module: CausalLMModule) -> torch.optim.Optimizer:
    return module.configure_optimizers()["optimizer"]


def test_lr_schedules_by_hand():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 10, 2, "linear") for s in (2, 6, 9)] == [1.0, 0.5, pytest.approx(1 / 8)]
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 10, 0, "cosine") == pytest.approx(0.0)
    with pytest.raises(UserError, match="last_n_blocks"):
        CausalLMModule(make_tiny_model("llama"), trainable="last_n_blocks:0")


# ---------------------------------------------------------------------------------------------
# FedAvg


def test_weighted_fedavg_is_exact_on_a_hand_example():
    states = [{"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])},
              {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}]
    out = fedavg(states, [1, 3])  # (1*s0 + 3*s1) / 4
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(out["b"], torch.tensor([3.0]))
    assert out["w"].dtype == torch.float32
    bf16 = fedavg([{"x": torch.tensor([1.0], dtype=torch.bfloat16)}, {"x": torch.tensor([2.0], dtype=torch.bfloat16)}],
                  [1, 1])
    assert bf16["x"].dtype == torch.bfloat16 and bf16["x"].item() == 1.5


def test_collective_form_equals_the_pure_function():
    """Two 'processes' each sum their clients; summing the partial sums (what the reducer does) gives fedavg."""
    generator = torch.Generator().manual_seed(0)
    clients = [{"w": torch.randn(5, 3, generator=generator), "b": torch.randn(4, generator=generator)}
               for _ in range(3)]
    sizes = [7, 2, 5]
    rank0, rank1 = WeightedSum(), WeightedSum()
    rank0.add(clients[0], sizes[0])
    for c in (1, 2):
        rank1.add(clients[c], sizes[c])
    mine, theirs = rank0.tensors(), rank1.tensors()
    got = weighted_average({name: mine[name] + theirs[name] for name in mine}, clients[0])
    expected = fedavg(clients, sizes)
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name])


# ---------------------------------------------------------------------------------------------
# The recipe: `fedspallm fit`, in process and over two processes


REPEATED = "\n\n".join(["The quick brown fox jumps over the lazy dog, and the dog sleeps in the sun."] * 60)


@pytest.fixture(scope="module")
def pruned_dir(tiny_model_dir, tmp_path_factory) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = prune_half(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    path = tmp_path_factory.mktemp("tiny-pruned")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "train.txt").write_text(REPEATED, encoding="utf-8")
    (folder / "val.txt").write_text(REPEATED, encoding="utf-8")
    return str(folder / "train.txt"), str(folder / "val.txt")


def fit_args(model_dir: str, corpus: tuple[str, str], out: Path, *extra: str) -> list[str]:
    return ["fit", "--model.name_or_path", model_dir, "--fit.dataset", corpus[0], "--eval.datasets", f"[{corpus[1]}]",
            "--fit.seqlen", "32", "--fit.batch_size", "4", "--fit.lr", "3e-3", "--eval.seqlen", "32",
            "--eval.max_windows", "4", "--output.dir", str(out), "--output.save_compressed", "false",
            "--runtime.progress", "false", "--runtime.threads", "1", *extra]


def test_fit_command_improves_exports_and_keeps_zeros(pruned_dir, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from fedspallm.cli import main

    main(fit_args(pruned_dir, corpus, tmp_path, "--fit.max_steps", "12", "--fit.val_every", "5",
                  "--fit.trainable", "last_n_blocks:2"))
    (run,) = tmp_path.glob("version_*")
    saved = json.loads((run / "results.json").read_text())
    assert saved["masks_preserved"] is True and saved["steps"] == 12
    assert [row[0] for row in saved["val"]["history"]] == [0, 5, 10, 12]  # validated at the end too
    val = corpus[1]
    assert saved["perplexity"][val] < 0.8 * saved["perplexity_before"][val]
    assert saved["sparsity"]["overall"] == saved["sparsity_before"]["overall"] == pytest.approx(0.5, abs=1e-3)
    assert (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents.*"))
    assert "Sparse fine-tuned" in (run / "model" / "README.md").read_text()

    exported = AutoModelForCausalLM.from_pretrained(run / "model")
    original = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert compare_zero_sets(zero_sets(original), zero_sets(exported))["identical"]
    assert saved["val"]["best_step"] == min(saved["val"]["history"], key=lambda r: r[1])[0]


def test_fit_rejects_bad_settings(pruned_dir, corpus, tmp_path, capsys):
    from fedspallm.cli import main

    cases = [(["--fit.trainable", "last_n_blocks:x"], "fit.trainable"),
             (["--eval.datasets", f"[{corpus[0]}]"], "is the training file"),
             (["--runtime.devices", "2"], "set fit.federated=true"),
             (["--fit.federated", "true", "--fit.num_clients", "1", "--runtime.devices", "2"], "fit.num_clients=1")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(fit_args(pruned_dir, corpus, tmp_path, *extra))
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("version_*"))  # nothing loaded, nothing written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str]) -> None:
    port = str(_free_port())
    if command[:2] == [FABRIC, "run"] and "--main-port" not in command:  # not fabric's fixed 29400: runs in parallel
        command = [*command[:2], "--main-port", port, *command[2:]]
    env = {**os.environ, "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_federated_fit_over_two_processes(pruned_dir, corpus, tmp_path):
    """`fabric run --devices 2`: one client per process; the same 2 clients in one process give the same model."""
    fed = ["--fit.federated", "true", "--fit.num_clients", "2", "--fit.rounds", "2", "--fit.local_steps", "3",
           "--fit.seqlen", "32"]
    two, one = tmp_path / "two", tmp_path / "one"
    _run([FABRIC, "run", "--accelerator", "cpu", "--devices", "2", MAIN, *fit_args(pruned_dir, corpus, two, *fed)])
    from fedspallm.cli import main

    main(fit_args(pruned_dir, corpus, one, *fed))  # both clients in this process
    (run,) = two.glob("version_*")
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 6
    assert results["masks_preserved"] is True
    digests = results["weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # every rank holds the same weights, bit for bit
    assert [row[0] for row in results["val"]["history"]] == [0, 3, 6]
    assert results["val"]["best_ppl"] < results["val"]["ppl_before"]
    sizes = results["federated"]["client_windows"]  # the FedAvg weights: an even split of the windows
    assert sum(sizes) == results["train_windows"] and max(sizes) - min(sizes) <= 1
    (single,) = one.glob("version_*")
    alone = json.loads((single / "results.json").read_text())
    assert alone["world_size"] == 1 and alone["weights_sha256_per_rank"] == digests[:1]

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(run / "model")
    original = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert compare_zero_sets(zero_sets(original), zero_sets(exported))["identical"]
    sha = hashlib.sha256((run / "model" / "model.safetensors").read_bytes()).hexdigest()
    assert sha == hashlib.sha256((single / "model" / "model.safetensors").read_bytes()).hexdigest()
