"""Token streams and evaluation windows.

Token streams follow SparseGPT: a split's documents are joined with a separator
(:func:`fedspallm.data.corpora.separator_for`) and tokenized with the tokenizer's special tokens (BOS
where the tokenizer adds one).

Tokenizing a 5-million-character corpus in one call takes several seconds, and non-IID partitions
need one stream per topic as well. So every document is tokenized once, in one batched call, as a
piece that carries the separator, and streams are concatenations of pieces. Splitting at a document
boundary gives the same tokens as tokenizing the joined text only when the tokenizer does not
merge across that boundary; this is checked (see :class:`TokenCorpus`) and, where it does not hold,
the joined text is tokenized in one call instead. Either way the stream equals the tokenization of
the joined text.

A run reads and tokenizes each split once through one :class:`Corpora`, which it creates and hands
along (preflight fills it while checking; the recipe cuts its windows from it). Nothing is cached in
a module: two runs in one process share nothing.
"""

from __future__ import annotations

import itertools
from typing import Literal, NamedTuple, Sequence

import numpy as np
import torch

from fedspallm.data import corpora
from fedspallm.data.corpora import DEFAULT_SEPARATOR, Document, corpus_key, load_documents, separator_for
from fedspallm.errors import UserError

#: SparseGPT evaluates C4 on the first 1100 validation documents, truncated to 256 windows.
C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256


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


class TokenCorpus:
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
    return TokenCorpus([d.text for d in docs], tokenizer, separator, add_special_tokens).stream()


class TokenizedSplit(NamedTuple):
    documents: tuple[Document, ...]
    corpus: TokenCorpus


def _tokenizer_key(tokenizer) -> tuple:
    name = getattr(tokenizer, "name_or_path", "") or ""
    if not name:  # an in-memory tokenizer: only the object itself identifies it (the entry keeps it alive)
        return ("object", id(tokenizer))
    try:
        size = len(tokenizer)
    except TypeError:
        size = -1
    return (name, type(tokenizer).__name__, size)


class Corpora:
    """The corpora of one run: each split's documents read once and tokenized once (per tokenizer).

    A run creates one and hands it along: :func:`fedspallm.preflight.preflight` reads and tokenizes
    the corpora it checks into it and returns it, and the recipe cuts its windows and calibration
    plan from the same object. A tokenizer is identified by its ``name_or_path``, class and size, so
    the run's tokenizer finds what preflight's (loaded from the same directory) tokenized.
    Treat what it returns as read-only.
    """

    def __init__(self) -> None:
        self._documents: dict[tuple[str, str], tuple[Document, ...]] = {}
        self._columns: dict[tuple[str, str], Sequence[str]] = {}
        self._tokens: dict[tuple, TokenizedSplit] = {}

    def documents(self, name: str, split: Literal["train", "test"]) -> tuple[Document, ...]:
        key = (corpus_key(name), split)
        if key not in self._documents:
            self._documents[key] = tuple(load_documents(name, split))
        return self._documents[key]

    def column(self, name: str, split: Literal["train", "test"]) -> Sequence[str]:
        """A hub dataset's text column, unmaterialized (C4 calibration draws a few documents of it)."""
        if (name, split) not in self._columns:
            self._columns[(name, split)] = corpora.hub_column(name, split)
        return self._columns[(name, split)]

    def tokens(self, name: str, split: Literal["train", "test"], tokenizer, first: int | None = None) -> TokenizedSplit:
        """The split's documents (only the first ``first`` of them, if given) and their token corpus."""
        key = (corpus_key(name), split, first, _tokenizer_key(tokenizer))
        if key not in self._tokens:
            docs = self.documents(name, split)[:first]
            self._tokens[key] = TokenizedSplit(docs, TokenCorpus([d.text for d in docs], tokenizer,
                                                                 separator_for(name, split)))
        return self._tokens[key]


def token_stream(name: str, split: Literal["train", "test"], tokenizer, store: Corpora | None = None) -> torch.Tensor:
    """The whole split as one token stream (through ``store`` when given; treat it as read-only)."""
    return (store or Corpora()).tokens(name, split, tokenizer).corpus.stream()


def eval_windows(name: str, tokenizer, seqlen: int, max_windows: int | None,
                 store: Corpora | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seqlen]`` windows of the test split tokenized as one stream.

    The remainder is dropped and at most ``max_windows`` (the first ones) are returned. C4 follows
    SparseGPT: the first 1100 validation documents joined with ``" "``, truncated to 256·seqlen tokens.
    """
    if seqlen < 1 or (max_windows is not None and max_windows < 1):
        raise ValueError(f"eval_windows needs seqlen >= 1 and max_windows >= 1 or None, got {seqlen}, {max_windows}")
    store = store or Corpora()
    if name == "c4":
        stream = store.tokens(name, "test", tokenizer, first=C4_EVAL_DOCS).corpus.stream()[: C4_EVAL_WINDOWS * seqlen]
    else:
        stream = store.tokens(name, "test", tokenizer).corpus.stream()
    count = stream.numel() // seqlen
    if count == 0:
        raise UserError(f"corpus {name!r} has {stream.numel()} tokens, shorter than one window of seqlen {seqlen}")
    if max_windows is not None:
        count = min(count, max_windows)
    return stream[: count * seqlen].reshape(count, seqlen).clone()
