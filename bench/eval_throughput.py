"""Perplexity-evaluation throughput of the embedded default model, against this CPU's matmul peak.

Everything is measured in one run, so the printed ratios compare like with like on a shared machine:

(a) matmul peak, GFLOP/s: the best of several n x n products (2 n^3 FLOPs each), in float32 and
    bfloat16. Two layouts are timed: ``A @ B.T`` (what ``nn.Linear`` computes) and ``A @ B``.
(b) evaluation throughput, tokens/s: ``evaluate_perplexity`` on ``--windows`` x ``--seqlen`` tokens
    of the default corpus's test split (``fedspallm.data.eval_windows``), batch ``--batch-size``.
(c) achieved GFLOP/s = FLOPs per token x tokens/s, with the forward FLOPs per token estimated as

        2 * N  +  2 * d * V  +  4 * L * T * d

    N = non-embedding parameters (every weight except the token embedding and the lm_head; norms
    included), d = hidden size, V = vocabulary, L = decoder blocks, T = seqlen. The first term is the
    projections, the second the lm_head, the third attention (Q K^T and A V, 2 T d FLOPs each per
    token per block). The attention term counts the full T x T score matrix; a causal kernel could
    skip half of it, so this is an upper estimate of the useful work.

The ratio achieved / peak is printed per dtype. bfloat16 runs as ``eval.dtype: bfloat16`` does: the
float32 model's parameters cast for the evaluation (``CausalLMModule(eval_dtype=...)``), on
``--bf16-windows`` windows (the same as float32 unless given: CPUs without native bf16 units are
much slower in it).

(d) where the time of one batch goes, per dtype (torch.profiler, self CPU time by operator):
    matmul (projections and lm_head), attention (the SDPA kernel), the loss (the perplexity
    metric's float32 softmax, log and gather), and the elementwise rest (norms, rotary embedding,
    SiLU, residual adds, every dtype conversion including the float32 copy of the logits).
"""

from __future__ import annotations

from common import footer, load_average, machine_line, matmul_peaks, print_peaks  # first: imports fedspallm before torch

import argparse
import time

import lightning as L
import torch

from torch.profiler import profile

from fedspallm.config import ModelConfig
from fedspallm.data import eval_windows
from fedspallm.dtypes import parameters_in
from fedspallm.lit import CausalLMModule, evaluate_perplexity, new_perplexity_metric
from fedspallm.models import find_decoder_blocks, load_model


def flops_per_token(model: torch.nn.Module, seqlen: int) -> tuple[float, dict[str, float]]:
    config = model.config.get_text_config()
    d, vocab = config.hidden_size, config.vocab_size
    layers = len(find_decoder_blocks(model))
    embedding_weights = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    non_embedding = sum(p.numel() for p in model.parameters() if id(p) not in embedding_weights)
    terms = {
        "projections 2N": 2.0 * non_embedding,
        "lm_head 2dV": 2.0 * d * vocab,
        "attention 4LTd": 4.0 * layers * seqlen * d,
    }
    return sum(terms.values()), terms | {"N": float(non_embedding)}


def timed_eval(fabric: L.Fabric, module: CausalLMModule, windows: torch.Tensor, batch_size: int) -> tuple[float, float]:
    with torch.inference_mode(), parameters_in(module.model, getattr(torch, module.evaluation_dtype)):
        module.model(input_ids=windows[:1, :64], use_cache=False)  # warm-up: first-call allocations, kernels
    start = time.perf_counter()
    ppl = evaluate_perplexity(fabric, module, windows, batch_size=batch_size, progress=False)
    return ppl, time.perf_counter() - start


CATEGORIES = {  # operator -> category of (d); anything else is "elementwise"
    "aten::mm": "matmul", "aten::addmm": "matmul", "aten::bmm": "matmul",
    "aten::_softmax": "loss", "aten::log": "loss", "aten::index": "loss",
}


