"""Round checkpoints: the federation's state after a completed round, and resuming from it.

After every completed round of a multi-round run, ``federation.ckpt`` in the run directory holds
what the next round needs and nothing that can be recomputed: the pooled sums (Σ M⊙W in float64,
keep counts, contributor counts), the global weights and masks so far, the round logs (each with
every client's upload bytes and local time), the RNG states and the round index. It is written with ``fabric.save`` to a temporary name
and renamed, so a crash mid-write leaves the previous checkpoint intact.

Resuming (``output.resume``) loads it before any model is loaded, checks that the settings that
shape the result are those of the checkpointed run (only ``federation.rounds`` may grow), and
continues at the next round. Because the sums are exact float64 accumulations and everything else
is a deterministic function of them and the seed, the final model is bitwise identical to an
uninterrupted run (at the same torch threads per process; see README, "Determinism").
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedspallm.config import DataConfig, FederationConfig, ModelConfig, PruningConfig
from fedspallm.errors import UserError
from fedspallm.federated.aggregation import Contribution
from fedspallm.federated.driver import StepLog
from fedspallm.federated.rounds import FederationOutcome

CHECKPOINT_NAME = "federation.ckpt"
FORMAT = 2  # 2: upload bytes and client times live in the round logs
# Keys that do not change the pruned model: how long to wait and which faults to inject.
_NEUTRAL = {"collective_timeout_s", "on_client_failure", "fail_client", "fail_round", "fail_mode", "rounds"}


def fingerprint(seed: int, model: ModelConfig, data: DataConfig, pruning: PruningConfig,
                federation: FederationConfig) -> dict[str, Any]:
    """Every setting that shapes the pruned model, flattened to ``section.key`` -> value."""
    sections = {"model": asdict(model), "data": asdict(data), "pruning": asdict(pruning),
                "federation": {k: v for k, v in asdict(federation).items() if k not in _NEUTRAL}}
    flat: dict[str, Any] = {"seed": seed}
    for section, values in sections.items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def capture_rng() -> dict[str, Any]:
    state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (state[0], torch.from_numpy(state[1].copy()), *state[2:])}


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuples(rng["python"]))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def checkpoint_state(outcome: FederationOutcome, fingerprint_: dict[str, Any], rounds: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "completed_rounds": outcome.completed_rounds,
        "rounds": rounds,
        "fingerprint": fingerprint_,
        "pooled": {name: {"weight_sum": c.weight_sum, "keep_count": c.keep_count, "contributors": c.contributors}
                   for name, c in outcome.pooled.items()},
        "global_weights": outcome.global_weights,
        "masks": dict(outcome.masks),
        "uncovered": outcome.uncovered,
        "round_logs": [asdict(log) for log in outcome.rounds],
        "rng": capture_rng(),
    }


def save_checkpoint(fabric: Any, run_dir: Path | None, state: dict[str, Any]) -> Path | None:
    """Collective (``fabric.save`` has a barrier); rank 0 writes ``run_dir/federation.ckpt`` atomically."""
    target = Path(run_dir) / CHECKPOINT_NAME if run_dir is not None else None
    tmp = target.with_name(f".{CHECKPOINT_NAME}.tmp") if target is not None else None
    fabric.save(tmp, state)
    if fabric.global_rank == 0 and target is not None:
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    return target


def checkpoint_path(resume: str) -> Path:
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
        if not path.is_file():
            raise UserError(f"output.resume={resume!r}: the directory has no {CHECKPOINT_NAME} (checkpoints are "
                            "written after every round of a run with federation.rounds > 1)")
    return path


def load_checkpoint(resume: str, expected: dict[str, Any], rounds: int) -> dict[str, Any]:
    """The checkpoint of ``output.resume``, checked against this run's settings (one-line errors)."""
    path = checkpoint_path(resume)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated or foreign files raise many types
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"output.resume={resume!r}: {path.name} is not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"output.resume={resume!r}: {path.name} is not a fedspallm round checkpoint "
                        f"(format {FORMAT})")
    saved = state["fingerprint"]
    changed = [key for key in sorted(set(saved) | set(expected)) if saved.get(key) != expected.get(key)]
    if changed:
        key = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise UserError(f"output.resume={resume!r}: {key}={expected.get(key)!r} differs from the checkpointed run's "
                        f"{saved.get(key)!r}{more}; resume with the same settings")
    if state["completed_rounds"] > rounds:
        raise UserError(f"federation.rounds={rounds}: the checkpoint in {resume!r} has completed "
                        f"{state['completed_rounds']} rounds already; use at least that many")
    return state


def outcome_from_checkpoint(state: dict[str, Any]) -> FederationOutcome:
    pooled = {name: Contribution(p["weight_sum"], p["keep_count"], int(p["contributors"]))
              for name, p in state["pooled"].items()}
    keys = [f.name for f in fields(StepLog)]
    logs = [StepLog(**{key: log[key] for key in keys}) for log in state["round_logs"]]
    return FederationOutcome(global_weights=dict(state["global_weights"]), masks=dict(state["masks"]), rounds=logs,
                             uncovered=list(state["uncovered"]), pooled=pooled,
                             completed_rounds=int(state["completed_rounds"]))


def start_from(state: dict[str, Any] | None) -> FederationOutcome | None:
    """The outcome to resume from (None for a fresh run), round logs included. Restores the RNG states."""
    if state is None:
        return None
    restore_rng(state["rng"])
    return outcome_from_checkpoint(state)


class RoundCheckpointer:
    """``after_round(t, outcome)`` saves the state after round t; a no-op unless checkpointing is on."""

    def __init__(self, fabric: Any, run_dir: Path | None, fingerprint_: dict[str, Any], rounds: int,
                 enabled: bool) -> None:
        self.fabric, self.run_dir, self.fingerprint, self.rounds = fabric, run_dir, fingerprint_, rounds
        self.enabled = enabled and rounds > 1
        self.path: Path | None = None

    def after_round(self, t: int, outcome: FederationOutcome) -> None:
        if self.enabled:
            self.path = save_checkpoint(self.fabric, self.run_dir, checkpoint_state(outcome, self.fingerprint,
                                                                                    self.rounds))
