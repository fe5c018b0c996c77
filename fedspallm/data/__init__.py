"""Data, by job: :mod:`~fedspallm.data.corpora` (the documents of a corpus split),
:mod:`~fedspallm.data.tokens` (token streams, evaluation windows and the per-run :class:`Corpora`) and
:mod:`~fedspallm.data.partitions` (every client's calibration windows: iid, topic, Dirichlet)."""

from fedspallm.data.corpora import (
    BUILTIN_NAMES,
    FILE_SUFFIXES,
    HUB_DATASETS,
    Document,
    is_test_title,
    load_documents,
    separator_for,
)
from fedspallm.data.partitions import (
    ALL_STREAM,
    PARTITIONS,
    CalibrationPlan,
    WindowSpec,
    even_split,
    plan_calibration,
)
from fedspallm.data.tokens import C4_EVAL_DOCS, C4_EVAL_WINDOWS, Corpora, eval_windows, token_stream, tokenize_stream

__all__ = [
    "ALL_STREAM", "BUILTIN_NAMES", "C4_EVAL_DOCS", "C4_EVAL_WINDOWS", "FILE_SUFFIXES", "HUB_DATASETS", "PARTITIONS",
    "CalibrationPlan", "Corpora", "Document", "WindowSpec", "even_split", "eval_windows", "is_test_title",
    "load_documents", "plan_calibration", "separator_for", "token_stream", "tokenize_stream",
]
