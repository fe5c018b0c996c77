"""bench/reference.py's transcriptions of the original SparseGPT and Wanda pipelines, against the engine,
on a tiny random Llama: the sparsity each reaches, and Wanda's masks position by position."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fedspallm.calibration import PruneSpec, prune_sequential
from fedspallm.models import find_decoder_blocks, get_weight, prunable_modules
from fedspallm.pruners import sparsegpt_prune

from conftest import make_tiny_model, random_windows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import reference  # noqa: E402  (bench/reference.py, found through the path above)


def _pruned_pair(method: str, batch_size: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Keep-masks by full name: the reference pipeline's and prune_sequential's, each from the same dense model."""
    windows = random_windows(6, 16)
    ours_model, reference_model = make_tiny_model("llama"), make_tiny_model("llama")
    layer0 = find_decoder_blocks(reference_model)[0]
    reference.REFERENCES[method](reference_model, windows, 0.5)
    assert find_decoder_blocks(reference_model)[0] is layer0  # the capture put layer 0 back
    prune_sequential(ours_model, windows, PruneSpec(method, 0.5), batch_size=batch_size)
    masks = [{name: get_weight(m) != 0 for name, m in prunable_modules(model).items()}
             for model in (reference_model, ours_model)]
    return masks[0], masks[1]


def test_reference_sparsegpt_and_ours_prune_half_of_every_matrix() -> None:
    reference_masks, ours_masks = _pruned_pair("sparsegpt", batch_size=4)
    assert len(ours_masks) == 3 * 7
    for name, ours in ours_masks.items():
        rows, cols = ours.shape
        tiles = -(-cols // 128)
        assert int((~ours).sum()) == rows * cols // 2, name
        # The original's tile threshold is ``score <= the score at the quantile``: one entry more per tile.
        assert int((~reference_masks[name]).sum()) == rows * cols // 2 + tiles, name
        # Same Hessians, same update: the masks differ only by rounding near the threshold (and that entry).
        assert (reference_masks[name] == ours).float().mean() > 0.97, name


def test_reference_fasterprune_is_the_engine_kernel_across_tiles() -> None:
    # Four 16-column tiles, so that the lazy update of the later tiles is exercised. The reference
    # prunes int(128 * 0.5) + 1 = 65 of each 8 x 16 tile; the engine prunes round(128 * s) = 65 at s = 65/128.
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 64, generator=generator)
    inputs = (torch.randn(4, 32, 64, generator=generator) @ torch.randn(64, 64, generator=generator)
              * torch.randn(64, generator=generator).exp())
    linear = torch.nn.Linear(64, 8, bias=False)
    linear.weight.data = weight.clone()
    layer = reference.SparseGPTLayer(linear)
    layer.add_batch(inputs)
    hessian = layer.hessian.clone()
    layer.fasterprune(0.5, blocksize=16)
    ours = sparsegpt_prune(weight, hessian, 65 / 128, blocksize=16)
    assert torch.equal(linear.weight != 0, ours.mask)
    assert (~ours.mask).reshape(8, 4, 16).sum(dim=(0, 2)).tolist() == [65] * 4
    torch.testing.assert_close(linear.weight.data, ours.weight, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(ours.weight, weight.masked_fill(~ours.mask, 0))  # the OBS update did move weights


def test_reference_wanda_masks_equal_ours() -> None:
    # The engine batches 8 windows where the reference runs one at a time, and squares a sum of
    # squares where the reference squares a norm: the statistics may round differently, but not by
    # the gap between any two scores of these random weights, so the masks are the same to the entry.
    reference_masks, ours_masks = _pruned_pair("wanda", batch_size=8)
    for name, ours in ours_masks.items():
        assert int((~ours).sum()) == ours.numel() // 2, name
        assert torch.equal(reference_masks[name], ours), name
