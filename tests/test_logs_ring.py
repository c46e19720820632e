"""RingBuffer offsets and bounds; LogStore chunks, cursors and waiting."""

from __future__ import annotations

import random
import sys

import anyio
import pytest

from dynsup.logs import LogStore, RingBuffer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# RingBuffer


def test_offsets_count_every_byte_appended() -> None:
    ring = RingBuffer(16)
    assert (ring.start, ring.end) == (0, 0)
    assert ring.append(b"hello ") == 0
    assert ring.append(b"world") == 6
    assert (ring.start, ring.end) == (0, 11)
    assert ring.read(0, 100) == (0, b"hello world", 11)
    assert ring.read(6, 3) == (6, b"wor", 9)
    assert ring.read(11, 100) == (11, b"", 11)


def test_overwrite_drops_oldest_bytes() -> None:
    ring = RingBuffer(8)
    ring.append(b"0123456789")
    ring.append(b"abc")
    assert (ring.start, ring.end) == (5, 13)
    assert len(ring) == 8
    assert ring.read(5, 100) == (5, b"56789abc", 13)


def test_slow_reader_is_told_how_many_bytes_it_missed() -> None:
    ring = RingBuffer(8)
    ring.append(b"aaaa")
    offset = 2  # a reader that has read "aa"
    ring.append(b"bbbbbbbb")
    start, data, end = ring.read(offset, 100)
    assert start - offset == 2  # the last "aa" was dropped before it was read
    assert (data, end) == (b"bbbbbbbb", 12)


def test_read_past_end_resumes_at_end() -> None:
    ring = RingBuffer(8)
    ring.append(b"abc")
    assert ring.read(50, 10) == (3, b"", 3)


def test_read_rejects_negative_arguments() -> None:
    ring = RingBuffer(8)
    with pytest.raises(ValueError):
        ring.read(-1, 10)
    with pytest.raises(ValueError):
        ring.read(0, -1)


def test_append_larger_than_capacity_keeps_its_tail() -> None:
    ring = RingBuffer(4)
    ring.append(b"xy")
    assert ring.append(b"0123456789") == 2
    assert (ring.start, ring.end) == (8, 12)
    assert ring.read(0, 100) == (8, b"6789", 12)
    assert ring.append(memoryview(b"abcd")) == 12  # exactly the capacity
    assert ring.read(0, 100) == (12, b"abcd", 16)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RingBuffer(0)


@pytest.mark.parametrize(
    ("content", "n", "expected"),
    [
        (b"a\nb\nc\n", 1, b"c\n"),
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc\n", 3, b"a\nb\nc\n"),
        (b"a\nb\nc\n", 10, b"a\nb\nc\n"),
        (b"a\nb\npartial", 1, b"partial"),
        (b"a\nb\npartial", 2, b"b\npartial"),
        (b"a\n\n\n", 2, b"\n\n"),  # empty lines are lines
        (b"", 3, b""),
        (b"a\nb\n", 0, b""),
    ],
)
def test_tail_offset(content: bytes, n: int, expected: bytes) -> None:
    ring = RingBuffer(64)
    ring.append(content)
    assert ring.read(ring.tail_offset(n), 1000)[1] == expected


def test_tail_offset_is_absolute() -> None:
    ring = RingBuffer(8)
    ring.append(b"xxxxxxxxx\n")
    ring.append(b"ab\ncd\n")  # holds "x\nab\ncd\n" from offset 8
    assert ring.tail_offset(1) == 13
    assert ring.tail_offset(2) == 10
    assert ring.tail_offset(3) == 8


def test_tail_offset_with_fewer_lines_held_starts_at_oldest_byte() -> None:
    ring = RingBuffer(8)
    ring.append(b"line one\nline two\n")  # keeps "ine two\n", a cut line
    assert ring.tail_offset(5) == ring.start
    assert ring.read(ring.tail_offset(5), 100)[1] == b"ine two\n"


def test_memory_is_bounded_whatever_is_appended() -> None:
    capacity = 1 << 16
    ring = RingBuffer(capacity)
    sizes = [1, 7, 4096, capacity - 1, capacity, 3 * capacity, 100]
    for i in range(2000):
        ring.append(bytes([i % 256]) * sizes[i % len(sizes)])
        assert len(ring) <= capacity
        # Dropped bytes are removed once they reach `capacity` (one move per
        # capacity appended), and bytearray over-allocates by an eighth.
        assert sys.getsizeof(ring._buf) < 3.5 * capacity
    assert ring.end - ring.start == capacity


