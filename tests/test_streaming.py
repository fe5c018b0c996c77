"""Streaming aggregation: uploads held packed, one block's sums at a time, the dense cache from disk."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model, random_windows


def test_an_upload_packs_mask_and_values_and_gives_back_the_exact_sums():
    from fedspallm.federated.aggregation import contribute, merge
    from fedspallm.federated.uploads import Upload, add, as_contribution

    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(7, 13, generator=generator) for _ in range(3)]
    masks = [torch.rand(7, 13, generator=generator) > 0.6 for _ in range(3)]
    masks[0][0, 0], weights[0][0, 0] = True, 0.0  # a kept weight that is exactly zero stays kept
    upload = Upload.of(weights[0], masks[0])
    assert upload.mask.dtype == torch.uint8 and upload.mask.numel() == (7 * 13 + 7) // 8
    assert upload.values.numel() == int(masks[0].sum())
    assert torch.equal(upload.keep(), masks[0])
    expected = contribute(None, weights[0], masks[0])
    got = upload.contribution()
    assert torch.equal(got.weight_sum, expected.weight_sum) and torch.equal(got.keep_count, expected.keep_count)
    held = None
    for w, m in zip(weights, masks):
        held = add(held, Upload.of(w, m))
    reference = merge(merge(contribute(None, weights[0], masks[0]), contribute(None, weights[1], masks[1])),
                      contribute(None, weights[2], masks[2]))
    held = as_contribution(held)
    assert held.contributors == 3
    assert torch.equal(held.weight_sum, reference.weight_sum) and torch.equal(held.keep_count, reference.keep_count)


def test_a_spooled_upload_store_gives_back_the_same_bits_and_removes_its_files(tmp_path):
    from fedspallm.federated.uploads import Upload, UploadStore, as_contribution

    generator = torch.Generator().manual_seed(2)
    weights = [torch.randn(6, 10, generator=generator) for _ in range(2)]
    masks = [torch.rand(6, 10, generator=generator) > 0.5 for _ in range(2)]
    memory, spooled = UploadStore(), UploadStore(tmp_path)
    for store in (memory, spooled):
        store.add("a", Upload.of(weights[0], masks[0]))  # one client's upload
        store.add("b", Upload.of(weights[0], masks[0]))  # two clients' sums
        store.add("b", Upload.of(weights[1], masks[1]))
    directory = spooled.directory
    assert directory.parent == tmp_path and sorted(p.name for p in directory.iterdir()) == ["a.safetensors", "b.safetensors"]
    assert "a" in spooled and len(spooled) == 2
    a = spooled.pop("a")
    assert isinstance(a, Upload) and a.shape == (6, 10)
    assert torch.equal(a.mask, memory.pop("a").mask) and torch.equal(a.values, weights[0][masks[0]])
    b, expected = spooled.pop("b"), as_contribution(memory.pop("b"))
    assert b.contributors == 2
    assert torch.equal(b.weight_sum, expected.weight_sum) and torch.equal(b.keep_count, expected.keep_count)
    assert spooled.pop("a") is None and list(directory.iterdir()) == []  # read back once, then gone
    spooled.add("c", Upload.of(weights[1], masks[1]))
    spooled.close()
    assert not directory.exists() and len(spooled) == 0


def test_pack_mask_matches_numpy_packbits():
    import numpy as np

    from fedspallm.federated.uploads import pack_mask, unpack_mask

    mask = torch.rand(5, 11, generator=torch.Generator().manual_seed(1)) > 0.5
    assert pack_mask(mask).tolist() == np.packbits(mask.flatten().numpy()).tolist()
    assert torch.equal(unpack_mask(pack_mask(mask), mask.shape), mask)


def test_packed_masks_read_back_as_bool_masks():
    from fedspallm.federated.uploads import PackedMasks

    masks = PackedMasks({"a": torch.tensor([[True, False, True]])})
    masks["b"] = torch.zeros(2, 9, dtype=torch.bool)
    assert list(masks) == ["a", "b"] and len(masks) == 2
    assert torch.equal(masks["a"], torch.tensor([[True, False, True]])) and masks["b"].dtype == torch.bool
    assert set(dict(masks)) == {"a", "b"}


def test_the_dense_cache_reads_the_checkpoint_on_disk_and_falls_back_to_a_copy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from fedspallm.federated.dense import DenseSource
    from fedspallm.models import get_weight, prunable_modules

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dense = DenseSource(model, tiny_model_dir)
    assert dense.on_disk
    layers = prunable_modules(model)
    assert list(dense) == list(layers)
    for name, layer in layers.items():
        assert torch.equal(dense[name], get_weight(layer)), name
    with torch.no_grad():
        next(iter(layers.values())).weight.mul_(2)  # the model no longer matches its file: a host copy instead
    copied = DenseSource(model, tiny_model_dir)
    assert not copied.on_disk
    assert all(torch.equal(copied[name], get_weight(layer)) for name, layer in layers.items())


class CountingReducer:
    world_size = 1

    def __init__(self) -> None:
        self.tags: list[tuple[str, str, int]] = []

    def sum(self, tensors, *, kind, tag):
        self.tags.append((kind, tag, sum(t.numel() for t in tensors.values())))
        return dict(tensors)


def test_a_run_that_spools_its_uploads_gives_the_same_model(tmp_path):
    from fedspallm.calibration import PruneSpec
    from fedspallm.config import FederationConfig
    from fedspallm.federated.driver import run_steps
    from fedspallm.federated.rounds import ClientWindows
    from fedspallm.federated.strategies import RunContext, get_strategy

    cfg = FederationConfig(strategy="fedspallm", num_clients=3, rounds=2, budgets=[0.67, 0.67, 0.67],
                           sampling="systematic")
    windows = ClientWindows({c: random_windows(2, 16, seed=c) for c in range(3)})
    models = []
    for scratch in (None, tmp_path):
        model = make_tiny_model("llama")
        strategy = get_strategy("fedspallm")(RunContext(model, PruneSpec("sparsegpt", 0.5), cfg, windows,
                                                        scratch=scratch))
        run_steps(strategy, CountingReducer())
        models.append(model.state_dict())
    assert all(torch.equal(models[0][key], models[1][key]) for key in models[0])
    assert list(tmp_path.iterdir()) == []  # the spool directory is gone after the last round


@pytest.mark.parametrize("rounds", [1, 2])
def test_round_sums_are_reduced_and_freed_block_by_block(rounds):
    from fedspallm.calibration import PruneSpec
    from fedspallm.config import FederationConfig
    from fedspallm.federated.driver import run_steps
    from fedspallm.federated.rounds import ClientWindows
    from fedspallm.federated.strategies import RunContext, get_strategy
    from fedspallm.models import prunable_modules

    model = make_tiny_model("llama")
    cfg = FederationConfig(strategy="fedspallm", num_clients=2, rounds=rounds, budgets=[0.67, 0.67], sampling="systematic")
    windows = ClientWindows({0: random_windows(2, 16, seed=0), 1: random_windows(2, 16, seed=1)})
    strategy = get_strategy("fedspallm")(RunContext(model, PruneSpec("wanda", 0.5), cfg, windows))
    assert strategy.dense is None if rounds == 1 else strategy.dense is not None  # read only by later rounds
    reducer = CountingReducer()
    run_steps(strategy, reducer)
    per_block = len(prunable_modules(model, [0]))
    weight_sums = [(tag, n) for kind, tag, n in reducer.tags if kind == "weight_sum"]
    # One reduce per block of the round, tagged with it, each holding that block's matrices only.
    first = [tag for tag, _ in weight_sums if tag.startswith("round 1")]
    assert first == [f"round 1, block {b}" for b in sorted({b for s in strategy.plan.samples[0] for b in s})]
    block_weights = sum(layer.weight.numel() for layer in prunable_modules(model, [0]).values())
    assert all(n == block_weights for _, n in weight_sums)
    assert per_block == 7
    # Pooled sums are kept only when a later round (or a checkpoint) reads them.
    assert (len(strategy.outcome.pooled) == 0) if rounds == 1 else len(strategy.outcome.pooled) > 0
    assert len(strategy.local) == 0
