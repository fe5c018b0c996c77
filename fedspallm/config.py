"""Typed configuration: the user-facing contract (see DESIGN.md, "keep these names stable").

jsonargparse turns these dataclasses into ``--model.name_or_path``-style flags, YAML configs and
``--print_config``; their docstrings are what ``--help`` shows. jsonargparse checks the types
(``Literal`` choices included) while parsing; each dataclass checks its own values in
``__post_init__`` (so a config that exists is valid), and the rules between sections live in
:func:`check_prune` and :func:`check_fit`. Every rule is here, once, and raises a one-line
:class:`UserError` naming the key (both keys, when two contradict each other). Checks that need
files, the model or the launcher are :mod:`fedspallm.preflight`'s.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from fedspallm.errors import UserError

BUILTIN_DATASETS = ("default", "wikitext2", "ptb", "c4")
#: How windows are split over clients (calibration and federated fine-tuning alike).
Partition = Literal["iid", "topic", "dirichlet"]


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

    def __post_init__(self) -> None:
        name = self.name_or_path
        if not name:
            raise UserError("model.name_or_path is empty")
        looks_local = name.endswith(".gguf") or name.startswith((".", "/", "~")) or Path(name).exists()
        if looks_local and name != "default" and not Path(name).expanduser().exists():
            raise UserError(f"model.name_or_path={name!r}: no such file or directory")


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
    partition: Partition = "iid"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        check_dataset_name("data.calibration", self.calibration)
        if self.nsamples < 1:
            raise UserError(f"data.nsamples={self.nsamples}: need at least 1 calibration window")
        check_seqlen("data.seqlen", self.seqlen)
        check_positive("data.alpha", self.alpha)


@dataclass
class EvalConfig:
    """Perplexity evaluation.

    Args:
        datasets: any of "default", wikitext2, ptb, c4, or paths to .txt/.jsonl files.
        seqlen: tokens per evaluation window (non-overlapping, the remainder is dropped).
        max_windows: evaluate at most this many windows per dataset (null for all).
        batch_size: windows per forward pass.
        dtype: float32 or bfloat16: the dtype the model is evaluated in (its weights are cast for
            the evaluation only); null: the model's own dtype (model.dtype). results.json reports
            the dtype used: perplexities in different dtypes are not comparable.
    """

    datasets: list[str] = field(default_factory=lambda: ["default"])
    seqlen: int = 512
    max_windows: Optional[int] = 32
    batch_size: int = 4
    dtype: Optional[Literal["float32", "bfloat16"]] = None

    def __post_init__(self) -> None:
        if not self.datasets:
            raise UserError("eval.datasets is empty")
        for name in self.datasets:
            check_dataset_name("eval.datasets", name)
        check_seqlen("eval.seqlen", self.seqlen)
        check_at_least("eval.max_windows", self.max_windows, 1, nullable=True)
        check_at_least("eval.batch_size", self.batch_size, 1)


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
        targets: module-name patterns of the matrices to prune (empty: every linear projection and
            every expert matrix of the decoder blocks). A pattern is "re:<regex>" (matches the
            whole name), a glob with * or ?, or a plain suffix at a dot ("down_proj",
            "self_attn.q_proj"). Expert e of a fused experts parameter is named like
            "model.layers.3.mlp.experts.down_proj[5]" and also answers to the name without "[e]".
            MoE routers are never pruned. A pattern that matches nothing is an error.
        ignore: module-name patterns (same syntax) of matrices to leave dense.
        calibration_dtype: the dtype of the calibration forward passes: float32, bfloat16 (float16
            on CUDA only), or null: the model's own dtype. Statistics are accumulated in float32 from
            those activations, the solves run in float32 and the weights stay in the model's dtype.
            bfloat16 is not the default: it moved perplexity by more than 1% (README, "bf16 calibration").
    """

    method: Literal["sparsegpt", "wanda", "magnitude"] = "sparsegpt"
    sparsity: float = 0.7
    pattern: str = "unstructured"
    blocksize: int = 128
    percdamp: float = 0.01
    offload: bool = False
    targets: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    calibration_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None

    def __post_init__(self) -> None:
        if self.pattern != "unstructured":
            match = _PATTERN.match(self.pattern)
            if not match:
                raise UserError(f"pruning.pattern={self.pattern!r}: use 'unstructured' or 'N:M' such as 2:4")
            if not 0 < int(match.group(1)) < int(match.group(2)):
                raise UserError(f"pruning.pattern={self.pattern!r}: N:M needs 0 < N < M")
        if not (math.isfinite(self.sparsity) and 0 <= self.sparsity < 1):
            raise UserError(f"pruning.sparsity={self.sparsity}: must be in [0, 1)")
        check_at_least("pruning.blocksize", self.blocksize, 1)
        check_positive("pruning.percdamp", self.percdamp)

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
        secure_aggregation: sum every client-derived tensor across processes under pairwise-masked
            secure aggregation (X25519 keys, HKDF-SHA256, AES-CTR masks, fixed point with public
            bounds): a process sees no other process's updates or statistics, only their sums. Needs
            3 or more processes. See the README, "Secure aggregation", for the threat model.
        secure_bounds: the public fixed-point encodings per kind of sum, overriding the defaults:
            {kind: bound} or {kind: {bound, frac_bits, limbs}}, e.g. {weight_sum: 8192} or
            {weight_sum: {limbs: 2}}; kinds weight_sum, keep_count, contributors, votes, hessian,
            sq_norms. A value beyond its bound stops the run with one line (it is never clipped); a
            bound that could overflow for the process count is refused before launch. limbs 2 sends
            two words per value and makes the masked sum of float32 weights the plain one bit for bit
            (with one, weights below 2^-13 in magnitude round to 2^-36). fedstats encodes its
            statistics with the hessian / sq_norms entries in both modes.
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
    secure_aggregation: bool = False
    secure_bounds: Optional[dict[str, Union[float, dict[str, float]]]] = None

    def __post_init__(self) -> None:
        from fedspallm.federated.secure_aggregation import encodings
        from fedspallm.federated.strategies import STRATEGIES
        from fedspallm.federated.summed_statistics import check_statistic_encodings

        try:
            check_statistic_encodings(encodings(self.secure_bounds))
        except UserError as err:
            err.same_on_every_rank = True  # type: ignore[attr-defined]
            raise

        if self.strategy not in STRATEGIES:
            err = UserError(f"federation.strategy={self.strategy!r}: unknown strategy; registered: "
                            f"{', '.join(STRATEGIES)}")
            err.same_on_every_rank = True  # type: ignore[attr-defined]
            raise err
        check_at_least("federation.num_clients", self.num_clients, 1)
        check_at_least("federation.rounds", self.rounds, 1)
        if isinstance(self.budgets, list):
            if len(self.budgets) != self.num_clients:
                raise UserError(f"federation.budgets has {len(self.budgets)} values; need one per client "
                                f"(federation.num_clients={self.num_clients})")
            for r in self.budgets:
                if not 0 < r <= 1:
                    raise UserError(f"federation.budgets contains {r}: every budget must be in (0, 1]")
        if not 0 < self.budget <= 1:
            raise UserError(f"federation.budget={self.budget}: must be in (0, 1]")
        low, high = self.budget_range
        if not 0 < low <= high <= 1:
            raise UserError(f"federation.budget_range={list(self.budget_range)}: need 0 < low <= high <= 1")
        check_positive("federation.collective_timeout_s", self.collective_timeout_s)
        if self.fail_client is not None and not 0 <= self.fail_client < self.num_clients:
            raise UserError(f"federation.fail_client={self.fail_client}: must be a client id in "
                            f"0..{self.num_clients - 1} (federation.num_clients={self.num_clients}) or null")
        if self.standalone_clients is not None and not 1 <= self.standalone_clients <= self.num_clients:
            raise UserError(f"federation.standalone_clients={self.standalone_clients}: must be null or in "
                            f"1..{self.num_clients} (federation.num_clients={self.num_clients})")
        strategy = STRATEGIES[self.strategy]
        with_values = " or ".join(name for name, cls in STRATEGIES.items() if cls.uploads_values)
        if self.paired_aggregation is not None:
            primary = strategy.aggregation_rule(self)
            if not strategy.uploads_values:
                raise UserError(f"federation.paired_aggregation={self.paired_aggregation}: needs strategy "
                                f"{with_values}, not {self.strategy}")
            if self.paired_aggregation == primary:
                raise UserError(f"federation.paired_aggregation={self.paired_aggregation}: the run already aggregates "
                                f"with {primary}; pair it with the other rule")
            if (self.client_base == "global" and self.rounds > 1) or self.freeze_mask_after is not None:
                raise UserError(f"federation.paired_aggregation={self.paired_aggregation}: with client_base global or "
                                "refit rounds the clients' work depends on the aggregate; run the rules separately")
        if self.freeze_mask_after is not None:
            if not 1 <= self.freeze_mask_after < self.rounds:
                raise UserError(f"federation.freeze_mask_after={self.freeze_mask_after} with federation.rounds="
                                f"{self.rounds}: the mask freezes after 1..rounds-1 rounds, or never (null)")
            if not strategy.uploads_values:
                raise UserError(f"federation.freeze_mask_after={self.freeze_mask_after}: refitting weights needs "
                                f"uploaded values; federation.strategy={self.strategy} has none (use {with_values})")
        if not 1 <= self.fail_round <= self.rounds:
            raise UserError(f"federation.fail_round={self.fail_round} with federation.rounds={self.rounds}: "
                            f"must be in 1..{self.rounds}")


