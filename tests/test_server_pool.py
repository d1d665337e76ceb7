"""The server's queue (first come, first served, bounded) and its pool of KV caches (by shared prefix,
least recently used out, bounded in count and bytes)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import edge_qwen
from edge_qwen.apps.server_pool import CachePool, FairQueue, QueueFull, QueueTimeout
from edge_qwen.cache import KVCache


@pytest.fixture(scope="module")
def model(tiny_fp32: Path) -> edge_qwen.Model:
    return edge_qwen.load(tiny_fp32)


def filled(cache: KVCache, ids: list[int]) -> KVCache:
    cache.append(ids)  # the pool looks only at the ids a cache holds
    return cache


def test_a_continued_conversation_gets_its_own_cache_back(model: edge_qwen.Model) -> None:
    pool = CachePool(lambda: model.new_cache(64), max_caches=3, max_bytes=1 << 30)
    a = filled(pool.take([1, 2, 3, 4]), [1, 2, 3, 4])
    b = filled(pool.take([1, 9, 9, 9]), [1, 9, 9, 9])  # shares only an opening with a: a cache of its own
    assert b is not a and pool.caches == 2
    assert pool.take([1, 2, 3, 4, 5, 6]) is a
    assert pool.take([1, 9, 9, 9, 7]) is b


def test_the_least_recently_used_cache_goes_when_the_pool_is_full(model: edge_qwen.Model) -> None:
    pool = CachePool(lambda: model.new_cache(64), max_caches=2, max_bytes=1 << 30)
    a = filled(pool.take([1, 1, 1]), [1, 1, 1])
    b = filled(pool.take([2, 2, 2]), [2, 2, 2])
    assert pool.take([1, 1, 1, 5]) is a  # a is now the most recently used
    assert pool.take([3, 3, 3]) is b and pool.caches == 2


def test_the_memory_bound_limits_the_pool(model: edge_qwen.Model) -> None:
    one = model.new_cache(64).nbytes
    pool = CachePool(lambda: model.new_cache(64), max_caches=8, max_bytes=2 * one)
    for i in range(1, 5):
        filled(pool.take([i, i, i]), [i, i, i])
    assert pool.caches == 2


def test_the_queue_serves_in_arrival_order_and_refuses_beyond_its_bound() -> None:
    queue = FairQueue(max_waiting=3)
    order: list[int] = []
    hold = threading.Event()

    def request(i: int) -> None:
        with queue.turn(time.monotonic() + 30):
            if i == 0:
                hold.wait(30)
            order.append(i)

    threads = []
    for i in range(4):
        threads.append(threading.Thread(target=request, args=(i,)))
        threads[-1].start()
        while queue.waiting < i:  # each one in line before the next arrives
            time.sleep(0.001)
    with pytest.raises(QueueFull), queue.turn(time.monotonic() + 30):
        pass
    hold.set()
    for thread in threads:
        thread.join()
    assert order == [0, 1, 2, 3]


def test_a_request_timed_out_in_line_is_skipped() -> None:
    queue = FairQueue(max_waiting=2)
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with queue.turn(time.monotonic() + 30):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(30)
    with pytest.raises(QueueTimeout), queue.turn(time.monotonic() + 0.05):
        pass
    release.set()
    thread.join()
    with queue.turn(time.monotonic() + 5):  # the abandoned ticket does not block the line
        assert queue.waiting == 0


def test_a_cache_whose_whole_prompt_is_shared_is_continued(model: edge_qwen.Model) -> None:
    pool = CachePool(lambda: model.new_cache(64), max_caches=3, max_bytes=1 << 30)
    a = filled(
        pool.take([1, 2, 3]), [1, 2, 3, 7, 7, 7, 7, 7, 7]
    )  # a long answer the next prompt renders otherwise
    assert pool.take([1, 2, 3, 8, 8]) is a
    assert pool.take([1, 2, 9]) is not a  # shares less than a's last prompt and less than half of it
