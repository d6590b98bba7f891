"""The read-ahead policy (pure code): what a stream of READs makes it prefetch."""
from __future__ import annotations

from shimfs.readahead import (CHUNK, DEFAULT, HOLE_EVERY, MIN_WINDOW, Budget, Stream, chunks,
                              hole)

MIB = 1 << 20


def feed(stream: Stream, reads) -> list[tuple[int, int]]:
    plans = []
    for off, size in reads:
        plan = stream.on_read(off, size)
        if plan:
            plans.append(plan)
    return plans


def test_sequential_run_grows_window_up_to_the_cap():
    s = Stream(max_window=16 * MIB, min_run=4 * MIB)
    plans = feed(s, [(i * MIB, MIB) for i in range(40)])
    assert plans, "a long sequential run prefetches"
    assert plans[0][0] >= 5 * MIB                   # not before the run beats min_run
    assert s.window == 16 * MIB
    # never more than a window ahead of the furthest read, and no byte asked twice
    covered = []
    for off, n in plans:
        assert off + n <= 40 * MIB + 16 * MIB
        covered.append((off, off + n))
    covered.sort()
    for (a0, a1), (b0, b1) in zip(covered, covered[1:]):
        assert a1 <= b0
    assert s.sequential == 39 and s.random == 1


def test_a_read_around_cluster_is_one_random_touch():
    """A fault makes the kernel read ±2 MiB as four 1 MiB READs: no prefetch."""
    s = Stream(max_window=16 * MIB, min_run=4 * MIB)
    for base in (100 * MIB, 7 * MIB, 900 * MIB, 300 * MIB):
        assert feed(s, [(base + i * MIB, MIB) for i in range(4)]) == []
    assert s.random == 4 and s.sequential == 12


def test_out_of_order_reads_within_a_window_stay_in_stream():
    s = Stream(max_window=16 * MIB, min_run=0)
    feed(s, [(i * MIB, MIB) for i in range(8)])
    issued = s.issued_until
    assert s.window > 0
    feed(s, [(6 * MIB, MIB)])                                  # a little behind: no reset
    assert s.window > 0 and s.random == 1 and s.issued_until >= issued
    feed(s, [(500 * MIB, MIB)])                                # a real jump: reset
    assert s.window == 0 and s.random == 2


def stream_for(read_ahead_bytes: int, cache_size: int = 256 * MIB) -> Stream:
    """A stream as the mount builds it for that kernel window (cache.AsyncCache)."""
    return Stream(DEFAULT.max_window(read_ahead_bytes, cache_size),
                  DEFAULT.min_run(read_ahead_bytes), None,
                  DEFAULT.stream_slack(read_ahead_bytes))


def test_the_default_window_keeps_its_numbers():
    assert DEFAULT.min_run(4 * MIB) == 4 * MIB
    assert DEFAULT.stream_slack(4 * MIB) == 256 << 10
    assert DEFAULT.max_window(4 * MIB, 256 * MIB) == 64 * MIB


def test_a_scan_in_16k_reads_still_prefetches_deep():
    """read_ahead=4: the kernel sends 16 KiB READs; the stream is detected
    after 128 KiB and its window grows to the 64 MiB floor, so random
    detection costs a scan nothing after its first 128 KiB."""
    s = stream_for(16 << 10)
    k = 16 << 10
    plans = feed(s, [(i * k, k) for i in range(4096)])        # 64 MiB of READs
    assert plans and plans[0][0] <= 256 << 10
    assert s.window == 64 * MIB
    assert s.issued_until >= 64 * MIB + 32 * MIB              # far ahead of the reader
    assert s.random == 1


def test_neighbouring_random_touches_are_not_a_scan():
    """read_ahead=4: touches 40-200 KiB apart, and pairs of neighbouring
    pages, prefetch nothing (with the default's 256 KiB slack and no run
    floor they did)."""
    s = stream_for(16 << 10)
    k = 16 << 10
    reads, off = [], 0
    for gap in (40, 64, 100, 200, 48, 150) * 20:
        off += gap << 10
        reads.append((off, k))
        if gap == 100:
            reads.append((off + k, k))                        # the next page too
    assert feed(s, reads) == []


