"""Client partitions: every client's calibration windows (iid, topic, Dirichlet), as a plan.

Calibration windows are described by :class:`WindowSpec` (stream, start) and only materialized
for the clients a process simulates (:meth:`CalibrationPlan.materialize`).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence, get_args

import numpy as np
import torch

from fedspallm.config import Partition
from fedspallm.data.tokens import Corpora, TokenizedSplit, _encode_one
from fedspallm.errors import UserError

PARTITIONS = get_args(Partition)
#: Name of the stream that joins every document of a split (the iid partition draws from it).
ALL_STREAM = "all"
#: Stream of the documents that have no topic in a corpus where others have one.
NO_TOPIC = "(no topic)"


@dataclass(frozen=True)
class WindowSpec:
    """A calibration window, described without materializing it: ``streams[stream][start:start+seqlen]``."""

    stream: str
    start: int
    topic: str | None


@dataclass
class CalibrationPlan:
    """Every client's calibration windows, and the token streams they index into.

    ``streams`` is shared with the run's :class:`~fedspallm.data.tokens.Corpora`: treat it as read-only.
    """

    per_client: list[list[WindowSpec]]
    seqlen: int = 0
    streams: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    name: str = ""
    partition: str = "iid"
    seed: int = 0
    client_topics: list[list[str]] = field(default_factory=list)
    """topic: the topics each client holds; dirichlet: the topics its windows came from; iid: empty."""
    mixtures: list[dict[str, float]] = field(default_factory=list)
    """dirichlet: each client's topic mixture (empty otherwise)."""

    @property
    def num_clients(self) -> int:
        return len(self.per_client)

    @property
    def sizes(self) -> list[int]:
        return [len(windows) for windows in self.per_client]

    def _client_windows(self, client: int) -> torch.Tensor:
        windows = self.per_client[client]
        if not windows:
            return torch.zeros(0, self.seqlen, dtype=torch.long)
        return torch.stack([self.streams[w.stream][w.start:w.start + self.seqlen] for w in windows])

    def materialize(self, client_ids: Iterable[int]) -> dict[int, torch.Tensor]:
        """client id -> LongTensor [n_i, seqlen], built only for the clients asked for."""
        result: dict[int, torch.Tensor] = {}
        for client in client_ids:
            client = int(client)
            if not 0 <= client < self.num_clients:
                raise ValueError(f"client id {client} out of range: the plan has {self.num_clients} clients")
            result[client] = self._client_windows(client)
        return result

    def all_windows(self) -> torch.Tensor:
        """Every client's windows concatenated in client order (the centralized baseline's data)."""
        return torch.cat([self._client_windows(c) for c in range(self.num_clients)])

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description: sizes and windows per topic for every client."""
        per_topic = []
        for windows in self.per_client:
            counts: dict[str, int] = {}
            for w in windows:
                counts[w.topic or ALL_STREAM] = counts.get(w.topic or ALL_STREAM, 0) + 1
            per_topic.append(dict(sorted(counts.items())))
        return {"dataset": self.name, "partition": self.partition, "seed": self.seed, "seqlen": self.seqlen,
                "sizes": self.sizes, "client_topics": self.client_topics, "windows_per_topic": per_topic,
                "mixtures": self.mixtures}


def even_split(total: int, parts: int) -> list[int]:
    """Sizes of ``total`` items over ``parts``, differing by at most 1, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _chunk(specs: list[WindowSpec], sizes: list[int]) -> list[list[WindowSpec]]:
    """Consecutive runs of ``specs``: the first sizes[0] to client 0, and so on."""
    bounds = list(itertools.accumulate(sizes, initial=0))
    return [specs[a:b] for a, b in zip(bounds, bounds[1:])]


def _max_start(length: int, seqlen: int) -> int:
    """Largest window start in a stream of ``length`` tokens, as SparseGPT draws it
    (``randint(0, length - seqlen - 1)``): the stream needs at least seqlen + 1 tokens."""
    return length - seqlen - 1


