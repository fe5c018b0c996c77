"""PlainReducer: per-tensor sums over two real gloo processes, one all_reduce per same-dtype bucket."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fedspallm.federated.collectives import PlainReducer, buckets


def _tensors(rank: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    return {
        "a.weight_sum": torch.randn(3, 5, generator=generator, dtype=torch.float64),
        "a.keep": torch.randint(0, 4, (3, 5), generator=generator, dtype=torch.int32),
        "b.weight_sum": torch.randn(7, generator=generator, dtype=torch.float64),
        "b.keep": torch.randint(0, 4, (2, 2), generator=generator, dtype=torch.int32),
        "count": torch.tensor([rank + 1], dtype=torch.int64),
    }


def _worker(rank: int, port: int, bucket_bytes: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        reducer = PlainReducer(bucket_bytes=bucket_bytes)
        mine = _tensors(rank)
        sums = reducer.sum(mine, kind="weight_sum", tag="round 1")
        queue.put((rank, {k: (str(v.dtype), v.tolist()) for k, v in sums.items()}, reducer.calls, list(sums),
                   all(torch.equal(mine[k], _tensors(rank)[k]) for k in mine)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("bucket_bytes, expected_calls", [(1 << 20, 3), (64, 5)])
def test_two_processes_sum_every_tensor_with_one_collective_per_bucket(bucket_bytes, expected_calls):
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_worker, args=(rank, port, bucket_bytes, queue)) for rank in range(2)]
    for proc in procs:
        proc.start()
    results = dict((r[0], r[1:]) for r in (queue.get(timeout=120) for _ in procs))
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    expected = {k: _tensors(0)[k] + _tensors(1)[k] for k in _tensors(0)}
    for rank, (sums, calls, order, inputs_untouched) in results.items():
        assert order == list(expected) and inputs_untouched
        assert calls == expected_calls
        for key, value in expected.items():
            assert sums[key] == (str(value.dtype), value.tolist()), (rank, key)


def test_buckets_group_by_dtype_in_order_and_cap_their_size():
    tensors = _tensors(0)
    assert buckets(tensors, 1 << 20) == [["a.weight_sum", "b.weight_sum"], ["a.keep", "b.keep"], ["count"]]
    # 64 bytes: a.weight_sum (120 B) alone; b.weight_sum (56 B) alone; a.keep (60 B) alone; b.keep (16 B); count
    assert buckets(tensors, 64) == [["a.weight_sum"], ["b.weight_sum"], ["a.keep"], ["b.keep"], ["count"]]


def test_one_process_returns_the_inputs_without_a_collective():
    reducer = PlainReducer()
    tensors = _tensors(0)
    sums = reducer.sum(tensors, kind="keep_count", tag="round 1")
    assert reducer.world_size == 1 and reducer.calls == 0
    assert all(sums[k] is tensors[k] for k in tensors)
    with pytest.raises(ValueError, match="unknown reduce kind 'weights'"):
        reducer.sum(tensors, kind="weights", tag="round 1")
