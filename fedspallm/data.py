"""Corpora, evaluation windows and per-client calibration plans.

Corpora (``data.calibration`` and ``eval.datasets`` accept the same names):

- ``"default"``: the embedded Wikipedia "vital article" leads (see :mod:`fedspallm.assets`). A document
  is one article's ``extract``; its topic is the article's ``topic`` (12 topics). The split is fixed:
  an article is in *test* iff ``int(sha256(title.encode()).hexdigest(), 16) % 10 == 0`` (about 10%),
  in *train* otherwise. Both splits are sorted by title.
- a ``.txt`` file: blank-line-separated paragraphs, each stripped; no topics. Both splits read the
  same file: pass separate files for calibration and evaluation.
- a ``.jsonl`` file: one JSON object per line with a string ``"text"`` and an optional string
  ``"topic"``. Blank lines and blank texts are skipped.
- ``"wikitext2"``, ``"ptb"``, ``"c4"``: the Hugging Face hub datasets of the SparseGPT protocol
  (``wikitext-2-raw-v1`` train/test; ``ptb_text_only`` train/test; ``allenai/c4`` en shard 0 train
  and validation shard 0 as "test"). They need the hub (or its local cache).

Token streams follow SparseGPT: a split's documents are joined with a separator and tokenized with
the tokenizer's special tokens (BOS where the tokenizer adds one). The separators are SparseGPT's:
``"\\n\\n"`` for WikiText-2 test, ``" "`` for WikiText-2 train, PTB and C4 validation, and ``"\\n\\n"``
for the embedded corpus and local files.

Tokenizing a 5-million-character corpus in one call takes several seconds, and non-IID partitions
need one stream per topic as well. So every document is tokenized once, in one batched call, as a
piece that carries the separator, and streams are concatenations of pieces. Splitting at a document
boundary gives the same tokens as tokenizing the joined text only when the tokenizer does not
merge across that boundary; this is checked (see :class:`_TokenCorpus`) and, where it does not hold,
the joined text is tokenized in one call instead. Either way the stream equals the tokenization of
the joined text.

Calibration windows are described by :class:`WindowSpec` (stream, start) and only materialized
for the clients a process simulates (:meth:`CalibrationPlan.materialize`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch

from fedspallm.errors import UserError

HUB_DATASETS = ("wikitext2", "ptb", "c4")
BUILTIN_NAMES = ("default",) + HUB_DATASETS
FILE_SUFFIXES = (".txt", ".jsonl")
PARTITIONS = ("iid", "topic", "dirichlet")

#: Name of the stream that joins every document of a split (the iid partition draws from it).
ALL_STREAM = "all"
#: Stream of the documents that have no topic in a corpus where others have one.
NO_TOPIC = "(no topic)"
#: SparseGPT evaluates C4 on the first 1100 validation documents, truncated to 256 windows.
C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256

# SparseGPT's separators, by (dataset, split).
_SEPARATORS = {
    ("wikitext2", "train"): " ",
    ("wikitext2", "test"): "\n\n",
    ("ptb", "train"): " ",
    ("ptb", "test"): " ",
    ("c4", "train"): " ",
    ("c4", "test"): " ",
}
DEFAULT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Document:
    text: str
    topic: str | None = None


# ---------------------------------------------------------------------------------------------
# Loading documents


def is_test_title(title: str) -> bool:
    """The embedded corpus's fixed split: test iff sha256(title) % 10 == 0."""
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % 10 == 0


@lru_cache(maxsize=1)
def _default_splits() -> tuple[tuple[Document, ...], tuple[Document, ...]]:
    from fedspallm.assets import wiki_leads_path

    path = wiki_leads_path()
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"embedded corpus {path} is unreadable ({type(err).__name__}); delete it to fetch it again") from None
    train: list[Document] = []
    test: list[Document] = []
    for key in sorted(entries, key=lambda k: entries[k].get("title", k)):
        entry = entries[key]
        title = entry.get("title", key)
        text = (entry.get("extract") or "").strip()
        if not text:
            continue
        doc = Document(text=text, topic=entry.get("topic") or None)
        (test if is_test_title(title) else train).append(doc)
    return tuple(train), tuple(test)


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or type(err).__name__})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not valid UTF-8 (byte offset {err.start}); save it as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