def test_chunks_cut_on_chunk_boundaries_and_holes():
    assert list(chunks(CHUNK // 2, 2 * CHUNK)) == [
        (CHUNK // 2, CHUNK // 2), (CHUNK, CHUNK), (2 * CHUNK, CHUNK // 2)]
    assert hole(0) and hole(HOLE_EVERY * CHUNK) and not hole(CHUNK)


def test_streams_share_the_budget():
    """One stream may take the whole budget; streams prefetching together
    split it, and a stream that stops (random read, closed handle) gives
    its share back."""
    budget = Budget(64 * MIB)
    a = Stream(max_window=64 * MIB, budget=budget)
    b = Stream(max_window=64 * MIB, budget=budget)
    feed(a, [(i * MIB, MIB) for i in range(12)])
    assert a.window == 64 * MIB and budget.active == 1
    feed(b, [(i * MIB, MIB) for i in range(12)])
    assert b.window == 32 * MIB and budget.active == 2
    feed(a, [(12 * MIB, MIB)])                     # a's next step takes its share only
    assert a.window == 32 * MIB
    feed(b, [(900 * MIB, MIB)])                    # b jumps: random, window closed
    assert b.window == 0 and budget.active == 1
    feed(a, [(13 * MIB, MIB)])
    assert a.window == 64 * MIB
    a.close()
    b.close()                                      # closing twice, or closed ones, is harmless
    assert budget.active == 0


def test_many_streams_never_prefetch_more_than_the_budget():
    """Once every stream has taken a step since the last one joined, the
    windows add up to no more than the budget."""
    budget = Budget(64 * MIB)
    streams = [Stream(max_window=64 * MIB, budget=budget) for _ in range(16)]
    for s in streams:
        feed(s, [(i * MIB, MIB) for i in range(8)])
    assert budget.active == 16
    assert sum(s.window for s in streams) > 64 * MIB      # the early ones ran ahead...
    for s in streams:
        feed(s, [(8 * MIB, MIB)])
    assert all(s.window == 4 * MIB for s in streams)      # ...until their next step
    assert sum(s.window for s in streams) <= budget.total
    for s in streams:
        s.close()
    assert budget.active == 0


def test_windows_shrink_while_dirty_pages_fill_the_cache():
    """Prefetched pages can only live in what dirty pages leave of the cache;
    the windows together keep within half of it, and grow back once the
    dirty pages are written back."""
    clean = [256 * MIB]
    budget = Budget(64 * MIB, clean=lambda: clean[0])
    s = Stream(max_window=64 * MIB, budget=budget)
    feed(s, [(i * MIB, MIB) for i in range(12)])
    assert s.window == 64 * MIB                     # a clean cache: the whole budget
    clean[0] = 72 * MIB                             # a mapped write: 184 MiB dirty
    plans = feed(s, [(12 * MIB, MIB)])
    assert s.window == 36 * MIB
    assert all(off + n <= 13 * MIB + 64 * MIB for off, n in plans)
    clean[0] = 1 * MIB                              # nearly all dirty: one chunk at least
    feed(s, [(13 * MIB, MIB)])
    assert s.window == MIN_WINDOW
    clean[0] = 256 * MIB                            # written back: room again
    feed(s, [(14 * MIB, MIB)])
    assert s.window == 2 * MIN_WINDOW               # grows back by doubling
    s.close()


def test_the_trigger_shows_the_policy_every_read_that_would_prefetch():
    """A stream whose reads before its trigger are hidden (the compiled path
    answers them) plans exactly what it plans when it sees every read."""
    reads = [(i * 16384, 16384) for i in range(4096)]          # a 64 MiB scan
    seen_all = Stream(max_window=64 * MIB, min_run=128 << 10, slack=32 << 10)
    every = feed(seen_all, reads)
    s = Stream(max_window=64 * MIB, min_run=128 << 10, slack=32 << 10)
    shown, plans = 0, []
    for off, size in reads:
        trigger = s.trigger()
        if trigger >= 0 and off + size <= trigger:
            continue                                           # answered without Python
        shown += 1
        plan = s.on_read(off, size)
        if plan:
            plans.append(plan)
    assert shown < len(reads) // 8                             # most reads never reach it
    # the same bytes, in windows as deep: never further behind the reader
    assert plans[-1][0] + plans[-1][1] >= every[-1][0] + every[-1][1] - CHUNK
    assert sum(n for _, n in plans) >= sum(n for _, n in every) - CHUNK


def test_a_random_stream_has_no_trigger():
    s = Stream(max_window=64 * MIB, min_run=128 << 10)
    feed(s, [(o * MIB, 4096) for o in (9, 3, 77, 12)])
    assert s.trigger() == -1


def test_shared_windows_stay_page_aligned():
    """Three streams sharing what an odd number of clean bytes allows: every
    window, and so every prefetch and push, starts and ends on a page."""
    budget = Budget(64 * MIB, clean=lambda: 16 * MIB - 12345)
    streams = [Stream(max_window=64 * MIB, budget=budget) for _ in range(3)]
    plans = []
    for i in range(40):
        for k, s in enumerate(streams):
            plan = s.on_read((k * 1000 + i) * MIB, MIB)
            if plan:
                plans.append(plan)
    assert plans
    assert all(off % 4096 == 0 and n % 4096 == 0 for off, n in plans)
    assert all(s.window % 4096 == 0 for s in streams)
