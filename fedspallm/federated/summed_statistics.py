"""The statistics ``fedstats`` sums, in fixed point: one summation shared with ``centralized``.

SparseGPT's Σ x xᵀ and Wanda's Σ x_j² are sums over tokens, hence over clients, and over a client's
calibration batches. Each batch's sum S travels in the public fixed-point encoding of its kind
(``hessian`` / ``sq_norms`` in :data:`~fedspallm.federated.secure_aggregation.DEFAULT_ENCODINGS`, the
project's one fixed-point encoding): as the integer q = round(S / N · 2^f), N being the run's public
token count. A client adds its batches' integers (:class:`BlockWords`), a process its clients', and
the reducer gets Q · 2^-f, a float64 that is exactly that integer on the 2^-f grid. Integers add
exactly in any order, and so do these floats, because the sum over all clients stays far below 2^53
quanta (see :class:`StatisticCodec`): the plain all-reduce and secure aggregation both return the
exact sum, whatever the layout of clients over processes.

``centralized`` sums its own batches the same way (:meth:`StatisticCodec.collect_summed`), batching the
union of the windows client by client (:func:`~fedspallm.calibration.batch_bounds`). Each batch is then
the same float32 computation in both strategies, and the integer sums are equal: ``fedstats`` with any
number of clients is the centralized model on the union of their windows, bit for bit, as long as
the forward passes are (same device, dtype and kernels; every client samples every block).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedspallm.calibration import BlockStatistics, NumericalError, SequentialCalibration, Statistic
from fedspallm.errors import UserError
from fedspallm.federated.secure_aggregation import (
    DEFAULT_ENCODINGS,
    Encoding,
    decode_into,
    encode_into,
    encodings,
    modulus_bits,
)
from fedspallm.models import in_features
from fedspallm.pruners import all_finite

COUNT_FIELDS = 1  # the sequences behind a statistic
EXACT_WORDS = 2**52  # a process's words stay below bound · 2^f + K quanta; float64 adds integers exactly below 2^53


def check_statistic_encodings(table: Mapping[str, Encoding]) -> None:
    """The statistics' encodings keep float64 sums of their words exact: one limb, below 2^52 quanta."""
    for kind in sorted({"hessian", "sq_norms"} & set(table)):
        encoding = table[kind]
        if encoding.limbs != 1:
            raise UserError(f"federation.secure_bounds.{kind}: limbs {encoding.limbs}; statistics are sums of "
                            "one-limb words (already exact), so limbs must be 1")
        if encoding.max_word() >= EXACT_WORDS:
            raise UserError(f"federation.secure_bounds.{kind}: bound {encoding.bound:g} x 2^{encoding.frac_bits} "
                            f"reaches 2^{EXACT_WORDS.bit_length() - 1} quanta; fedstats' float64 sums are exact only "
                            "below it: lower the bound or frac_bits")


