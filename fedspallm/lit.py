"""The LightningModule that wraps a causal LM: perplexity evaluation and mask-preserving sparse fine-tuning.

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

Sparse fine-tuning keeps the zeros of a pruned model. :meth:`CausalLMModule.prepare_training`
freezes the parameters outside ``trainable`` and records, for every trainable prunable matrix
(:func:`fedspallm.models.prunable_modules`), where its weight is zero. The gradient at those
positions is zeroed after every backward pass (``on_after_backward``, before gradient clipping), and
the weights there are set to zero again after every optimizer step (``optimizer_step``). So no
optimizer (momentum, Adam's moments, weight decay) can move a pruned weight, and the zero set after
training contains the one before it. (It is the same set unless a kept weight lands on exactly 0.0,
which the fit recipe checks and reports.) The same methods drive the Trainer and a plain loop
(federated clients): ``training_step``, ``on_after_backward``, ``apply_masks``, ``configure_optimizers``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from torchmetrics.text import Perplexity

from fedspallm.dtypes import check_compute_dtype, parameters_in
from fedspallm.errors import UserError
from fedspallm.models import find_decoder_blocks, prunable_modules

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
EVAL_DTYPES = ("float32", "bfloat16")


class RowwisePerplexity(Perplexity):
    """torchmetrics' :class:`Perplexity`, whose softmax runs over ``rows`` predictions at a time.

    The parent's update takes the softmax of all [N, V] logits at once, a float32 copy as large as its
    input (100 MB for one 511-token window over the default model's 49,152-token vocabulary). Each
    row's softmax does not depend on the other rows, so this update gathers the same float32
    probabilities of the targets, chunk by chunk, and then sums their logs in one call as the parent
    does: the same states bit for bit, with a [rows, V] copy at most. With an ``ignore_index`` it is
    the parent's update.
    """

    rows = 64

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if self.ignore_index is not None:
            super().update(preds, target)
            return
        preds, target = preds.reshape(-1, preds.shape[-1]), target.reshape(-1)
        probs = torch.cat([
            torch.nn.functional.softmax(preds[i : i + self.rows], dim=1)[
                torch.arange(min(self.rows, target.numel() - i)), target[i : i + self.rows]]
            for i in range(0, target.numel(), self.rows)])
        self.total_log_probs += -probs.log().sum()
        self.count += target.numel()


def new_perplexity_metric(sync: bool = True) -> Perplexity:
    """A :class:`Perplexity` whose NLL sum and token count are kept in float64 (and whose softmax
    runs a few rows at a time, see :class:`RowwisePerplexity`).

    float32 states would lose about 1e-7 relative per added batch once the sum is large; float64
    makes the accumulated sum exact to far below anything a perplexity table shows.
    """
    return RowwisePerplexity(sync_on_compute=sync).set_dtype(torch.float64)


def parse_trainable(spec: str) -> tuple[str, int]:
    """"all" -> ("all", 0); "norms_and_biases" -> (same, 0); "last_n_blocks:3" -> ("last_n_blocks", 3)."""
    if spec in ("all", "norms_and_biases"):
        return spec, 0
    match = re.fullmatch(r"last_n_blocks:(\d+)", spec or "")
    if match is None or int(match.group(1)) < 1:
        raise UserError(f"fit.trainable={spec!r}: use all, last_n_blocks:N (N >= 1) or norms_and_biases")
    return "last_n_blocks", int(match.group(1))


def trainable_names(model: nn.Module, spec: str) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters that ``spec`` trains.

    ``all``: every parameter. ``last_n_blocks:N``: the parameters of the last N decoder blocks.
    ``norms_and_biases``: every 1-D parameter (norm weights and biases), in any architecture.
    """
    kind, n = parse_trainable(spec)
    named = list(model.named_parameters())
    if kind == "all":
        return [name for name, _ in named]
    if kind == "norms_and_biases":
        return [name for name, p in named if p.dim() == 1]
    stack = find_decoder_blocks(model)
    if n > len(stack):
        raise UserError(f"fit.trainable={spec!r}: the model has only {len(stack)} decoder blocks")
    prefix = next(name for name, module in model.named_modules() if module is stack)
    heads = tuple(f"{prefix}.{b}." for b in range(len(stack) - n, len(stack)))
    return [name for name, _ in named if name.startswith(heads)]


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0,
              schedule: Literal["constant", "cosine", "linear"] = "constant") -> float:
    """The learning-rate multiplier for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup ``(step + 1) / warmup_steps`` over the first ``warmup_steps`` steps, then constant,
    or a cosine / linear decay that would reach 0 at ``total_steps``.
    """
    if schedule not in SCHEDULES:
        raise UserError(f"fit.schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


class CausalLMModule(L.LightningModule):
    """Wraps a Hugging Face causal LM: perplexity evaluation and mask-preserving sparse fine-tuning.

    ``validation_step`` / ``test_step`` take a LongTensor ``[B, T]`` of token windows and update
    ``self.val_ppl`` / ``self.test_ppl``. Under the Trainer they log ``"val/ppl"`` / ``"test/ppl"``
    (the metric object is logged, so Lightning computes it, synced across processes, at epoch end).
    Under Fabric, use :func:`evaluate_perplexity` (``self.log`` cannot take a metric object there).

    Training (``trainer.fit`` or a plain loop) takes the same windows; the loss is Hugging Face's
    mean next-token NLL. The keyword arguments configure the optimizer (``adamw`` or ``sgd``), the
    learning-rate schedule (see :func:`lr_factor`; ``total_steps`` is needed by cosine and linear),
    which parameters train (see :func:`trainable_names`) and whether the zeros of the prunable
    matrices are kept (``keep_masks``). ``schedule_offset`` shifts the schedule: a federated client
    in round r starts at step ``r * local_steps`` of the global schedule.

    ``eval_dtype`` ("float32" or "bfloat16"; None = the model's own dtype) is the dtype
    :func:`evaluate_perplexity` runs the model in: its parameters are cast for the evaluation and put
    back afterwards (see :func:`fedspallm.dtypes.parameters_in`). Perplexities in different dtypes are not comparable.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        schedule: Literal["constant", "cosine", "linear"] = "constant",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        trainable: str = "all",
        keep_masks: bool = True,
        eval_dtype: str | None = None,
    ):
        super().__init__()
        self.model = model
        if eval_dtype is not None and eval_dtype not in EVAL_DTYPES:
            raise UserError(f"eval.dtype={eval_dtype!r}: use one of {', '.join(EVAL_DTYPES)} (or null: the model's dtype)")
        self.eval_dtype = eval_dtype
        self.val_ppl = new_perplexity_metric()
        self.test_ppl = new_perplexity_metric()
        if optimizer not in OPTIMIZERS:
            raise UserError(f"fit.optimizer={optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        parse_trainable(trainable)
        lr_factor(0, 1, 0, schedule)  # validates the name
        if schedule != "constant" and total_steps is None:
            raise UserError(f"schedule {schedule!r} needs total_steps")
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.trainable = trainable
        self.keep_masks = keep_masks
        self.schedule_offset = 0
        self._masks: dict[str, tuple[nn.Parameter, torch.Tensor]] | None = None
        self._head_split: tuple[nn.Module, nn.Module] | tuple[()] | None = None  # see head_split

    # -- sparse fine-tuning ----------------------------------------------------------------------

    def prepare_training(self) -> None:
        """Freeze what ``trainable`` excludes and record the zeros of every trainable prunable matrix.

        Idempotent: the masks are taken the first time only (call it right after loading, before any
        step). ``setup("fit")`` calls it, so ``trainer.fit`` needs no extra call.
        """
        if self._masks is not None:
            return
        keep = set(trainable_names(self.model, self.trainable))
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in keep)
        masks: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
        if self.keep_masks:
            for name, layer in prunable_modules(self.model).items():
                weight = layer.weight
                if weight.requires_grad:
                    zero = weight.detach() == 0
                    if bool(zero.any()):
                        masks[name] = (weight, zero)
        self._masks = masks

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Module name -> bool tensor in the weight's own layout, True where the weight is pruned."""
        return {name: zero for name, (_, zero) in (self._masks or {}).items()}

    def _mask_pairs(self):
        for name, (param, zero) in (self._masks or {}).items():
            if zero.device != param.device:
                zero = zero.to(param.device)
                self._masks[name] = (param, zero)
            yield param, zero

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradient at every pruned position."""
        for param, zero in self._mask_pairs():
            if param.grad is not None:
                param.grad.masked_fill_(zero, 0)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set every pruned weight to zero again."""
        for param, zero in self._mask_pairs():
            param.masked_fill_(zero, 0)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.prepare_training()
            self.model.train()  # Hugging Face loads models in eval mode; the Trainer keeps modes as it finds them

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Mean next-token NLL of ``batch`` ([B, T] token ids), as Hugging Face computes it."""
        _check_windows(batch, "batch")
        loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss
        if self._trainer is not None and self._trainer.training:  # not in a plain loop, nor after fit
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_after_backward(self) -> None:
        self.mask_gradients()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.apply_masks()

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer over the trainable parameters, and a per-step LambdaLR for the schedule."""
        self.prepare_training()
        params = self.trainable_parameters()
        if not params:
            raise UserError(f"fit.trainable={self.trainable!r} selects no parameters of this model")
        if self.optimizer_name == "adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        total, offset = self.total_steps or 1, self.schedule_offset
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step + offset, total, self.warmup_steps, self.schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation ------------------------------------------------------------------------------

    @property
    def evaluation_dtype(self) -> str:
        """The dtype :func:`evaluate_perplexity` runs the model in, by name ("float32", "bfloat16", ...)."""
        if self.eval_dtype is not None:
            return self.eval_dtype
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, **kwargs)

    def update_perplexity(self, metric: Perplexity, batch: torch.Tensor) -> None:
        """Run the model on ``batch`` ([B, T] token ids) and add its B * (T - 1) token NLLs to ``metric``.

        The decoder runs on the whole batch, and the output head one window at a time: only one
        window's [T - 1, V] logits exist at once, not the batch's [B, T, V] (V = 49152 for the default
        model: 403 MB in float32 for B = 4, T = 512). Models whose logits are not the head applied to
        the decoder's last hidden state (e.g. a final soft-capping) are run whole; see :meth:`head_split`.
        """
        _check_windows(batch, "batch")
        targets = batch[:, 1:]
        split = self.head_split(batch)
        if split is None:
            logits = self.model(input_ids=batch, use_cache=False).logits
        else:
            decoder, head = split
            hidden = decoder(input_ids=batch, use_cache=False)[0]
        # One window at a time: the metric's softmax makes a float32 copy of its input, and a
        # [T - 1, V] copy is much smaller than [B, T - 1, V].
        for i in range(batch.shape[0]):
            window = logits[i : i + 1, :-1] if split is None else head(hidden[i : i + 1, :-1])
            metric.update(window.float(), targets[i : i + 1])
            del window

    def head_split(self, batch: torch.Tensor) -> tuple[nn.Module, nn.Module] | None:
        """(decoder, output head) if the model's logits are ``head(decoder(ids)[0])``, else None.

        Decided once per module by a probe on the first 8 tokens of one window: the model's own
        forward and decoder-then-head must give the same logits bit for bit (same ops, same shapes).
        """
        if self._head_split is None:
            decoder = getattr(self.model, "get_decoder", lambda: None)()
            head = getattr(self.model, "get_output_embeddings", lambda: None)()
            same = False
            if isinstance(decoder, nn.Module) and isinstance(head, nn.Module) and decoder is not self.model:
                probe = batch[:1, :8]
                try:
                    same = torch.equal(head(decoder(input_ids=probe, use_cache=False)[0]),
                                       self.model(input_ids=probe, use_cache=False).logits)
                except (TypeError, ValueError, RuntimeError):  # a decoder that takes other arguments
                    same = False
            self._head_split = (decoder, head) if same else ()
        return self._head_split or None

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
    dtype = getattr(torch, inner.evaluation_dtype)
    if inner.eval_dtype is not None:
        check_compute_dtype(dtype, device, "eval.dtype")
    shard = windows[rank::world_size]
    metric = new_perplexity_metric(sync=fabric is not None).to(device)
    was_training = inner.training
    inner.eval()
    bar = task = None
    if progress and rank == 0:
        from fedspallm.reporting import progress_bar

        label = description if world_size == 1 else f"{description} [rank 0 of {world_size}]"
        bar = progress_bar()
        task = bar.add_task(label, total=shard.shape[0])
        bar.start()
    try:
        with torch.inference_mode(), parameters_in(inner.model, dtype):
            for start in range(0, shard.shape[0], batch_size):
                batch = shard[start : start + batch_size].to(device)
                inner.update_perplexity(metric, batch)
                if bar is not None:
                    bar.update(task, advance=batch.shape[0])
            value = float(metric.compute())  # all-reduces sums and counts when distributed
    finally:
        if bar is not None:
            bar.stop()
        inner.train(was_training)
    return value
