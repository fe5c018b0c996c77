"""A memory plan for Llama-2-7B (configs/llama-2-7b.yaml), computed on a meta-device model. Nothing is allocated.

    python bench/memory_plan.py                     # the config's settings, 4 processes
    python bench/memory_plan.py --processes 8 --batch-size 2

How: the 7B model is built from its LlamaConfig on the meta device (shapes and dtypes, no data). Every
figure then comes from the code paths a run takes, walked on it:

- the model's bytes and its trunk (what offload keeps on the GPU besides one block) from the model;
- calibration of one block: the engine's own block forward with its statistics hooks
  (``calibration._collect_statistics``, then the pass that makes the pruned outputs) runs on meta
  tensors under a tracker of live tensor bytes (a torch dispatch mode), for one batch of
  ``runtime.batch_size`` windows; the Hessians are those hooks' own, grouped by input as the engine
  groups them (the grouping is read off a same-architecture twin with tiny sizes, since meta tensors
  have no identity); plus the client's hidden states (inputs and outputs of the block, all its windows);
- uploads: ``upload_bytes`` of every matrix the process's clients prune in the round (the server's
  plan, ``plan_rounds``), at the target sparsity, spooled to disk as they are made
  (``uploads.UploadStore``): in memory only one block's, read back at its reduce;
- aggregation of one block: the sums ``RoundStrategy.local_sums`` builds (float64, int32, int64), the
  reducer's buckets (``collectives.buckets``; staged on the GPU for NCCL), and the aggregate's
  workspace, measured here by running ``aggregate`` on a real 1024 x 1024 matrix, per weight;
- the global masks: packed, 1/8 byte per prunable weight (``uploads.PackedMasks``), from aggregation on;
- evaluation: the model plus one batch of logits ([batch, seqlen, vocab] in float32, as the metric reads
  them) and the live bytes of a block forward;
- export: ``save_pretrained`` writes tensor by tensor from wherever the model is; the host holds the
  model when it is evaluated there.

Peak per process = the largest stage, on the GPU and on the host, with and without offload. The
process's fixed cost (Python, torch, CUDA context ~0.5 GB) is not included.
"""

from __future__ import annotations

from common import footer, load_average  # first: imports fedspallm before torch

import argparse
import time
import weakref
from collections import defaultdict

import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from fedspallm.calibration import (
    BlockStatistics,
    PruneSpec,
    SequentialCalibration,
    SequentialStats,
    STATISTIC_KINDS,
    _collect_statistics,
)
from fedspallm.config import FederationConfig
from fedspallm.federated.aggregation import aggregate, contribute
from fedspallm.federated.collectives import DEFAULT_BUCKET_BYTES, buckets
from fedspallm.federated.rounds import clients_of_rank, plan_rounds
from fedspallm.models import find_decoder_blocks, find_prunable_layers, get_weight, in_features
from fedspallm.pruners.common import num_to_prune
from fedspallm.runtime import peak_rss_bytes, reset_peak_rss
from fedspallm.federated.aggregation import upload_bytes

