"""Known zeros in the engine (FileRec.zero): pages this node extended a file
over are filled with zeros instead of read, and only as long as that is true.

Every test runs on the compiled engine and on the fallback, which must agree;
bytes are compared with the backing file, which is the truth.
"""
from __future__ import annotations

import os

import pytest

from engines import IDS, IMPLS, cache_over

PAGE = 4096


def grow(pc, fid, fd, size):
    """What files.OpenFiles.truncate does: ftruncate, then the engine."""
    before = os.fstat(fd).st_size
    os.ftruncate(fd, size)
    pc.truncate(fid, size, max(before, pc.size(fid)))


def stats(pc, fid):
    return pc.file_stats(fid)


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_grown_pages_are_filled_not_read(tmp_path, impl):
    head = os.urandom(10000)                       # ends inside page 2
    with cache_over(tmp_path, impl, head) as (pc, fid, fd):
        grow(pc, fid, fd, 64 * PAGE)
        assert stats(pc, fid)["known_zero_bytes"] == 61 * PAGE    # pages 3..63
        assert pc.read(fid, 0, 64 * PAGE) == head + bytes(64 * PAGE - len(head))
        st = stats(pc, fid)
        assert st["bytes_fetched"] == 3 * PAGE      # pages 0-2 hold the old bytes
        assert st["zero_fill_bytes"] == 61 * PAGE
        assert st["zero_fills"] == 1
        assert pc.stats()["zero_fill_bytes"] == 61 * PAGE
        # zeros take no slot (they would crowd out real pages), and count as
        # cached: served on the caller's thread, with no I/O
        assert st["cached_bytes"] == 3 * PAGE
        assert pc.read_cached(fid, 10 * PAGE, 20 * PAGE + 5) == bytes(20 * PAGE + 5)
        assert pc.read_cached(fid, 8000, 8192) == head[8000:] + bytes(8000 + 8192 - len(head))
        pc.prefetch(fid, 0, 64 * PAGE)
        st = stats(pc, fid)
        assert st["bytes_fetched"] == 3 * PAGE and st["cached_bytes"] == 3 * PAGE
        assert st["zero_fills"] == 3


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_partly_written_pages_keep_their_bytes_and_zeros(tmp_path, impl):
    with cache_over(tmp_path, impl, b"") as (pc, fid, fd):
        grow(pc, fid, fd, 16 * PAGE)
        model = bytearray(16 * PAGE)
        for off, n in [(100, 10), (PAGE - 3, 7), (5 * PAGE + 1, 2 * PAGE), (16 * PAGE - 1, 1)]:
            blob = os.urandom(n)
            pc.write(fid, off, blob)
            model[off:off + n] = blob
        assert stats(pc, fid)["bytes_fetched"] == 0      # partial pages were zeros
        assert pc.read(fid, 0, 16 * PAGE) == model
        pc.writeback(fid)
        with open(os.path.join(tmp_path, "f"), "rb") as f:
            assert f.read() == model
        # written pages are no longer known zeros: dropped, they are read back
        pc.invalidate(fid, 0, 16 * PAGE)
        assert pc.read(fid, 0, 16 * PAGE) == model
        assert stats(pc, fid)["bytes_fetched"] > 0
        pc.check()


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_written_pages_are_read_back_after_eviction(tmp_path, impl):
    # 16 slots for 64 pages: every written page is written back and evicted
    # before it is read again, so it must come from the backing file
    with cache_over(tmp_path, impl, b"", 16 * PAGE) as (pc, fid, fd):
        grow(pc, fid, fd, 64 * PAGE)
        model = bytearray(64 * PAGE)
        for p in range(0, 64, 3):
            blob = os.urandom(100)
            pc.write(fid, p * PAGE + 50, blob)
            model[p * PAGE + 50:p * PAGE + 150] = blob
        pc.writeback(fid)
        for p in range(64):
            assert pc.read(fid, p * PAGE, PAGE) == model[p * PAGE:(p + 1) * PAGE], p
        assert stats(pc, fid)["known_zero_bytes"] == (64 - 22) * PAGE
        pc.check()


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_write_past_the_end_fills_the_gap_with_zeros(tmp_path, impl):
    head = os.urandom(3 * PAGE + 5)
    with cache_over(tmp_path, impl, head) as (pc, fid, fd):
        pc.write(fid, 20 * PAGE + 7, b"tail")         # as numpy.memmap(mode="w+") does
        assert stats(pc, fid)["bytes_fetched"] == 0   # page 20 was zeros, not read
        want = head + bytes(20 * PAGE + 7 - len(head)) + b"tail"
        assert pc.read(fid, 0, len(want)) == want
        assert stats(pc, fid)["bytes_fetched"] == 4 * PAGE   # pages 0-3 only
        pc.writeback(fid)
        with open(os.path.join(tmp_path, "f"), "rb") as f:
            assert f.read() == want


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_shrunk_and_regrown(tmp_path, impl):
    data = os.urandom(8 * PAGE)
    with cache_over(tmp_path, impl, data) as (pc, fid, fd):
        pc.read(fid, 0, 8 * PAGE)
        grow(pc, fid, fd, 3 * PAGE + 10)          # shrink: the tail of page 3 goes
        assert stats(pc, fid)["known_zero_bytes"] == 0
        grow(pc, fid, fd, 8 * PAGE)               # regrow: pages 4-7 are zeros
        assert stats(pc, fid)["known_zero_bytes"] == 4 * PAGE
        want = data[:3 * PAGE + 10] + bytes(5 * PAGE - 10)
        assert pc.read(fid, 0, 8 * PAGE) == want
        grow(pc, fid, fd, 2 * PAGE)
        grow(pc, fid, fd, 2 * PAGE + 1)           # page 2 had bytes before: not zeros
        pc.invalidate(fid, 0, 0)
        assert pc.read(fid, 0, 3 * PAGE) == data[:2 * PAGE] + b"\0"
        with open(os.path.join(tmp_path, "f"), "rb") as f:
            assert f.read() == data[:2 * PAGE] + b"\0"
        pc.check()


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_bytes_written_by_someone_else_show_after_refresh(tmp_path, impl):
    with cache_over(tmp_path, impl, b"") as (pc, fid, fd):
        grow(pc, fid, fd, 8 * PAGE)
        # another node writes into the grown range before this one reads it
        os.pwrite(fd, b"theirs", 5 * PAGE + 1)
        pc.refresh(fid, 4 * PAGE, 2 * PAGE)
        assert pc.read(fid, 5 * PAGE, PAGE) == b"\0theirs" + bytes(PAGE - 7)
        # outside the refreshed range the zeros are still known
        assert stats(pc, fid)["known_zero_bytes"] == 6 * PAGE
        os.pwrite(fd, b"more", 7 * PAGE)
        pc.invalidate(fid, 0, 8 * PAGE)               # what a reload does
        assert stats(pc, fid)["known_zero_bytes"] == 0
        assert pc.read(fid, 7 * PAGE, 4) == b"more"


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_a_size_from_elsewhere_forgets_the_zeros_past_it(tmp_path, impl):
    with cache_over(tmp_path, impl, b"") as (pc, fid, fd):
        grow(pc, fid, fd, 8 * PAGE)
        os.ftruncate(fd, 2 * PAGE)                # someone shrinks it...
        pc.set_size(fid, 2 * PAGE)
        os.pwrite(fd, b"x" * (6 * PAGE), 2 * PAGE)    # ...and writes it again
        pc.set_size(fid, 8 * PAGE)
        assert stats(pc, fid)["known_zero_bytes"] == 2 * PAGE
        assert pc.read(fid, 0, 8 * PAGE) == bytes(2 * PAGE) + b"x" * (6 * PAGE)


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_growth_from_the_backing_end_when_it_is_longer(tmp_path, impl):
    # the backing file grew elsewhere (8 pages of bytes) while this node
    # believes it is empty; a truncate up starts its zeros at the backing end
    with cache_over(tmp_path, impl, b"") as (pc, fid, fd):
        theirs = os.urandom(8 * PAGE)
        os.pwrite(fd, theirs, 0)
        grow(pc, fid, fd, 16 * PAGE)
        assert stats(pc, fid)["known_zero_bytes"] == 8 * PAGE
        assert pc.read(fid, 0, 16 * PAGE) == theirs + bytes(8 * PAGE)


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_multiwrite_twins_of_zero_pages_write_only_changes(tmp_path, impl):
    with cache_over(tmp_path, impl, b"") as (pc, fid, fd):
        pc.set_multiwrite(fid, True)
        grow(pc, fid, fd, 4 * PAGE)
        pc.write(fid, PAGE + 10, b"mine")        # its twin: a page of zeros
        os.pwrite(fd, b"theirs", PAGE + 100)     # another writer, same page
        pc.writeback(fid)
        with open(os.path.join(tmp_path, "f"), "rb") as f:
            got = f.read()
        assert got[PAGE + 10:PAGE + 14] == b"mine"
        assert got[PAGE + 100:PAGE + 106] == b"theirs"
        assert stats(pc, fid)["bytes_fetched"] == 0


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_full_cache_reads_zeros_through(tmp_path, impl):
    # a read larger than the cache: pages with no slot are zeros too, no I/O
    with cache_over(tmp_path, impl, b"", 16 * PAGE) as (pc, fid, fd):
        grow(pc, fid, fd, 256 * PAGE)
        pc.write(fid, 0, os.urandom(16 * PAGE))   # every slot dirty
        head = pc.read(fid, 0, 16 * PAGE)
        assert pc.read(fid, 0, 256 * PAGE) == head + bytes(240 * PAGE)
        assert stats(pc, fid)["bytes_fetched"] == 0
        pc.writeback(fid)


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
@pytest.mark.parametrize("multiwrite", [False, True], ids=["plain", "multiwrite"])
def test_a_punched_hole_drops_dirty_pages_and_zeros_the_edges(tmp_path, impl, multiwrite):
    """What files.OpenFiles.fallocate does for PUNCH_HOLE: the backing file
    is punched, then the engine; dirty bytes outside the hole still reach
    the backing file, those inside never do."""
    from mounting import fallocate
    data = os.urandom(32 * PAGE)
    with cache_over(tmp_path, impl, data) as (pc, fid, fd):
        if multiwrite:
            pc.set_multiwrite(fid, True)
        assert pc.read(fid, 0, 32 * PAGE) == data
        pc.write(fid, 0, b"A" * (32 * PAGE))                # every page dirty
        a, b = 3 * PAGE + 100, 20 * PAGE + 7
        fallocate(fd, 0x02 | 0x01, a, b - a)
        pc.punch(fid, a, b - a)
        want = b"A" * a + bytes(b - a) + b"A" * (32 * PAGE - b)
        assert pc.size(fid) == 32 * PAGE
        assert pc.read(fid, 0, 32 * PAGE) == want
        assert pc.dirty_bytes(fid) == (4 + 12) * PAGE         # pages 0-3 and 20-31
        assert stats(pc, fid)["known_zero_bytes"] == 16 * PAGE  # pages 4-19
        pc.writeback(fid)
        assert os.pread(fd, 32 * PAGE, 0) == want
        pc.punch(fid, 30 * PAGE, 10 * PAGE)                 # past the end: up to it
        assert pc.read(fid, 30 * PAGE, 4 * PAGE) == bytes(2 * PAGE)