def _topic_streams(name: str, split: TokenizedSplit, seqlen: int) -> tuple[dict[str, torch.Tensor], dict[str, str | None]]:
    """Usable per-topic streams (at least seqlen + 1 tokens) and stream -> topic label."""
    docs, corpus = split
    groups: dict[str, list[int]] = {}
    for i, doc in enumerate(docs):
        groups.setdefault(doc.topic if doc.topic is not None else NO_TOPIC, []).append(i)
    if ALL_STREAM in groups:
        raise UserError(f"corpus {name!r} has a topic named {ALL_STREAM!r}, which is reserved; rename it")
    streams, labels = {}, {}
    for topic in sorted(groups):
        stream = corpus.stream(groups[topic])
        if _max_start(stream.numel(), seqlen) >= 0:
            streams[topic] = stream
            labels[topic] = None if topic == NO_TOPIC else topic
    return streams, labels


def _deal_topics(sizes: dict[str, int], num_clients: int) -> list[list[tuple[str, int, int]]]:
    """Each client's (topic, segment start, segment end) list.

    K <= #topics: whole topics, dealt largest first to the client with the fewest tokens so far
    (every client gets at least one). K > #topics: every topic gets a client, and each further
    client goes to the topic with the most tokens per client; a topic's clients split its stream
    into equal contiguous segments.
    """
    order = sorted(sizes, key=lambda t: (-sizes[t], t))
    if num_clients <= len(order):
        load = [0] * num_clients
        held: list[list[str]] = [[] for _ in range(num_clients)]
        for topic in order:
            client = min(range(num_clients), key=lambda c: (load[c], c))
            held[client].append(topic)
            load[client] += sizes[topic]
        return [[(t, 0, sizes[t]) for t in sorted(topics)] for topics in held]
    share = {t: 1 for t in order}
    for _ in range(num_clients - len(order)):
        best = max(order, key=lambda t: (sizes[t] / share[t], -order.index(t)))
        share[best] += 1
    result = []
    for topic in sorted(order):
        n, length = share[topic], sizes[topic]
        bounds = [round(j * length / n) for j in range(n + 1)]
        result.extend([[(topic, bounds[j], bounds[j + 1])] for j in range(n)])
    return result


def _check_window_fits(name: str, length: int, seqlen: int, what: str = "") -> None:
    if _max_start(length, seqlen) < 0:
        raise UserError(
            f"corpus {name!r}{what} has {length} tokens, too short for one calibration window of seqlen {seqlen} "
            f"(needs at least {seqlen + 1})"
        )


