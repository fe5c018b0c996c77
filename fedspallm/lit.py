"""The LightningModule that wraps a causal LM: perplexity evaluation (and, later, sparse fine-tuning).

Perplexity follows SparseGPT's definition exactly: the text is cut into equal, non-overlapping
windows of ``seqlen`` tokens; inside each window the model predicts tokens 2..seqlen from their
prefixes (so every window contributes ``seqlen - 1`` predicted tokens, and no token is predicted
across a window boundary), and

    ppl = exp( sum of token NLLs over all windows / (nwindows * (seqlen - 1)) ).

This equals ``exp(mean over windows of model(w, labels=w).loss)`` because Hugging Face's loss is the
mean NLL over the ``seqlen - 1`` shifted tokens of a window and all windows have the same length.

The NLL sums and token counts live in a :class:`torchmetrics.text.Perplexity`, whose ``compute()``
all-reduces them across processes, so data-parallel evaluation needs no hand-written collective.
That metric takes ``log(softmax(logits))`` in float32 rather than a log-softmax, so a single token
with probability below ~1e-38 (NLL above ~87 nats) would count as infinite. The worst token NLL
measured on the default model, even magnitude-pruned to 90%, was about 53.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.text import Perplexity

from fedspallm.errors import UserError


def new_perplexity_metric(sync: bool = True) -> Perplexity:
    """A :class:`Perplexity` whose NLL sum and token count are kept in float64.

    float32 states would lose about 1e-7 relative per added batch once the sum is large; float64
    makes the accumulated sum exact to far below anything a perplexity table shows.
    """
    return Perplexity(sync_on_compute=sync).set_dtype(torch.float64)


class CausalLMModule(L.LightningModule):
    """Wraps a Hugging Face causal LM: perplexity evaluation now; sparse fine-tuning will be added
    later in this same class.

    ``validation_step`` / ``test_step`` take a LongTensor ``[B, T]`` of token windows and update
    ``self.val_ppl`` / ``self.test_ppl``. Under the Trainer they log ``"val/ppl"`` / ``"test/ppl"``
    (the metric object is logged, so Lightning computes it, synced across processes, at epoch end).
    Under Fabric, use :func:`evaluate_perplexity` (``self.log`` cannot take a metric object there).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.val_ppl = new_perplexity_metric()
        self.test_ppl = new_perplexity_metric()

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, **kwargs)

    def update_perplexity(self, metric: Perplexity, batch: torch.Tensor) -> None:
        """Run the model on ``batch`` ([B, T] token ids) and add its B * (T - 1) token NLLs to ``metric``."""
        _check_windows(batch, "batch")
        logits = self.model(input_ids=batch, use_cache=False).logits
        targets = batch[:, 1:]
        # One window at a time: the metric's softmax makes a float32 copy of its input, and a
        # [T - 1, V] copy is much smaller than [B, T - 1, V] (V = 49152 for the default model).
        for i in range(batch.shape[0]):
            metric.update(logits[i : i + 1, :-1].float(), targets[i : i + 1])

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.update_perplexity(self.val_ppl, batch)
        self._log_metric("val/ppl", self.val_ppl)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.update_perplexity(self.test_ppl, batch)
        self._log_metric("test/ppl", self.test_ppl)

    def _log_metric(self, name: str, metric: Perplexity) -> None:
        if self._fabric is not None:
            return  # Fabric's log_dict takes numbers only; evaluate_perplexity returns the value
        self.log(name, metric, on_step=False, on_epoch=True, prog_bar=True)


def _check_windows(windows: Any, what: str) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        dtype = windows.dtype if isinstance(windows, torch.Tensor) else ""
        raise UserError(f"{what} must be a LongTensor [n, seqlen] of token ids, got {shape} {dtype}".rstrip())
    if windows.shape[1] < 2:
        raise UserError(f"{what} has seqlen {windows.shape[1]}; perplexity needs windows of at least 2 tokens")


def _unwrap(module: nn.Module) -> nn.Module:
    """The user's module, if Fabric wrapped it: calling a DDP wrapper's forward could sync buffers,
    a collective that hangs when ranks run different numbers of batches."""
    from lightning.fabric.wrappers import _unwrap_objects

    return _unwrap_objects(module)


def _check_same_windows(fabric: L.Fabric, windows: torch.Tensor) -> None:
    """Every rank must hold the same windows, or the shards would not partition them."""
    shape = torch.tensor(windows.shape, dtype=torch.long)
    shapes = fabric.all_gather(shape).reshape(fabric.world_size, 2)
    if not bool((shapes == shapes[0]).all()):
        raise UserError(f"ranks hold different evaluation windows (shapes {shapes.tolist()}); every rank must get the same windows")


def evaluate_perplexity(
    fabric: L.Fabric | None,
    module: CausalLMModule,
    windows: torch.Tensor,
    batch_size: int = 4,
    description: str = "eval",
    progress: bool = True,
) -> float:
    """Perplexity of ``module``'s model over ``windows`` (LongTensor [n, seqlen]), data-parallel.

    SparseGPT's definition: ppl = exp(sum of token NLLs / (n * (seqlen - 1))). Each window
    contributes ``seqlen - 1`` predicted tokens (token 1 of a window is only context), so the result
    equals exp of the mean over windows of Hugging Face's ``model(w, labels=w).loss``.

    Rank r evaluates ``windows[r::world_size]`` (no padding, no duplicated windows); the metric's
    ``compute()`` all-reduces the NLL sums and token counts, so every rank returns the same float.
    Every rank must pass the same ``windows``. Works with ``world_size == 1`` and no process group,
    and under ``fabric run --devices N`` (gloo on CPU, NCCL on GPUs). Runs under
    ``torch.inference_mode`` on the device of the module's parameters, with the model in eval mode
    (its previous mode is restored). Logits are cast to float32 before the softmax.

    A progress bar over rank 0's windows is shown on rank 0 when ``progress`` is true.

    ``fabric=None`` evaluates every window in this process and syncs nothing, even inside a process
    group: standalone clients score their own models this way.
    """
    _check_windows(windows, "windows")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: must be >= 1")
    inner = _unwrap(module)
    if not isinstance(inner, CausalLMModule):
        raise TypeError(f"evaluate_perplexity expects a CausalLMModule, got {type(inner).__name__}")
    world_size, rank = (fabric.world_size, fabric.global_rank) if fabric is not None else (1, 0)
    if world_size > 1:
        _check_same_windows(fabric, windows)

    device = next(inner.parameters()).device
    shard = windows[rank::world_size]
    metric = new_perplexity_metric(sync=fabric is not None).to(device)
    was_training = inner.training
    inner.eval()
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        label = description if world_size == 1 else f"{description} [rank 0 of {world_size}]"
        bar = tqdm(total=shard.shape[0], desc=label, unit="window", dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for start in range(0, shard.shape[0], batch_size):
                batch = shard[start : start + batch_size].to(device)
                inner.update_perplexity(metric, batch)
                if bar is not None:
                    bar.update(batch.shape[0])
            value = float(metric.compute())  # all-reduces sums and counts when distributed
    finally:
        if bar is not None:
            bar.close()
        inner.train(was_training)
    return value
