"""The ``fit`` recipe: sparse fine-tuning of a pruned model, locally (Lightning Trainer) or federated (FedAvg).

    fedspallm fit --model.name_or_path lightning_logs/version_0/model --fit.max_steps 300
    fabric run --devices 2 fedspallm/main.py fit --model.name_or_path ... --fit.federated true

The masks are the zeros of the model as loaded (every prunable matrix); :class:`CausalLMModule`
keeps them on the gradients and after every optimizer step, and the run compares the zero sets
before and after (``masks_preserved`` in results.json).

Local mode: one process, ``lightning.Trainer`` over non-overlapping ``fit.seqlen`` windows of the
training corpus, validated every ``fit.val_every`` steps; the weights with the best validation
perplexity (the loaded ones count as step 0) are exported.

Federated mode (FedAvg): in every round each client starts from the global weights and takes
``fit.local_steps`` optimizer steps on its own windows (a plain loop over the module's own
``training_step`` / ``configure_optimizers``; a fresh optimizer per client and round, the learning
rate following one schedule over all rounds). The server's average is weighted by each client's
number of windows, ``W = Σ n_i·W_i / Σ n_i``: every process adds ``n_i·W_i`` of its clients in
float64 (the federation's summable :class:`~fedspallm.federated.aggregation.WeightedSum`) and sums
them over processes through the run's reducer (kind ``fit_weights``, one collective per bucket), so
every process ends with the same weights. Only the trainable parameters travel (the frozen ones never change); no gradient
crosses a process boundary.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from lightning.fabric import Fabric
from torch import nn

from fedspallm.config import EvalConfig, FitConfig, ModelConfig, OutputConfig, RuntimeConfig, check_fit
from fedspallm.data import Corpora, even_split, eval_windows, plan_calibration, token_stream
from fedspallm.errors import UserError
from fedspallm.federated.aggregation import WeightedSum, weighted_average
from fedspallm.federated.collectives import Reducer, collective_report, make_reducer
from fedspallm.federated.rounds import check_processes, clients_of_rank
from fedspallm.federated.secure_aggregation import check_setup
from fedspallm.lit import CausalLMModule, evaluate_perplexity, lr_factor
from fedspallm.models import load_model, prunable_modules
from fedspallm.outputs import model_card, sparsity_report, write_run
from fedspallm.preflight import check_context, launched_processes, same_on_every_rank
from fedspallm.reporting import RunReporter, tensorboard_logger
from fedspallm.runtime import make_fabric, peak_rss_bytes, quiet_libraries


# ---------------------------------------------------------------------------------------------
# Data


def train_windows(name: str, tokenizer, seqlen: int, max_windows: int | None, seed: int,
                  corpora: Corpora | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seqlen]`` windows of the train split's token stream, in a seeded random
    order, the first ``max_windows`` of them (all when None)."""
    stream = token_stream(name, "train", tokenizer, corpora)
    count = stream.numel() // seqlen
    if count == 0:
        raise UserError(f"fit.dataset={name!r} has {stream.numel()} tokens, fewer than one window of fit.seqlen={seqlen}")
    windows = stream[: count * seqlen].reshape(count, seqlen)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    if max_windows is not None:
        order = order[:max_windows]
    return windows[order].clone()


def client_windows(cfg: FitConfig, tokenizer, windows: torch.Tensor, clients: Sequence[int],
                   seed: int, corpora: Corpora | None = None) -> tuple[dict[int, torch.Tensor], list[int]]:
    """The windows of ``clients`` and every client's window count (the FedAvg weights).

    iid: the (shuffled) training windows split evenly, in order. topic / dirichlet: the calibration
    planner's non-IID partition of the same corpus (:func:`fedspallm.data.plan_calibration`), with
    as many windows in total as iid would have.
    """
    total = windows.shape[0]
    if cfg.num_clients > total:
        raise UserError(f"fit.num_clients={cfg.num_clients}: more clients than training windows ({total})")
    if cfg.partition == "iid":
        sizes = even_split(total, cfg.num_clients)
        parts = torch.split(windows, sizes)
        return {c: parts[c] for c in clients}, sizes
    plan = plan_calibration(cfg.dataset, tokenizer, total, cfg.seqlen, cfg.num_clients, cfg.partition, cfg.alpha, seed,
                            corpora)
    return plan.materialize(clients), plan.sizes