def test_small_appends_keep_exactly_the_newest_bytes() -> None:
    capacity = 1000
    ring = RingBuffer(capacity)
    stream = bytearray()
    rng = random.Random(7)
    for i in range(5000):
        data = bytes([65 + i % 26]) * rng.choice([1, 3, 17, 99, 250, 999])
        assert ring.append(data) == len(stream)
        stream += data
        kept = bytes(stream[-capacity:])
        assert (ring.start, ring.end) == (len(stream) - len(kept), len(stream))
        assert ring.read(0, 2 * capacity) == (ring.start, kept, len(stream))
        assert ring.tail_offset(1) == len(stream) - len(kept) + max(0, kept.rfind(b"\n") + 1)
        assert sys.getsizeof(ring._buf) < 3.5 * capacity


# LogStore


def test_store_keeps_one_log_per_stream() -> None:
    store = LogStore(capacity=64, clock=lambda: 42.0)
    a = store.append("web", "stdout", 10, b"out1\n")
    b = store.append("web", "stderr", 10, b"err1\n")
    c = store.append("web", "stdout", 10, b"out2\n")
    assert [(x.seq, x.offset) for x in (a, b, c)] == [(1, 0), (2, 0), (3, 5)]
    assert (c.name, c.stream, c.pid, c.data, c.time) == ("web", "stdout", 10, b"out2\n", 42.0)
    assert store.read("web", "stdout", 0, 100) == (0, b"out1\nout2\n", 10)
    assert store.read("web", "stderr", 0, 100) == (0, b"err1\n", 5)
    assert store.read("nope", "stdout", 0, 100) == (0, b"", 0)
    assert store.tail_offset("web", "stdout", 1) == 5
    assert store.end("web", "stdout") == 10


def test_store_rings_are_bounded_by_capacity() -> None:
    store = LogStore(capacity=4)
    store.append("web", "stdout", 1, b"abcdef")
    assert store.read("web", "stdout", 0, 100) == (2, b"cdef", 6)


def test_remove_forgets_a_process() -> None:
    store = LogStore()
    store.append("web", "stdout", 1, b"x")
    store.append("db", "stdout", 2, b"y")
    store.remove("web")
    assert store.read("web", "stdout", 0, 10) == (0, b"", 0)
    assert store.read("db", "stdout", 0, 10) == (0, b"y", 1)


def test_since_returns_chunks_after_cursor() -> None:
    store = LogStore()
    assert store.since(0) == ([], 0, 0)
    chunks = [store.append("web", "stdout", 1, b"%d" % i) for i in range(5)]
    assert store.since(0) == (chunks, 5, 0)
    assert store.since(3) == (chunks[3:], 5, 0)
    assert store.since(5) == ([], 5, 0)


def test_since_caps_a_batch_by_bytes_but_returns_at_least_one_chunk() -> None:
    store = LogStore()
    chunks = [store.append("web", "stdout", 1, b"x" * 10) for _ in range(5)]
    assert store.since(0, max_bytes=25) == (chunks[:2], 2, 0)
    assert store.since(2, max_bytes=1) == (chunks[2:3], 3, 0)


def test_slow_pump_is_told_how_many_chunks_it_lost() -> None:
    # Each chunk costs 1000 bytes plus a fixed overhead: three fit.
    store = LogStore(recent_bytes=3 * 1300)
    chunks = [store.append("web", "stdout", 1, b"x" * 1000) for _ in range(10)]
    got, cursor, lost = store.since(2)
    assert got == chunks[-3:]
    assert (cursor, lost) == (10, 5)  # seqs 3..7 were dropped
    # The rings are independent of the chunk queue: nothing lost there.
    assert store.read("web", "stdout", 0, 20_000)[0] == 0


def test_newest_chunk_is_kept_even_when_over_budget() -> None:
    store = LogStore(recent_bytes=100)
    store.append("web", "stdout", 1, b"small")
    big = store.append("web", "stdout", 1, b"x" * 1000)
    assert store.since(0) == ([big], 2, 1)


def test_stale_cursor_resyncs_to_newest() -> None:
    store = LogStore()
    store.append("web", "stdout", 1, b"x")
    assert store.since(1000) == ([], 1, 0)


@pytest.mark.anyio
async def test_wait_beyond_wakes_on_append() -> None:
    store = LogStore()
    store.append("web", "stdout", 1, b"before")
    woke: list[bool] = []

    async def waiter() -> None:
        woke.append(await store.wait_beyond(1, timeout=30))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        tg.start_soon(waiter)  # two waiters share one event
        await anyio.wait_all_tasks_blocked()
        assert woke == []
        store.append("web", "stderr", 1, b"after")
    assert woke == [True, True]
    assert [c.data for c in store.since(1)[0]] == [b"after"]


