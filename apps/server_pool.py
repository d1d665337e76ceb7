"""The server's two shared resources: a first-come-first-served queue for the model, and a small pool of
KV caches that conversations resent turn after turn find their earlier turns in.

One generation runs at a time (the model's cores are all one generation can use on a small device);
requests wait their turn in arrival order, and beyond `max_waiting` a request is refused at once (429)
instead of piling up. Each cache is kept with the tokens it holds; a request takes the cache sharing
the longest prefix with its prompt, so a client that resends the whole conversation each turn, as
OpenAI clients do, prefills only the new turn. Least recently used caches go first when the pool is
full; the pool holds at most `max_caches` caches and `max_bytes` of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from edge_qwen.cache import KVCache, common_prefix_len

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests wait than the queue's bound."""


class QueueTimeout(Exception):
    """A request's deadline passed while it waited for its turn."""


class FairQueue:
    """Tickets served in the order they were taken: one holder at a time, a bounded line behind it."""

    def __init__(self, max_waiting: int) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._next = 0  # the ticket the next arrival takes
        self._serving = 0  # the ticket whose turn it is
        self._abandoned: set[int] = set()

    @property
    def waiting(self) -> int:
        """Requests in line, not counting the one being served."""
        with self._cond:
            return max(self._next - self._serving - 1, 0)

    @contextmanager
    def turn(self, deadline: float) -> Iterator[None]:
        """Wait for this request's turn (QueueFull at once when the line is full, QueueTimeout when
        `deadline`, a time.monotonic() value, passes first); hold it for the with-block."""
        with self._cond:
            if self._next - self._serving > self.max_waiting:
                raise QueueFull(
                    f"{self._next - self._serving} requests ahead (the queue holds {self.max_waiting})"
                )
            ticket = self._next
            self._next += 1
            while self._serving != ticket:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._abandoned.add(ticket)  # skipped when its turn comes
                    raise QueueTimeout("the request timed out waiting for its turn")
                self._cond.wait(left)
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                while self._serving in self._abandoned:
                    self._abandoned.discard(self._serving)
                    self._serving += 1
                self._cond.notify_all()


class CachePool:
    """Up to `max_caches` KV caches (and `max_bytes` of them), picked by the prefix they share."""

    def __init__(self, new_cache: Callable[[], KVCache], max_caches: int, max_bytes: int) -> None:
        if max_caches < 1:
            raise ValueError(f"max_caches must be >= 1, got {max_caches}")
        self._new_cache = new_cache
        self.max_caches = max_caches
        self.max_bytes = max_bytes
        # Least recently used first: each cache with the length of the last prompt run in it.
        self._entries: list[tuple[KVCache, int]] = []

    @property
    def caches(self) -> int:
        return len(self._entries)

    def take(self, prompt_ids: list[int]) -> KVCache:
        """The cache to run `prompt_ids` in: the one sharing the longest prefix if it continues what
        that cache holds (it shares the cache's whole last prompt, or most of its tokens), else a new
        one while the bounds allow, else the least recently used. It becomes the most recently used.

        Conversations all share the template's opening; rewinding another conversation's cache to it
        would throw that conversation away for a few tokens, so a new cache is preferred then.
        """
        shared = [common_prefix_len(cache.tokens, prompt_ids) for cache, _ in self._entries]
        best = max(range(len(shared)), key=shared.__getitem__, default=None)
        if best is not None and self._continues(best, shared[best]):
            cache, _ = self._entries.pop(best)
        elif self._room_for_one():
            cache = self._new_cache()
            log.info("new KV cache (%d in the pool)", len(self._entries) + 1)
        else:
            cache, _ = self._entries.pop(0)  # the least recently used: its tokens are dropped
        self._entries.append((cache, len(prompt_ids)))
        return cache

    def _continues(self, i: int, shared: int) -> bool:
        cache, last_prompt = self._entries[i]
        return shared > 0 and (shared >= last_prompt or 2 * shared >= cache.length)

    def _room_for_one(self) -> bool:
        if not self._entries:
            return True
        held = sum(cache.nbytes for cache, _ in self._entries)
        one = self._entries[0][0].nbytes
        return len(self._entries) < self.max_caches and held + one <= self.max_bytes
