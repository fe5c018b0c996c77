"""Corpora, evaluation windows and calibration plans (fedspallm.data: corpora, tokens, partitions).

Most tests use tiny in-memory tokenizers whose output is known exactly (one id per UTF-8 byte);
the embedded corpus tests use the embedded SmolLM2 tokenizer (cached locally, loads in seconds).
Nothing here touches the network: hub datasets are checked in offline mode, or faked.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections import Counter

import pytest
import torch

from fedspallm import data
from fedspallm.data import (
    CalibrationPlan,
    Corpora,
    Document,
    eval_windows,
    load_documents,
    plan_calibration,
    tokenize_stream,
)
from fedspallm.data import corpora as corpora_module
from fedspallm.data import tokens as tokens_module
from fedspallm.errors import UserError

TOPICS = {
    "Arts", "Biology and health sciences", "Everyday life", "Geography", "History", "Mathematics", "People",
    "Philosophy and religion", "Physical sciences", "Society and social sciences", "Technology", "Uncategorized",
}


class ByteTokenizer:
    """One id per UTF-8 byte; optionally a BOS id (256) in front, as Llama/OPT tokenizers add."""

    def __init__(self, name: str = "", bos: bool = False):
        self.name_or_path = name
        self.bos = bos
        self.calls = 0

    def __len__(self) -> int:
        return 257

    def __call__(self, texts, add_special_tokens=True, **kwargs):
        self.calls += 1
        prefix = [256] if (self.bos and add_special_tokens) else []
        return {"input_ids": [prefix + list(t.encode("utf-8")) for t in texts]}


class RegexTokenizer:
    """Tokens are regex matches, ids assigned on first sight. ``pattern`` decides whether tokens merge
    across a document boundary (like Llama-3's punctuation + newlines)."""

    def __init__(self, pattern: str):
        self.pattern = re.compile(pattern)
        self.vocab: dict[str, int] = {}
        self.name_or_path = ""

    def __call__(self, texts, add_special_tokens=True, **kwargs):
        return {"input_ids": [[self.vocab.setdefault(m, len(self.vocab)) for m in self.pattern.findall(t)] for t in texts]}


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    from fedspallm.assets import default_model_dir

    return AutoTokenizer.from_pretrained(str(default_model_dir()))


@pytest.fixture(scope="module")
def smol_corpora(smol):
    """The embedded corpus read and tokenized once for the module, in one run's Corpora."""
    store = Corpora()
    for split in ("train", "test"):
        store.tokens("default", split, smol)
    return store


@pytest.fixture
def default_cached(smol, smol_corpora):
    return smol, smol_corpora


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


# ---------------------------------------------------------------------------------------------
# The embedded corpus


def test_default_split_follows_the_documented_hash_rule():
    from fedspallm.assets import wiki_leads_path

    entries = json.loads(wiki_leads_path().read_text(encoding="utf-8"))
    titles = sorted(entries)
    expected_test = [t for t in titles if int(hashlib.sha256(t.encode()).hexdigest(), 16) % 10 == 0]
    test_set = set(expected_test)
    expected_train = [t for t in titles if t not in test_set]

    train, test = load_documents("default", "train"), load_documents("default", "test")
    assert [d.text for d in test] == [entries[t]["extract"].strip() for t in expected_test]
    assert [d.text for d in train] == [entries[t]["extract"].strip() for t in expected_train]
    assert [d.topic for d in train] == [entries[t]["topic"] for t in expected_train]
    assert len(train) + len(test) == len(entries) == 10033
    assert 0.08 < len(test) / len(entries) < 0.12
    assert not {d.text for d in train} & {d.text for d in test}
    assert {d.topic for d in train} == {d.topic for d in test} == TOPICS
    assert load_documents("default", "test") == test  # deterministic across re-reads


def test_default_streams_are_exact_and_read_once_per_run(default_cached, monkeypatch):
    smol, store = default_cached
    test_docs = load_documents("default", "test")
    stream = data.token_stream("default", "test", smol, store)
    # the batched, piecewise tokenization equals tokenizing the joined split in one call
    assert stream.tolist() == smol("\n\n".join(d.text for d in test_docs))["input_ids"]
    assert stream.dtype == torch.long and stream.dim() == 1

    calls = []
    monkeypatch.setattr(tokens_module, "_encode", lambda *a, **k: calls.append(1) or [])
    monkeypatch.setattr(corpora_module, "default_splits", lambda: calls.append("read") or ((), ()))
    assert torch.equal(data.token_stream("default", "test", smol, store), stream)
    assert torch.equal(eval_windows("default", smol, 512, None, store).flatten(), stream[: stream.numel() // 512 * 512])
    assert calls == []  # the run's Corpora serves the split it already read and tokenized
    # a loaded tokenizer is known by its name, class and size: the run's own tokenizer finds preflight's tokens
    from transformers import AutoTokenizer

    assert torch.equal(data.token_stream("default", "test", AutoTokenizer.from_pretrained(smol.name_or_path), store),
                       stream)
    assert calls == []
    # and nothing outlives the run: a new Corpora reads and tokenizes again
    with pytest.raises(UserError, match="empty"):
        data.token_stream("default", "test", smol, Corpora())
    assert calls == ["read"]


def test_default_eval_windows_are_stream_slices(default_cached):
    tok, store = default_cached
    stream = data.token_stream("default", "test", tok, store)
    windows = eval_windows("default", tok, 512, None, store)
    assert windows.shape == (stream.numel() // 512, 512)
    assert torch.equal(windows.flatten(), stream[: windows.numel()])
    first = eval_windows("default", tok, 512, 3, store)
    assert torch.equal(first, windows[:3])


# ---------------------------------------------------------------------------------------------
# Local files


def test_txt_paragraphs(tmp_path):
    path = write(tmp_path, "c.txt", "\ufeffFirst para\r\nstill first.\r\n\r\n\n  Second.  \n \t\n\nThird\n")
    docs = load_documents(path, "train")
    assert docs == [Document("First para\nstill first."), Document("Second."), Document("Third")]
    assert load_documents(path, "test") == docs


def test_jsonl_with_topics(tmp_path):
    lines = [json.dumps({"text": "Über alles", "topic": "a"}), "", json.dumps({"text": "plain"}),
             json.dumps({"text": "   ", "topic": "b"}), json.dumps({"text": "c", "topic": None, "extra": 1})]
    docs = load_documents(write(tmp_path, "c.jsonl", "\n".join(lines) + "\n"), "test")
    assert docs == [Document("Über alles", "a"), Document("plain"), Document("c")]


def test_file_edits_are_picked_up(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("one\n\ntwo\n")
    assert len(load_documents(str(path), "train")) == 2
    path.write_text("one\n\ntwo\n\nthree and more\n")
    assert len(load_documents(str(path), "train")) == 3


def test_tokenize_stream_joins_with_the_separator():
    docs = [Document("ab"), Document("c"), Document("dé")]
    assert tokenize_stream(docs, ByteTokenizer()).tolist() == byte_ids("ab\n\nc\n\ndé")
    assert tokenize_stream(docs, ByteTokenizer(), " ").tolist() == byte_ids("ab c dé")
    assert tokenize_stream(docs, ByteTokenizer(bos=True)).tolist() == [256] + byte_ids("ab\n\nc\n\ndé")
    assert tokenize_stream(docs, ByteTokenizer(bos=True), add_special_tokens=False).tolist() == byte_ids("ab\n\nc\n\ndé")


@pytest.mark.parametrize(
    "pattern, mode",
    [
        (r"\w+|[^\w\s]+|\s+", "lead"),  # never merges across "\n\n" + word
        (r"\w+|[^\w\s]+\n*|\s+", "trail"),  # punctuation swallows the newlines after it (Llama-3 style)
        (r"\S+\s+\S+|\S+|\s+", "exact"),  # word pairs merge across boundaries: only one call is right
    ],
)
def test_tokenize_stream_is_exact_whatever_the_boundary_behaviour(pattern, mode):
    tok = RegexTokenizer(pattern)
    texts = [f"Doc {i} ends." for i in range(40)] + ["Last one!"]
    corpus = tokens_module.TokenCorpus(texts, tok, "\n\n")
    assert corpus.mode == mode
    assert corpus.stream().tolist() == tok(["\n\n".join(texts)])["input_ids"][0]
    subset = [3, 7, 40]
    assert corpus.stream(subset).tolist() == tok(["\n\n".join(texts[i] for i in subset)])["input_ids"][0]


def test_eval_windows_non_overlapping_remainder_dropped(tmp_path):
    paragraphs = ["alpha beta", "gamma", "delta epsilon zeta"]
    path = write(tmp_path, "eval.txt", "\n\n".join(paragraphs))
    stream = byte_ids("\n\n".join(paragraphs))  # 37 bytes
    assert len(stream) == 37
    windows = eval_windows(path, ByteTokenizer(), 8, None)
    assert windows.shape == (4, 8)  # 37 // 8, the last 5 tokens dropped
    assert windows.flatten().tolist() == stream[:32]
    assert eval_windows(path, ByteTokenizer(), 8, 2).tolist() == [stream[:8], stream[8:16]]
    assert eval_windows(path, ByteTokenizer(), 37, 5).shape == (1, 37)


# ---------------------------------------------------------------------------------------------
# Bad input: one-line UserErrors


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("empty.txt", "  \n\n \t\n", ["empty"]),
        ("blank.jsonl", '{"text": "  "}\n\n', ["empty"]),
        ("latin1.txt", b"caf\xe9 ok\n", ["latin1.txt", "UTF-8", "byte offset 3"]),
        ("bad.jsonl", '{"text": "a"}\n\n{"text": oops}\n', ["bad.jsonl", "line 3", "JSON"]),
        ("notext.jsonl", '{"text": "a"}\n{"body": "b"}\n', ["line 2", '"text"']),
        ("nonstr.jsonl", '{"text": 5}\n', ["line 1", "string"]),
        ("list.jsonl", '["text"]\n', ["line 1", '"text"']),
    ],
)
def test_bad_files(tmp_path, name, content, words):
    path = write(tmp_path, name, content)
    with pytest.raises(UserError) as err:
        load_documents(path, "train")
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_missing_file_and_unknown_names(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_documents(str(tmp_path / "nope.txt"), "train")
    for name in ("wikitext103", str(tmp_path / "table.csv")):
        with pytest.raises(UserError, match="unknown dataset"):
            load_documents(name, "test")
    with pytest.raises(UserError, match="unknown dataset"):
        eval_windows("wikitext-2", ByteTokenizer(), 8, None)


def test_corpus_shorter_than_one_window(tmp_path):
    path = write(tmp_path, "short.txt", "tiny")
    with pytest.raises(UserError, match=r"has 4 tokens, shorter than one window of seqlen 5"):
        eval_windows(path, ByteTokenizer(), 5, None)
    with pytest.raises(UserError, match="too short for one calibration window"):
        plan_calibration(path, ByteTokenizer(), 2, 4, 1, "iid", 0.5, 0)  # needs seqlen + 1 tokens


def test_partition_needs_topics_and_enough_samples(tmp_path):
    path = write(tmp_path, "c.txt", "some words here\n\nand more words there\n")
    for partition in ("topic", "dirichlet"):
        with pytest.raises(UserError, match="data.partition"):
            plan_calibration(path, ByteTokenizer(), 4, 8, 2, partition, 0.5, 0)
    # the config rejects these (tests/test_validation.py); called directly, they are programming errors
    with pytest.raises(ValueError, match="num_clients"):
        plan_calibration(path, ByteTokenizer(), 3, 8, 4, "iid", 0.5, 0)
    with pytest.raises(ValueError, match="shards"):
        plan_calibration(path, ByteTokenizer(), 4, 8, 2, "shards", 0.5, 0)


def test_short_topics_are_skipped(tmp_path):
    lines = [{"text": "x" * 50, "topic": "long"}, {"text": "y" * 5, "topic": "short"}]
    path = write(tmp_path, "t.jsonl", "\n".join(json.dumps(x) for x in lines))
    plan = plan_calibration(path, ByteTokenizer(), 4, 10, 2, "topic", 0.5, 0)
    assert {w.topic for c in plan.per_client for w in c} == {"long"}
    with pytest.raises(UserError, match="no topic"):
        plan_calibration(path, ByteTokenizer(), 4, 60, 2, "dirichlet", 0.5, 0)


# ---------------------------------------------------------------------------------------------
# Hub datasets


@pytest.fixture
def offline(monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    yield


@pytest.mark.parametrize("name", ["wikitext2", "ptb", "c4"])
def test_hub_datasets_offline_give_one_line_user_error(offline, name):
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        eval_windows(name, ByteTokenizer(), 16, 2)
    with pytest.raises(UserError):
        plan_calibration(name, ByteTokenizer(), 2, 16, 1, "iid", 0.5, 0)
    message = str(err.value)
    assert name in message and ".txt" in message and ".jsonl" in message and "\n" not in message
    assert time.monotonic() - start < 30


def fake_hub(monkeypatch, columns: dict[tuple[str, str], list[str]]):
    monkeypatch.setattr(corpora_module, "hub_column", lambda name, split: columns[(name, split)])


def test_hub_protocol_separators(monkeypatch):
    fake_hub(monkeypatch, {("wikitext2", "test"): [" = A = \n", "", " text \n"], ("wikitext2", "train"): ["a", "b"],
                           ("ptb", "test"): ["x y", "z"]})
    assert data.token_stream("wikitext2", "test", ByteTokenizer()).tolist() == byte_ids(" = A = \n\n\n\n\n text \n")
    assert data.token_stream("wikitext2", "train", ByteTokenizer()).tolist() == byte_ids("a b")
    assert data.token_stream("ptb", "test", ByteTokenizer()).tolist() == byte_ids("x y z")


def test_c4_follows_sparsegpt(monkeypatch):
    validation = ["v"] * data.C4_EVAL_DOCS + ["IGNORED"] * 50
    train = ["short", "a long enough document number one", "tiny", "another long document, number two"]
    fake_hub(monkeypatch, {("c4", "test"): validation, ("c4", "train"): train})
    # first 1100 documents joined with " " (2199 bytes); 9 * 256 > 2199, so no truncation
    windows = eval_windows("c4", ByteTokenizer(), 9, None)
    assert windows.shape == (2199 // 9, 9) and set(windows.unique().tolist()) == {ord("v"), ord(" ")}
    # truncated to 256 * seqlen tokens
    assert eval_windows("c4", ByteTokenizer(), 4, None).shape == (256, 4)

    tok = ByteTokenizer(bos=True)
    plan = plan_calibration("c4", tok, 6, 10, 2, "iid", 0.5, 0)
    assert plan.sizes == [3, 3]
    for spec in (w for c in plan.per_client for w in c):
        doc = train[int(spec.stream.split(":")[1])]
        assert len(doc) + 1 > 10  # only documents longer than seqlen tokens (BOS included)
        assert plan.streams[spec.stream].tolist() == [256] + byte_ids(doc)
        assert 0 <= spec.start <= len(doc) + 1 - 10 - 1
    assert plan.all_windows().shape == (6, 10)
    with pytest.raises(UserError, match="data.partition"):
        plan_calibration("c4", tok, 6, 10, 2, "topic", 0.5, 0)


# ---------------------------------------------------------------------------------------------
# Calibration plans on the embedded corpus


def window_specs(plan: CalibrationPlan):
    return [[(w.stream, w.start, w.topic) for w in c] for c in plan.per_client]


@pytest.mark.parametrize("partition", ["iid", "topic", "dirichlet"])
def test_plans_are_deterministic_per_seed(default_cached, partition):
    tok, store = default_cached
    a = plan_calibration("default", tok, 12, 64, 4, partition, 0.5, seed=0, store=store)
    b = plan_calibration("default", tok, 12, 64, 4, partition, 0.5, seed=0, store=store)
    c = plan_calibration("default", tok, 12, 64, 4, partition, 0.5, seed=1, store=store)
    assert window_specs(a) == window_specs(b)
    assert torch.equal(a.all_windows(), b.all_windows())
    assert window_specs(a) != window_specs(c)


def test_iid_sizes_and_content(default_cached):
    tok, store = default_cached
    plan = plan_calibration("default", tok, 10, 128, 4, "iid", 0.5, 0, store=store)
    assert plan.sizes == [3, 3, 2, 2]
    stream = data.token_stream("default", "train", tok, store)
    windows = plan.all_windows()
    assert windows.shape == (10, 128) and windows.dtype == torch.long
    specs = [w for c in plan.per_client for w in c]
    assert all(w.stream == "all" and w.topic is None and 0 <= w.start <= stream.numel() - 129 for w in specs)
    for row, w in zip(windows, specs):
        assert torch.equal(row, stream[w.start:w.start + 128])
    # the windows are SparseGPT's draw: random.Random(seed).randint(0, len - seqlen - 1), in order
    rng = random.Random(0)
    assert [w.start for w in specs] == [rng.randint(0, stream.numel() - 128 - 1) for _ in range(10)]


def test_topic_partition_gives_each_client_its_own_topics(default_cached):
    tok, store = default_cached
    plan = plan_calibration("default", tok, 40, 64, 4, "topic", 0.5, 0, store=store)
    assert plan.sizes == [10] * 4
    held = [set(t) for t in plan.client_topics]
    assert all(held) and sum(len(h) for h in held) == len(TOPICS) and set().union(*held) == TOPICS
    for i in range(4):
        for j in range(i + 1, 4):
            assert not held[i] & held[j]
    docs = load_documents("default", "train")
    corpus = store.tokens("default", "train", tok).corpus
    math_docs = [i for i, d in enumerate(docs) if d.topic == "Mathematics"]
    assert torch.equal(corpus.stream(math_docs), tokenize_stream([docs[i] for i in math_docs], tok))
    for client, windows in enumerate(plan.per_client):
        assert {w.topic for w in windows} <= held[client]
        rows = plan.materialize([client])[client]
        for row, w in zip(rows, windows):
            stream = plan.streams[w.topic]
            assert torch.equal(stream, corpus.stream([i for i, d in enumerate(docs) if d.topic == w.topic]))
            assert torch.equal(row, stream[w.start:w.start + 64])


def test_topic_partition_with_more_clients_than_topics(default_cached):
    tok, store = default_cached
    plan = plan_calibration("default", tok, 64, 32, 16, "topic", 0.5, 0, store=store)
    assert plan.sizes == [4] * 16
    assert all(len(t) == 1 for t in plan.client_topics)
    assert {t[0] for t in plan.client_topics} == TOPICS
    by_topic: dict[str, list[tuple[int, int]]] = {}
    for windows in plan.per_client:  # clients sharing a topic draw from disjoint parts of its stream
        by_topic.setdefault(windows[0].topic, []).append((min(w.start for w in windows),
                                                          max(w.start for w in windows) + 32))
    shared = [spans for spans in by_topic.values() if len(spans) > 1]
    assert shared
    for spans in shared:
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_dirichlet_sizes_and_skew(default_cached):
    tok, store = default_cached
    plan = plan_calibration("default", tok, 10, 64, 3, "dirichlet", 0.5, 0, store=store)
    assert plan.sizes == [4, 3, 3]
    assert all(abs(sum(m.values()) - 1) < 1e-9 for m in plan.mixtures)
    skewed = plan_calibration("default", tok, 64, 64, 4, "dirichlet", 0.01, 0, store=store)
    for windows in skewed.per_client:  # tiny alpha: each client is dominated by one topic
        assert Counter(w.topic for w in windows).most_common(1)[0][1] >= 0.75 * len(windows)
    flat = plan_calibration("default", tok, 240, 64, 2, "dirichlet", 1000.0, 0, store=store)
    for windows in flat.per_client:  # huge alpha: near-uniform mixtures
        assert len({w.topic for w in windows}) == len(TOPICS)


def test_materialize_builds_only_the_requested_clients(default_cached, monkeypatch):
    tok, store = default_cached
    plan = plan_calibration("default", tok, 10, 64, 4, "topic", 0.5, 0, store=store)
    everything = plan.all_windows()
    built = []
    original = CalibrationPlan._client_windows
    monkeypatch.setattr(CalibrationPlan, "_client_windows", lambda self, c: built.append(c) or original(self, c))
    mine = plan.materialize([2, 3])
    assert sorted(mine) == [2, 3] and sorted(built) == [2, 3]
    offsets = [0, 3, 6, 8, 10]
    for client in (2, 3):
        assert mine[client].shape == (plan.sizes[client], 64)
        assert torch.equal(mine[client], everything[offsets[client]:offsets[client + 1]])
    with pytest.raises(ValueError):
        plan.materialize([4])
