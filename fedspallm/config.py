"""Typed configuration: the user-facing contract (see DESIGN.md, "keep these names stable").

jsonargparse turns these dataclasses into ``--model.name_or_path``-style flags, YAML configs and
``--print_config``; their docstrings are what ``--help`` shows. ``validate()`` checks every value
before any model is loaded and raises a one-line :class:`UserError` naming the key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from fedspallm.errors import UserError

BUILTIN_DATASETS = ("default", "wikitext2", "ptb", "c4")


@dataclass
class ModelConfig:
    """The causal LM.

    Args:
        name_or_path: "default" (embedded SmolLM2-135M-Instruct), a hub id, a local Hugging Face
            directory, or a .gguf file.
        dtype: dtype of the weights. Statistics are always accumulated in float32.
        revision: hub revision, for hub ids.
        trust_remote_code: passed to transformers for hub models with custom code.
    """

    name_or_path: str = "default"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: Optional[str] = None
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Calibration data.

    Args:
        calibration: "default" (embedded Wikipedia leads, train split), wikitext2, c4, ptb, or a
            path to a .txt or .jsonl file.
        nsamples: total number of calibration windows, over all clients.
        seqlen: tokens per calibration window.
        partition: how windows are split across clients: iid, topic (non-IID by the embedded
            corpus's topics) or dirichlet (over topics, with concentration alpha).
        alpha: Dirichlet concentration for partition=dirichlet; smaller is more skewed.
    """

    calibration: str = "default"
    nsamples: int = 32
    seqlen: int = 512
    partition: Literal["iid", "topic", "dirichlet"] = "iid"
    alpha: float = 0.5


@dataclass
class EvalConfig:
    """Perplexity evaluation.

    Args:
        datasets: any of "default", wikitext2, ptb, c4, or paths to .txt/.jsonl files.
        seqlen: tokens per evaluation window (non-overlapping, the remainder is dropped).
        max_windows: evaluate at most this many windows per dataset (null for all).
        batch_size: windows per forward pass.
    """

    datasets: list[str] = field(default_factory=lambda: ["default"])
    seqlen: int = 512
    max_windows: Optional[int] = 32
    batch_size: int = 4


@dataclass
class PruningConfig:
    """The local pruner.

    Args:
        method: sparsegpt, wanda or magnitude.
        sparsity: target fraction of zeros per pruned matrix, in [0, 1). Ignored for N:M patterns
            (their sparsity is N/M).
        pattern: "unstructured" or "N:M" (for example 2:4, 4:8): prune N of every M consecutive
            input weights.
        blocksize: SparseGPT column block size.
        percdamp: SparseGPT dampening, as a fraction of mean(diag H).
        offload: keep the model on the CPU and move one block at a time to the accelerator.
    """

    method: Literal["sparsegpt", "wanda", "magnitude"] = "sparsegpt"
    sparsity: float = 0.7
    pattern: str = "unstructured"
    blocksize: int = 128
    percdamp: float = 0.01
    offload: bool = False

    @property
    def n_m(self) -> tuple[int, int]:
        """(N, M) for N:M patterns, (0, 0) for unstructured."""
        if self.pattern == "unstructured":
            return (0, 0)
        n, m = (int(x) for x in self.pattern.split(":"))
        return (n, m)

    @property
    def target_sparsity(self) -> float:
        n, m = self.n_m
        return n / m if m else self.sparsity


