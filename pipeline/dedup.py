"""Duplicate and contamination detection, vectorised over whole columns (blend and filter).

Texts are split into words with pyarrow kernels (lower case, split on whitespace, punctuation
trimmed from each word's ends: "Hello, World!" and "hello world" give the same words). Words
become integer ids by dictionary-encoding the flattened words, so shingles, MinHash signatures
and n-gram look-ups are numpy array operations with no Python loop per row. On 128K rows this
takes seconds, where a per-row MinHash (datasketch's `MinHash.update`) spends that long hashing
shingles one at a time.

Memory stays bounded by a constant per row: a corpus is read in chunks of rows, and only each
row's 16-byte digest (exact duplicates) and its LSH band keys cut to 32 bits (near duplicates:
4 bytes a band, a quarter of a 64-permutation signature) are kept across chunks; the signatures
of the few rows whose cut keys collide are computed again for the check. A `Vocabulary` carries
word ids from chunk to chunk in first-seen order, so signatures computed chunk by chunk (or
again later) equal those of one pass over everything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-spread 64-bit hash of each element (wraps mod 2^64)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x & _MASK


# Trimmed from both ends of every word. A regex replace of every non-letter over the whole text
# ([^\pL\pN]+) took 3.4 s on 128K 100-word texts here; splitting then trimming takes 1.5 s.
PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’«»—–…¡¿"


@dataclass(frozen=True)
class Words:
    """Each text as a run of word ids: `ids[offsets[i]:offsets[i+1]]` are text i's words."""

    ids: np.ndarray  # uint64 word ids, shared by every text of one `words()` call
    offsets: np.ndarray  # int64, len(texts) + 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class Vocabulary:
    """Word -> id (from 1) in first-seen order, shared by every `words()` call given it."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def encode(self, tokens: pa.ChunkedArray) -> np.ndarray:
        encoded = pc.dictionary_encode(tokens).combine_chunks()
        # A chunk's dictionary lists its words in first-seen order, so new words get ids in the
        # order one pass over all chunks would give them.
        ids = self._ids
        known = [ids.setdefault(w, len(ids) + 1) for w in encoded.dictionary.to_pylist()]
        lookup = np.array(known, dtype=np.uint64)
        return lookup[encoded.indices.to_numpy(zero_copy_only=False)]


def words(*columns: pa.Array, vocabulary: Vocabulary | None = None) -> list[Words]:
    """Word ids for several string columns, in one id space (so columns can be compared), or in
    `vocabulary`'s, which spans calls."""
    flat, lengths = [], []
    for column in columns:
        split = pc.utf8_split_whitespace(pc.utf8_lower(column))
        tokens = pc.utf8_trim(pc.list_flatten(split), characters=PUNCTUATION)
        keep = pc.not_equal(tokens, "")  # a token of punctuation alone is no word
        parents = pc.list_parent_indices(split).filter(keep).to_numpy(zero_copy_only=False)
        flat.append(tokens.filter(keep))
        lengths.append(np.bincount(parents, minlength=len(column)))
    tokens = pa.chunked_array(flat, type=pa.string())
    ids = (vocabulary or Vocabulary()).encode(tokens)
    out, start = [], 0
    for f, n in zip(flat, lengths, strict=True):
        offsets = np.zeros(len(n) + 1, dtype=np.int64)
        np.cumsum(n, out=offsets[1:])
        out.append(Words(ids[start : start + len(f)], offsets))
        start += len(f)
    return out