@pytest.mark.anyio
async def test_wait_beyond_returns_at_once_when_a_chunk_is_there() -> None:
    store = LogStore()
    store.append("web", "stdout", 1, b"x")
    with anyio.fail_after(5):
        assert await store.wait_beyond(0, timeout=60) is True


@pytest.mark.anyio
async def test_wait_beyond_times_out() -> None:
    store = LogStore()
    store.append("web", "stdout", 1, b"x")
    assert await store.wait_beyond(1, timeout=0.05) is False
    # A later append still wakes a later waiter (the event was renewed).
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.wait_beyond, 1, 30)
        await anyio.wait_all_tasks_blocked()
        store.append("web", "stdout", 1, b"y")


def test_wrapped_ring_reads_and_tails_like_the_stream_it_holds() -> None:
    capacity = 997
    ring = RingBuffer(capacity)
    stream = bytearray()
    rng = random.Random(12)
    for _ in range(1500):
        data = bytes(rng.choices(b"ab\n", k=rng.choice([1, 5, 80, 400, 996, 2500])))
        ring.append(data)
        stream += data
        start = max(0, len(stream) - capacity)
        offset = rng.randrange(start, len(stream) + 1)
        limit = rng.randrange(0, capacity + 1)
        assert ring.read(offset, limit) == (offset, bytes(stream[offset : offset + limit]),
                                            min(offset + limit, len(stream)))  # fmt: skip
        n = rng.randrange(1, 6)
        held = bytes(stream[start:])
        body = held[:-1] if held.endswith(b"\n") else held
        cut = start
        for _ in range(n):
            i = body.rfind(b"\n")
            if i < 0:
                break
            body = body[:i]
            cut = start + i + 1
        else:
            assert ring.tail_offset(n) == cut
            continue
        assert ring.tail_offset(n) == start


def test_a_flood_reuses_the_ring_storage_instead_of_reallocating_it() -> None:
    # Regrowing the buffer took fresh memory from malloc every `capacity`
    # bytes; under a log flood its page faults were most of the daemon's CPU.
    capacity = 1 << 16
    ring = RingBuffer(capacity)
    ring.append(b"x" * capacity)
    storage = sys.getsizeof(ring._buf)
    for i in range(500):
        ring.append(bytes([i % 256]) * (1 + i * 37 % 5000))
        assert sys.getsizeof(ring._buf) == storage
    assert storage < capacity + 1024


def test_since_for_some_names_skips_the_others_chunks_and_moves_past_them() -> None:
    store = LogStore()
    web = [store.append("web", "stdout", 1, b"w%d" % i) for i in range(3)]
    store.append("db", "stdout", 2, b"d")
    assert store.since(0, names={"web"}) == (web, 4, 0)
    assert store.since(0, names=set()) == ([], 4, 0)
    assert store.since(0, max_bytes=3, names={"web"}) == (web[:1], 1, 0)
    assert store.last_seq_of("web") == 3 and store.last_seq_of("db") == 4


def test_since_for_some_names_reports_lost_chunks_only_when_theirs_were_dropped() -> None:
    store = LogStore(recent_bytes=3 * 1300)  # three chunks fit
    for _ in range(5):
        store.append("flood", "stdout", 1, b"x" * 1000)
    quiet = store.append("quiet", "stdout", 2, b"y" * 1000)
    # seqs 1-3 (flood's) were dropped: nothing the quiet unit's reader wanted.
    assert store.since(0, names={"quiet"}) == ([quiet], 6, 0)
    assert store.since(0, names={"flood"})[2] == 3
    for _ in range(3):
        store.append("flood", "stdout", 1, b"x" * 1000)
    assert store.since(0, names={"quiet"})[2] == 6  # quiet's chunk was dropped too


@pytest.mark.anyio
async def test_wait_beyond_some_names_sleeps_through_the_others_output() -> None:
    store = LogStore()
    woke: list[bool] = []

    async def waiter() -> None:
        woke.append(await store.wait_beyond(0, timeout=30, names={"probed"}))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        for _ in range(100):
            store.append("flood", "stdout", 1, b"x")
        await anyio.wait_all_tasks_blocked()
        assert woke == []
        store.append("probed", "stdout", 2, b"ready\n")
    assert woke == [True]
    assert await store.wait_beyond(0, timeout=0.05, names=set()) is False