@dataclass
class FederationConfig:
    """The federation.

    Args:
        strategy: {strategies}
        num_clients: number of clients K. Processes each simulate K / world_size of them.
        rounds: number of rounds T.
        budgets: resource fraction r_i per client: a list of K values in (0, 1], "uniform" (every
            client gets ``budget``) or "linear" (evenly spread over ``budget_range``).
        budget: r for budgets=uniform.
        budget_range: [low, high] for budgets=linear.
        sampling: how each round's blocks are drawn: systematic (unbiased, covers every block when
            sum k_i >= L), uniform (independent draws) or all (every client prunes every block).
        aggregation: l0 (average only the non-zeros) or fedavg (average including zeros).
        expansion: expand the aggregated mask to the exact target sparsity.
        client_base: dense (the blocks a client does not sample are its cached dense ones; all
            rounds are pooled) or global (they are the current global model's; each round replaces
            the blocks it covers). Either way a sampled block is pruned from the dense cache (an
            already pruned matrix would only find its own zeros again) and feeds the next block.
        freeze_mask_after: null (the paper's method) or a round count F < rounds: rounds after the
            first F keep the global mask fixed and refit the kept weights. Every client starts from
            the global model, re-runs SparseGPT's update on its sampled blocks from the dense cache
            with the global mask given, and uploads only the kept values; the server averages them.
            Clients then disagree only on values, not on which weights exist. Not for mask_vote.
        uncovered: what to do with blocks no client pruned: error, magnitude (server prunes them by
            magnitude) or dense (left dense; the shortfall is reported).
        paired_aggregation: null, l0 or fedavg: also aggregate the same client uploads with this rule
            and evaluate that model too (results.json ``paired``): a comparison of aggregation rules on
            identical client work, at no extra client cost. The exported model is the primary one.
            Needs a round-based strategy whose clients' work does not depend on the aggregate:
            fedspallm or fedavg, client_base dense (or 1 round) and no refit rounds.
        standalone_clients: standalone only: prune and evaluate this many clients, drawn with the
            seed, instead of all K (their mean, min and max are reported). With many clients each
            standalone model costs a whole prune and evaluation; null evaluates every client.
        collective_timeout_s: a collective that waits longer than this fails the run (a dead or
            hung client never hangs the others forever). A process that dies is noticed at once on
            CPU (gloo closes the connection); a hung one after this many seconds. The run then
            stops with one line naming the clients and the round.
        on_client_failure: what a failed client does to the run. Only "stop" is offered: the
            processes share one gloo/NCCL process group, and such a group cannot shrink after a
            member dies or hangs; every survivor's next collective fails and the group would have
            to be re-initialised by every process (an elastic restart). Resume from the last round
            checkpoint instead (output.resume).
        fail_client: fault injection, for tests: this client's process dies (or hangs) in round
            fail_round, after pruning its first block. null (the default) injects nothing.
        fail_round: the round (1-based) in which fail_client fails.
        fail_mode: exit (the process dies at once, as in a crash) or hang (it stops making progress).
    """

    strategy: str = "fedspallm"
    num_clients: int = 4
    rounds: int = 1
    budgets: Union[list[float], Literal["uniform", "linear"]] = "uniform"
    budget: float = 0.5
    budget_range: tuple[float, float] = (0.25, 1.0)
    sampling: Literal["systematic", "uniform", "all"] = "systematic"
    aggregation: Literal["l0", "fedavg"] = "l0"
    expansion: bool = True
    client_base: Literal["dense", "global"] = "dense"
    freeze_mask_after: Optional[int] = None
    uncovered: Literal["error", "magnitude", "dense"] = "error"
    paired_aggregation: Optional[Literal["l0", "fedavg"]] = None
    standalone_clients: Optional[int] = None
    collective_timeout_s: float = 600.0
    on_client_failure: Literal["stop"] = "stop"
    fail_client: Optional[int] = None
    fail_round: int = 1
    fail_mode: Literal["exit", "hang"] = "exit"

    def __post_init__(self) -> None:
        from fedspallm.federated.strategies import STRATEGIES

        if self.strategy not in STRATEGIES:
            err = UserError(f"federation.strategy={self.strategy!r}: unknown strategy; registered: "
                            f"{', '.join(STRATEGIES)}")
            err.same_on_every_rank = True  # type: ignore[attr-defined]
            raise err


_FEDERATION_DOC = FederationConfig.__doc__ or ""


def document_strategies(text: str) -> None:
    """Fill the ``strategy`` line of FederationConfig's docstring (what ``--help`` shows) from the registry."""
    FederationConfig.__doc__ = _FEDERATION_DOC.replace("{strategies}", text)