_FEDERATION_DOC = FederationConfig.__doc__ or ""


def document_strategies(text: str) -> None:
    """Fill the ``strategy`` line of FederationConfig's docstring (what ``--help`` shows) from the registry."""
    FederationConfig.__doc__ = _FEDERATION_DOC.replace("{strategies}", text)


@dataclass
class OutputDirConfig:
    """Where the run writes (``validate``/``test``; ``prune`` and ``fit`` take :class:`OutputConfig`).

    Args:
        dir: root of the run directories (version_N is created inside).
    """

    dir: str = "lightning_logs"

    def __post_init__(self) -> None:
        path = Path(self.dir)
        if path.exists() and not path.is_dir():
            raise UserError(f"output.dir={self.dir!r}: exists and is not a directory")


@dataclass
class OutputConfig(OutputDirConfig):
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

    save_model: bool = True
    save_compressed: bool = True
    checkpoint: bool = True
    resume: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resume is not None and not Path(self.resume).expanduser().exists():
            raise UserError(f"output.resume={self.resume!r}: no such run directory or checkpoint file")


_PATTERN = re.compile(r"^(\d+):(\d+)$")


def check_dataset_name(key: str, name: str) -> None:
    """A corpus name: a built-in one, or an existing .txt/.jsonl file."""
    if name in BUILTIN_DATASETS:
        return
    path = Path(name).expanduser()
    if path.suffix not in (".txt", ".jsonl"):
        raise UserError(
            f"{key}={name!r}: unknown dataset; use one of {', '.join(BUILTIN_DATASETS)} "
            "or a path to a .txt or .jsonl file"
        )
    if not path.is_file():
        raise UserError(f"{key}={name!r}: file not found")