class BatchStream:
    """Endless micro-batches of one client's windows: seeded random epochs, the last partial batch dropped."""

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int):
        self.windows = windows
        self.batch_size = min(batch_size, windows.shape[0])
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> torch.Tensor:
        if len(self.order) < self.batch_size:
            self.order = torch.randperm(self.windows.shape[0], generator=self.generator).tolist()
        picked, self.order = self.order[: self.batch_size], self.order[self.batch_size:]
        return self.windows[picked]


# ---------------------------------------------------------------------------------------------
# Zero sets and FedAvg (pure functions)


def zero_sets(model: nn.Module) -> dict[str, np.ndarray]:
    """Every prunable matrix's zero positions, bit-packed (1 bit per weight), in its own layout."""
    return {name: np.packbits((layer.weight.detach() == 0).flatten().cpu().numpy())
            for name, layer in prunable_modules(model).items()}


def compare_zero_sets(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``identical``: the same zero positions, bit for bit; ``pruned_kept_zero``: every zero before is
    still zero; ``new_zeros``: kept weights that are now exactly 0.0."""
    if before.keys() != after.keys():
        raise ValueError("zero sets of different models")
    lost = new = zeros_before = zeros_after = 0
    for name, bits in before.items():
        now = after[name]
        lost += int(np.unpackbits(bits & ~now).sum())
        new += int(np.unpackbits(now & ~bits).sum())
        zeros_before += int(np.unpackbits(bits).sum())
        zeros_after += int(np.unpackbits(now).sum())
    return {"identical": lost == 0 and new == 0, "pruned_kept_zero": lost == 0, "pruned_now_nonzero": lost,
            "new_zeros": new, "zeros_before": zeros_before, "zeros_after": zeros_after}


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg of client states: ``Σ w_i·state_i[k] / Σ w_i`` for every key, computed in float64."""
    if len(states) != len(weights) or not states:
        raise ValueError("fedavg needs one weight per state, and at least one state")
    acc = WeightedSum()
    for state, weight in zip(states, weights):
        acc.add(state, weight)
    return weighted_average(acc.tensors(), states[0])


# ---------------------------------------------------------------------------------------------
# Helpers shared by both modes


def module_for(net: nn.Module, cfg: FitConfig, total_steps: int) -> CausalLMModule:
    return CausalLMModule(net, optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          momentum=cfg.momentum, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps,
                          total_steps=total_steps, trainable=cfg.trainable)


def _trainable(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in net.named_parameters() if p.requires_grad]


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True) for name, p in _trainable(net)}


@torch.no_grad()
def _restore(net: nn.Module, state: Mapping[str, torch.Tensor] | None, model_cfg: ModelConfig) -> None:
    """Load a snapshot of the trainable parameters; None means the weights as loaded (read again)."""
    if state is None:
        original = dict(load_model(model_cfg).model.named_parameters())
        state = {name: original[name] for name, _ in _trainable(net)}
    for name, p in _trainable(net):
        p.copy_(state[name])



def weights_digest(net: nn.Module) -> str:
    """sha256 over every parameter's bytes, in order (equal digests mean bitwise-equal weights)."""
    h = hashlib.sha256()
    for name, p in net.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _mixed_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def fitted_model_card(results: dict[str, Any], config_yaml: str) -> str:
    fit = results["fit"]
    mode = (f"federated (FedAvg), {fit['num_clients']} clients, {fit['rounds']} rounds of {fit['local_steps']} steps"
            if fit["federated"] else f"{results['steps']} steps")
    facts = [f"base: {results['model']}; {mode}; optimizer {fit['optimizer']}, lr {fit['lr']}, {fit['schedule']}, "
             f"precision {fit['precision']}, trainable {fit['trainable']}",
             f"sparsity {results['sparsity']['overall']:.4f}; zero positions unchanged: {results['masks_preserved']}"]
    perplexity = [f"| {name} | {results['perplexity_before'][name]:.3f} | {value:.3f} |"
                  for name, value in results["perplexity"].items()]
    return model_card("Sparse fine-tuned with fedspallm", ["pruning", "sparse", "fedspallm", "sparse-fine-tuning"],
                      facts, {"Perplexity": ["| dataset | perplexity before | after |", "|---|---|---|", *perplexity]},
                      config_yaml)