def ngrams(w: Words, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every word n-gram and the row each belongs to; a text shorter than n words gives
    one hash of all its words, so short texts still compare."""
    lengths = w.lengths()
    rows = np.repeat(np.arange(len(lengths)), lengths)
    # Polynomial hash of the n ids from each position (ids past the row's end count as 0), mixed
    # once at the end: n multiply-adds over the whole array instead of n full mixes.
    total = len(w.ids)
    position = np.arange(total) - np.repeat(w.offsets[:-1], lengths)  # index within its row
    remaining = np.repeat(lengths, lengths) - position  # words from here to the row's end
    padded = np.r_[w.ids, np.zeros(n, dtype=np.uint64)]
    h = np.zeros(total, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            part = np.where(remaining > k, padded[k : k + total], np.uint64(0))
            h = h * np.uint64(0x100000001B3) + part
    h = _mix(h)
    # A full n-gram starts where n words remain; a short row keeps only its first position.
    valid = (remaining >= n) | ((position == 0) & (lengths[rows] < n))
    return h[valid], rows[valid]


def digests(keys: pa.Array) -> np.ndarray:
    """A 16-byte BLAKE2b digest of each string (null as ""): what exact duplicates are judged
    on, so the strings themselves need not be kept (a chance collision is ~2^-64 at 1M rows)."""
    out = b"".join(
        hashlib.blake2b((k or "").encode(), digest_size=16).digest() for k in keys.to_pylist()
    )
    return np.frombuffer(out, dtype=np.dtype((np.void, 16)))


def exact_duplicates(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row: is it a repeat of an earlier row with the same key (any array np.unique
    sorts, e.g. `digests`), and that row's index."""
    _, first_index, inverse = np.unique(keys, return_index=True, return_inverse=True)
    first = first_index[inverse.ravel()]
    return first != np.arange(len(keys)), first


def minhash(w: Words, shingle: int, num_perm: int) -> np.ndarray:
    """MinHash signatures (rows x num_perm, uint32) over word `shingle`-grams; an empty text gets
    all-max, which matches nothing but another empty text."""
    hashes, rows = ngrams(w, shingle)
    hashes = (hashes >> np.uint64(32)).astype(np.uint32)
    n = len(w.offsets) - 1
    sig = np.full((num_perm, n), np.iinfo(np.uint32).max, dtype=np.uint32)
    if len(hashes) == 0:
        return sig.T.copy()
    # One (odd multiplier, offset) pair per permutation, applied to already-mixed 32-bit shingle
    # hashes, laid out permutations x shingles so the min runs over contiguous memory: 10M
    # shingles x 64 permutations take 0.4 s here, against 4-7 s shingles-major or in 64 bits.
    seeds = _mix(np.arange(1, 2 * num_perm + 1, dtype=np.uint64)) >> np.uint64(32)
    mult = seeds[:num_perm].astype(np.uint32) | np.uint32(1)
    add = seeds[num_perm:].astype(np.uint32)
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # each row's first hash
    ends = np.r_[starts, len(hashes)]
    present = rows[starts]
    limit = max(1, 8_000_000 // num_perm)  # hashes per block: bounds the block to ~32 MB
    lo = 0
    while lo < len(starts):
        hi = max(lo + 1, int(np.searchsorted(ends, ends[lo] + limit, side="right")) - 1)
        hi = min(hi, len(starts))
        with np.errstate(over="ignore"):  # multiply-add hashing wraps mod 2^32 on purpose
            block = mult[:, None] * hashes[None, ends[lo] : ends[hi]]
            block += add[:, None]
        sig[:, present[lo:hi]] = np.minimum.reduceat(block, starts[lo:hi] - starts[lo], axis=1)
        lo = hi
    return sig.T.copy()


def signatures(chunks: Iterable[pa.Array], rows: int, shingle: int, num_perm: int) -> np.ndarray:
    """`minhash` of every row of several chunks of texts (`rows` in all), as one (rows x
    num_perm) array filled in place: no second copy while it is assembled."""
    vocabulary = Vocabulary()
    sig = np.empty((rows, num_perm), dtype=np.uint32)
    start = 0
    for chunk in chunks:
        part = minhash(words(chunk, vocabulary=vocabulary)[0], shingle, num_perm)
        sig[start : start + len(part)] = part
        start += len(part)
    assert start == rows, f"the chunks held {start} rows, not {rows}"
    return sig


def band_key(sig: np.ndarray, groups: np.ndarray, band: int, bands: int) -> np.ndarray:
    """Each row's LSH key (uint64) in one band: its group id and that band's signature values
    (of `sig`, rows x num_perm), hashed."""
    per_band = sig.shape[1] // bands
    key = _mix(groups.astype(np.uint64) ^ np.uint64(band + 1))
    for j in range(band * per_band, (band + 1) * per_band):
        key = _mix(key ^ sig[:, j])
    return key


def near_duplicates(
    sig: np.ndarray, groups: np.ndarray, threshold: float, bands: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows whose estimated Jaccard similarity to an earlier row of the same group reaches
    `threshold`: (is_duplicate, the earlier row, the estimate).

    LSH banding proposes candidates (rows sharing all values of one band); each candidate is then
    checked against the band's first row on the full signature, so false positives cost nothing.
    """
    n = len(sig)
    dup = np.zeros(n, dtype=bool)
    match = np.arange(n)
    score = np.zeros(n)
    if n == 0:
        return dup, match, score
    empty = sig[:, 0] == np.iinfo(np.uint32).max
    for b in range(bands):
        key = band_key(sig, groups, b, bands)
        _, first_index, inverse = np.unique(key, return_index=True, return_inverse=True)
        first = first_index[inverse]
        cand = np.flatnonzero((first != np.arange(n)) & ~dup & ~empty)
        if len(cand) == 0:
            continue
        est = (sig[cand] == sig[first[cand]]).mean(axis=1)
        hit = cand[est >= threshold]
        dup[hit], match[hit], score[hit] = True, first[hit], est[est >= threshold]
    # A row may match one that is itself a duplicate (a cluster of three); point every removed
    # row at the cluster's kept row. Matches always point to an earlier row, so this ends.
    while np.any(dup[match]):
        match = np.where(dup[match], match[match], match)
    return dup, match, score


@dataclass(frozen=True)
class Bands:
    """Rows' LSH band keys cut to their low 32 bits (bands x rows, uint32): what
    `banded_duplicates` finds the rows that may have a near duplicate from, at 4 bytes a band
    per row instead of a whole signature."""

    keys: np.ndarray
    vocabulary: Vocabulary  # the word ids the signatures were computed with


def lsh_bands(
    chunks: Iterable[tuple[pa.Array, np.ndarray]],
    rows: int,
    shingle: int,
    num_perm: int,
    bands: int,
) -> Bands:
    """`Bands` of every row of several chunks of (texts, group ids), `rows` in all: each chunk's
    signatures live only while its keys are computed."""
    vocabulary = Vocabulary()
    keys = np.empty((bands, rows), dtype=np.uint32)
    start = 0
    for texts, groups in chunks:
        sig = minhash(words(texts, vocabulary=vocabulary)[0], shingle, num_perm)
        for b in range(bands):
            keys[b, start : start + len(sig)] = band_key(sig, groups, b, bands)  # low 32 bits
        start += len(sig)
    assert start == rows, f"the chunks held {start} rows, not {rows}"
    return Bands(keys, vocabulary)


def banded_duplicates(
    lsh: Bands,
    again: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`near_duplicates` of every row from its cut band keys; `again(rows)` computes once more
    the signatures and group ids of the rows (ascending) it is given.

    Rows with the same key share its low 32 bits, so every candidate, and the row it is checked
    against, is among the rows whose cut key another row shares in some band (at 1M rows ~100
    more a band share one by chance). `near_duplicates` over just those rows, in order, finds
    each the same earlier row, so the result is that of all rows with their whole signatures.
    """
    bands, n = lsh.keys.shape
    shared = np.zeros(n, dtype=bool)
    for b in range(bands):
        order = np.argsort(lsh.keys[b], kind="stable")
        same = lsh.keys[b][order[1:]] == lsh.keys[b][order[:-1]]
        shared[order[1:][same]] = True
        shared[order[:-1][same]] = True
    rows = np.flatnonzero(shared)
    dup, match, score = np.zeros(n, dtype=bool), np.arange(n), np.zeros(n)
    if len(rows):
        sig, groups = again(rows)
        found, earlier, estimate = near_duplicates(sig, groups, threshold, bands)
        dup[rows], match[rows], score[rows] = found, rows[earlier], estimate
    return dup, match, score


def contaminated(train: Words, evals: Words, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each training text: does it contain an eval text's word n-gram (or a whole eval text
    shorter than n words), and the index of one eval text it overlaps (-1 when clean)."""
    hit = np.zeros(len(train.offsets) - 1, dtype=bool)
    which = np.full(len(hit), -1, dtype=np.int64)
    eval_lengths = evals.lengths()
    # One pass per n-gram size: n itself, and each shorter eval text length present.
    sizes = sorted({n, *(int(x) for x in eval_lengths[(eval_lengths > 0) & (eval_lengths < n)])})
    for size in sizes:
        e_hash, e_rows = ngrams(evals, size)
        keep = eval_lengths[e_rows] >= size if size == n else eval_lengths[e_rows] == size
        e_hash, e_rows = e_hash[keep], e_rows[keep]
        if len(e_hash) == 0:
            continue
        t_hash, t_rows = ngrams(train, size)
        t_keep = train.lengths()[t_rows] >= size  # a short training text cannot contain them
        t_hash, t_rows = t_hash[t_keep], t_rows[t_keep]
        order = np.argsort(e_hash, kind="stable")
        sorted_hash = e_hash[order]
        pos = np.clip(np.searchsorted(sorted_hash, t_hash), 0, len(sorted_hash) - 1)
        found = sorted_hash[pos] == t_hash
        new = found & ~hit[t_rows]
        # The first overlapping n-gram of each row names the eval text it came from.
        rows_hit, first_pos = np.unique(t_rows[new], return_index=True)
        which[rows_hit] = e_rows[order[pos[new][first_pos]]]
        hit[rows_hit] = True
    return hit, which
