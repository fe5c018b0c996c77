"""Corpora: the documents of a corpus split, in a stable order.

``data.calibration``, ``eval.datasets`` and ``fit.dataset`` accept the same names:

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

A split's documents are joined into one token stream with SparseGPT's separators
(:func:`separator_for`): ``"\\n\\n"`` for WikiText-2 test, ``" "`` for WikiText-2 train, PTB and C4, and
``"\\n\\n"`` for the embedded corpus and local files.

Nothing here is cached: a run reads each split once through its :class:`fedspallm.data.tokens.Corpora`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from fedspallm.errors import UserError

HUB_DATASETS = ("wikitext2", "ptb", "c4")
BUILTIN_NAMES = ("default",) + HUB_DATASETS
FILE_SUFFIXES = (".txt", ".jsonl")

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


def separator_for(name: str, split: str) -> str:
    """The separator that joins a split's documents into one token stream (SparseGPT's choice)."""
    return _SEPARATORS.get((name, split), DEFAULT_SEPARATOR)


# ---------------------------------------------------------------------------------------------
# The embedded corpus


def is_test_title(title: str) -> bool:
    """The embedded corpus's fixed split: test iff sha256(title) % 10 == 0."""
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % 10 == 0


def default_splits() -> tuple[tuple[Document, ...], tuple[Document, ...]]:
    """(train, test) documents of the embedded corpus."""
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


# ---------------------------------------------------------------------------------------------
# Local files


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


def resolve_file(name: str) -> Path:
    """The file a corpus name points at (a .txt or .jsonl that exists), or a one-line UserError."""
    path = Path(name).expanduser()
    if path.suffix not in FILE_SUFFIXES:
        raise UserError(
            f"unknown dataset {name!r}: use one of {', '.join(BUILTIN_NAMES)} or a path to a .txt or .jsonl file"
        )
    if not path.is_file():
        raise UserError(f"dataset file {name!r} not found" if not path.exists() else f"dataset {name!r} is not a file")
    return path


def corpus_key(name: str) -> str:
    """What identifies a corpus: its name for the built-in ones, the resolved path for files."""
    return name if name in BUILTIN_NAMES else str(resolve_file(name).resolve())


# ---------------------------------------------------------------------------------------------
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


def hub_column(name: str, split: str) -> Sequence[str]:
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


# ---------------------------------------------------------------------------------------------


def load_documents(name: str, split: Literal["train", "test"]) -> list[Document]:
    """The documents of a corpus split, in a stable order (see the module docstring)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "default":
        docs: Sequence[Document] = default_splits()[0 if split == "train" else 1]
    elif name in HUB_DATASETS:
        docs = [Document(text) for text in hub_column(name, split)]
    else:
        path = resolve_file(name)
        docs = _parse_txt(path) if path.suffix == ".txt" else _parse_jsonl(path)
    if not any(doc.text.strip() for doc in docs):
        raise UserError(f"corpus {name!r} ({split}) is empty: it has no non-blank text")
    return list(docs)