def _finish(results: dict[str, Any], net: nn.Module, tokenizer: Any, reporter: RunReporter, output: OutputConfig,
            config_yaml: str, started: float, source: Any) -> None:
    """Rank 0: the run's files (:func:`fedspallm.outputs.write_run`), TensorBoard, and a summary."""
    run_dir = reporter.run_dir
    write_run(run_dir, results, environment_source=source, config_yaml=config_yaml, started=started, model=net,
              tokenizer=tokenizer, card=fitted_model_card(results, config_yaml), save_model=output.save_model,
              save_compressed=output.save_compressed)
    reporter.log_metrics({f"perplexity/{k}": v for k, v in results["perplexity"].items()}, step=results["steps"])
    reporter.log_sparsity(results["sparsity"])
    reporter.close()
    for name, value in results["perplexity"].items():
        print(f"{name}: perplexity {results['perplexity_before'][name]:.4f} -> {value:.4f}")
    zeros = results["zero_set"]
    print(f"steps: {results['steps']}; sparsity {results['sparsity']['overall']:.4f}; masks preserved: "
          f"{results['masks_preserved']} ({zeros['zeros_after']} zeros, {zeros['new_zeros']} new, "
          f"{zeros['pruned_now_nonzero']} lost)")
    print(f"run directory: {run_dir}")


# ---------------------------------------------------------------------------------------------
# The recipe


def check_settings(fit: FitConfig, eval: EvalConfig, output: OutputConfig, runtime: RuntimeConfig) -> str:
    """The rules between sections and the processes this run has; returns the validation corpus's name."""
    val_name = check_fit(fit, eval, output)
    launched, how = launched_processes(runtime)
    processes = 2 if launched is None else launched  # not a plain number (e.g. devices "auto"): several
    if not fit.federated and processes > 1:
        raise UserError(f"{processes} processes, but local fine-tuning runs in one process: set fit.federated=true "
                        "to spread clients over processes, or launch a single process")
    if fit.federated:
        check_processes(processes, fit.num_clients, key="fit.num_clients", how=how)
    if fit.secure_aggregation and launched is not None:
        check_setup(launched, switch="fit.secure_aggregation", how=how)
    return val_name