@dataclass
class OutputConfig:
    """Outputs.

    Args:
        dir: root of the run directories (version_N is created inside).
        save_model: export the pruned model as a Hugging Face checkpoint (safetensors).
        save_compressed: also export a bitmask + kept-values safetensors file.
        checkpoint: in runs of more than one round, write the federation's state after every
            completed round (``federation.ckpt`` in the run directory, atomically).
        resume: a run directory (or its federation.ckpt) to continue from its last completed round.
            The settings that shape the model must be those of that run (rounds may grow); the
            result is bitwise identical to an uninterrupted run. The resumed run writes a new run
            directory.
    """

    dir: str = "lightning_logs"
    save_model: bool = True
    save_compressed: bool = True
    checkpoint: bool = True
    resume: Optional[str] = None


_PATTERN = re.compile(r"^(\d+):(\d+)$")


def _is_path_like(name: str) -> bool:
    return name not in BUILTIN_DATASETS


def validate_dataset_name(key: str, name: str) -> None:
    if name in BUILTIN_DATASETS:
        return
    path = Path(name)
    if path.suffix not in (".txt", ".jsonl", ".json"):
        raise UserError(
            f"{key}={name!r}: unknown dataset; use one of {', '.join(BUILTIN_DATASETS)} "
            "or a path to a .txt or .jsonl file"
        )
    if not path.is_file():
        raise UserError(f"{key}={name!r}: file not found")


def validate_pruning(cfg: PruningConfig) -> None:
    if cfg.pattern != "unstructured":
        match = _PATTERN.match(cfg.pattern)
        if not match:
            raise UserError(f"pruning.pattern={cfg.pattern!r}: use 'unstructured' or 'N:M' such as 2:4")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise UserError(f"pruning.pattern={cfg.pattern!r}: N:M needs 0 < N < M")
    if not (isinstance(cfg.sparsity, (int, float)) and math.isfinite(cfg.sparsity) and 0 <= cfg.sparsity < 1):
        raise UserError(f"pruning.sparsity={cfg.sparsity}: must be in [0, 1)")
    if cfg.blocksize < 1:
        raise UserError(f"pruning.blocksize={cfg.blocksize}: must be >= 1")
    if not (math.isfinite(cfg.percdamp) and cfg.percdamp > 0):
        raise UserError(f"pruning.percdamp={cfg.percdamp}: must be > 0")


def validate_model(cfg: ModelConfig) -> None:
    name = cfg.name_or_path
    if not name:
        raise UserError("model.name_or_path is empty")
    looks_local = name.endswith(".gguf") or name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and name != "default" and not Path(name).expanduser().exists():
        raise UserError(f"model.name_or_path={name!r}: no such file or directory")


def validate_data(cfg: DataConfig) -> None:
    validate_dataset_name("data.calibration", cfg.calibration)
    if cfg.nsamples < 1:
        raise UserError(f"data.nsamples={cfg.nsamples}: need at least 1 calibration window")
    if cfg.seqlen <= 1:
        raise UserError(f"data.seqlen={cfg.seqlen}: must be > 1")
    if not (math.isfinite(cfg.alpha) and cfg.alpha > 0):
        raise UserError(f"data.alpha={cfg.alpha}: must be > 0")


def validate_eval(cfg: EvalConfig) -> None:
    if not cfg.datasets:
        raise UserError("eval.datasets is empty")
    for name in cfg.datasets:
        validate_dataset_name("eval.datasets", name)
    if cfg.seqlen <= 1:
        raise UserError(f"eval.seqlen={cfg.seqlen}: must be > 1")
    if cfg.max_windows is not None and cfg.max_windows < 1:
        raise UserError(f"eval.max_windows={cfg.max_windows}: must be >= 1 or null")
    if cfg.batch_size < 1:
        raise UserError(f"eval.batch_size={cfg.batch_size}: must be >= 1")


