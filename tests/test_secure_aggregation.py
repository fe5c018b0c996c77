"""Secure aggregation over real gloo process groups: what each rank hands to the collective, and what comes back.

Statistical checks (uniform bytes, no correlation with the plaintext) run on 2^18 words per rank at
a significance of 1e-6 per check (about 60 checks per run: a false alarm in roughly one run out of
15,000), while the negative controls show the same checks reject the plaintext by orders of magnitude.
"""

from __future__ import annotations

import fedspallm  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fedspallm.errors import UserError
from fedspallm.federated.secure_aggregation import (
    DEFAULT_ENCODINGS,
    Encoding,
    SecureReducer,
    encodings,
    fixed_point_sum,
    modulus_bits,
)
import subprocess
import sys

from test_distributed import FABRIC, MAIN, REPO, free_port, model_sha, results, run, tiny_args
from test_finetune import corpus, pruned_dir  # noqa: F401  (fixtures)

NUM_CLIENTS = 12  # spread over 3 or 4 processes: 4 or 3 clients each
SHAPE = (512, 512)  # 2^18 words per rank for the statistical checks
ALPHA = 1e-6
Z_ALPHA = 4.753  # one-sided standard normal quantile of 1 - ALPHA


def client_update(client: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One client's pruned matrix (float32, 70% zeros) and keep mask: float32 values of magnitude >= 2^-12
    are multiples of 2^-35, so any party's float64 sum of them is exact and encodes without rounding."""
    generator = torch.Generator().manual_seed(1000 + client)
    weight = torch.randn(SHAPE, generator=generator) * 0.05
    keep = (torch.rand(SHAPE, generator=generator) >= 0.7) & (weight.abs() >= 2.0**-12)
    return torch.where(keep, weight, 0.0), keep.to(torch.int32)


def party_inputs(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    clients = range(rank * NUM_CLIENTS // world, (rank + 1) * NUM_CLIENTS // world)
    weight_sum = torch.zeros(SHAPE, dtype=torch.float64)
    keep_count = torch.zeros(SHAPE, dtype=torch.int32)
    for c in clients:
        w, k = client_update(c)
        weight_sum += w.double()
        keep_count += k
    return weight_sum, keep_count


class CapturingReducer:
    """A plain gloo all-reduce that records every tensor this rank hands to the collective."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.handed: list[tuple[str, str, torch.Tensor]] = []

    def sum(self, tensors, *, kind, tag):
        out = {}
        for name, tensor in tensors.items():
            self.handed.append((kind, tag, tensor.clone()))
            summed = tensor.clone()
            dist.all_reduce(summed)
            out[name] = summed
        return out


def run_party(rank: int, world: int) -> dict:
    weight_sum, keep_count = party_inputs(rank, world)
    runs = []
    for run in range(2):  # two runs: fresh keys and nonce each; the second in 1 MiB buckets, the matrix in halves
        inner = CapturingReducer(world)
        reducer = SecureReducer(inner, rank, seed=0, bucket_bytes=64 << 20 if run == 0 else 1 << 20)
        halves = {"layers.0.w": weight_sum} if run == 0 else {"top": weight_sum[:256], "bottom": weight_sum[256:]}
        weights = reducer.sum(halves, kind="weight_sum", tag="round 0")
        if run == 1:
            weights = {"layers.0.w": torch.cat([weights["top"], weights["bottom"]])}
        counts = reducer.sum({"layers.0.w": keep_count, "contributors": torch.tensor([3 + rank])},
                             kind="keep_count", tag="round 0")
        stats = reducer.stats()
        runs.append({"weights": weights, "counts": counts, "handed": inner.handed, "stats": stats})
    # A value outside its bound at rank 1: every rank gets one line, and rank 1's payload is random.
    inner = CapturingReducer(world)
    reducer = SecureReducer(inner, rank, seed=0)
    bad = weight_sum.clone()
    if rank == 1:
        bad[3, 4] = 5000.0
    try:
        reducer.sum({"layers.1.w": bad}, kind="weight_sum", tag="round 1")
        error = None
    except UserError as exc:
        error = str(exc)
    return {"runs": runs, "error": error, "violation_payload": inner.handed[-1][2]}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = run_party(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def spawn(world: int, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"world{world}"
    out.mkdir()
    mp.spawn(_worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[int, list[dict]]:
    tmp = tmp_path_factory.mktemp("secure")
    return {world: spawn(world, tmp) for world in (3, 4)}


def chi_square_critical(df: int, z: float = Z_ALPHA) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile."""
    c = 2 / (9 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


def byte_chi_squares(words: torch.Tensor, k: int) -> list[tuple[float, float]]:
    """(statistic, critical value) per byte position of words meant to be uniform on [0, 2^k)."""
    assert int(words.min()) >= 0 and int(words.max()) < 2**k
    size = words.element_size()
    planes = words.numpy().view(np.uint8).reshape(-1, size)  # little-endian: the last plane holds the top bits
    out = []
    for b in range(size):
        categories = 256 if 8 * (b + 1) <= k else 2 ** (k - 8 * b)
        counts = np.bincount(planes[:, b], minlength=256).astype(np.float64)
        assert counts[categories:].sum() == 0
        expected = len(planes) / categories
        out.append((float(((counts[:categories] - expected) ** 2 / expected).sum()),
                    chi_square_critical(categories - 1)))
    return out


def masked_payloads(party: dict, run: int = 0) -> list[torch.Tensor]:
    return [t for kind, _, t in party["runs"][run]["handed"] if kind != "metadata"]


def test_the_aggregate_is_the_plain_fixed_point_sum_bitwise_and_layout_free(worlds):
    exact_weights = sum(client_update(c)[0].double() for c in range(NUM_CLIENTS))
    exact_counts = sum(client_update(c)[1] for c in range(NUM_CLIENTS))
    for world, parties in worlds.items():
        inputs = [party_inputs(r, world) for r in range(world)]
        reference = fixed_point_sum([w for w, _ in inputs], DEFAULT_ENCODINGS["weight_sum"], world)
        for party in parties:
            for run in party["runs"]:
                assert torch.equal(run["weights"]["layers.0.w"], reference)
                assert run["counts"]["layers.0.w"].dtype == torch.int32
                assert torch.equal(run["counts"]["layers.0.w"], exact_counts)
                assert run["counts"]["contributors"].tolist() == [sum(3 + r for r in range(world))]
        # The clients' values are multiples of 2^-35, so here the fixed-point sum is the exact sum.
        assert torch.equal(reference, exact_weights)
    # Same clients over 3 or 4 processes: the same bits.
    assert torch.equal(worlds[3][0]["runs"][0]["weights"]["layers.0.w"], worlds[4][0]["runs"][0]["weights"]["layers.0.w"])


def test_the_collective_sees_only_the_key_table_and_uniform_words(worlds):
    for world, parties in worlds.items():
        k = modulus_bits(world)
        for rank, party in enumerate(parties):
            handed = party["runs"][0]["handed"]
            assert [kind for kind, _, _ in handed] == ["metadata", "weight_sum", "keep_count"]
            assert handed[0][2].shape == (world + 1, 32)  # public keys and the nonce: public by design
            payload = masked_payloads(party)[0][:-1]  # the weight sums; the last word is the flag
            plain = fixed_point_words(party_inputs(rank, world)[0])
            for stat, critical in byte_chi_squares(payload, k):
                assert stat < critical
            counts = masked_payloads(party)[1][:-2]  # int32 words: keep counts (the plain path's dtype too)
            assert counts.dtype == torch.int32
            for stat, critical in byte_chi_squares(counts, modulus_bits(world, 32)):
                assert stat < critical
            # Negative control: the same test on the plaintext words fails by far.
            plain_residues = plain & (2**k - 1)
            assert max(stat / critical for stat, critical in byte_chi_squares(plain_residues, k)) > 100
            n = payload.numel()
            r = np.corrcoef(payload.double().numpy(), plain.double().numpy())[0, 1]
            assert abs(r) < Z_ALPHA / math.sqrt(n)
            masked_bytes = payload.numpy().view(np.uint8).reshape(-1, 8).astype(np.float64)
            plain_bytes = plain_residues.numpy().view(np.uint8).reshape(-1, 8).astype(np.float64)
            for b in range(8):  # byte by byte, position by position
                assert abs(np.corrcoef(masked_bytes[:, b], plain_bytes[:, b])[0, 1]) < Z_ALPHA / math.sqrt(n)


def fixed_point_words(weight_sum: torch.Tensor) -> torch.Tensor:
    return torch.round(weight_sum.reshape(-1) * 2.0 ** DEFAULT_ENCODINGS["weight_sum"].frac_bits).to(torch.int64)


def test_two_runs_use_different_masks_and_give_identical_results(worlds):
    for parties in worlds.values():
        for party in parties:
            first, second = masked_payloads(party, 0), masked_payloads(party, 1)
            assert [t.numel() for t in second] == [2**17 + 1, 2**17, 2**18 + 1, 1]  # two buckets per call
            for a, b in ((first[0], torch.cat(second[:2])), (first[1], torch.cat(second[2:]))):
                assert a.shape == b.shape
                assert (a == b).double().mean() < 1e-3  # equal words only by chance (2^-61 each)
            assert torch.equal(party["runs"][0]["weights"]["layers.0.w"], party["runs"][1]["weights"]["layers.0.w"])
            stats = party["runs"][0]["stats"]
            assert stats["handed_bytes"] == 8 * (SHAPE[0] * SHAPE[1] + 1) + 4 * (SHAPE[0] * SHAPE[1] + 1 + 1)  # int32 counts
            assert stats["plain_bytes"] == 8 * SHAPE[0] * SHAPE[1] + 4 * SHAPE[0] * SHAPE[1] + 8


def test_a_value_outside_its_bound_is_one_line_on_every_rank_and_reveals_nothing(worlds):
    for world, parties in worlds.items():
        errors = [party["error"] for party in parties]
        assert all(e is not None and "\n" not in e for e in errors)
        assert "'layers.1.w'" in errors[1] and "'weight_sum'" in errors[1] and "5000" in errors[1]
        assert "never clipped" in errors[1]
        assert all("other process" in e and "'weight_sum'" in e for i, e in enumerate(errors) if i != 1)
        # The offending party sent fresh random words instead of its (masked) input.
        for stat, critical in byte_chi_squares(parties[1]["violation_payload"][:-1], modulus_bits(world)):
            assert stat < critical


class Unreachable:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def sum(self, tensors, *, kind, tag):
        raise AssertionError("no collective may run before the checks")


@pytest.mark.parametrize("world", [1, 2])
def test_fewer_than_three_parties_is_one_line(world):
    with pytest.raises(UserError, match=f"at least 3 processes, got {world}") as info:
        SecureReducer(Unreachable(world), 0)
    assert "\n" not in str(info.value)


def test_a_bound_that_could_overflow_is_one_line_before_any_collective():
    bounds = encodings({"weight_sum": 2.0**22})  # 2^22 x 2^36 x 4 parties reaches 2^60
    with pytest.raises(UserError) as info:
        SecureReducer(Unreachable(4), 0, bounds=bounds)
    message = str(info.value)
    assert "\n" not in message
    assert "'weight_sum'" in message and "4 parties x bound 4.1943e+06 x 2^36 >= 2^60" in message
    # The defaults fit 127 parties and no more.
    for kind, encoding in DEFAULT_ENCODINGS.items():
        encoding.check(kind, 127)
    with pytest.raises(UserError, match="'weight_sum' would overflow"):
        DEFAULT_ENCODINGS["weight_sum"].check("weight_sum", 128)


def test_modulus_leaves_room_for_the_collective_sum():
    for parties in range(2, 600):
        k = modulus_bits(parties)
        assert parties * (2**k - 1) < 2**63 <= parties * (2 ** (k + 1) - 1)


def test_fixed_point_rounding_error_is_bounded():
    encoding = Encoding(2.0**12, 36)
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(10_000, generator=generator, dtype=torch.float64) * 1e-3 for _ in range(5)]
    exact = sum(parts)
    approx = fixed_point_sum(parts, encoding, 5)
    assert 0 < float((approx - exact).abs().max()) <= 5 * encoding.quantum() / 2 + 1e-18
    # Integers are exact, with their dtype.
    counts = [torch.randint(0, 100, (50,), generator=generator, dtype=torch.int32) for _ in range(4)]
    assert torch.equal(fixed_point_sum(counts, DEFAULT_ENCODINGS["keep_count"], 4), sum(counts))


def test_bound_overrides_parse():
    table = encodings({"hessian": 2.0**10, "weight_sum": {"bound": 100.0, "frac_bits": 30}})
    assert table["hessian"] == Encoding(2.0**10, DEFAULT_ENCODINGS["hessian"].frac_bits)
    assert table["weight_sum"] == Encoding(100.0, 30)
    with pytest.raises(UserError, match="unknown kind 'weights'"):
        encodings({"weights": 1.0})
    with pytest.raises(UserError, match="needs a finite bound > 0"):
        Encoding(-1.0, 3).check("votes", 3)


def weights_of(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (model,) = out.glob("version_*/model/model.safetensors")
    return load_file(model)


def test_two_limbs_give_the_correctly_rounded_exact_sum_where_one_limb_rounds():
    """Float32 values of magnitude 2^-40 to 2^2 (all on the two-limb grid, 2^-72): one limb rounds the small
    ones to 2^-36; two limbs give every sum correctly rounded (math.fsum), which is also the plain sum
    wherever that one is exact."""
    generator = torch.Generator().manual_seed(0)

    def draw() -> torch.Tensor:
        sign = torch.randint(0, 2, (4000,), generator=generator) * 2 - 1
        return torch.ldexp(sign * (1 + torch.rand(4000, generator=generator)),
                           torch.randint(-40, 2, (4000,), generator=generator)).float().double()

    parts = [draw() for _ in range(4)]
    exact = torch.tensor([math.fsum(v) for v in zip(*(p.tolist() for p in parts))], dtype=torch.float64)
    two = fixed_point_sum(parts, Encoding(2.0**12, 32, limbs=2), 4)
    assert torch.equal(two, exact)
    one = fixed_point_sum(parts, Encoding(2.0**12, 36), 4)
    assert not torch.equal(one, exact)  # the control: one word does round these values
    ulp = torch.nextafter(exact.abs(), torch.tensor(float("inf"), dtype=torch.float64)) - exact.abs()
    assert bool(((one - exact).abs() <= 4 * 2.0**-37 + ulp).all())  # 4 parties' half quanta
    fit = DEFAULT_ENCODINGS["fit_weights"]  # n_i · W_i, float32 weights: on the two-limb grid
    weighted = [(torch.randn(4000, generator=generator) * 0.02).double() * n for n in (3, 5, 7)]
    assert torch.equal(fixed_point_sum(weighted, fit, 3), weighted[0] + weighted[1] + weighted[2])
    assert fit.limbs == 2 and fit.words(127) == torch.int64


def test_a_two_limb_sum_through_the_reducer_is_the_fixed_point_sum(tmp_path):
    """Three gloo processes, fit_weights (two limbs): what comes back is fixed_point_sum bit for bit, and twice
    the words went to the collective."""
    out = tmp_path / "limbs"
    out.mkdir()
    mp.spawn(_two_limb_worker, args=(3, free_port(), str(out)), nprocs=3, join=True)
    parts = [_two_limb_input(rank) for rank in range(3)]
    reference = fixed_point_sum(parts, DEFAULT_ENCODINGS["fit_weights"], 3)
    assert torch.equal(reference, parts[0] + parts[1] + parts[2])
    for rank in range(3):
        got = torch.load(out / f"rank{rank}.pt")
        assert torch.equal(got["sum"], reference)
        assert got["handed"] == 2 * 8 * reference.numel() + 8  # two int64 words a value, one flag word


def _two_limb_input(rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rank)
    return (torch.randn(70_000, generator=generator) * 0.02).double() * (rank + 2)


def _two_limb_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        inner = CapturingReducer(world)
        reducer = SecureReducer(inner, rank, seed=0, bucket_bytes=1 << 20)  # the tensor spans two buckets
        summed = reducer.sum({"w": _two_limb_input(rank)}, kind="fit_weights", tag="round 0")["w"]
        handed = sum(t.numel() * t.element_size() for kind, _, t in inner.handed if kind != "metadata")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save({"sum": summed, "handed": handed}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("strategy", ["fedspallm", "fedstats"])
def test_the_switch_gives_the_plain_run_s_model_bit_for_bit_and_records_it(strategy, tiny_model_dir, tmp_path):
    """federation.secure_aggregation on the tiny model with 3 processes (clients 0 | 1 | 2, 3): the same
    model.safetensors as the plain run, byte for byte, and results.json says which run was masked. fedspallm's
    weight sums need two limbs for that; with one, the weights that differ are those below 2^-13."""
    extra = ("--federation.strategy", strategy, "--output.save_compressed", "false")
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    limbs = ("--federation.secure_bounds", "{weight_sum: {limbs: 2}}") if strategy == "fedspallm" else ()
    run([FABRIC, "run", "--devices", "3", MAIN, *tiny_args(tiny_model_dir, plain, *extra)], timeout=900)
    run([FABRIC, "run", "--devices", "3", MAIN, *tiny_args(tiny_model_dir, secure, *extra,
                                                          "--federation.secure_aggregation", "true", *limbs)],
        timeout=900)
    assert model_sha(secure) == model_sha(plain)
    a, b = results(plain), results(secure)
    assert (a["secure_aggregation"], b["secure_aggregation"]) == (False, True)
    assert b["perplexity"] == a["perplexity"] and b["sparsity"] == a["sparsity"]
    plain_c, secure_c = a["collectives"], b["collectives"]
    assert (plain_c["secure_aggregation"], secure_c["secure_aggregation"], secure_c["parties"]) == (False, True, 3)
    assert secure_c["plain_bytes"] == plain_c["handed_bytes"] > 0
    assert len(secure_c["wire_bytes_per_process"]) == 3
    assert min(secure_c["wire_bytes_per_process"]) > secure_c["handed_bytes"]
    if strategy == "fedstats":
        # grid values as int64 words (the plain bytes), counts and flags as int32 words instead of int64
        assert secure_c["handed_bytes"] < plain_c["handed_bytes"]
        return
    assert secure_c["handed_bytes"] > plain_c["handed_bytes"]  # two int64 words per float64 weight sum
    # One limb (the default): weight sums on the 2^-36 grid (every float32 value above 2^-13 in magnitude)
    # come back exact; others within the parties' rounding, P half quanta, then one float32 rounding each side.
    one_limb = tmp_path / "one_limb"
    run([FABRIC, "run", "--devices", "3", MAIN, *tiny_args(tiny_model_dir, one_limb, *extra,
                                                          "--federation.secure_aggregation", "true")], timeout=900)
    rounded = weights_of(one_limb)
    for name, want in weights_of(plain).items():
        ulp = torch.nextafter(want.abs(), torch.tensor(float("inf"), dtype=want.dtype)) - want.abs()
        assert bool(((rounded[name] - want).abs() <= 3 * 2.0**-37 + ulp).all()), name
    # int64 words for the float64 weight sums, int32 for the int32 keep counts and the int64 contributor counts
    assert 0 < plain_c["handed_bytes"] - results(one_limb)["collectives"]["handed_bytes"] < 4 * 64


@pytest.mark.parametrize("command", ["prune", "fit"])
def test_the_switch_with_two_processes_is_one_line_before_launch(command, tiny_model_dir, pruned_dir, corpus,
                                                                 tmp_path):
    from test_finetune import fit_args

    if command == "prune":
        switch = "federation.secure_aggregation"
        args = tiny_args(tiny_model_dir, tmp_path, "--runtime.devices", "2", f"--{switch}", "true")
    else:
        switch = "fit.secure_aggregation"
        args = fit_args(pruned_dir, corpus, tmp_path, "--runtime.devices", "2", "--fit.federated", "true",
                        f"--{switch}", "true")
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True, timeout=240, env=env,
                          cwd=REPO)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: runtime.devices=2 x num_nodes=1: {switch}=true needs at least 3 processes, got 2: "
                     "with 2 each learns the other's input from the sum; launch 3 or more (fabric run --devices 3) "
                     f"or set {switch} false"]
    assert not list(tmp_path.glob("version_*/results.json"))


def test_fit_secure_aggregation_needs_federated_fit():
    from fedspallm.config import FitConfig

    with pytest.raises(UserError, match=r"^fit.secure_aggregation=true with fit.federated=false: local fine-tuning "
                                        r"sums nothing across processes; set fit.federated true or secure_aggregation "
                                        r"false$"):
        FitConfig(secure_aggregation=True)


def test_federated_fit_under_secure_aggregation_equals_the_plain_fit(pruned_dir, corpus, tmp_path):
    """fit.secure_aggregation with 3 processes: the FedAvg sums go masked, and the fine-tuned model is the
    plain run's, byte for byte."""
    from test_finetune import fit_args

    fed = ["--fit.federated", "true", "--fit.num_clients", "3", "--fit.rounds", "2", "--fit.local_steps", "2",
           "--fit.seqlen", "32"]
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    run([FABRIC, "run", "--accelerator", "cpu", "--devices", "3", MAIN, *fit_args(pruned_dir, corpus, plain, *fed)],
        timeout=600)
    run([FABRIC, "run", "--accelerator", "cpu", "--devices", "3", MAIN,
         *fit_args(pruned_dir, corpus, secure, *fed, "--fit.secure_aggregation", "true")], timeout=600)
    assert model_sha(secure) == model_sha(plain)
    a, b = results(plain), results(secure)
    assert (a["federated"]["secure_aggregation"], b["federated"]["secure_aggregation"]) == (False, True)
    assert b["masks_preserved"] is True
    assert b["val"]["history"] == a["val"]["history"]
    # the training losses, now masked (kind fit_losses): the correctly rounded sum, the plain sum within its
    # own float64 rounding of three terms
    for plain_loss, secure_loss in zip(a["federated"]["train_loss_per_round"], b["federated"]["train_loss_per_round"]):
        assert secure_loss == pytest.approx(plain_loss, rel=2.0**-50, abs=0)
    digests = b["weights_sha256_per_rank"]
    assert len(digests) == 3 and len(set(digests)) == 1  # every rank decodes the same weights
    assert b["federated"]["collectives"]["plain_bytes"] == a["federated"]["collectives"]["handed_bytes"] > 0
