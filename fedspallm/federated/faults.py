"""Client faults: a dead or hung process stops the run within a bound, and the message names who and when.

Collectives say *that* a peer failed, never *which*: on CPU, gloo raises "connection closed" on
every survivor as soon as a peer process dies, and a timeout after
``federation.collective_timeout_s`` when a peer hangs. So every rank leaves marks in the run's
key-value store (the default ``TCPStore`` of ``torch.distributed``, which the launcher or rank 0
hosts): once its host and pid, then per round "started" and "reached the aggregation". When a round
fails, each survivor reads the marks with a short timeout and names the ranks that never arrived,
what became of them (exited: the pid is gone; failed: it recorded its error; alive but absent:
hung or too slow) and the clients they hold. The first survivor to claim the report prints it;
the others exit quietly.

Under ``fabric run`` (torchrun) the launcher sends SIGTERM to the survivors as soon as one process
exits; the watch turns that signal into the same diagnosis, so the line is printed even by a
survivor that was still pruning. With ``python fedspallm/main.py --runtime.devices N``, Lightning's
own launcher SIGKILLs every process within 5 s of a child's death; a survivor that is not yet
waiting in the collective then dies without a message (the exit is still bounded).

Why ``on_client_failure: skip`` is not offered: every process belongs to one gloo/NCCL process
group, and a group cannot shrink after a member dies or hangs. The survivors' next collective fails,
and continuing would mean re-initialising the group in every process (an elastic restart). Resume
from the last round checkpoint instead (``output.resume``).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from fedspallm.errors import UserError

STORE_TIMEOUT_S = 5.0  # store reads during a diagnosis; the store may be gone with its host


class ClientFailure(UserError):
    """A client (its process) failed mid-round. ``quiet``: another process reports it."""

    def __init__(self, message: str, exit_code: int = 1, quiet: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.quiet = quiet


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (the launcher stops the survivors when a process dies)."""


def clients_text(clients: list[int]) -> str:
    return f"client {clients[0]}" if len(clients) == 1 else "clients " + ", ".join(str(c) for c in clients)


def process_state(host: str, pid: int) -> str:
    """'alive', 'gone' or 'unknown' (another host) for a process."""
    if host != socket.gethostname():
        return "unknown"
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        return "gone" if state in ("Z", "X") else "alive"
    except FileNotFoundError:
        return "gone"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            pass
        return "alive"


def inject_fault(mode: str, client: int, round_index: int) -> None:
    """Fault injection for tests: die at once (no clean-up, as in a crash) or stop making progress."""
    print(f"fedspallm: injected fault: client {client} {'exits' if mode == 'exit' else 'hangs'} in round "
          f"{round_index + 1}", file=sys.stderr, flush=True)
    if mode == "exit":
        sys.stdout.flush()
        os._exit(1)
    while True:
        time.sleep(0.5)


class FaultInjection:
    """A test feature, installed by the driver around the client work (``federation.fail_client``).

    Client ``client`` dies (``exit``) or stops making progress (``hang``) in round ``round_index``
    (1-based), after pruning its first block: mid-round, with its peers at work or waiting.
    """

    def __init__(self, client: int, round_index: int, mode: str) -> None:
        self.client, self.round_index, self.mode = client, round_index, mode

    @classmethod
    def from_config(cls, federation: Any) -> FaultInjection | None:
        if federation.fail_client is None:
            return None
        return cls(federation.fail_client, federation.fail_round, federation.fail_mode)

    def wrap(self, client_update: Callable[[Any, int, Any], int]) -> Callable[[Any, int, Any], int]:
        def update(step: Any, client: int, on_block: Callable[[int, int], None] | None) -> int:
            if client != self.client or step.index + 1 != self.round_index:
                return client_update(step, client, on_block)

            def failing(index: int, total: int) -> None:
                if on_block is not None:
                    on_block(index, total)
                inject_fault(self.mode, client, step.index)

            return client_update(step, client, failing)

        return update


