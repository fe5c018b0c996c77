"""Layer-wise reconstruction error of the aggregation rules, on the embedded default model.

    python experiments/layer_error.py        # a few minutes; writes experiments/results/layers.md and .json

End-to-end perplexity mixes two effects: how well the server's aggregate of the clients' pruned
matrices reconstructs a layer, and how errors propagate through 30 sequentially pruned blocks. This
isolates the first. For a few blocks of the *dense* model, it captures the inputs X of four
projections (q, o, gate, down) for every client's calibration windows (the main experiment's
setting: 32 windows x 128 tokens, 4 IID clients, seed 0) and for held-out windows of the embedded
test split. Every client prunes each matrix alone with SparseGPT at 70% on its own Hessian, and the
error of a pruned matrix W' is the held-out relative output error

    ||(W - W') X_test||^2 / ||W X_test||^2 = tr(D H_test D^T) / tr(W H_test W^T),  D = W - W'.

Rows: centralized SparseGPT on the pooled Hessian; the standalone clients' mean; FedSpaLLM's l0
average + expansion; plain averaging (fedavg) + expansion; and the refit that ``freeze_mask_after``
adds (every client re-runs SparseGPT's update under the FedSpaLLM mask; the values are averaged).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from fedspallm.config import ModelConfig
from fedspallm.data import eval_windows, plan_calibration
from fedspallm.federated.aggregation import aggregate, contribute
from fedspallm.models import find_decoder_blocks, get_weight, load_model
from fedspallm.pruners import accumulate_hessian, sparsegpt_prune

ROOT = Path(__file__).resolve().parent
BLOCKS = (5, 15, 25)
PROJECTIONS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
CLIENTS, SPARSITY, SEED = 4, 0.7, 0


@torch.no_grad()
def hessians(model, windows: torch.Tensor, layers: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """H = (2/n) sum X X^T of every layer's input over ``windows`` (dense model, batches of 8)."""
    state: dict[str, tuple[torch.Tensor | None, int]] = {name: (None, 0) for name in layers}

    def hook(name):
        def record(module, args, output):
            state[name] = accumulate_hessian(*state[name], args[0])
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        for start in range(0, windows.shape[0], 8):
            model(input_ids=windows[start:start + 8], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: value for name, (value, _) in state.items()}


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, h_test: torch.Tensor) -> float:
    d = (weight - pruned).double()
    h = h_test.double()
    return float(torch.trace(d @ h @ d.T) / torch.trace(weight.double() @ h @ weight.double().T))


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    loaded = load_model(ModelConfig())
    model, tokenizer = loaded.model, loaded.tokenizer
    plan = plan_calibration("default", tokenizer, 32, 128, CLIENTS, "iid", 0.5, SEED)
    client_windows = plan.materialize(range(CLIENTS))
    test = eval_windows("default", tokenizer, 256, 16)
    blocks = find_decoder_blocks(model)
    layers = {f"{b}.{p}": blocks[b].get_submodule(p) for b in BLOCKS for p in PROJECTIONS}
    h_test = hessians(model, test, layers)
    h_client = [hessians(model, client_windows[c], layers) for c in range(CLIENTS)]

    rows = []
    for name, layer in layers.items():
        weight = get_weight(layer).detach().float()
        pooled = sum(h[name] for h in h_client) / CLIENTS  # every client holds the same number of windows
        solo = [sparsegpt_prune(weight, h[name], SPARSITY) for h in h_client]
        sums = None
        for result in solo:
            sums = contribute(sums, result.weight, result.mask)
        l0 = aggregate(sums, "l0", True, SPARSITY)
        plain = aggregate(sums, "fedavg", True, SPARSITY)
        refit = sum(sparsegpt_prune(weight, h[name], SPARSITY, keep=l0.mask).weight for h in h_client) / CLIENTS
        errors = {
            "centralized": relative_error(weight, sparsegpt_prune(weight, pooled, SPARSITY).weight, h_test[name]),
            "standalone mean": sum(relative_error(weight, r.weight, h_test[name]) for r in solo) / CLIENTS,
            "fedspallm (l0 + expansion)": relative_error(weight, l0.weight.float(), h_test[name]),
            "fedavg + expansion": relative_error(weight, plain.weight.float(), h_test[name]),
            "l0 mask + refit (ours)": relative_error(weight, refit, h_test[name]),
        }
        unanimous = sum(r.mask.int() for r in solo)
        agree = float(((unanimous == 0) | (unanimous == CLIENTS)).float().mean())
        rows.append({"matrix": name, "clients_agree": agree, **errors})
        print(name, {k: round(v, 4) for k, v in errors.items()}, f"agree {agree:.3f}", flush=True)

    columns = list(rows[0])[2:]
    lines = [f"Held-out relative output error of one pruned matrix, SmolLM2-135M dense inputs, SparseGPT at "
             f"{SPARSITY:.0%}, {CLIENTS} IID clients x 8 windows x 128 tokens (seed {SEED}); test inputs from 16 "
             "windows x 256 tokens of the embedded test split. 'agree': fraction of positions where all clients "
             "made the same keep/prune choice. Lower is better.", "",
             "| matrix | agree | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in rows:
        lines.append(f"| {row['matrix']} | {row['clients_agree']:.3f} | "
                     + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    means = {c: sum(r[c] for r in rows) / len(rows) for c in columns}
    lines.append("| **mean** | | " + " | ".join(f"**{means[c]:.4f}**" for c in columns) + " |")
    out = ROOT / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "layers.json").write_text(json.dumps({"rows": rows, "mean": means}, indent=2))
    (out / "layers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