def validate_federation(cfg: FederationConfig, data: DataConfig) -> None:
    if cfg.num_clients < 1:
        raise UserError(f"federation.num_clients={cfg.num_clients}: must be >= 1")
    if cfg.num_clients > data.nsamples:
        raise UserError(
            f"federation.num_clients={cfg.num_clients}: more clients than calibration samples "
            f"(data.nsamples={data.nsamples}); every client needs at least one window"
        )
    if cfg.rounds < 1:
        raise UserError(f"federation.rounds={cfg.rounds}: must be >= 1")
    if isinstance(cfg.budgets, list):
        if len(cfg.budgets) != cfg.num_clients:
            raise UserError(
                f"federation.budgets has {len(cfg.budgets)} values; need one per client "
                f"(federation.num_clients={cfg.num_clients})"
            )
        for r in cfg.budgets:
            if not (isinstance(r, (int, float)) and 0 < r <= 1):
                raise UserError(f"federation.budgets contains {r}: every budget must be in (0, 1]")
    if not 0 < cfg.budget <= 1:
        raise UserError(f"federation.budget={cfg.budget}: must be in (0, 1]")
    low, high = cfg.budget_range
    if not 0 < low <= high <= 1:
        raise UserError(f"federation.budget_range={list(cfg.budget_range)}: need 0 < low <= high <= 1")
    if not (math.isfinite(cfg.collective_timeout_s) and cfg.collective_timeout_s > 0):
        raise UserError(f"federation.collective_timeout_s={cfg.collective_timeout_s}: must be > 0")
    if cfg.fail_client is not None and not 0 <= cfg.fail_client < cfg.num_clients:
        raise UserError(
            f"federation.fail_client={cfg.fail_client}: must be a client id in 0..{cfg.num_clients - 1} or null"
        )
    if cfg.standalone_clients is not None and not 1 <= cfg.standalone_clients <= cfg.num_clients:
        raise UserError(f"federation.standalone_clients={cfg.standalone_clients}: must be null or in "
                        f"1..{cfg.num_clients} (federation.num_clients)")
    if cfg.paired_aggregation is not None:
        primary = "fedavg" if cfg.strategy == "fedavg" else cfg.aggregation
        if cfg.strategy not in ("fedspallm", "fedavg"):
            raise UserError(f"federation.paired_aggregation={cfg.paired_aggregation}: needs strategy fedspallm or "
                            f"fedavg, not {cfg.strategy}")
        if cfg.paired_aggregation == primary:
            raise UserError(f"federation.paired_aggregation={cfg.paired_aggregation}: the run already aggregates "
                            f"with {primary}; pair it with the other rule")
        if (cfg.client_base == "global" and cfg.rounds > 1) or cfg.freeze_mask_after is not None:
            raise UserError(f"federation.paired_aggregation={cfg.paired_aggregation}: with client_base global or "
                            "refit rounds the clients' work depends on the aggregate; run the rules separately")
    if cfg.freeze_mask_after is not None:
        if not 1 <= cfg.freeze_mask_after < cfg.rounds:
            raise UserError(f"federation.freeze_mask_after={cfg.freeze_mask_after}: must be null or in "
                            f"1..{cfg.rounds - 1} (fewer than federation.rounds={cfg.rounds})")
        if cfg.strategy not in ("fedspallm", "fedavg"):
            raise UserError(f"federation.freeze_mask_after={cfg.freeze_mask_after}: refitting weights needs "
                            f"uploaded values; federation.strategy={cfg.strategy} has none (use fedspallm or fedavg)")
    if not 1 <= cfg.fail_round <= cfg.rounds:
        raise UserError(f"federation.fail_round={cfg.fail_round}: must be in 1..{cfg.rounds} (federation.rounds)")


def validate_output(cfg: OutputConfig) -> None:
    path = Path(cfg.dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"output.dir={cfg.dir!r}: exists and is not a directory")
    if cfg.resume is not None and not Path(cfg.resume).expanduser().exists():
        raise UserError(f"output.resume={cfg.resume!r}: no such run directory or checkpoint file")


@dataclass
class RuntimeConfig:
    """Where and how the run executes. Under ``fabric run`` the launcher's --accelerator/--devices/--num-nodes win.

    Args:
        accelerator: auto, cpu, cuda, mps.
        devices: processes (one per device) when started with ``python``/``fedspallm``; clients are spread over them.
        num_nodes: nodes, for multi-node launches.
        batch_size: calibration windows per forward pass.
        progress: show progress bars (rank 0 only).
        threads: torch threads per process; 0 = CPU cores divided by local processes. Results are
            bitwise identical across process layouts only at the same threads per process (BLAS
            reductions depend on it); pin it (e.g. 1) to compare layouts.
    """

    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    batch_size: int = 8
    progress: bool = True
    threads: int = 0