def finetune(
    seed: int = 0,
    model: ModelConfig = ModelConfig(),
    fit: FitConfig = FitConfig(),
    eval: EvalConfig = EvalConfig(),
    output: OutputConfig = OutputConfig(),
    runtime: RuntimeConfig = RuntimeConfig(),
    config_yaml: str = "",
) -> dict[str, Any]:
    """Sparse fine-tuning of a (pruned) model: its zero positions stay zero, bit for bit.

    Local (one process, Lightning Trainer) or federated (``--fit.federated true``: FedAvg over
    clients spread over ``fabric run --devices K`` or ``--runtime.devices K`` processes). Writes
    TensorBoard events (train/loss, lr, val/ppl), results.json (perplexity before/after, steps,
    sparsity before/after, masks_preserved) and the best checkpoint by validation perplexity as a
    Hugging Face model to output.dir/version_N/model.

    Args:
        seed: seeds the window order, the client partition, dropout and the data order of every client.
    """
    try:  # every check before any weights load; each process fails alike, so the CLI prints it once
        val_name = check_settings(fit, eval, output, runtime)
    except UserError as err:
        raise same_on_every_rank(err) from None
    quiet_libraries()
    started = time.perf_counter()
    fabric = make_fabric(runtime, loggers=[tensorboard_logger(output.dir)])
    torch.manual_seed(seed)
    reporter = RunReporter(fabric, output.dir, runtime.progress)

    loaded = load_model(model)
    net, tokenizer = loaded.model.to(fabric.device), loaded.tokenizer
    check_context(net, {"fit.seqlen": fit.seqlen, "eval.seqlen": eval.seqlen})
    total_steps = fit.rounds * fit.local_steps if fit.federated else fit.max_steps
    module = module_for(net, fit, total_steps)
    module.eval_dtype = eval.dtype
    module.prepare_training()  # freeze, and take the masks from the weights as loaded
    zeros_before = zero_sets(net)
    sparsity_before = sparsity_report(net, 0.0)
    corpora = Corpora()  # the training corpus is tokenized once for its windows and its client partition
    windows = train_windows(fit.dataset, tokenizer, fit.seqlen, fit.max_windows, seed, corpora)
    eval_sets = {name: eval_windows(name, tokenizer, eval.seqlen, eval.max_windows, corpora) for name in eval.datasets}
    val_windows = eval_sets.get(val_name)
    if val_windows is None:
        val_windows = eval_windows(val_name, tokenizer, eval.seqlen, eval.max_windows, corpora)
    load_s = time.perf_counter() - started

    eval_fabric = fabric if fit.federated else None
    eval_started = time.perf_counter()
    before = {name: evaluate_perplexity(eval_fabric, module, w, eval.batch_size, description=f"eval {name}",
                                        progress=runtime.progress) for name, w in eval_sets.items()}
    val_before = before[val_name] if val_name in before else evaluate_perplexity(
        eval_fabric, module, val_windows, eval.batch_size, description=f"val {val_name}", progress=runtime.progress)
    eval_s = time.perf_counter() - eval_started
    reporter.log_metrics({"val/ppl": val_before}, step=0)

    train_started = time.perf_counter()
    if fit.federated:
        outcome = _fit_federated(fabric, module, fit, runtime, windows, val_windows, val_before, eval.batch_size,
                                 tokenizer, reporter,
                                 make_reducer(fabric, secure=fit.secure_aggregation, seed=seed,
                                              switch="fit.secure_aggregation"), seed, corpora)
    else:
        outcome = _fit_local(module, fit, runtime, windows, val_windows, val_before, eval.batch_size, reporter,
                             output.dir, seed)
    best_step = min(outcome["val_history"], key=lambda row: (row[1], row[0]))[0]
    if best_step != outcome["val_history"][-1][0]:
        _restore(net, outcome["best_state"], model)
    outcome.pop("best_state")
    module.apply_masks()
    train_s = time.perf_counter() - train_started

    eval_started = time.perf_counter()
    after = {name: evaluate_perplexity(eval_fabric, module, w, eval.batch_size, description=f"eval {name}",
                                       progress=runtime.progress) for name, w in eval_sets.items()}
    eval_s += time.perf_counter() - eval_started
    zeros = compare_zero_sets(zeros_before, zero_sets(net))
    digest = weights_digest(net)
    digests = [digest]
    if fabric.world_size > 1:
        mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int64)
        digests = [bytes(row.tolist()).hex() for row in fabric.all_gather(mine).reshape(fabric.world_size, -1)]
    n_trainable = sum(p.numel() for _, p in _trainable(net))
    results: dict[str, Any] = {
        "strategy": "federated-finetune" if fit.federated else "finetune",
        "model": model.name_or_path,
        "dtype": model.dtype,
        "seed": seed,
        "fit": asdict(fit),
        "eval": asdict(eval) | {"dtype": module.evaluation_dtype},
        "world_size": fabric.world_size,
        "perplexity_before": before,
        "perplexity": after,
        "val": {"dataset": val_name, "ppl_before": val_before, "best_step": best_step,
                "best_ppl": min(row[1] for row in outcome["val_history"]), "history": outcome["val_history"]},
        "steps": outcome["steps"],
        "train_windows": int(windows.shape[0]),
        "tokens_per_step": fit.batch_size * fit.accumulate_grad_batches * fit.seqlen
                           * (fit.num_clients if fit.federated else 1),
        "trainable_parameters": n_trainable,
        "masked_matrices": len(module.masks),
        "sparsity_before": sparsity_before,
        "sparsity": sparsity_report(net, sparsity_before["overall"]),
        "masks_preserved": zeros["identical"],
        "zero_set": zeros,
        "weights_sha256_per_rank": digests,
        "ranks_agree": len(set(digests)) == 1,
        "timings": {"load_s": load_s, "train_s": train_s, "eval_s": eval_s},
        "peak_rss_bytes": peak_rss_bytes(),
        **outcome.get("extra", {}),
    }
    if fabric.global_rank == 0:
        _finish(results, net, tokenizer, reporter, output, config_yaml, started, loaded.source)
    fabric.barrier()
    return results