_BLANK_LINES = re.compile(r"\n[ \t\f\v]*\n")


def _parse_txt(path: Path) -> tuple[Document, ...]:
    text = _read_utf8(path).replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = (p.strip() for p in _BLANK_LINES.split(text))
    return tuple(Document(p) for p in paragraphs if p)


def _parse_jsonl(path: Path) -> tuple[Document, ...]:
    docs = []
    for number, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict) or "text" not in obj:
            raise UserError(f'{path}: line {number} has no "text" field (each line must be a JSON object with "text")')
        text, topic = obj["text"], obj.get("topic")
        if not isinstance(text, str):
            raise UserError(f'{path}: line {number}: "text" must be a string, got {type(text).__name__}')
        if topic is not None and not isinstance(topic, str):
            raise UserError(f'{path}: line {number}: "topic" must be a string or null, got {type(topic).__name__}')
        if text.strip():
            docs.append(Document(text, topic or None))
    return tuple(docs)


@lru_cache(maxsize=8)
def _parse_file(key: tuple[str, int, int]) -> tuple[Document, ...]:
    path = Path(key[0])
    return _parse_txt(path) if path.suffix == ".txt" else _parse_jsonl(path)


def _resolve_file(name: str) -> Path:
    path = Path(name).expanduser()
    if path.suffix not in FILE_SUFFIXES:
        raise UserError(
            f"unknown dataset {name!r}: use one of {', '.join(BUILTIN_NAMES)} or a path to a .txt or .jsonl file"
        )
    if not path.is_file():
        raise UserError(f"dataset file {name!r} not found" if not path.exists() else f"dataset {name!r} is not a file")
    return path


# Hub datasets: the SparseGPT protocol. Loading is wrapped so that no traceback escapes.
_HUB_SOURCES: dict[tuple[str, str], tuple[tuple[Any, ...], dict[str, Any], str]] = {
    ("wikitext2", "train"): (("wikitext", "wikitext-2-raw-v1"), {"split": "train"}, "text"),
    ("wikitext2", "test"): (("wikitext", "wikitext-2-raw-v1"), {"split": "test"}, "text"),
    ("ptb", "train"): (("ptb_text_only", "penn_treebank"), {"split": "train"}, "sentence"),
    ("ptb", "test"): (("ptb_text_only", "penn_treebank"), {"split": "test"}, "sentence"),
    ("c4", "train"): (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"}, "text"),
    ("c4", "test"): (("allenai/c4",), {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                       "split": "validation"}, "text"),
}


@lru_cache(maxsize=6)
def _hub_column(name: str, split: str) -> Sequence[str]:
    """The text column of a hub dataset, as a lazily indexable sequence (arrow-backed)."""
    from fedspallm.hub import hub_reachable

    args, kwargs, column = _HUB_SOURCES[(name, split)]
    hub_reachable()  # an unreachable hub: the local cache at once instead of retries
    try:
        import datasets

        dataset = datasets.load_dataset(*args, **kwargs)
        return dataset[column]
    except Exception as err:  # datasets/huggingface_hub raise many types (ConnectionError, OSError, ValueError, ...)
        reason = (str(err).strip().splitlines() or [""])[0][:160]
        raise UserError(
            f"could not load dataset {name!r} ({'/'.join(str(a) for a in args)}, {split}) from the Hugging Face hub "
            f"({type(err).__name__}: {reason}); without hub access pass a local .txt or .jsonl file instead"
        ) from None


def load_documents(name: str, split: Literal["train", "test"]) -> list[Document]:
    """The documents of a corpus split, in a stable order (see the module docstring)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "default":
        docs: Sequence[Document] = _default_splits()[0 if split == "train" else 1]
    elif name in HUB_DATASETS:
        docs = [Document(text) for text in _hub_column(name, split)]
    else:
        docs = _parse_file(_file_key(_resolve_file(name)))
    if not any(doc.text.strip() for doc in docs):
        raise UserError(f"corpus {name!r} ({split}) is empty: it has no non-blank text")
    return list(docs)


# ---------------------------------------------------------------------------------------------
# Tokenization


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Batch-encode ``texts`` to token id lists (no padding, no truncation, no length warning)."""
    if not texts:
        return []
    try:
        out = tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)
    except TypeError:  # tokenizers without a ``verbose`` keyword
        out = tokenizer(texts, add_special_tokens=add_special_tokens)
    return out["input_ids"]


