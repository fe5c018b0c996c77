"""The strategy registry and interface: a strategy defined in this one file runs through the CLI.

``toy`` is a block-by-block strategy (the shape fedstats has): each step is one block; every client
keeps state across steps; the step's sum is the clients' window counts; the aggregate prunes the
block by magnitude. Its model must therefore equal the centralized magnitude-pruned model bit for bit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedspallm.cli import main as cli_main
from fedspallm.cli import run as cli_run
from fedspallm.config import FederationConfig
from fedspallm.errors import UserError
from fedspallm.federated.strategies import STRATEGIES, RunContext, Step, Strategy, register
from fedspallm.models import find_decoder_blocks, get_weight, prunable_modules, set_weight
from fedspallm.pruners import magnitude_prune

REPO = Path(__file__).resolve().parents[1]


@register
class Toy(Strategy):
    name = "toy"
    help = "test only: the server magnitude-prunes block by block while clients count their windows"

    def __init__(self, ctx: RunContext, plan=None) -> None:
        super().__init__(ctx, plan)
        self.windows = ctx.calibration.materialize(self.clients())
        self.passes = {client: 0 for client in self.clients()}  # client state that lives across steps
        self.windows_per_step: list[int] = []

    def steps(self) -> list[Step]:
        return [Step(b, f"block {b}") for b in range(len(find_decoder_blocks(self.ctx.model)))]

    def client_update(self, step: Step, client: int, on_block) -> int:
        self.passes[client] += len(self.windows[client])
        return 8

    def local_sums(self, step: Step) -> dict[str, dict[str, torch.Tensor]]:
        mine = sum(len(self.windows[c]) for c in self.clients())
        return {"metadata": {"windows": torch.tensor([mine], dtype=torch.int64)}}

    def aggregate(self, step: Step, sums) -> None:
        self.windows_per_step.append(int(sums["metadata"]["windows"].item()))
        spec = self.ctx.spec
        for layer in prunable_modules(self.ctx.model, [step.index]).values():
            set_weight(layer, magnitude_prune(get_weight(layer), spec.sparsity, spec.n, spec.m).weight)

    def summary(self):
        return {"toy": {"windows_per_step": self.windows_per_step, "passes": self.passes}}


def _args(model_dir: str, root: Path, *more: str) -> list[str]:
    return ["prune", "--model.name_or_path", model_dir, "--data.nsamples", "8", "--data.seqlen", "64",
            "--eval.seqlen", "64", "--eval.max_windows", "4", "--federation.num_clients", "4",
            "--pruning.sparsity", "0.5", "--output.dir", str(root), "--runtime.progress", "false",
            "--output.save_compressed", "false", *more]


def test_a_strategy_in_one_file_runs_through_the_cli(tiny_model_dir, tmp_path):
    toy = cli_run(_args(tiny_model_dir, tmp_path / "toy", "--federation.strategy", "toy"))
    assert toy["strategy"] == "toy"
    assert toy["toy"]["windows_per_step"] == [8, 8, 8, 8]  # every client's windows, summed, at each of 4 blocks
    assert toy["toy"]["passes"] == {0: 8, 1: 8, 2: 8, 3: 8}  # 2 windows per client, 4 steps
    assert toy["bytes"]["upload_per_client_per_round"] == []  # not round-based
    assert toy["sparsity"]["overall"] == 0.5
    written = json.loads((Path(toy["model_dir"]).parent / "results.json").read_text())
    assert written["toy"]["windows_per_step"] == [8, 8, 8, 8]

    central = cli_run(_args(tiny_model_dir, tmp_path / "central", "--federation.strategy", "centralized",
                            "--pruning.method", "magnitude"))
    mine = load_file(str(Path(toy["model_dir"]) / "model.safetensors"))
    theirs = load_file(str(Path(central["model_dir"]) / "model.safetensors"))
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


def test_help_and_errors_list_the_registered_names(capsys):
    with pytest.raises(SystemExit):
        cli_main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in STRATEGIES:
        assert f"{name}: " in text, name
    assert "toy: test only" in text
    with pytest.raises(UserError, match=r"^federation\.strategy='nope': unknown strategy; registered: "
                                        r"fedspallm, centralized, standalone, fedavg, mask_vote, fedstats, toy$"):
        FederationConfig(strategy="nope")


def test_the_registry_refuses_a_second_strategy_of_the_same_name():
    with pytest.raises(ValueError, match="'toy' is registered already"):
        register(type("OtherToy", (Toy,), {"name": "toy", "help": "x"}))
    with pytest.raises(TypeError, match="one-line class attribute help"):
        register(type("Nameless", (Toy,), {"name": "nameless"}))


def test_the_readme_lists_the_registered_strategies():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("Strategies (`federation.strategy`)"):].split("\n\n")[1]
    listed = re.findall(r"^- `(\w+)`: ", section, flags=re.M)
    builtin = [name for name, cls in STRATEGIES.items() if cls.__module__.startswith("fedspallm.")]
    assert listed == builtin