# ---------------------------------------------------------------------------------------------
# Local mode: the Lightning Trainer


def _fit_local(module: CausalLMModule, cfg: FitConfig, runtime: RuntimeConfig, windows: torch.Tensor,
               val_windows: torch.Tensor, val_before: float, val_batch_size: int, reporter: RunReporter,
               output_dir: str, seed: int) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import Callback, LearningRateMonitor, RichProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    class BestWeights(Callback):
        """After every validation: remember the trainable weights if val/ppl is the best so far."""

        def __init__(self) -> None:
            self.history: list[list[float]] = [[0, val_before]]
            self.state: dict[str, torch.Tensor] | None = None  # None: the weights as loaded

        def on_validation_end(self, trainer: L.Trainer, pl_module: CausalLMModule) -> None:
            if trainer.sanity_checking or "val/ppl" not in trainer.callback_metrics:
                return
            ppl, step = float(trainer.callback_metrics["val/ppl"]), trainer.global_step
            if self.history[-1][0] == step:
                return
            if ppl < min(row[1] for row in self.history):
                self.state = _snapshot(pl_module.model)
            self.history.append([step, ppl])

    L.seed_everything(seed, verbose=False)
    best = BestWeights()
    logger = TensorBoardLogger(save_dir=output_dir, name="", version=reporter.logger.version, default_hp_metric=False)
    trainer = L.Trainer(
        accelerator=runtime.accelerator, devices=1, precision=cfg.precision, max_steps=cfg.max_steps, max_epochs=-1,
        accumulate_grad_batches=cfg.accumulate_grad_batches, gradient_clip_val=cfg.gradient_clip_val,
        val_check_interval=cfg.val_every * cfg.accumulate_grad_batches, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, logger=logger,
        callbacks=[best, LearningRateMonitor(logging_interval="step"),
                   *([RichProgressBar()] if runtime.progress else [])],
        enable_checkpointing=False, enable_progress_bar=runtime.progress, enable_model_summary=False,
        log_every_n_steps=min(10, cfg.val_every),
    )
    batch = min(cfg.batch_size, windows.shape[0])
    train_loader = torch.utils.data.DataLoader(windows, batch_size=batch, shuffle=True, drop_last=True,
                                               generator=torch.Generator().manual_seed(seed))
    val_loader = torch.utils.data.DataLoader(val_windows, batch_size=val_batch_size)
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    if best.history[-1][0] != trainer.global_step:
        trainer.validate(module, dataloaders=val_loader, verbose=False)
    logger.finalize("success")
    return {"steps": trainer.global_step, "val_history": best.history, "best_state": best.state}


# ---------------------------------------------------------------------------------------------
# Federated mode: FedAvg over Fabric collectives


