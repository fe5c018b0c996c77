"""Secure aggregation against the plain sum, measured in one run.

    python bench/secure_aggregation.py                 # about 3-5 minutes on the shared 2-core CPU
    python bench/secure_aggregation.py --blocks 4      # a quick look

Three measurements:

1. **Mask generation** (one process, ``--parties`` parties simulated): the AES-256-CTR keystream
   alone, then ``SecureReducer``'s masking loop (keystream + modular add, 32 Ki words at a time),
   in GB/s of mask words produced, and the whole encode + mask + decode of one block's sums per GB
   of payload.
2. **One round's reduce, secure against plain** (``--parties`` gloo processes on 127.0.0.1): the
   sums the default run reduces after a round (for every matrix of ``--blocks`` blocks of the
   embedded SmolLM2-135M: the float64 Σ M⊙W, the int32 keep counts and the contributor count),
   block by block, plain and secure in turn, so that the shared CPU's load hits both alike. Wall
   time is the slowest rank's. "handed" is what a rank gives the collective; "on the wire" is what
   it actually writes to its sockets during the collective (``wchar`` of /proc/self/io), per party.
3. With ``--default-run``: the default run (``fabric run --devices 4 ... --config configs/default.yaml``)
   without and with ``federation.secure_aggregation``, back to back (``--repeats`` pairs, alternating, so
   that a change of load hits both alike): wall time of each command, the ratio, both perplexities and
   whether the exported models are the same bytes. It takes the whole machine for several minutes.
"""

from __future__ import annotations

from common import MB, REPO, footer, launch_run, load_average, machine_line  # first: imports fedspallm before torch

import argparse
import json
import datetime
import os
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedspallm.federated.collectives import written_bytes
from fedspallm.federated.secure_aggregation import CHUNK, SecureReducer, _keystream

HIDDEN, INTERMEDIATE, KV = 576, 1536, 192  # SmolLM2-135M: q, k, v, o, gate, up, down per block
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTERMEDIATE, HIDDEN),
          (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]


class SimulatedPeers:
    """One process standing in for all parties: random peer keys at setup, its own words back as the 'sum'
    (the flag word zeroed), so that the local work of a secure sum can be timed without a collective."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def sum(self, tensors, *, kind, tag):
        ((name, table),) = tensors.items()
        table = table.clone()
        if kind == "metadata":
            for peer in range(1, self.world_size):
                key = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
                table[peer] = torch.tensor(list(key))
            table[-1] = torch.tensor(list(os.urandom(32)))
        else:
            table[-1] = 0
        return {name: table}


def block_sums(block: int, clients: int) -> dict[str, dict[str, torch.Tensor]]:
    """A party's sums for one block, shaped and typed as the round's reduce hands them.

    Stand-in plaintext drawn from no generator at all (masking time does not depend on the values);
    every mask comes from the reducer's AES-CTR keystream."""
    sums: dict[str, dict[str, torch.Tensor]] = {"weight_sum": {}, "keep_count": {}, "contributors": {}}
    for i, shape in enumerate(SHAPES):
        name = f"model.layers.{block}.{i}"
        position = torch.arange(shape[0] * shape[1], dtype=torch.int64).reshape(shape) + block * 7919 + i
        keep = (position % (clients + 1)).to(torch.int32)
        sums["weight_sum"][name] = torch.sin(position.to(torch.float64)) * 0.02 * keep
        sums["keep_count"][name] = keep
        sums["contributors"][name] = torch.tensor([clients], dtype=torch.int64)
    return sums


def mask_generation(parties: int, megabytes: int) -> None:
    words = megabytes * MB // 8
    buffer = np.empty(CHUNK * 8 + 16, dtype=np.uint8)
    zeros = memoryview(bytes(CHUNK * 8))
    stream = _keystream(os.urandom(32))
    start = time.perf_counter()
    for _ in range(0, words, CHUNK):
        stream.update_into(zeros, buffer)
    raw = words * 8 / (time.perf_counter() - start) / 1e9
    reducer = SecureReducer(SimulatedPeers(parties), 0)
    payload = torch.zeros(words, dtype=torch.int64)
    streams = reducer._streams(0, "bench", "weight_sum", "bench")
    start = time.perf_counter()
    reducer._mask(payload, streams, 61)
    masking = (parties - 1) * words * 8 / (time.perf_counter() - start) / 1e9
    sums = block_sums(0, 1)
    payload_bytes = sum(t.numel() * 8 for t in sums["weight_sum"].values()) * 3 // 2  # int64 + int32 words
    reducer.sum(sums["weight_sum"], kind="weight_sum", tag="warm-up")
    start = time.perf_counter()
    for repeat in range(3):
        for kind, tensors in sums.items():
            reducer.sum(tensors, kind=kind, tag=f"bench {repeat}")
    whole = 3 * payload_bytes / (time.perf_counter() - start) / 1e9
    print(f"\n1. mask generation, one process, {parties} parties ({parties - 1} masks per word), {megabytes} MB:")
    print(f"   AES-256-CTR keystream {raw:.2f} GB/s; masking loop (keystream + add mod 2^k) {masking:.2f} GB/s of masks")
    print(f"   a block's sums encoded, masked and decoded: {whole:.2f} GB/s of payload "
          f"({payload_bytes / MB:.1f} MB per block)")