class RoundWatch:
    """Marks progress in the store and turns a failed round into one :class:`ClientFailure`.

    Use as a context manager around the rounds: inside it SIGTERM raises :class:`Terminated`.
    ``store`` is None in a single process (no peers, nothing to mark).
    """

    def __init__(self, rank: int, world_size: int, num_clients: int, rounds: int, timeout_s: float,
                 store: Any = None) -> None:
        from fedspallm.federated.rounds import clients_of_rank

        self.rank, self.world_size, self.rounds, self.timeout_s = rank, world_size, rounds, timeout_s
        self.clients = {r: clients_of_rank(num_clients, world_size, r) for r in range(world_size)}
        self.store = store
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"fedspallm/{restart}"
        self._previous_handler: Any = None
        self._store_gone = False
        self._failed = False
        self._round = 0
        self._procs: dict[int, tuple[str, int]] = {}  # rank -> (host, pid), read before anything fails
        self._set(f"proc/{rank}", f"{socket.gethostname()}:{os.getpid()}")

    @classmethod
    def for_fabric(cls, fabric: Any, num_clients: int, rounds: int, timeout_s: float) -> RoundWatch:
        store = None
        if fabric.world_size > 1:
            from torch.distributed import distributed_c10d

            store = distributed_c10d._get_default_store()
        return cls(fabric.global_rank, fabric.world_size, num_clients, rounds, timeout_s, store)

    # -- marks -------------------------------------------------------------------------------

    def _set(self, key: str, value: str) -> None:
        if self.store is not None:
            self.store.set(f"{self.prefix}/{key}", value)

    def started(self, t: int) -> None:
        self._round = t
        self._set(f"round{t}/started/{self.rank}", "1")

    def arrived(self, t: int) -> None:
        """Call just before the round's first collective."""
        self._set(f"round{t}/arrived/{self.rank}", "1")
        if self.store is not None and 0 not in self._procs and self.rank != 0:
            key = f"{self.prefix}/proc/0"
            if self.store.check([key]):
                host, _, pid = self.store.get(key).decode().rpartition(":")
                self._procs[0] = (host, int(pid))

    def _store_host_gone(self) -> bool:
        """Without torchrun's agent, rank 0 hosts the store: if its process is gone, so is the store."""
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true" or 0 not in self._procs:
            return False
        return process_state(*self._procs[0]) == "gone"

    def record_failure(self, t: int, client: int | None, err: BaseException) -> str:
        who = f"{clients_text([client])} (rank {self.rank})" if client is not None else f"rank {self.rank}"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if not isinstance(err, UserError):
            reason = f"{type(err).__name__}: {reason}"
        message = f"round {t + 1}/{self.rounds} failed: {who} failed: {reason}"
        try:
            self._set(f"failed/{self.rank}", message)
        except Exception:  # noqa: BLE001 - the store may be gone; the message still goes out locally
            pass
        return message

    # -- SIGTERM -----------------------------------------------------------------------------

    def __enter__(self) -> RoundWatch:
        if self.world_size > 1 and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
        return self

    def __exit__(self, exc_type: type | None, *exc: Any) -> None:
        if exc_type is Terminated:  # between two rounds
            raise self._failure(self._round, "this process was stopped (SIGTERM)", timed_out=False) from None
        # After a failure SIGTERM stays ignored: the process is on its way out and must print first.
        if self._previous_handler is not None and not self._failed:
            signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None

    def _ignore_sigterm(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self._failed = True

    # -- a round -----------------------------------------------------------------------------

    @contextmanager
    def client(self, t: int, client: int) -> Iterator[None]:
        """Local work of one client: an error names the client and the round, and is recorded for the others."""
        try:
            yield
        except (ClientFailure, Terminated):
            raise
        except UserError as err:
            self._ignore_sigterm()
            message = self.record_failure(t, client, err)
            raise ClientFailure(message, exit_code=2, quiet=not self._claim_report()) from None
        except Exception as err:
            self.record_failure(t, client, err)
            raise  # a bug: keep its traceback

    @contextmanager
    def round(self, t: int) -> Iterator[None]:
        """Everything of round t; a failed collective or SIGTERM becomes one ClientFailure."""
        self.started(t)
        try:
            yield
        except ClientFailure:
            raise
        except Exception as err:
            if self.world_size == 1 or not _is_collective_error(err):
                raise
            raise self._failure(t, _cause(err), timed_out=_is_timeout(err)) from None
        except Terminated:
            raise self._failure(t, "this process was stopped (SIGTERM)", timed_out=False) from None

    def _failure(self, t: int, cause: str, timed_out: bool) -> ClientFailure:
        self._ignore_sigterm()  # finish the diagnosis and print; the launcher SIGKILLs after 30 s
        message = self.diagnose(t, cause, timed_out)
        return ClientFailure(message, quiet=not self._claim_report())

    def _claim_report(self) -> bool:
        """True for the one process that prints the failure (the first to claim it), or if the store is gone."""
        if self.store is None or self._store_gone:
            return True
        try:
            self.store.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
            winner = self.store.compare_set(f"{self.prefix}/reported", "", str(self.rank))
            return winner.decode() == str(self.rank)
        except Exception:  # noqa: BLE001
            return True

    def diagnose(self, t: int, cause: str, timed_out: bool) -> str:
        """One line: which ranks (clients) did not reach round t's aggregation, and what became of them."""
        store = self.store
        head = f"round {t + 1}/{self.rounds} failed"
        try:
            if self._store_host_gone():
                raise ConnectionError("the store's host is gone")
            store.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
            states = {r: self._peer(t, r) for r in range(self.world_size) if r != self.rank}
        except Exception:  # noqa: BLE001 - the store's host is gone
            self._store_gone = True
            rank0 = f"the process of {clients_text(self.clients[0])} (rank 0"
            if self._store_host_gone():
                return (f"{head}: {rank0}, pid {self._procs[0][1]}) exited, and with it the run's store; "
                        "the run stops (federation.on_client_failure=stop)")
            host = f"{rank0}), which hosts it" if self.rank != 0 else "the launcher, which hosts it"
            return f"{head}: {cause}, and the run's store is unreachable: {host}, probably died"
        for state in states.values():
            if state["failure"]:
                return state["failure"]  # a client failed with an error and said so
        dead = [r for r, s in states.items() if s["process"] == "gone"]
        missing = [r for r, s in states.items() if not s["arrived"]]
        parts: list[str] = []
        for r in dead:
            when = "before" if not states[r]["arrived"] else "during"
            parts.append(f"the process of {clients_text(self.clients[r])} (rank {r}, pid {states[r]['pid']}) exited "
                         f"{when} the round's aggregation")
        if not parts and missing:
            waited = (f"within federation.collective_timeout_s={self.timeout_s:g} s (hung or too slow)"
                      if timed_out else f"({cause})")
            for r in missing:
                parts.append(f"the process of {clients_text(self.clients[r])} (rank {r}) did not reach the round's "
                             f"aggregation {waited}")
        if not parts:
            return f"{head}: {cause}"
        return f"{head}: " + "; ".join(parts) + "; the run stops (federation.on_client_failure=stop)"

    def _peer(self, t: int, r: int) -> dict[str, Any]:
        store, prefix = self.store, self.prefix
        failure = store.get(f"{prefix}/failed/{r}").decode() if store.check([f"{prefix}/failed/{r}"]) else None
        arrived = store.check([f"{prefix}/round{t}/arrived/{r}"])
        if not store.check([f"{prefix}/proc/{r}"]):  # it never got as far as the rounds
            return {"failure": failure, "arrived": arrived, "pid": "?", "process": "unknown"}
        host, _, pid = store.get(f"{prefix}/proc/{r}").decode().rpartition(":")
        return {"failure": failure, "arrived": arrived, "pid": int(pid), "process": process_state(host, int(pid))}


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def _first_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= 160 else text[:157] + "..."


def _cause(err: BaseException) -> str:
    if _is_timeout(err):
        return "a collective timed out"
    if any(s in str(err) for s in ("Connection closed", "Connection reset", "Broken pipe")):
        return "a peer closed its connection"
    return f"a collective failed ({_first_line(err)})"


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, TimeoutError) or "timed out" in text or "timeout" in text


def _is_collective_error(err: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(err, (dist.DistError, ConnectionError, TimeoutError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in ("gloo", "Connection", "NCCL", "Timed out"))
