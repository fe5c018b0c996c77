"""Secure aggregation: pairwise-masked sums (Bonawitz et al. 2017) behind the ``Reducer`` seam.

``SecureReducer`` sums named tensors over all processes like a plain all-reduce, but every tensor
a process hands to the collective is a one-time-padded fixed-point encoding that looks uniformly
random; the pads cancel exactly in the sum. Parties are processes (the virtual clients of one
process are one party, whose local sum is its input). The protocol, in the order it runs:

1. **Setup** (once, in the constructor; every rank constructs the reducer at the same point).
   - At least 3 parties, else a one-line :class:`UserError`: with 2, each learns the other's input
     from the sum.
   - Every kind's public encoding is checked against the party count before anything else
     (:meth:`Encoding.check`).
   - Each party draws an ephemeral X25519 key pair; the raw 32-byte public keys, and a 32-byte
     random nonce from rank 0, are exchanged through one plain sum of a ``[P + 1, 32]`` table
     (party p fills row p, rank 0 the last row): an all-gather built from the inner reducer.
   - The run id is SHA-256 over the protocol label, the config seed, the party count, the nonce and
     all public keys. Each pair (i, j) derives a pair key by X25519 then HKDF-SHA256 (salt = run
     id, info = the pair).
2. **Every sum** (call c, kind, tag, tensor t at position n with name s).
   - Each value is encoded in fixed point with the kind's public :class:`Encoding`:
     q = round(x · 2^f) (half to even), after checking |x| <= bound. A value out of bound or not
     finite is never clipped: see "Bad input" below.
   - For each peer j, a per-use key is HKDF-Expand(pair key, info = label, c, kind, tag, n, s), so
     a mask is never reused: not across calls, tensors, pairs or runs. The mask m_ij is the
     AES-256-CTR keystream of that key (zero counter block; the key is single-use), read as words.
     No torch or numpy generator is involved.
   - Party i hands q + Σ_{j>i} m_ij − Σ_{j<i} m_ji mod 2^k to the collective, as words in
     [0, 2^k). Summed over parties the masks cancel: Σ_i q_i mod 2^k. Encoding, masking and
     decoding run 32 Ki values at a time, so that every pass stays in cache.
   - The sum is decoded as the signed residue and scaled back by 2^-f (through float64, exact
     below 2^53, then rounded once to the input's dtype), so the result equals the decoded plain
     fixed-point sum bitwise (:func:`fixed_point_sum`): it does not depend on the masks, on the run,
     or on how the sum was split over the collective's buckets. Integer kinds come back exact, in
     their own dtype.

**Words and modulus.** A kind travels as int32 words when its sum fits them (the integer counts:
the same bytes as the plain path's int32), else as int64. For w-bit words,
k = (w − 1) − ceil(log2 P) (:func:`modulus_bits`), so that P words in [0, 2^k) sum to less than
2^(w−1): the collective's signed addition never overflows, whatever the backend does with signed
overflow (gloo adds ``int64_t``, where overflow is undefined in C++). Masking itself is done on
unsigned numpy views, whose arithmetic wraps mod 2^w by definition; 2^k divides 2^w, so the final
``& (2^k − 1)`` gives the residue mod 2^k. The fixed-point sum decodes without ambiguity when
P · ceil(bound · 2^f) < 2^(k−1), which :meth:`Encoding.check` verifies (for int64 words) for
every kind before the first round: one line naming the kind and the numbers.

**Two limbs.** One word rounds a float32 value below 2^(23 − f) in magnitude (2^-13 for
``weight_sum``). An encoding with ``limbs`` 2 sends round(x · 2^(f + 40)) as two int64 words, the high
floor(x · 2^f) and the low next 40 bits, each masked and summed like a tensor of its own; the
decoded sum is then the correctly rounded exact sum, which is the plain float64 sum whenever that
one is exact. ``fit_weights`` uses two limbs; ``weight_sum`` one, unless ``federation.secure_bounds``
says ``{weight_sum: {limbs: 2}}`` (twice its words on the wire).

**Bad input.** A value outside its bound makes its party replace its whole payload with fresh random
words (so the others learn nothing, not even the sum of the rest) and raise a flag that travels
as one more masked word of the same collective. Every party sees the flag in the sum and raises a
one-line :class:`UserError`; the offending party's names the tensor, the kind and the value.

Kind ``"metadata"`` (byte counts, timings, standalone clients' perplexities) passes through to the
inner reducer in the clear. The encodings (:data:`DEFAULT_ENCODINGS`) and why their bounds are
what they are are listed in the README's "Secure aggregation" section.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.hazmat.primitives.serialization import Encoding as KeyEncoding
from cryptography.hazmat.primitives.serialization import PublicFormat

from fedspallm.errors import UserError
from fedspallm.federated.collectives import DEFAULT_BUCKET_BYTES, written_bytes

MIN_PARTIES = 3
LABEL = b"fedspallm/secure-aggregation/v1"
KEY_BYTES = 32
PLAIN_KINDS = ("metadata",)
CHUNK = 1 << 15  # values are encoded, masked and decoded 32 Ki at a time, so each pass stays in cache
_ZERO_COUNTER = bytes(16)


def modulus_bits(parties: int, word_bits: int = 64) -> int:
    """k = (word_bits − 1) − ceil(log2 P): P words below 2^k sum below 2^(word_bits − 1), so the signed
    collective never overflows."""
    return word_bits - 1 - (parties - 1).bit_length()


LOW_BITS = 40  # the low word of a two-limb encoding carries this many bits below 2^-frac_bits
EXACT = 2**53  # float64 holds every integer below it


@dataclass(frozen=True)
class Encoding:
    """The public fixed-point encoding of one kind of tensor: every value x a party hands in has
    |x| <= ``bound`` and is sent as round(x · 2^``frac_bits``). Integer kinds use ``frac_bits`` 0 and
    are exact.

    ``limbs`` 2 sends round(x · 2^(frac_bits + LOW_BITS)) as two int64 words, the high one
    floor(x · 2^frac_bits) and the low one the next :data:`LOW_BITS` bits (in [0, 2^LOW_BITS]): twice
    the words, and every float32 value down to 2^(23 − frac_bits − LOW_BITS) on the grid. The high
    words' sum stays below 2^53 (:meth:`fits`), so the two sums decode through float64 with one
    rounding: the correctly rounded exact sum."""

    bound: float
    frac_bits: int
    limbs: int = 1

    def max_word(self) -> int:
        """The largest |q| a value within the bound encodes to (the high word's, with two limbs)."""
        return math.ceil(Fraction(self.bound) * 2**self.frac_bits)

    def fits(self, parties: int, word_bits: int) -> bool:
        room = 2 ** (modulus_bits(parties, word_bits) - 1)
        if self.limbs == 1:
            return parties * self.max_word() < room
        # the high sum plus the carries of the low words (at most one per party) stays exact in float64
        return parties * (self.max_word() + 1) < min(room, EXACT) and parties * 2**LOW_BITS < room

    def check(self, kind: str, parties: int) -> None:
        """A one-line error unless ``parties`` sums of values within the bound decode without overflow."""
        if not (self.bound > 0 and math.isfinite(self.bound)) or not 0 <= self.frac_bits <= 62 \
                or self.limbs not in (1, 2):
            raise UserError(f"secure aggregation: kind {kind!r} needs a finite bound > 0, 0 <= frac_bits <= 62 and "
                            f"limbs 1 or 2, got bound {self.bound!r}, frac_bits {self.frac_bits!r} and limbs "
                            f"{self.limbs!r}")
        if not self.fits(parties, 64):
            k = modulus_bits(parties)
            limit = (f"2^{k - 1} (sums are taken mod 2^{k})" if self.limbs == 1
                     else f"2^{min(k - 1, 53)} (the high words' sum decodes through float64)")
            raise UserError(
                f"secure aggregation: kind {kind!r} would overflow: {parties} parties x bound {self.bound:g} x "
                f"2^{self.frac_bits} >= {limit}; lower its bound or frac_bits, or run fewer processes"
            )

    def words(self, parties: int) -> torch.dtype:
        """The collective's word: int32 when the sum fits (half the bytes of int64), else int64."""
        return torch.int32 if self.limbs == 1 and self.fits(parties, 32) else torch.int64

    def quantum(self) -> float:
        return 2.0 ** -(self.frac_bits + LOW_BITS * (self.limbs - 1))


# The public encodings. Bounds hold per party and per call: the value a process hands in is the sum
# over its own clients in that call (one round, one block). All of them fit 127 parties (k = 56).
DEFAULT_ENCODINGS: dict[str, Encoding] = {
    # Σ M⊙W over a party's clients: <= clients per process x max |W|; quantum 2^-36 = 1.5e-11.
    "weight_sum": Encoding(2.0**12, 36),
    # Integer counts per party (kept positions, contributors, prune votes): exact, in int32 words
    # (as the plain path sends them) for up to 127 parties.
    "keep_count": Encoding(2.0**16, 0),
    "contributors": Encoding(2.0**16, 0),
    "votes": Encoding(2.0**16, 0),
    # Second moments (SparseGPT's H = Σ x xᵀ, Wanda's Σ x_j²) divided by the public total token count,
    # so every entry is bounded by max x²: 2^24 allows |x| up to 4096; quantum 2^-24 = 6e-8.
    "hessian": Encoding(2.0**24, 24),
    "sq_norms": Encoding(2.0**24, 24),
    # Federated fine-tuning: Σ n_i W_i over a party's clients (n_i = windows of client i), in two limbs:
    # quantum 2^-64 (5.4e-20), so every float32 weight above 2^-41 in magnitude is on the grid and the sum
    # is the plain float64 sum's correctly rounded value (one word would round n_i W_i to 2^-28).
    "fit_weights": Encoding(2.0**20, 24, limbs=2),
    # Its clients' mean training losses and their number, summed per round (the reported train/loss).
    "fit_losses": Encoding(2.0**20, 24, limbs=2),
}


def encodings(overrides: Mapping[str, float | Mapping[str, float]] | None = None) -> dict[str, Encoding]:
    """The default encodings with ``overrides`` applied: ``{kind: bound}`` or ``{kind: {bound, frac_bits}}``."""
    table = dict(DEFAULT_ENCODINGS)
    for kind, value in (overrides or {}).items():
        if kind not in table:
            raise UserError(f"federation.secure_bounds: unknown kind {kind!r}; known: {', '.join(table)}")
        if isinstance(value, Mapping):
            unknown = set(value) - {"bound", "frac_bits", "limbs"}
            if unknown:
                raise UserError(f"federation.secure_bounds: kind {kind!r} takes bound, frac_bits and limbs, not "
                                f"{sorted(unknown)}")
            for key in ("frac_bits", "limbs"):
                if key in value and value[key] != int(value[key]):
                    raise UserError(f"federation.secure_bounds: kind {kind!r}: {key} {value[key]!r} is not an integer")
            table[kind] = Encoding(float(value.get("bound", table[kind].bound)),
                                   int(value.get("frac_bits", table[kind].frac_bits)),
                                   int(value.get("limbs", table[kind].limbs)))
        else:
            table[kind] = Encoding(float(value), table[kind].frac_bits)
        table[kind].check(kind, MIN_PARTIES)
    return table


def check_setup(parties: int, table: Mapping[str, Encoding] | None = None, *,
                switch: str = "federation.secure_aggregation", how: str = "") -> None:
    """The rules on public numbers that come before any collective: at least :data:`MIN_PARTIES` parties,
    and every kind's encoding fits ``parties`` (:meth:`Encoding.check`). One line each; ``switch`` is the
    config key that turned secure aggregation on, ``how`` what set the process count."""
    if parties < MIN_PARTIES:
        launched = f"{how}: " if how else ""
        raise UserError(
            f"{launched}{switch}=true needs at least {MIN_PARTIES} processes, got {parties}: with 2 each learns the "
            f"other's input from the sum; launch 3 or more (fabric run --devices 3) or set {switch} false"
        )
    for kind, encoding in (DEFAULT_ENCODINGS if table is None else table).items():
        encoding.check(kind, parties)


def _unsigned(words: torch.Tensor) -> np.ndarray:
    """A uint32/uint64 numpy view of int32/int64 words: numpy's unsigned arithmetic wraps by definition."""
    return words.numpy().view(np.uint32 if words.dtype == torch.int32 else np.uint64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where x · 2^f is exact: float64 for float64, float32 for the rest (float16 would overflow)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def encode_into(words: torch.Tensor, x: torch.Tensor, encoding: Encoding, scratch: torch.Tensor | None = None,
                limb: int = 0) -> None:
    """words (int32/int64) = round(x · 2^f), half to even; x flat, on the CPU, already within the bound.
    With two limbs, ``limb`` 0 is floor(x · 2^f) and ``limb`` 1 round(frac(x · 2^f) · 2^LOW_BITS).

    x · 2^f is exact (a power-of-two scale, far from overflow), and so are the floor and the fraction
    of a float, so the only rounding is round()."""
    if not x.dtype.is_floating_point:
        if limb:
            words.zero_()
            return
        words.copy_(x)
        if encoding.frac_bits:
            words.mul_(2**encoding.frac_bits)
        return
    compute = _compute_dtype(x.dtype)
    scaled = torch.empty(len(x), dtype=compute) if scratch is None else scratch[:len(x)]
    torch.mul(x.to(compute), 2.0**encoding.frac_bits, out=scaled)
    if encoding.limbs == 1:
        words.copy_(scaled.round_())
    elif limb == 0:
        words.copy_(scaled.floor_())
    else:
        words.copy_(scaled.sub_(torch.floor(scaled)).mul_(2.0**LOW_BITS).round_())


def _signed_residue(words: torch.Tensor, k: int) -> None:
    """words = their signed residue mod 2^k, in [−2^(k−1), 2^(k−1)), in place."""
    u = _unsigned(words)
    low, half = u.dtype.type(2**k - 1), u.dtype.type(2 ** (k - 1))
    np.bitwise_and(u, low, out=u)
    np.add(u, half, out=u)  # the residue shifted by half a modulus, so that ...
    np.bitwise_and(u, low, out=u)
    words.sub_(int(half))  # ... subtracting it back gives the signed residue


def decode_into(out: torch.Tensor, words: torch.Tensor, encoding: Encoding, k: int,
                scratch: torch.Tensor | None = None, low_words: torch.Tensor | None = None) -> None:
    """out = the signed residue of ``words`` mod 2^k, times 2^-f (``words`` is overwritten; both flat, CPU).
    With two limbs, ``low_words`` are the low words' sums (overwritten too).

    Through float64: exact below 2^53, then rounded once to out's dtype. Two limbs: the low sums'
    carries move into the high sums (still below 2^53), and high · 2^-f + low · 2^-(f + LOW_BITS),
    both exact, is rounded once."""
    _signed_residue(words, k)
    if not out.dtype.is_floating_point:
        out.copy_(words if not encoding.frac_bits else torch.div(words, 2**encoding.frac_bits, rounding_mode="floor"))
        return
    values = torch.empty(len(words), dtype=torch.float64) if scratch is None else scratch[:len(words)]
    if low_words is not None:
        _signed_residue(low_words, k)  # a sum of words in [0, 2^LOW_BITS]: non-negative
        words.add_(low_words >> LOW_BITS)
        low_words.bitwise_and_(2**LOW_BITS - 1)
    values.copy_(words).mul_(2.0**-encoding.frac_bits)
    if low_words is not None:
        values.add_(low_words.to(torch.float64).mul_(2.0 ** -(encoding.frac_bits + LOW_BITS)))
    out.copy_(values)


def fixed_point_sum(parts: list[torch.Tensor], encoding: Encoding, parties: int) -> torch.Tensor:
    """The plain fixed-point sum of the parties' tensors: what :meth:`SecureReducer.sum` must return, bit for bit."""
    totals = [torch.zeros(parts[0].numel(), dtype=torch.int64) for _ in range(encoding.limbs)]
    for part in parts:
        for limb, total in enumerate(totals):
            words = torch.empty(part.numel(), dtype=torch.int64)
            encode_into(words, part.detach().reshape(-1).cpu(), encoding, limb=limb)
            total += words
    out = torch.empty(parts[0].numel(), dtype=parts[0].dtype)
    decode_into(out, totals[0], encoding, modulus_bits(parties), low_words=totals[1] if encoding.limbs == 2 else None)
    return out.reshape(parts[0].shape)


def bound_violation(name: str, kind: str, tag: str, x: torch.Tensor, encoding: Encoding) -> str | None:
    """A one-line message if a value of ``x`` is not finite or outside ±bound, else None."""
    if x.numel() == 0:
        return None
    if x.dtype == torch.bool:
        raise ValueError(f"secure aggregation: tensor {name!r} is bool; hand counts as an integer dtype")
    lo, hi = torch.aminmax(x)
    worst = max(abs(float(lo)), abs(float(hi))) if x.dtype.is_floating_point else max(abs(int(lo)), abs(int(hi)))
    if math.isfinite(worst) and worst <= encoding.bound:
        return None
    what = "a value that is not finite" if not math.isfinite(worst) else f"the value {worst:.6g}"
    return (f"secure aggregation: tensor {name!r} (kind {kind!r}, {tag}) holds {what}, outside the public bound "
            f"±{encoding.bound:g}; values are never clipped: raise federation.secure_bounds.{kind}")


class InnerReducer(Protocol):
    """The plain all-reduce the secure one runs on (see ``Reducer`` in :mod:`fedspallm.federated.collectives`)."""

    world_size: int

    def sum(self, tensors: Mapping[str, torch.Tensor], *, kind: str, tag: str) -> dict[str, torch.Tensor]: ...


def _fields(*parts: bytes) -> bytes:
    """An unambiguous concatenation: every field prefixed by its length."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _buckets(names: list[str], flat: Mapping[str, torch.Tensor], max_words: int, limbs: int = 1):
    """(is first bucket, [(position, name), ...]) in order, each bucket at most ``max_words`` words
    (``limbs`` per value; a larger tensor is a bucket of its own); an empty call is one empty bucket, for its flag."""
    group: list[tuple[int, str]] = []
    words = 0
    first = True
    for index, name in enumerate(names):
        size = flat[name].numel() * limbs
        if group and words + size > max_words:
            yield first, group
            first, group, words = False, [], 0
        group.append((index, name))
        words += size
    if group or first:
        yield first, group


def _keystream(key: bytes):
    """AES-256-CTR from a zero counter block: the key is used for this one mask only."""
    return Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()


class SecureReducer:
    """Pairwise-masked secure aggregation over ``inner``, a plain reducer of integer words.

    Args:
        inner: the plain reducer (one party per process); it sees only masked words and the setup table.
        rank: this process's party index, 0 <= rank < inner.world_size.
        seed: the config seed, bound into the run id.
        bounds: ``{kind: Encoding}``, by default :data:`DEFAULT_ENCODINGS`.
        bucket_bytes: the most bytes of words handed to the collective at once (the plain reducer's buckets).
        switch: the config key that turned it on, for the one-line errors of :func:`check_setup`.

    Attributes for results.json: ``plain_bytes`` (what the same calls would hand a plain reducer),
    ``encoded_bytes`` (the words handed to the collective), ``wire_bytes`` (what this process wrote
    to its sockets during those collectives, see :func:`written_bytes`), ``metadata_bytes``,
    ``calls``, ``mask_seconds`` (encode, mask, unmask and decode) and ``collective_seconds``.
    """

    def __init__(self, inner: InnerReducer, rank: int, *, seed: int = 0,
                 bounds: Mapping[str, Encoding] | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 switch: str = "federation.secure_aggregation") -> None:
        try:
            self._setup(inner, rank, seed, bounds, bucket_bytes, switch)
        except UserError as err:  # the same checks on the same public numbers: every rank says the same
            err.same_on_every_rank = True  # type: ignore[attr-defined]
            raise

    def _setup(self, inner: InnerReducer, rank: int, seed: int, bounds: Mapping[str, Encoding] | None,
               bucket_bytes: int, switch: str) -> None:
        self.inner = inner
        self.bucket_bytes = bucket_bytes
        self.world_size = inner.world_size
        self.rank = rank
        self.encodings = dict(DEFAULT_ENCODINGS if bounds is None else bounds)
        check_setup(self.world_size, self.encodings, switch=switch)
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside 0..{self.world_size - 1}")
        self.calls = 0
        self.plain_bytes = self.encoded_bytes = self.metadata_bytes = self.wire_bytes = 0
        self.mask_seconds = self.collective_seconds = 0.0
        self._zeros = memoryview(bytes(CHUNK * 8))
        self._stream_bytes = np.empty(CHUNK * 8 + 16, dtype=np.uint8)  # update_into wants 15 spare bytes
        self._scratch = {dtype: torch.empty(CHUNK, dtype=dtype) for dtype in (torch.float32, torch.float64)}
        self._pair_keys = self._agree(seed)

    # -- setup -----------------------------------------------------------------------------------
    def _agree(self, seed: int) -> dict[int, bytes]:
        """Exchange public keys and the run nonce; derive one key per peer."""
        private = X25519PrivateKey.generate()
        public = private.public_key().public_bytes(KeyEncoding.Raw, PublicFormat.Raw)
        table = torch.zeros(self.world_size + 1, KEY_BYTES, dtype=torch.int64)
        table[self.rank] = torch.tensor(list(public), dtype=torch.int64)
        if self.rank == 0:
            table[self.world_size] = torch.tensor(list(os.urandom(KEY_BYTES)), dtype=torch.int64)
        table = self.inner.sum({"secure_aggregation/keys": table}, kind="metadata",
                               tag="secure aggregation setup")["secure_aggregation/keys"].cpu()
        rows = [bytes(row) for row in table.tolist()] if 0 <= int(table.min()) and int(table.max()) < 256 else []
        publics, nonce = rows[:-1], rows[-1:]
        if len(publics) != self.world_size or len(set(publics)) != self.world_size or publics[self.rank] != public:
            raise RuntimeError("secure aggregation setup: the exchanged public keys are inconsistent")
        self.run_id = hashlib.sha256(_fields(LABEL, b"run", str(seed).encode(), str(self.world_size).encode(),
                                             nonce[0], *publics)).digest()
        keys = {}
        for peer, peer_public in enumerate(publics):
            if peer == self.rank:
                continue
            shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
            lo, hi = sorted((self.rank, peer))
            keys[peer] = HKDF(hashes.SHA256(), KEY_BYTES, salt=self.run_id,
                              info=_fields(LABEL, b"pair", str(lo).encode(), str(hi).encode())).derive(shared)
        return keys

    def _streams(self, index: int, name: str, kind: str, tag: str) -> list[tuple[bool, object]]:
        """(add?, keystream) per peer: +mask towards higher ranks, −mask towards lower; a key per pair and use."""
        info = _fields(LABEL, b"mask", str(self.calls).encode(), kind.encode(), tag.encode(), str(index).encode(),
                       name.encode())
        return [(peer > self.rank, _keystream(HKDFExpand(hashes.SHA256(), KEY_BYTES, info=info).derive(key)))
                for peer, key in sorted(self._pair_keys.items())]

    # -- masking ---------------------------------------------------------------------------------
    def _mask(self, words: torch.Tensor, streams: list[tuple[bool, object]], k: int,
              source: torch.Tensor | None = None, encoding: Encoding | None = None, limb: int = 0) -> None:
        """words = encode(source) (or words as they are) + Σ ±keystream mod 2^k, chunk by chunk, in place."""
        u = _unsigned(words)
        low = u.dtype.type(2**k - 1)
        stream = self._stream_bytes.view(u.dtype)
        scratch = self._scratch[_compute_dtype(source.dtype)] if source is not None else None
        for start in range(0, len(u), CHUNK):
            part = u[start:start + CHUNK]
            if source is not None:
                encode_into(words[start:start + CHUNK], source[start:start + CHUNK], encoding, scratch, limb)
            for add, encryptor in streams:
                encryptor.update_into(self._zeros[:part.nbytes], self._stream_bytes)
                (np.add if add else np.subtract)(part, stream[:len(part)], out=part)
            np.bitwise_and(part, low, out=part)

    # -- the Reducer protocol ---------------------------------------------------------------------
    def sum(self, tensors: Mapping[str, torch.Tensor], *, kind: str, tag: str) -> dict[str, torch.Tensor]:
        """Element-wise sum over all parties; see the module docstring for what crosses the wire.

        The words go to the collective in buckets of at most ``bucket_bytes`` (so a round's sums never
        need a second full-size copy); the bound-violation flag rides in the first bucket, so every
        rank stops before any further sum is revealed."""
        self.calls += 1
        if kind in PLAIN_KINDS:
            self.metadata_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            return self.inner.sum(tensors, kind=kind, tag=tag)
        if kind not in self.encodings:
            raise ValueError(f"secure aggregation: no encoding for kind {kind!r}; known: "
                             f"{', '.join([*self.encodings, *PLAIN_KINDS])}")
        encoding = self.encodings[kind]
        started = time.perf_counter()
        collective_s = 0.0
        dtype = encoding.words(self.world_size)
        k = modulus_bits(self.world_size, torch.iinfo(dtype).bits)
        flat = {name: t.detach().reshape(-1).cpu() for name, t in tensors.items()}
        violation = None
        for name, values in flat.items():
            violation = violation or bound_violation(name, kind, tag, values, encoding)
        out = {}
        limbs = encoding.limbs
        for first, group in _buckets(list(flat), flat, self.bucket_bytes * 8 // torch.iinfo(dtype).bits, limbs):
            offsets = np.cumsum([0, *(flat[name].numel() * limbs for _, name in group)]).tolist()
            payload = torch.empty(offsets[-1] + first, dtype=dtype)  # the first bucket ends with the flag word
            if violation is None:
                for (index, name), lo, hi in zip(group, offsets, offsets[1:]):
                    streams, n = self._streams(index, name, kind, tag), flat[name].numel()
                    for limb in range(limbs):  # the high words, then the low ones, along one keystream per peer
                        self._mask(payload[lo + limb * n:lo + (limb + 1) * n], streams, k, flat[name], encoding, limb)
            else:  # fresh random words that cancel with nothing: the sum reveals nothing of anyone
                payload.zero_()
                self._mask(payload[:offsets[-1]], [(True, _keystream(os.urandom(KEY_BYTES)))], k)
            if first:
                payload[-1] = int(violation is not None)
                self._mask(payload[-1:], self._streams(len(flat), "bound violation flag", kind, tag), k)
            self.encoded_bytes += payload.numel() * payload.element_size()
            collective_started, written = time.perf_counter(), written_bytes()
            summed = self.inner.sum({"secure_aggregation/masked": payload}, kind=kind,
                                    tag=tag)["secure_aggregation/masked"].cpu()
            collective_s += time.perf_counter() - collective_started
            if written is not None:
                self.wire_bytes += written_bytes() - written
            if summed.data_ptr() == payload.data_ptr():
                summed = summed.clone()
            flags = int(summed[-1]) & (2**k - 1) if first else 0
            if flags:
                raise UserError(violation or (
                    f"secure aggregation: {flags} other process(es) handed a value outside the public bound of kind "
                    f"{kind!r} ({tag}); their own error names the tensor"))
            for (_, name), lo, hi in zip(group, offsets, offsets[1:]):
                n = flat[name].numel()
                result = torch.empty(n, dtype=tensors[name].dtype)
                for start in range(0, n, CHUNK):
                    stop = min(start + CHUNK, n)
                    decode_into(result[start:stop], summed[lo + start:lo + stop], encoding, k,
                                self._scratch[torch.float64],
                                summed[lo + n + start:lo + n + stop] if limbs == 2 else None)
                out[name] = result.reshape(tensors[name].shape).to(tensors[name].device)
        self.plain_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        self.collective_seconds += collective_s
        self.mask_seconds += time.perf_counter() - started - collective_s
        return {name: out[name] for name in tensors}

    def stats(self) -> dict[str, float | int | bool]:
        """What results.json records about this process's collectives (the same keys as the plain reducer's,
        ``handed_bytes`` being the masked words; ``wire_bytes`` counts every socket write of the inner
        reducer, the key exchange and the metadata included)."""
        inner = getattr(self.inner, "wire_bytes", None)
        return {"secure_aggregation": True, "parties": self.world_size, "calls": self.calls,
                "collective_seconds": self.collective_seconds, "mask_seconds": self.mask_seconds,
                "handed_bytes": self.encoded_bytes, "plain_bytes": self.plain_bytes,
                "metadata_bytes": self.metadata_bytes, "wire_bytes": self.wire_bytes if inner is None else inner}
