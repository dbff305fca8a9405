"""A prompt cache: live generators kept with the KV cache of their token history.

onnxruntime-genai 0.18's `Generator.rewind_to(n)` keeps the first `n` tokens'
keys and values and drops the rest, at no cost. So a generator that has seen
tokens `A` can serve a prompt `P` by rewinding to the longest common prefix of
`A` and `P` and appending only the rest of `P`: the second turn of a
conversation appends the last lines, and a new conversation of the same
household appends what follows the shared system prompt and tools.

The cache is a pool of idle generators, shared by the conversations (the
household's prompt is the same for everyone) and bounded by a memory budget:
a generator's KV cache is allocated for its `max_length` when it is created
(`past_present_share_buffer`), so each entry costs `max_length` times the
model's bytes per token, whatever it holds. A generator is taken out of the
pool while it generates (nobody else can use it meanwhile) and put back
afterwards with its new history; the least recently used entries go when the
pool and the generators running now together exceed the budget (running
generators are never stopped for it: only they can exceed it). Everything is
in memory: nothing reaches the disk, and a model's entries are dropped with it.

A model that decodes in the batch (batch_decode.py: its own onnxruntime session)
keeps no generators: its entries hold the keys and values themselves (`kv`, one
array per past input, with room for later turns as a generator has). A request
copies the prefix it needs into a buffer of its own, so such an entry is shared:
`take()` leaves it in the pool, and any number of conversations start from it at
once. Only a request whose prompt extends all of an entry's tokens (the
conversation's next turn) takes it out, as a generator is taken, and writes its
prompt after them (only past every reader's prefix); not while the entry's own
request is still answering (`growing`). A new entry also replaces the idle ones
whose tokens it starts with (it serves whatever they served).

`/v1/capacity` shows the warm prefixes as hashes (never text): the SHA-256 of
the first N token ids, for N at a few block boundaries each entry covers, and
the household prefix keys (`warm_keys`) of the requests that left each entry: a
client that cannot tokenize (Home Assistant) sends a key of its own with each
request (the SHA-256 of the part every request of the household starts with)
and routes to the worker that lists it. An entry keeps at most
`MAX_KEYS_PER_ENTRY` keys, and forgets a key when a request rewinds it into the
prompt that key came with (the household part it named may be gone: the
worker cannot tell where in the prompt that part ended).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BUDGET_MB = 1024  # room for a 3B model's 2k-token prompt (fp32 KV: ~230 KB a token)
# Warm prefixes are announced by the hash of their first N tokens, for N in these.
PREFIX_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# A common prefix shorter than this is not worth a generator sized for another prompt.
MIN_REUSE_TOKENS = 16
# Household prefix keys remembered per entry (most recent last).
MAX_KEYS_PER_ENTRY = 4


def prefix_hash(token_ids: Sequence[int], length: int) -> str:
    """SHA-256 (hex, first 16 bytes) of the first `length` token ids."""
    data = b"".join(int(t).to_bytes(4, "little", signed=True) for t in token_ids[:length])
    return hashlib.sha256(data).hexdigest()[:32]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    # Compare in chunks first (list slices compare in C), then token by token.
    step = 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(eq=False)
class CacheEntry:
    """One generator and the tokens whose keys and values it holds."""

    model_id: int  # the ChatModel instance it belongs to (ChatModel.cache_owner)
    key: Any  # what the generator was made for (search options): reused only for the same
    generator: Any
    max_length: int
    nbytes: int
    # A batched model's keys and values (one array per past input, room for
    # `max_length` tokens, the first len(tokens) held) instead of a generator.
    kv: list[Any] | None = None
    # Its request is still answering (it will write the answer's keys and values
    # after its tokens): only read, never taken out, until then.
    growing: bool = False
    tokens: list[int] = field(default_factory=list)
    last_used: int = 0
    # The prefix keys (X-Hearth-Prefix) of the requests whose prompts it holds,
    # oldest first, with the length of the prompt each came with.
    prefix_keys: dict[str, int] = field(default_factory=dict)


def _superseded(old: CacheEntry, new: CacheEntry) -> bool:
    """Whether `new` (a batched model's entry) serves every prompt `old` serves."""
    return (
        old is not new
        and old.kv is not None
        and old.model_id == new.model_id
        and old.key == new.key
        and len(old.tokens) <= len(new.tokens)
        and new.tokens[: len(old.tokens)] == old.tokens
    )


@dataclass
class Taken:
    """What `take()` found: an entry to rewind to `reuse` tokens, or nothing."""

    entry: CacheEntry | None
    reuse: int = 0
    shared: bool = False  # left in the pool (a batched model's entry, only read)


class PromptCache:
    """Idle generators keyed by their token history, LRU within a byte budget."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_MB * 1024 * 1024) -> None:
        self.budget_bytes = max(0, budget_bytes)
        self._lock = threading.Lock()
        self._idle: list[CacheEntry] = []
        self._busy_bytes = 0  # generators taken out and generating now
        self._clock = itertools.count(1)
        self.peak_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.cached_tokens = 0  # prompt tokens not prefilled thanks to the cache

    # -- use ------------------------------------------------------------------

    def take(self, model_id: int, key: Any, prompt: Sequence[int], max_length: int) -> Taken:
        """Take the idle generator sharing the longest prefix with `prompt`.

        Only one made for the same model and `key` and long enough for
        `max_length` qualifies; at least one prompt token is always left to
        append (its logits give the first new token). The caller owns the
        entry until it gives it back with `put()` (or drops it with
        `discard()`); an entry holding `kv` stays in the pool, shared (the
        caller only reads it).
        """
        best: CacheEntry | None = None
        best_len = 0
        with self._lock:
            for entry in self._idle:
                if entry.model_id != model_id or entry.key != key:
                    continue
                if entry.kv is None and entry.max_length < max_length:
                    continue
                # The last token of a generator's history may not be in its KV cache
                # yet (sampled, not fed back): never reuse it, and leave one to append.
                held = len(entry.tokens) - (1 if entry.kv is None else 0)
                usable = min(held, len(prompt) - 1)
                shared = common_prefix(entry.tokens[: max(usable, 0)], prompt)
                if shared > best_len or (
                    shared == best_len and best is not None and entry.last_used > best.last_used
                ):
                    best, best_len = entry, shared
            if best is None or best_len < min(MIN_REUSE_TOKENS, len(prompt) - 1) or best_len <= 0:
                self.misses += 1
                return Taken(None)
            self.hits += 1
            self.cached_tokens += best_len
            if best.kv is not None and (best_len < len(best.tokens) or best.growing):  # read
                best.last_used = next(self._clock)
                return Taken(best, best_len, shared=True)
            self._idle.remove(best)
            # Rewound into a key's prompt: the part that key named may be gone.
            best.prefix_keys = {k: n for k, n in best.prefix_keys.items() if n - 1 <= best_len}
            self._busy_bytes += best.nbytes
            return Taken(best, best_len)

    def started(self, nbytes: int) -> None:
        """A new generator of `nbytes` is generating outside the pool.

        Idle entries make room for it (least recently used first): the budget
        bounds the generators kept and those generating together.
        """
        self.held(0, nbytes)

    def held(self, before: int, after: int) -> None:
        """Bytes held outside the pool (a batch's KV buffer) went from `before` to
        `after`; idle entries make room, as for a request's own buffer."""
        with self._lock:
            self._busy_bytes = max(0, self._busy_bytes + after - before)
            self._evict()
            self._note_peak()

    def put(
        self,
        entry: CacheEntry,
        tokens: list[int],
        prefix_key: str | None = None,
        prompt_tokens: int = 0,
    ) -> None:
        """Give a generator back with the tokens it now holds; evict LRU over budget.

        `prefix_key`: the household prefix key of the request whose `prompt_tokens`
        long prompt `tokens` start with; listed in `warm_keys`.
        """
        with self._lock:
            self._busy_bytes = max(0, self._busy_bytes - entry.nbytes)
            self._keep(entry, tokens, prefix_key, prompt_tokens)

    def grow(
        self,
        entry: CacheEntry,
        kv: list[Any],
        tokens: list[int],
        nbytes: int,
        prefix_key: str | None = None,
        prompt_tokens: int = 0,
    ) -> None:
        """A batched model's entry (given back with `put()`) now holds `kv` (`nbytes`)
        for `tokens`, its old ones and more (an answer's keys and values); back in the
        pool if it had been evicted meanwhile."""
        with self._lock:
            if entry in self._idle:
                self._idle.remove(entry)
            entry.kv, entry.nbytes = kv, nbytes
            self._keep(entry, tokens, prefix_key, prompt_tokens)

    def _keep(
        self, entry: CacheEntry, tokens: list[int], prefix_key: str | None, prompt_tokens: int
    ) -> None:
        """Into the pool (lock held), unless it is too short or too large to keep."""
        if len(tokens) < 2 or entry.nbytes > self.budget_bytes:
            return
        entry.tokens = tokens
        if entry.kv is not None:  # it replaces the entries whose tokens it starts with
            for old in [e for e in self._idle if _superseded(old=e, new=entry)]:
                self._idle.remove(old)
                entry.prefix_keys = {**old.prefix_keys, **entry.prefix_keys}
        if prefix_key:
            keys = [(k, n) for k, n in entry.prefix_keys.items() if k != prefix_key]
            keys.append((prefix_key, min(prompt_tokens, len(tokens)) or len(tokens)))
            entry.prefix_keys = dict(keys[-MAX_KEYS_PER_ENTRY:])
        entry.last_used = next(self._clock)
        self._idle.append(entry)
        self._evict()
        self._note_peak()

    def _evict(self) -> None:
        """Drop least recently used idle entries until all fits the budget (lock held)."""
        while self._idle and self._idle_bytes() + self._busy_bytes > self.budget_bytes:
            oldest = min(self._idle, key=lambda e: e.last_used)
            self._idle.remove(oldest)
            self.evictions += 1

    def discard(self, entry: CacheEntry) -> None:
        """A taken or new generator that is not kept (an error, or not cacheable)."""
        with self._lock:
            self._busy_bytes = max(0, self._busy_bytes - entry.nbytes)

    def drop(self, model_id: int) -> int:
        """Drop every idle entry of a model (the model is going); returns how many."""
        with self._lock:
            gone = [e for e in self._idle if e.model_id == model_id]
            self._idle = [e for e in self._idle if e.model_id != model_id]
            return len(gone)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()

    # -- reporting --------------------------------------------------------------

    def _idle_bytes(self) -> int:
        return sum(e.nbytes for e in self._idle)

    def _note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._idle_bytes() + self._busy_bytes)

    def entries(self, model_id: int | None = None) -> list[CacheEntry]:
        with self._lock:
            return [e for e in self._idle if model_id is None or e.model_id == model_id]

    def warm_prefixes(self, model_id: int) -> list[dict[str, Any]]:
        """The prefixes held for a model, as hashes of their first N tokens."""
        seen: set[tuple[int, str]] = set()
        out: list[dict[str, Any]] = []
        for entry in sorted(self.entries(model_id), key=lambda e: -e.last_used):
            usable = len(entry.tokens) - 1
            for block in PREFIX_BLOCKS:
                if block > usable:
                    break
                item = (block, prefix_hash(entry.tokens, block))
                if item not in seen:
                    seen.add(item)
                    out.append({"tokens": block, "sha256": item[1]})
        return out

    def warm_keys(self, model_id: int) -> list[str]:
        """The household prefix keys a model's entries hold, most recently used first."""
        out: list[str] = []
        for entry in sorted(self.entries(model_id), key=lambda e: -e.last_used):
            out.extend(k for k in reversed(entry.prefix_keys) if k not in out)
        return out

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            used = self._idle_bytes()
            entries = len(self._idle)
            busy = self._busy_bytes
        return {
            "budget_bytes": self.budget_bytes,
            "used_bytes": used,
            "in_use_bytes": busy,
            "peak_bytes": self.peak_bytes,
            "entries": entries,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "cached_tokens": self.cached_tokens,
            "prefix_blocks": list(PREFIX_BLOCKS),
        }