def time_shares(module: CausalLMModule, batch: torch.Tensor) -> dict[str, float]:
    """Seconds of self CPU time per category for one ``update_perplexity`` on ``batch``."""
    metric = new_perplexity_metric(sync=False)
    with torch.inference_mode(), parameters_in(module.model, getattr(torch, module.evaluation_dtype)):
        with profile() as prof:
            module.update_perplexity(metric, batch)
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key
        category = "attention" if "attention" in name else CATEGORIES.get(name, "elementwise")
        shares[category] = shares.get(category, 0.0) + event.self_cpu_time_total / 1e6
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--bf16-windows", type=int, default=None,
                        help="windows evaluated in bfloat16 (default: --windows; 0 skips it)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    t0 = time.perf_counter()
    load_before = load_average()

    # (a) peaks
    peaks = matmul_peaks(args.matmul_n, args.repeats)

    # (b) evaluation throughput, (c) achieved GFLOP/s
    fabric = L.Fabric(accelerator="cpu", devices=1)
    start = time.perf_counter()
    loaded = load_model(ModelConfig(dtype="float32"))
    load_s = time.perf_counter() - start
    model = loaded.model
    windows = eval_windows("default", loaded.tokenizer, args.seqlen, args.windows)
    per_token, terms = flops_per_token(model, args.seqlen)

    runs = []
    bf16_windows = args.windows if args.bf16_windows is None else args.bf16_windows
    ppl, seconds = timed_eval(fabric, CausalLMModule(model), windows, args.batch_size)
    runs.append(("float32", windows.shape[0], ppl, seconds))
    if bf16_windows > 0:
        sub = windows[:bf16_windows]
        ppl32_sub = ppl if bf16_windows == windows.shape[0] else evaluate_perplexity(
            fabric, CausalLMModule(model), sub, args.batch_size, progress=False)
        ppl16, seconds16 = timed_eval(fabric, CausalLMModule(model, eval_dtype="bfloat16"), sub, args.batch_size)
        runs.append(("bfloat16", sub.shape[0], ppl16, seconds16))
    shares = {name: time_shares(CausalLMModule(model, eval_dtype=name), windows[: args.batch_size])
              for name, *_ in runs}

    print(f"\nfedspallm eval throughput: {loaded.source}")
    print(f"  {machine_line()}; model loaded in {load_s:.1f} s")
    print(f"  windows: eval_windows(\"default\") (test split), {windows.shape[0]} x {args.seqlen} tokens, batch {args.batch_size}")
    print(f"  FLOPs/token = 2N + 2dV + 4LTd = {terms['projections 2N'] / 1e6:.1f}M + {terms['lm_head 2dV'] / 1e6:.1f}M"
          f" + {terms['attention 4LTd'] / 1e6:.1f}M = {per_token / 1e6:.1f} MFLOP  (N = {terms['N'] / 1e6:.2f}M)")
    print()
    print_peaks(peaks)
    print()
    print(f"  {'eval':<10}{'windows':>8}{'seconds':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'peak':>8}{'achieved/peak':>15}{'ppl':>10}")
    for name, count, value, seconds in runs:
        tokens = count * args.seqlen
        achieved = per_token * tokens / seconds / 1e9
        peak = max(gflops for _, gflops in peaks[name].values())
        print(f"  {name:<10}{count:>8}{seconds:>9.2f}{tokens / seconds:>10.1f}{achieved:>9.2f}{peak:>8.2f}"
              f"{achieved / peak:>15.2f}{value:>10.3f}")
    if bf16_windows > 0:
        print(f"  bf16 vs fp32 perplexity on the same {runs[1][1]} window(s): {runs[1][2]:.3f} vs {ppl32_sub:.3f}")
    print()
    print(f"  where one batch of {args.batch_size} x {args.seqlen} goes (self CPU time, torch.profiler):")
    names = ("matmul", "attention", "loss", "elementwise")
    print(f"    {'dtype':<10}" + "".join(f"{n:>13}" for n in names))
    for name, row in shares.items():
        total = sum(row.values())
        print(f"    {name:<10}" + "".join(f"{row.get(n, 0.0) / total:>13.1%}" for n in names))
    print("  (tokens/s counts input tokens; each window predicts seqlen - 1 of them)")
    print(f"  {footer(t0, load_before)}")


if __name__ == "__main__":
    main()