def check_at_least(key: str, value: int | None, low: int, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if value is None or value < low:
        raise UserError(f"{key}={value}: must be >= {low}" + (" or null" if nullable else ""))


def check_positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{key}={value}: must be > 0")


def check_seqlen(key: str, value: int) -> None:
    if value <= 1:
        raise UserError(f"{key}={value}: must be > 1 (a window predicts its tokens from the ones before)")


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

    def __post_init__(self) -> None:
        if self.accelerator not in ("auto", "cpu", "cuda", "gpu", "mps"):
            raise UserError(f"runtime.accelerator={self.accelerator!r}: use auto, cpu, cuda, gpu or mps")
        check_at_least("runtime.devices", self.devices, 1)
        check_at_least("runtime.num_nodes", self.num_nodes, 1)
        check_at_least("runtime.batch_size", self.batch_size, 1)
        check_at_least("runtime.threads", self.threads, 0)


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
        secure_aggregation: federated mode: sum the clients' weighted weights across
            processes under secure aggregation, as federation.secure_aggregation does for prune
            (kind fit_weights, in two limbs: the plain fit's model bit for bit), and the clients' training
            losses (kind fit_losses). Needs fit.federated and 3 or more processes.
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
    partition: Partition = "iid"
    alpha: float = 0.5
    secure_aggregation: bool = False

    def __post_init__(self) -> None:
        from fedspallm.lit import parse_trainable

        check_dataset_name("fit.dataset", self.dataset)
        if self.val_dataset is not None:
            check_dataset_name("fit.val_dataset", self.val_dataset)
        check_seqlen("fit.seqlen", self.seqlen)
        for key in ("batch_size", "max_steps", "accumulate_grad_batches", "val_every", "num_clients", "rounds",
                    "local_steps"):
            check_at_least(f"fit.{key}", getattr(self, key), 1)
        check_at_least("fit.max_windows", self.max_windows, 1, nullable=True)
        check_at_least("fit.warmup_steps", self.warmup_steps, 0)
        check_positive("fit.lr", self.lr)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"fit.weight_decay={self.weight_decay}: must be >= 0")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise UserError(f"fit.momentum={self.momentum}: must be in [0, 1)")
        if self.gradient_clip_val is not None:
            check_positive("fit.gradient_clip_val", self.gradient_clip_val)
        check_positive("fit.alpha", self.alpha)
        if self.secure_aggregation and not self.federated:
            raise UserError("fit.secure_aggregation=true with fit.federated=false: local fine-tuning sums nothing "
                            "across processes; set fit.federated true or secure_aggregation false")
        parse_trainable(self.trainable)


# ---------------------------------------------------------------------------------------------
# Rules between sections


def check_prune(data: DataConfig, pruning: PruningConfig, federation: FederationConfig) -> None:
    """The rules between the sections of a ``prune`` config (each section checked its own keys)."""
    if federation.num_clients > data.nsamples:
        raise UserError(
            f"federation.num_clients={federation.num_clients}: more clients than calibration samples "
            f"(data.nsamples={data.nsamples}); every client needs at least one window"
        )
    if pruning.n_m != (0, 0) and not federation.expansion:
        raise UserError(f"pruning.pattern={pruning.pattern} with federation.expansion=false: only expansion makes "
                        f"an aggregate {pruning.pattern} (averaging keeps whatever any client kept); set "
                        "federation.expansion true or prune unstructured")


def check_fit(fit: FitConfig, eval: EvalConfig, output: OutputConfig) -> str:
    """The rules between the sections of a ``fit`` config; returns the validation corpus's name."""
    if output.resume is not None:
        raise UserError("output.resume: fit does not resume; start a new fit from the exported model instead")
    val_name = fit.val_dataset or (fit.dataset if fit.dataset in BUILTIN_DATASETS else eval.datasets[0])
    is_file = Path(fit.dataset).suffix in (".txt", ".jsonl")
    if is_file and Path(fit.dataset).expanduser().resolve() == Path(val_name).expanduser().resolve():
        raise UserError(f"fit.val_dataset={val_name!r} is the training file fit.dataset; a local file has no held-out "
                        "split, so pass a different file as fit.val_dataset (or first in eval.datasets)")
    return val_name