def _autocast(precision: str, device: torch.device):
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def train_client(module: CausalLMModule, batches: BatchStream, steps: int, accumulate: int,
                 clip: float | None, precision: str, schedule_offset: int) -> list[float]:
    """``steps`` optimizer steps of one client with a fresh optimizer; returns the loss of every step."""
    module.schedule_offset = schedule_offset
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    device = next(module.parameters()).device
    params = module.trainable_parameters()
    module.train()
    losses = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(accumulate):
            with _autocast(precision, device):
                loss = module.training_step(batches.next().to(device), step * accumulate + micro)
            (loss / accumulate).backward()
            module.on_after_backward()  # masks the gradients
            total += float(loss.detach())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        module.apply_masks()
        scheduler.step()
        losses.append(total / accumulate)
    optimizer.zero_grad(set_to_none=True)
    module.eval()
    return losses


def _fit_federated(fabric: Fabric, module: CausalLMModule, cfg: FitConfig, runtime: RuntimeConfig,
                   windows: torch.Tensor, val_windows: torch.Tensor, val_before: float, val_batch_size: int,
                   tokenizer: Any, reporter: RunReporter, reducer: Reducer, seed: int,
                   corpora: Corpora) -> dict[str, Any]:
    net = module.model
    if cfg.precision == "bf16-true":
        net.to(torch.bfloat16)
    my_clients = clients_of_rank(cfg.num_clients, fabric.world_size, fabric.global_rank, key="fit.num_clients")
    data, sizes = client_windows(cfg, tokenizer, windows, my_clients, seed, corpora)
    streams = {c: BatchStream(data[c], cfg.batch_size, _mixed_seed(seed, "data", c)) for c in my_clients}
    params = dict(_trainable(net))

    history: list[list[float]] = [[0, val_before]]
    best_state: dict[str, torch.Tensor] | None = None
    round_loss: list[float] = []
    with reporter.blocks("federated fine-tuning rounds", cfg.rounds) as advance:
        for r in range(cfg.rounds):
            global_weights = [p.detach().clone() for p in params.values()] if len(my_clients) > 1 else None
            acc = WeightedSum()
            loss_sum = torch.zeros(2, dtype=torch.float64)
            for i, client in enumerate(my_clients):
                if i > 0:
                    with torch.no_grad():
                        for p, g in zip(params.values(), global_weights):
                            p.copy_(g)
                torch.manual_seed(_mixed_seed(seed, "dropout", r, client))
                losses = train_client(module, streams[client], cfg.local_steps, cfg.accumulate_grad_batches,
                                      cfg.gradient_clip_val, cfg.precision, r * cfg.local_steps)
                acc.add(params, sizes[client])
                loss_sum += torch.tensor([sum(losses) / len(losses), 1.0], dtype=torch.float64)
            del global_weights
            tag = f"round {r + 1}"
            average = weighted_average(reducer.sum(acc.tensors(), kind="fit_weights", tag=tag), params)
            del acc
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(average[name])
            del average
            module.apply_masks()
            loss_sum = reducer.sum({"loss": loss_sum}, kind="fit_losses", tag=tag)["loss"]
            ppl = evaluate_perplexity(fabric, module, val_windows, val_batch_size, progress=False)
            step = (r + 1) * cfg.local_steps
            if ppl < min(row[1] for row in history):
                best_state = _snapshot(net)
            history.append([step, ppl])
            round_loss.append(float(loss_sum[0] / loss_sum[1]))
            reporter.log_metrics({"val/ppl": ppl, "train/loss": round_loss[-1], "round": float(r + 1),
                                  "lr": cfg.lr * lr_factor(step - 1, module.total_steps, cfg.warmup_steps,
                                                           cfg.schedule)}, step=step)
            if advance is not None:
                advance(r, cfg.rounds)
    extra = {"federated": {"num_clients": cfg.num_clients, "rounds": cfg.rounds, "local_steps": cfg.local_steps,
                           "partition": cfg.partition, "client_windows": sizes, "train_loss_per_round": round_loss,
                           "bytes_per_client_per_round": sum(p.numel() * p.element_size() for p in params.values()),
                           "secure_aggregation": cfg.secure_aggregation,
                           "collectives": collective_report(reducer, fabric.global_rank)}}
    return {"steps": cfg.rounds * cfg.local_steps, "val_history": history, "best_state": best_state, "extra": extra}