def validate_runtime(cfg: RuntimeConfig) -> None:
    if cfg.accelerator not in ("auto", "cpu", "cuda", "gpu", "mps"):
        raise UserError(f"runtime.accelerator={cfg.accelerator!r}: use auto, cpu, cuda, gpu or mps")
    if cfg.devices < 1:
        raise UserError(f"runtime.devices={cfg.devices}: must be >= 1")
    if cfg.num_nodes < 1:
        raise UserError(f"runtime.num_nodes={cfg.num_nodes}: must be >= 1")
    if cfg.batch_size < 1:
        raise UserError(f"runtime.batch_size={cfg.batch_size}: must be >= 1")
    if cfg.threads < 0:
        raise UserError(f"runtime.threads={cfg.threads}: must be >= 0")


@dataclass
class FitConfig:
    """Sparse fine-tuning (``fedspallm fit``): the zeros of the loaded model stay zeros, bit for bit.

    Args:
        dataset: training corpus (its train split): "default" (embedded Wikipedia leads), wikitext2,
            ptb, c4, or a .txt/.jsonl file. It is cut into non-overlapping windows of ``seqlen`` tokens.
        val_dataset: held-out corpus whose test split gives the validation perplexity that picks the
            best checkpoint (null: the test split of ``dataset`` when it is default, wikitext2, ptb or
            c4; else the first of eval.datasets). A .txt/.jsonl file has no separate test split: pass
            a different file than ``dataset``.
        seqlen: tokens per training window.
        max_windows: train on at most this many windows (a seeded random subset; null for all).
        batch_size: windows per micro-batch.
        accumulate_grad_batches: micro-batches per optimizer step.
        max_steps: optimizer steps (local mode). In federated mode the steps are rounds * local_steps.
        optimizer: adamw or sgd.
        lr: peak learning rate.
        weight_decay: decoupled weight decay (adamw) or L2 penalty (sgd). Zeros stay zeros either way.
        momentum: sgd momentum.
        schedule: learning-rate schedule after warmup: constant, cosine (to 0) or linear (to 0).
        warmup_steps: linear warmup from 0 over this many optimizer steps.
        gradient_clip_val: clip the gradient norm to this value (null: no clipping).
        precision: 32-true, bf16-mixed (float32 weights, bfloat16 autocast) or bf16-true (bfloat16
            weights).
        trainable: which parameters train; the rest are frozen (no gradients, no optimizer state):
            "all", "last_n_blocks:N" (the last N decoder blocks) or "norms_and_biases" (every 1-D
            parameter: norm weights and biases).
        val_every: validate every this many optimizer steps (local mode), and always at the end.
        federated: federated sparse fine-tuning: every client trains its own partition for
            ``local_steps`` steps, then the server averages the weights (FedAvg, weighted by each
            client's number of windows), for ``rounds`` rounds. Clients are spread over the processes
            (``fabric run --devices K`` or ``--runtime.devices K``); only weights cross processes.
        num_clients: number of clients (federated mode).
        rounds: number of federated rounds.
        local_steps: optimizer steps each client takes per round.
        partition: how training windows are split across clients: iid (an even split of the
            shuffled windows), topic or dirichlet (as for calibration, see data.partition).
        alpha: Dirichlet concentration for partition=dirichlet.
    """

    dataset: str = "default"
    val_dataset: Optional[str] = None
    seqlen: int = 256
    max_windows: Optional[int] = None
    batch_size: int = 4
    accumulate_grad_batches: int = 1
    max_steps: int = 200
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 10
    gradient_clip_val: Optional[float] = 1.0
    precision: Literal["32-true", "bf16-mixed", "bf16-true"] = "32-true"
    trainable: str = "all"
    val_every: int = 50
    federated: bool = False
    num_clients: int = 2
    rounds: int = 5
    local_steps: int = 20
    partition: Literal["iid", "topic", "dirichlet"] = "iid"
    alpha: float = 0.5