def _encode_one(tokenizer, text: str, add_special_tokens: bool) -> np.ndarray:
    return np.asarray(_encode(tokenizer, [text], add_special_tokens)[0], dtype=np.int64)


def _special_affixes(tokenizer) -> tuple[list[int], list[int]] | None:
    """The ids the tokenizer adds before and after a text (BOS/EOS), or None if not separable."""
    probe = "Special token probe."
    plain = _encode(tokenizer, [probe], False)[0]
    full = _encode(tokenizer, [probe], True)[0]
    n = len(plain)
    for k in range(len(full) - n + 1):
        if full[k:k + n] == plain:
            return full[:k], full[k + n:]
    return None


def _flatten(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(ids) for ids in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


class _TokenCorpus:
    """Token streams over subsets of a list of texts, each equal to ``tokenizer(separator.join(...))``.

    Fast path: each text is tokenized once, in one batched call, as a piece that carries the
    separator, either before it ("lead": ``sep + text``) or after it ("trail": ``text + sep``); a stream
    is the concatenation of its pieces, with the edge text tokenized bare and the special tokens
    around. This is exact when the tokenizer never merges across a document boundary. We require
    every text to be non-empty and free of surrounding whitespace (so that all boundaries look
    alike), and check the equality on a sample of real boundaries. Otherwise ("exact"), each stream
    is the joined text tokenized in one call.
    """

    PROBES = 16

    def __init__(self, texts: Sequence[str], tokenizer, separator: str, add_special_tokens: bool = True):
        self.texts = list(texts)
        self.tokenizer = tokenizer
        self.separator = separator
        self.add_special_tokens = add_special_tokens
        self._mode: str | None = None
        self._affixes: tuple[list[int], list[int]] = ([], [])
        self._flat = np.zeros(0, dtype=np.int64)
        self._offsets = np.zeros(1, dtype=np.int64)
        self._bare: dict[int, np.ndarray] = {}
        self._exact: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def mode(self) -> str:
        if self._mode is None:
            self._mode = self._choose_mode()
            if self._mode != "exact":
                pieces = [self._piece_text(t) for t in self.texts]
                self._flat, self._offsets = _flatten(_encode(self.tokenizer, pieces, False))
        return self._mode

    def _piece_text(self, text: str) -> str:
        return self.separator + text if self._mode == "lead" else text + self.separator

    def _choose_mode(self) -> str:
        texts = self.texts
        if len(texts) < 2:
            return "exact"
        if any(not t or t != t.strip() for t in texts):
            return "exact"
        affixes = _special_affixes(self.tokenizer) if self.add_special_tokens else ([], [])
        if affixes is None:
            return "exact"
        self._affixes = affixes
        count = min(self.PROBES, len(texts) - 1)
        idx = sorted({round(i * (len(texts) - 2) / max(count - 1, 1)) for i in range(count)})
        pairs = [(texts[i], texts[i + 1]) for i in idx]
        sep = self.separator
        joined = _encode(self.tokenizer, [a + sep + b for a, b in pairs], False)
        lefts = _encode(self.tokenizer, [a for a, _ in pairs] + [a + sep for a, _ in pairs], False)
        rights = _encode(self.tokenizer, [sep + b for _, b in pairs] + [b for _, b in pairs], False)
        n = len(pairs)
        if all(joined[k] == lefts[k] + rights[k] for k in range(n)):
            return "lead"
        if all(joined[k] == lefts[n + k] + rights[n + k] for k in range(n)):
            return "trail"
        return "exact"

    def _bare_tokens(self, i: int) -> np.ndarray:
        if i not in self._bare:
            self._bare[i] = _encode_one(self.tokenizer, self.texts[i], False)
        return self._bare[i]

    def stream(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """1-D LongTensor: the texts at ``indices`` (all by default), joined and tokenized."""
        indices = list(range(len(self.texts)) if indices is None else indices)
        if not indices:
            return torch.zeros(0, dtype=torch.long)
        if self.mode == "exact":
            key = tuple(indices)
            if key not in self._exact:
                joined = self.separator.join(self.texts[i] for i in indices)
                self._exact[key] = torch.from_numpy(_encode_one(self.tokenizer, joined, self.add_special_tokens))
            return self._exact[key]
        flat, off = self._flat, self._offsets
        prefix, suffix = self._affixes
        if self._mode == "lead":
            body = [self._bare_tokens(indices[0])] + [flat[off[i]:off[i + 1]] for i in indices[1:]]
        else:
            body = [flat[off[i]:off[i + 1]] for i in indices[:-1]] + [self._bare_tokens(indices[-1])]
        parts = [np.asarray(prefix, dtype=np.int64)] + body + [np.asarray(suffix, dtype=np.int64)]
        return torch.from_numpy(np.concatenate(parts))


def tokenize_stream(docs: list[Document], tokenizer, separator: str = DEFAULT_SEPARATOR,
                    add_special_tokens: bool = True) -> torch.Tensor:
    """1-D LongTensor of ``tokenizer(separator.join(doc.text for doc in docs))``, as SparseGPT
    tokenizes its joined WikiText-2 test split (special tokens included, as its tokenizer call does)."""
    return _TokenCorpus([d.text for d in docs], tokenizer, separator, add_special_tokens).stream()


# In-process cache of tokenized corpora, keyed on (corpus, split, tokenizer).

_CACHE_SIZE = 6
_corpus_cache: OrderedDict[tuple, tuple[tuple[Document, ...], _TokenCorpus]] = OrderedDict()


def _tokenizer_key(tokenizer) -> tuple | None:
    name = getattr(tokenizer, "name_or_path", "") or ""
    if not name:
        return None  # an in-memory tokenizer: nothing stable to key on, so no caching
    try:
        size = len(tokenizer)
    except TypeError:
        size = -1
    return (name, type(tokenizer).__name__, size)


def _corpus_key(name: str) -> tuple:
    if name in BUILTIN_NAMES:
        return (name,)
    return _file_key(_resolve_file(name))


def _tokenized(name: str, split: str, tokenizer, variant: str = "") -> tuple[tuple[Document, ...], _TokenCorpus]:
    """The documents of a split and their token corpus, cached in-process."""
    tok_key = _tokenizer_key(tokenizer)
    key = (_corpus_key(name), split, variant, tok_key)
    if tok_key is not None and key in _corpus_cache:
        _corpus_cache.move_to_end(key)
        return _corpus_cache[key]
    docs = tuple(load_documents(name, split))
    if variant == "c4-eval":
        docs = docs[:C4_EVAL_DOCS]
    entry = (docs, _TokenCorpus([d.text for d in docs], tokenizer, separator_for(name, split)))
    if tok_key is not None:
        _corpus_cache[key] = entry
        while len(_corpus_cache) > _CACHE_SIZE:
            _corpus_cache.popitem(last=False)
    return entry


def separator_for(name: str, split: str) -> str:
    """The separator that joins a split's documents into one token stream (SparseGPT's choice)."""
    return _SEPARATORS.get((name, split), DEFAULT_SEPARATOR)


def token_stream(name: str, split: Literal["train", "test"], tokenizer) -> torch.Tensor:
    """The whole split as one token stream (cached in-process; treat it as read-only)."""
    return _tokenized(name, split, tokenizer)[1].stream()


def clear_cache() -> None:
    """Forget every cached corpus and tokenization (tests use this)."""
    _corpus_cache.clear()
    _default_splits.cache_clear()
    _parse_file.cache_clear()
    _hub_column.cache_clear()


# ---------------------------------------------------------------------------------------------
# Evaluation


def eval_windows(name: str, tokenizer, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping ``[n, seqlen]`` windows of the test split tokenized as one stream.

    The remainder is dropped and at most ``max_windows`` (the first ones) are returned. C4 follows
    SparseGPT: the first 1100 validation documents joined with ``" "``, truncated to 256·seqlen tokens.
    """
    if seqlen < 1:
        raise UserError(f"eval.seqlen={seqlen}: must be >= 1")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"eval.max_windows={max_windows}: must be >= 1 or null")
    if name == "c4":
        _, corpus = _tokenized(name, "test", tokenizer, variant="c4-eval")
        stream = corpus.stream()[: C4_EVAL_WINDOWS * seqlen]
    else:
        _, corpus = _tokenized(name, "test", tokenizer)
        stream = corpus.stream()
    count = stream.numel() // seqlen
    if count == 0:
        raise UserError(f"corpus {name!r} has {stream.numel()} tokens, shorter than one window of seqlen {seqlen}")
    if max_windows is not None:
        count = min(count, max_windows)
    return stream[: count * seqlen].reshape(count, seqlen).clone()


# ---------------------------------------------------------------------------------------------
# Calibration plans


@dataclass(frozen=True)
class WindowSpec:
    """A calibration window, described without materializing it: ``streams[stream][start:start+seqlen]``."""

    stream: str
    start: int
    topic: str | None


@dataclass
class CalibrationPlan:
    """Every client's calibration windows, and the token streams they index into.

    ``streams`` is shared with the in-process cache: treat it as read-only.
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


def _topic_streams(name: str, split: str, tokenizer, seqlen: int) -> tuple[dict[str, torch.Tensor], dict[str, str | None]]:
    """Usable per-topic streams (at least seqlen + 1 tokens) and stream -> topic label."""
    docs, corpus = _tokenized(name, split, tokenizer)
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
                     partition: Literal["iid", "topic", "dirichlet"], alpha: float, seed: int) -> CalibrationPlan:
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
    Streams shorter than seqlen + 1 tokens are skipped.
    """
    if partition not in PARTITIONS:
        raise UserError(f"data.partition={partition!r}: use one of {', '.join(PARTITIONS)}")
    if num_clients < 1:
        raise UserError(f"federation.num_clients={num_clients}: must be >= 1")
    if nsamples < num_clients:
        raise UserError(
            f"data.nsamples={nsamples} is smaller than federation.num_clients={num_clients}: "
            "every client needs at least one calibration window"
        )
    if seqlen < 1:
        raise UserError(f"data.seqlen={seqlen}: must be >= 1")
    if partition == "dirichlet" and not (math.isfinite(alpha) and alpha > 0):
        raise UserError(f"data.alpha={alpha}: must be > 0")
    sizes = even_split(nsamples, num_clients)

    if name == "c4":
        if partition != "iid":
            raise UserError(f"data.partition={partition}: corpus 'c4' has no topics; use data.partition=iid")
        return _plan_c4(tokenizer, nsamples, seqlen, sizes, seed)

    if partition == "iid":
        _, corpus = _tokenized(name, "train", tokenizer)
        stream = corpus.stream()
        _check_window_fits(name, stream.numel(), seqlen)
        rng = random.Random(seed)
        specs = [WindowSpec(ALL_STREAM, rng.randint(0, _max_start(stream.numel(), seqlen)), None)
                 for _ in range(nsamples)]
        return CalibrationPlan(_chunk(specs, sizes), seqlen, {ALL_STREAM: stream}, name, partition, seed,
                               [[] for _ in sizes])

    docs, _ = _tokenized(name, "train", tokenizer)
    if all(doc.topic is None for doc in docs):
        raise UserError(
            f"data.partition={partition} needs a corpus with topics, and {name!r} has none; "
            'use data.partition=iid, or a .jsonl file with a "topic" field'
        )
    streams, labels = _topic_streams(name, "train", tokenizer, seqlen)
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


def _plan_c4(tokenizer, nsamples: int, seqlen: int, sizes: list[int], seed: int) -> CalibrationPlan:
    """SparseGPT's C4 sampling: a random train document with more than seqlen tokens, then a
    random window in it. Only the drawn documents are tokenized; each is its own stream."""
    texts = _hub_column("c4", "train")
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