class GlooSum:
    """The plain reducer of the measurement: one all_reduce per tensor, with its bytes and seconds."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.handed = self.wire = 0
        self.seconds = 0.0

    def sum(self, tensors, *, kind, tag):
        out = {}
        for name, tensor in tensors.items():
            summed = tensor.detach().clone()
            before, start = written_bytes(), time.perf_counter()
            dist.all_reduce(summed)
            self.seconds += time.perf_counter() - start
            self.wire += written_bytes() - before
            self.handed += summed.numel() * summed.element_size()
            out[name] = summed
        return out


def _rank(rank: int, world: int, port: int, blocks: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        plain, inner = GlooSum(world), GlooSum(world)
        secure = SecureReducer(inner, rank, seed=0)
        setup_wire = inner.wire
        seconds = {"plain": 0.0, "secure": 0.0}
        for block in range(blocks):
            sums = block_sums(block, 1)
            for name, reducer in (("plain", plain), ("secure", secure)):
                dist.barrier()
                start = time.perf_counter()
                for kind, tensors in sums.items():
                    reducer.sum(tensors, kind=kind, tag=f"block {block}")
                seconds[name] += time.perf_counter() - start
        row = torch.tensor([seconds["plain"], seconds["secure"], secure.mask_seconds, plain.handed,
                            secure.encoded_bytes, plain.wire, inner.wire - setup_wire, secure.plain_bytes],
                           dtype=torch.float64)
        rows = [torch.zeros_like(row) for _ in range(world)]
        dist.all_gather(rows, row)
        if rank == 0:
            out.put(torch.stack(rows).tolist())
    finally:
        dist.destroy_process_group()


def round_reduce(parties: int, blocks: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(parties, port, blocks, out), nprocs=parties, join=True, start_method="spawn")
    rows = np.array(out.get())
    plain_s, secure_s = rows[:, 0].max(), rows[:, 1].max()
    handed_plain, handed_secure, wire_plain, wire_secure, plain_bytes = rows[0, 3], rows[0, 4], rows[:, 5], rows[:, 6], rows[0, 7]
    ring = 2 * (parties - 1) / parties
    print(f"\n2. one round's reduce, {blocks} blocks x 7 matrices, {parties} gloo processes on 127.0.0.1 (1 thread each):")
    print(f"   wall time: plain {plain_s:.2f} s, secure {secure_s:.2f} s (x{secure_s / plain_s:.2f}; "
          f"+{secure_s - plain_s:.2f} s, of which encode/mask/decode {rows[:, 2].max():.2f} s on the slowest rank)")
    print(f"   handed to the collective per party: plain {handed_plain / MB:.2f} MB, secure {handed_secure / MB:.2f} MB "
          f"({handed_secure - plain_bytes:+.0f} B: int64 words for weight sums, int32 for counts, a flag word per call)")
    print(f"   on the wire per party (socket writes): plain {wire_plain.mean() / MB:.1f} MB, secure "
          f"{wire_secure.mean() / MB:.1f} MB (min-max over parties {wire_secure.min() / MB:.1f}-{wire_secure.max() / MB:.1f}); "
          f"wire / handed = {wire_secure.mean() / handed_secure:.3f} (a ring all-reduce writes 2(P-1)/P = {ring:.3f})")


def default_run(parties: int, repeats: int, strategy: str) -> None:
    config = REPO / "configs" / "default.yaml"
    seconds: dict[bool, list[float]] = {False: [], True: []}
    found: dict[bool, tuple[dict, str | None]] = {}
    print(f"\n3. the default run with strategy {strategy}, {parties} processes, plain then secure, {repeats} pair(s):")
    for _ in range(repeats):
        for secure in (False, True):
            results, digest, wall = launch_run(parties, config, ["--federation.strategy", strategy,
                                                          "--federation.secure_aggregation", str(secure).lower()])
            seconds[secure].append(wall)
            found[secure] = (results, digest)
            print(f"   secure_aggregation {str(secure).lower():5s}: {wall:.1f} s (recorded "
                  f"{results.get('secure_aggregation')!r}), perplexity {json.dumps(results['perplexity'])}", flush=True)
    plain, secure = min(seconds[False]), min(seconds[True])
    (plain_results, plain_digest), (secure_results, secure_digest) = found[False], found[True]
    worst = max(abs(secure_results["perplexity"][k] - v) / v for k, v in plain_results["perplexity"].items())
    print(f"   best of {repeats}: plain {plain:.1f} s, secure {secure:.1f} s: x{secure / plain:.3f} "
          f"({(secure / plain - 1) * 100:+.1f}%; the issue's budget is +15%)")
    print(f"   perplexity relative difference {worst:.2e}; model.safetensors "
          f"{'identical' if plain_digest == secure_digest else 'DIFFERENT'} (sha256 {secure_digest})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parties", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=30, help="blocks of the round (the default run: all 30)")
    parser.add_argument("--mask-mb", type=int, default=256, help="payload of the mask generation measurement")
    parser.add_argument("--default-run", action="store_true", help="also time the default run plain and secure")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of default runs (plain, secure)")
    parser.add_argument("--strategy", default="fedspallm", help="federation.strategy of the default runs")
    args = parser.parse_args()
    started, load_before = time.perf_counter(), load_average()
    torch.set_num_threads(1)
    print(f"\nsecure aggregation: {machine_line()}")
    mask_generation(args.parties, args.mask_mb)
    round_reduce(args.parties, args.blocks)
    if args.default_run:
        default_run(args.parties, args.repeats, args.strategy)
    print(f"\n{footer(started, load_before)}")


if __name__ == "__main__":
    main()