def plan_calibration(name: str, tokenizer, nsamples: int, seqlen: int, num_clients: int,
                     partition: Partition, alpha: float, seed: int,
                     store: Corpora | None = None) -> CalibrationPlan:
    """Deterministic per-client calibration windows drawn from the train split of ``name``.

    - iid: ``nsamples`` windows from the "all" stream, drawn as SparseGPT does
      (``random.Random(seed)``, start ``randint(0, len - seqlen - 1)``), then split evenly over the
      clients in order (sizes differ by at most 1, larger first). C4 follows SparseGPT: a random
      document with more than ``seqlen`` tokens, then a random window in it.
    - topic: clients hold whole topics when K <= #topics (see :func:`_deal_topics`), or share a
      topic's stream in disjoint segments when K > #topics; each client's windows are uniform over
      all windows of its own data (so topics weigh by their token counts).
    - dirichlet: client i's topic mixture is Dirichlet(alpha) over the topics
      (``numpy.random.default_rng(seed)``); each window's topic is drawn from it.
    Streams shorter than seqlen + 1 tokens are skipped. The train split is read and tokenized
    through ``store`` (a fresh one when None). The arguments are checked where the user gives them
    (:mod:`fedspallm.config`); here a bad one is a programming error (ValueError).
    """
    if partition not in PARTITIONS or not 1 <= num_clients <= nsamples or seqlen < 1 or not alpha > 0:
        raise ValueError(f"plan_calibration: partition {partition!r} not in {PARTITIONS}, or not "
                         f"1 <= num_clients ({num_clients}) <= nsamples ({nsamples}), seqlen {seqlen} >= 1, alpha {alpha} > 0")
    store = store or Corpora()
    sizes = even_split(nsamples, num_clients)

    if name == "c4":
        if partition != "iid":
            raise UserError(f"data.partition={partition}: corpus 'c4' has no topics; use data.partition=iid")
        return _plan_c4(store.column("c4", "train"), tokenizer, nsamples, seqlen, sizes, seed)

    train = store.tokens(name, "train", tokenizer)
    if partition == "iid":
        stream = train.corpus.stream()
        _check_window_fits(name, stream.numel(), seqlen)
        rng = random.Random(seed)
        specs = [WindowSpec(ALL_STREAM, rng.randint(0, _max_start(stream.numel(), seqlen)), None)
                 for _ in range(nsamples)]
        return CalibrationPlan(_chunk(specs, sizes), seqlen, {ALL_STREAM: stream}, name, partition, seed,
                               [[] for _ in sizes])

    if all(doc.topic is None for doc in train.documents):
        raise UserError(
            f"data.partition={partition} needs a corpus with topics, and {name!r} has none; "
            'use data.partition=iid, or a .jsonl file with a "topic" field'
        )
    streams, labels = _topic_streams(name, train, seqlen)
    if not streams:
        raise UserError(f"corpus {name!r}: no topic has the {seqlen + 1} tokens that one calibration window of seqlen {seqlen} needs")
    lengths = {t: s.numel() for t, s in streams.items()}

    if partition == "topic":
        rng = random.Random(seed)
        holdings = _deal_topics(lengths, num_clients)
        per_client = []
        for client, (size, held) in enumerate(zip(sizes, holdings)):
            for topic, lo, hi in held:
                _check_window_fits(name, hi - lo, seqlen, f" (client {client}'s share of topic {topic!r})")
            weights = [_max_start(hi - lo, seqlen) + 1 for _, lo, hi in held]
            picks = rng.choices(range(len(held)), weights=weights, k=size)
            windows = []
            for p in picks:
                topic, lo, hi = held[p]
                windows.append(WindowSpec(topic, lo + rng.randint(0, _max_start(hi - lo, seqlen)), labels[topic]))
            per_client.append(windows)
        client_topics = [sorted({t for t, _, _ in held}) for held in holdings]
        client_mixtures: list[dict[str, float]] = []
    else:
        gen = np.random.default_rng(seed)
        topics = sorted(streams)
        mixtures = gen.dirichlet([alpha] * len(topics), size=num_clients)
        per_client, client_topics, client_mixtures = [], [], []
        for size, mixture in zip(sizes, mixtures):
            total = float(mixture.sum())
            if not (math.isfinite(total) and total > 0):  # possible for tiny alpha: degenerate to one topic
                mixture = np.eye(len(topics))[gen.integers(len(topics))]
            mixture = mixture / mixture.sum()
            picks = gen.choice(len(topics), size=size, p=mixture)
            windows = []
            for p in picks:
                topic = topics[int(p)]
                start = int(gen.integers(0, _max_start(lengths[topic], seqlen) + 1))
                windows.append(WindowSpec(topic, start, labels[topic]))
            per_client.append(windows)
            client_topics.append(sorted({w.stream for w in windows}))
            client_mixtures.append({t: float(share) for t, share in zip(topics, mixture)})
    used = {w.stream for windows in per_client for w in windows}
    return CalibrationPlan(per_client, seqlen, {t: streams[t] for t in sorted(used)}, name, partition, seed,
                           client_topics, client_mixtures if partition == "dirichlet" else [])


def _plan_c4(texts: Sequence[str], tokenizer, nsamples: int, seqlen: int, sizes: list[int], seed: int) -> CalibrationPlan:
    """SparseGPT's C4 sampling: a random train document (of ``texts``) with more than seqlen tokens,
    then a random window in it. Only the drawn documents are tokenized; each is its own stream."""
    rng = random.Random(seed)
    streams: dict[str, torch.Tensor] = {}
    specs: list[WindowSpec] = []
    draws, max_draws = 0, 1000 + 100 * nsamples
    while len(specs) < nsamples:
        draws += 1
        if draws > max_draws:
            raise UserError(f"corpus 'c4': found too few documents longer than seqlen {seqlen} tokens in {max_draws} draws")
        index = rng.randint(0, len(texts) - 1)
        key = f"c4:{index}"
        if key not in streams:
            ids = _encode_one(tokenizer, texts[index], True)
            if ids.size <= seqlen:
                continue
            streams[key] = torch.from_numpy(ids)
        specs.append(WindowSpec(key, rng.randint(0, _max_start(streams[key].numel(), seqlen)), None))
    return CalibrationPlan(_chunk(specs, sizes), seqlen, streams, "c4", "iid", seed, [[] for _ in sizes])