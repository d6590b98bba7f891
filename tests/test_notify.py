"""shimfs._notify: the FUSE notifications, byte for byte, written to a pipe.

A pipe stands in for the session's /dev/fuse descriptor: every message is
read back and parsed as the kernel would (<linux/fuse.h> layouts).
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading

import pytest

from engines import IMPLS, cache_over
from shimfs._notify import SessionKernel
F_SETPIPE_SZ = 1031
HEADER = struct.Struct("=IiQ")          # fuse_out_header: len, error (notify code), unique


@pytest.fixture
def pipe():
    rfd, wfd = os.pipe()
    fcntl.fcntl(wfd, F_SETPIPE_SZ, 1 << 20)        # room for the small messages
    yield rfd, wfd
    for fd in (rfd, wfd):
        try:
            os.close(fd)
        except OSError:
            pass


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        assert chunk, "message cut short"
        data += chunk
    return data


def _read_message(rfd: int) -> tuple[int, bytes]:
    length, code, unique = HEADER.unpack(_read_exact(rfd, HEADER.size))
    assert unique == 0 and length >= HEADER.size
    return code, _read_exact(rfd, length - HEADER.size)


def _read_store(rfd: int):
    """One FUSE_NOTIFY_STORE: (nodeid, offset, data)."""
    code, body = _read_message(rfd)
    assert code == 4
    nodeid, offset, size, pad = struct.unpack_from("=QQII", body)
    assert pad == 0 and len(body) == 24 + size
    return nodeid, offset, body[24:]


def test_inval_range_message(pipe):
    rfd, wfd = pipe
    k = SessionKernel(wfd)
    assert k.live and k.fd == wfd
    k.inval_range(42, 8192, 4096)
    k.inval_range(43, -1, 0)
    assert _read_message(rfd) == (2, struct.pack("=Qqq", 42, 8192, 4096))
    assert _read_message(rfd) == (2, struct.pack("=Qqq", 43, -1, 0))


def test_store_splits_into_1mib_messages(pipe):
    rfd, wfd = pipe
    data = os.urandom((1 << 20) + 5)
    writer = threading.Thread(target=SessionKernel(wfd).store, args=(7, 4096, memoryview(data)))
    writer.start()          # a message is larger than the pipe: read while it writes
    try:
        assert _read_store(rfd) == (7, 4096, data[:1 << 20])
        assert _read_store(rfd) == (7, 4096 + (1 << 20), data[1 << 20:])
    finally:
        writer.join()


def test_errors_reach_the_caller(pipe):
    rfd, wfd = pipe
    os.close(rfd)
    k = SessionKernel(wfd)
    for call in (lambda: k.inval_range(1, 0, 0), lambda: k.store(1, 0, b"x")):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EPIPE


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "fallback"])
def test_push_writes_one_notify_store_of_the_cached_prefix(tmp_path, pipe, impl):
    rfd, wfd = pipe
    data = os.urandom(5 * 4096 + 100)
    k = SessionKernel(wfd)
    with cache_over(tmp_path, impl, data) as (pc, fid, fd):
        assert k.push(pc, fid, 7, 0, 8192) == 0                 # nothing cached: nothing sent
        pc.prefetch(fid, 4096, 2 * 4096)                        # pages 1 and 2
        pc.write(fid, 3 * 4096, b"X" * 10)                      # page 3: dirty, also cached
        assert k.push(pc, fid, 7, 4096, 1 << 20) == 3 * 4096    # stops at uncached page 4
        model = bytearray(data)
        model[3 * 4096:3 * 4096 + 10] = b"X" * 10
        assert _read_store(rfd) == (7, 4096, bytes(model[4096:4 * 4096]))
        pc.read(fid, 0, len(data))
        assert k.push(pc, fid, 9, 4 * 4096, 1 << 20) == 4096 + 100   # clipped to the size
        assert _read_store(rfd) == (9, 4 * 4096, bytes(model[4 * 4096:]))
        st = pc.file_stats(fid)
        assert (st["bytes_pushed"], st["pushes"]) == (4 * 4096 + 100, 2)
        with pytest.raises(ValueError):
            k.push(pc, fid, 7, 100, 4096)                       # not page aligned
        os.close(rfd)
        with pytest.raises(OSError) as e:                       # EPIPE reaches the caller
            k.push(pc, fid, 7, 0, 4096)
        assert e.value.errno == errno.EPIPE
        assert pc.file_stats(fid)["pushes"] == 2                # a failed push delivers nothing