class StatisticCodec:
    """A statistic <-> its fixed-point words: the encoding ``fedstats`` and ``centralized`` share.

    A statistic's plain sum S (Σ x xᵀ or Σ x_j², :meth:`Statistic.to_sum`) travels as the words
    round(S / N · 2^f) of its kind's encoding (bound 2^24, f = 24: a per-token second moment with a
    quantum of 6e-8, far below SparseGPT's damping of 1% of the mean diagonal). Of a Hessian only the
    upper triangle with its diagonal travels; decoding mirrors it.

    Overflow is impossible, and float64 sums are exact: before encoding, a client checks its values against
    ±bound · t / N, t being its own tokens behind the statistic. The clients' t add up to at most N, so
    any partial sum of their words stays within bound · 2^f + K = 2^48 + K < 2^53, whatever K and the
    layout; a process's share is within the encoding's bound, as secure aggregation requires.
    """

    def __init__(self, total_tokens: int, encodings: Mapping[str, Encoding] = DEFAULT_ENCODINGS) -> None:
        if total_tokens <= 0:
            raise ValueError("the public token count must be positive")
        check_statistic_encodings(encodings)
        self.total_tokens = total_tokens
        self.encodings = encodings
        self._upper: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def upper(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if width not in self._upper:
            rows, cols = torch.triu_indices(width, width)
            self._upper[width] = (rows, cols)
        return self._upper[width]

    @staticmethod
    def entries(kind: str, width: int) -> int:
        return width * (width + 1) // 2 if kind == "hessian" else width

    def wire_bytes(self, kind: str, width: int) -> int:
        """What one client sends for one statistic: its 8-byte words and its sequence count."""
        return (self.entries(kind, width) + COUNT_FIELDS) * 8

    def problem(self, stat: Statistic) -> str | None:
        """Why ``stat`` cannot be sent (not finite, or beyond the public bound), or None. Names no value."""
        total = stat.to_sum()
        if not all_finite(total):
            return "is not finite (NaN or inf)"
        bound = self.encodings[stat.kind].bound
        if total.numel() and float(total.abs().max()) > bound * stat.tokens:
            return (f"is outside the public fixed-point bound (a mean second moment beyond {bound:g}, i.e. inputs "
                    f"above {bound ** 0.5:g} in RMS)")
        return None

    def encode(self, stat: Statistic) -> torch.Tensor:
        """The int64 words of ``stat`` (flat), after :meth:`problem` found nothing."""
        scaled = stat.to_sum() / self.total_tokens
        if stat.kind == "hessian":
            scaled = scaled[self.upper(scaled.shape[0])]
        words = torch.empty(scaled.numel(), dtype=torch.int64)
        encode_into(words, scaled, self.encodings[stat.kind])
        return words

    def on_grid(self, kind: str, words: torch.Tensor) -> torch.Tensor:
        """Summed words as the float64 values they stand for (exact: below 2^53 quanta)."""
        out = torch.empty(words.numel(), dtype=torch.float64)
        decode_into(out, words.clone(), self.encodings[kind], modulus_bits(1))
        return out

    def decode(self, kind: str, values: torch.Tensor, samples: int, width: int) -> Statistic:
        """The statistic whose summed, decoded values (:meth:`on_grid`) are ``values``, over ``samples`` sequences."""
        values = values * self.total_tokens
        if kind == "hessian":
            rows, cols = self.upper(width)
            total = torch.zeros(width, width, dtype=torch.float64)
            total[cols, rows] = values
            total[rows, cols] = values
        else:
            total = values
        return Statistic.from_sum(kind, total, samples, 0)  # token counts are not exchanged

    def collect_summed(self, calibration: SequentialCalibration, index: int) -> BlockStatistics:
        """Block ``index``'s statistics as one party's batches sum in fixed point: what ``centralized``
        prunes from (:func:`~fedspallm.calibration.prune_sequential`'s ``collect``)."""
        words = BlockWords(self)
        statistics = calibration.collect(index, on_batch=words.add)
        for key, problem in words.problems.items():
            raise NumericalError(f"block {index} {key}: the statistic {problem}")
        layers = calibration.layers(index)
        values = {}
        for key in dict.fromkeys(statistics.readers.values()):
            width = in_features(layers[key])
            summed = words.words.get(key, torch.zeros(self.entries(statistics.kind, width), dtype=torch.int64))
            values[key] = self.decode(statistics.kind, self.on_grid(statistics.kind, summed),
                                      words.samples.get(key, 0), width)
        return BlockStatistics(statistics.kind, dict(statistics.readers), values)


class BlockWords:
    """One party's statistics of one block: per key, the sum of its batches' fixed-point words.

    A batch whose statistic cannot be sent (:meth:`StatisticCodec.problem`) marks its key in
    ``problems``, and nothing of that key is kept. Checking each batch against the bound on its own
    tokens keeps the sum within the bound on all of them.
    """

    def __init__(self, codec: StatisticCodec) -> None:
        self.codec = codec
        self.words: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}
        self.problems: dict[str, str] = {}

    def add(self, batch: BlockStatistics) -> None:
        for key, stat in batch.values.items():
            if key in self.problems:
                continue
            problem = self.codec.problem(stat)
            if problem is not None:
                self.problems[key] = problem
                self.words.pop(key, None)
                self.samples.pop(key, None)
                continue
            words = self.codec.encode(stat)
            self.words[key] = words if key not in self.words else self.words[key].add_(words)
            self.samples[key] = self.samples.get(key, 0) + stat.samples


def run_codec(calibration: Any, federation: Any) -> StatisticCodec:
    """The run's codec: its public token count, and the encodings secure aggregation uses for the run
    (``federation.secure_bounds``), so that the plain and the masked sum of the words are the same."""
    return StatisticCodec(public_token_count(calibration), encodings(federation.secure_bounds))


def public_token_count(calibration: Any) -> int:
    """Every calibration window of every client, in tokens: a figure every party derives from the config."""
    return sum(calibration.sizes) * calibration.seqlen