GB = 1e9
LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages created under it (meta tensors included) and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = defaultdict(int)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if self._refs[key] == 0:
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        weakref.finalize(tensor, self._release, key, storage.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.live -= nbytes
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out


def model_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each tensor once (meta tensors have no addresses to tell
    tied ones apart, so identity does)."""
    unique = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in unique.values())


def llama(dtype: torch.dtype, device: str, **sizes) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device(device):
        return AutoModelForCausalLM.from_config(LlamaConfig(**{**LLAMA_2_7B, **sizes}), dtype=dtype).eval()


def readers_of_the_architecture(dtype: torch.dtype) -> dict[str, str]:
    """Which statistic each projection reads, from the engine on a tiny same-architecture twin."""
    twin = llama(torch.float32, "cpu", hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=128)
    walk = SequentialCalibration(twin, torch.zeros(1, 8, dtype=torch.long), PruneSpec(), batch_size=1)
    return walk.readers(0)


def block_calibration_bytes(model, block, batch: int, seqlen: int, kind: str, readers: dict[str, str],
                            hooks: bool = True) -> tuple[int, int]:
    """(live-bytes peak of one batch through the block with its statistic hooks and once more, statistics bytes);
    without ``hooks``, a plain forward of the block (evaluation)."""
    hidden = torch.zeros(batch, seqlen, model.config.hidden_size, dtype=next(model.parameters()).dtype, device="meta")
    positions = torch.arange(seqlen, device="meta")[None]
    with LiveBytes() as tracker:
        kwargs = {"position_embeddings": model.model.rotary_emb(hidden, positions), "attention_mask": None,
                  "position_ids": positions}
        layers = find_prunable_layers(block)
        statistics = BlockStatistics(kind)
        # The grouping the engine finds by input identity (meta tensors have none): hook only the first reader.
        owners = {name: layer for name, layer in layers.items() if readers[name] == name} if hooks else {}
        _collect_statistics(block, owners, [hidden], [kwargs], kind, statistics, SequentialStats())
        block(hidden, **kwargs)  # advance: the pruned outputs
        stats_bytes = sum(s.value.numel() * s.value.element_size() for s in statistics.values.values())
    return tracker.peak, stats_bytes


def aggregate_workspace_per_weight() -> float:
    """Host bytes per weight the aggregate of one matrix takes beyond its sums, measured on a real matrix."""
    side = 1024
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(side, side, generator=generator)
    c = contribute(contribute(None, weight, torch.rand(side, side, generator=generator) > 0.7), weight,
                   torch.rand(side, side, generator=generator) > 0.7)
    reset_peak_rss()
    before = peak_rss_bytes()
    aggregate(c, "l0", True, 0.7)
    return max(peak_rss_bytes() - before, 0) / (side * side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/llama-2-7b.yaml")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=None, help="calibration batch (default: the config's)")
    args = parser.parse_args()
    started, load_before = time.perf_counter(), load_average()
    cfg = yaml.safe_load(open(args.config))
    dtype = getattr(torch, cfg["model"]["dtype"])
    seqlen, nsamples = cfg["data"]["seqlen"], cfg["data"]["nsamples"]
    batch = args.batch_size or cfg["runtime"]["batch_size"]
    sparsity = cfg["pruning"]["sparsity"]
    federation = FederationConfig(**{k: v for k, v in cfg["federation"].items()
                                     if k in FederationConfig.__dataclass_fields__})
    model = llama(dtype, "meta")
    blocks = find_decoder_blocks(model)
    total = model_bytes(model)
    block_bytes = max(model_bytes(b) for b in blocks)
    trunk = total - sum(model_bytes(b) for b in blocks)
    kind = STATISTIC_KINDS[cfg["pruning"]["method"]]
    readers = readers_of_the_architecture(dtype)
    forward_peak, stats_bytes = block_calibration_bytes(model, blocks[0], batch, seqlen, kind, readers)
    clients = clients_of_rank(federation.num_clients, args.processes, 0)
    windows = nsamples // federation.num_clients * len(clients)
    hidden = windows * seqlen * model.config.hidden_size * dtype.itemsize * 2  # inputs and outputs of a block
    calibration = forward_peak + stats_bytes + hidden + block_bytes  # + the block's dense weights kept to restore

    plan = plan_rounds(federation, len(blocks), 0)
    layers0 = {name: get_weight(layer) for name, layer in find_prunable_layers(blocks[0]).items()}
    per_block_upload = 0
    for weight in layers0.values():
        mask = torch.zeros(weight.numel(), dtype=torch.bool)
        mask[: weight.numel() - num_to_prune(weight.numel(), sparsity)] = True
        per_block_upload += upload_bytes(mask, dtype)
    spooled = max(len(plan.samples[t][c]) for t in range(federation.rounds) for c in clients) * per_block_upload * len(clients)
    read_back = per_block_upload * len(clients)  # the one block's uploads read back from the spool at its reduce

    sums = {f"{kind}:{name}": torch.empty(weight.shape, dtype=d, device="meta") for name, weight in layers0.items()
            for kind, d in (("weight_sum", torch.float64), ("keep_count", torch.int32))}
    block_sums = sum(t.numel() * t.element_size() for t in sums.values())
    largest_bucket = max(sum(sums[n].numel() * sums[n].element_size() for n in group)
                         for group in buckets(sums, DEFAULT_BUCKET_BYTES))
    largest = max(w.numel() for w in layers0.values())
    workspace = aggregate_workspace_per_weight() * largest
    aggregation_host = block_sums * 2 + workspace  # this process's sums and the reduced sums, one block at a time
    pooled_kept = 12 * sum(w.numel() for w in layers0.values()) * len(blocks) if federation.rounds > 1 else 0

    batch_eval = cfg["eval"]["batch_size"]
    logits = batch_eval * cfg["eval"]["seqlen"] * model.config.vocab_size * 4 * 2  # logits and the metric's copy
    eval_forward, _ = block_calibration_bytes(model, blocks[0], batch_eval, cfg["eval"]["seqlen"], kind, readers,
                                              hooks=False)
    evaluation = total + logits + eval_forward

    masks = sum((w.numel() + 7) // 8 for w in layers0.values()) * len(blocks)  # global masks, packed (PackedMasks)
    rows = []
    for offload in (False, True):
        gpu = {
            "load": 0 if offload else total,
            "calibration (per block)": (trunk + block_bytes if offload else total) + calibration,
            "aggregation (per block)": (0 if offload else total) + largest_bucket,
            "evaluation": evaluation,
            "export": total,
        }
        host = {
            "load": total,
            "calibration (per block)": (total if offload else 0),
            "aggregation (per block)": (total if offload else 0) + read_back + aggregation_host + pooled_kept + masks,
            "evaluation": masks + pooled_kept,
            "export": masks + block_bytes,
        }
        rows.append((offload, gpu, host))
    print(f"Llama-2-7B in {cfg['model']['dtype']} on the meta device: model {total / GB:.2f} GB "
          f"(trunk {trunk / GB:.2f} GB, one block {block_bytes / GB:.3f} GB); {args.processes} processes, "
          f"{federation.num_clients} clients, {len(clients)} per process, {windows} windows x {seqlen} per process, "
          f"calibration batch {batch}, eval batch {batch_eval} x {cfg['eval']['seqlen']}")
    print(f"per block: forward + hooks {forward_peak / GB:.2f} GB live peak, statistics {stats_bytes / GB:.2f} GB, "
          f"hidden states {hidden / GB:.2f} GB; uploads {spooled / GB:.2f} GB on disk, one block's "
          f"{read_back / GB:.2f} GB read back; one block's sums "
          f"{block_sums / GB:.2f} GB, largest bucket {largest_bucket / GB:.3f} GB, aggregate workspace "
          f"{workspace / GB:.2f} GB")
    for offload, gpu, host in rows:
        print(f"\npruning.offload {str(offload).lower()}:  {'stage':<26} {'GPU GB':>8} {'host GB':>8}")
        for stage in gpu:
            print(f"{'':24}{stage:<26} {gpu[stage] / GB:8.2f} {host[stage] / GB:8.2f}")
        print(f"{'':24}{'peak per process':<26} {max(gpu.values()) / GB:8.2f} {max(host.values()) / GB:8.2f}")
    print(footer(started, load_before))


if __name__ == "__main__":
    main()
