"""Cluster-wide grants over etcd: Phillips' Shared and Exclusive states, by extent.

This room only keeps the cluster's book of who may cache which extents of
which file; what a node does to give a range up (invalidate its kernel
pages, write back and fsync, drop its daemon pages) is the caller's
``give_up`` callback.  It knows nothing of FUSE, nor of what an extent is
(cluster.py: 4 MiB of data, and the last one the file's size): it deals in
ranges [a, b) of extent numbers, up to ``END``.  Everything here blocks:
call it from worker threads, never from the trio thread.

The book (every key under the prefix the mount names, ``PREFIX``):

* ``PREFIX/g/FILE/H/NODE/A`` = "MODE B": NODE holds extents [A, B) of FILE
  in MODE (S or E; one key per run, touching runs of one mode merged);
* ``PREFIX/g/FILE/W/NODE`` = "MODE A B;...": NODE waits for those ranges
  (the queue: its create revision is its place in line);
* ``PREFIX/ask/NODE/FILE`` = requester: please look at FILE's waiters;
* ``PREFIX/nodes/NODE`` = host: the node is there (written at ``start``,
  which so proves that the node may write the prefix).

Every key a node writes lives on that node's lease, so a node that dies
loses its grants and its requests when the lease expires (``ttl``).  A round
of an acquire reads every key of the file and writes in one transaction
guarded by "nothing of the file changed since": it grants the largest run
around each wanted range that conflicts with no other node's holding or
wait (GPFS's token trick: a file nobody else has is granted whole, in one
round trip), or else gets in line and asks the holders in the way.

Asks are served by one thread per node, in order: the node gives up the
parts of its holdings that conflict with what others wait for, after the
grant has been held for at least ``hold`` seconds (so that two writers make
progress instead of handing a page back and forth, as Lustre's 10 ms).  It
calls ``give_up(file, ranges, wanted)``, which returns ``S`` when the node
can keep everything Shared (an Exclusive holder with no writable handle
left, asked for Shared), else None, and then rewrites its keys.

A node whose lease could not be refreshed for two thirds of ``ttl`` counts
as having lost every grant: ``on_lost(files)`` is called (the caller drops
its caches), and a new lease is taken once the service answers again.
docs/coherence.md describes the whole protocol.
"""
from __future__ import annotations

import collections
import dataclasses
import errno
import itertools
import json
import logging
import os
import socket
import threading
import time
from typing import Callable, Iterable

import requests
from etcd3gw import exceptions as etcd_exceptions, utils as etcd_utils
from etcd3gw.client import Etcd3Client
from etcd3gw.lease import Lease

log = logging.getLogger(__name__)

S, E = "S", "E"

#: Longest wait between two reads of a key somebody waits for (seconds).
POLL = 0.5
#: Default lease time-to-live (seconds): a dead node's grants go after this.
TTL = 10
#: Default minimum hold time (seconds) before a grant is given up.
HOLD = 0.01
#: Default bound on the wait for a grant (seconds), then ETIMEDOUT.
WAIT = 60.0


class GrantError(OSError):
    """A grant could not be had: ``errno`` says why (ETIMEDOUT: a holder did
    not give it up in time; ENOTCONN: the service cannot be reached)."""


class GiveUpFailed(Exception):
    """Raised by a ``give_up`` callback that could not let go now (its
    write-back failed): the node keeps the grant, and the ask is served
    again at the next round."""


def parse_endpoints(value: str) -> list[tuple[str, int]]:
    """``etcd://HOST:PORT[,HOST:PORT...]`` (several members of one cluster)."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme != "etcd" or not rest:
        raise ValueError("coherence must be etcd://HOST:PORT[,HOST:PORT...], not %r" % value)
    out = []
    for part in rest.rstrip("/").split(","):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("bad etcd endpoint %r in %r (want HOST:PORT)" % (part, value))
        out.append((host.strip("[]"), int(port)))
    return out


@dataclasses.dataclass(frozen=True)
class Security:
    """How this node proves itself to etcd: TLS (``ca``: the CA that signed
    the servers' certificates; ``cert``/``key``: this node's client
    certificate, for servers run with ``--client-cert-auth``) and etcd's
    user/password authentication.  All empty: plain, unauthenticated."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        if (self.user is None) != (self.password is None):
            raise ValueError("an etcd user needs a password, and a password a user")
        if self.cert is not None and self.ca is None:
            raise ValueError("a client certificate needs the CA (TLS)")


def session(security: Security) -> requests.Session:
    """An HTTP session for etcd that trusts only what ``security`` names:
    no proxy and no CA bundle from the environment (REQUESTS_CA_BUNDLE
    would otherwise override the CA given here)."""
    s = requests.Session()
    s.trust_env = False
    if security.ca is not None:
        s.verify = security.ca
    if security.cert is not None:
        s.cert = (security.cert, security.key)
    return s


class _Etcd:
    """The etcd3gw clients of every endpoint; a call that cannot reach one
    tries the next, and ``GrantError(ENOTCONN)`` when none answers.  With a
    user, each client authenticates first and again when its token expires;
    a refusal is ``GrantError(EACCES)``."""

    def __init__(self, endpoints: list[tuple[str, int]], timeout: float,
                 security: Security = Security()):
        self.exc = etcd_exceptions
        self.enc, self.dec = etcd_utils._encode, etcd_utils._decode
        self.security = security
        tls = security.ca is not None
        self.clients = [Etcd3Client(host=h, port=p, timeout=timeout, api_path="/v3/",
                                    protocol="https" if tls else "http",
                                    session=session(security))
                        for h, p in endpoints]
        self.authenticated: set[int] = set()
        self.current = 0

    def _authenticate(self, c: Etcd3Client) -> None:
        sec = self.security
        c.session.headers.pop("Authorization", None)
        r = c.post(c.get_url("/auth/authenticate"), json={"name": sec.user, "password": sec.password})
        c.session.headers["Authorization"] = r["token"]
        self.authenticated.add(id(c))

    def call(self, what: Callable):
        last = None
        for i in range(len(self.clients)):
            c = self.clients[(self.current + i) % len(self.clients)]
            try:
                try:
                    if self.security.user is not None and id(c) not in self.authenticated:
                        self._authenticate(c)
                    out = what(c)
                except self.exc.Etcd3Exception as e:
                    if self.security.user is None or "token" not in _reason(e):
                        raise
                    self._authenticate(c)           # the token expired: once more
                    out = what(c)
            except (self.exc.ConnectionFailedError, self.exc.ConnectionTimeoutError) as e:
                last = _reason(e)
                continue
            except self.exc.Etcd3Exception as e:
                text = _reason(e)
                if "permission denied" in text or "authentication failed" in text \
                        or "user name is empty" in text or "token" in text:
                    raise GrantError(errno.EACCES, "etcd refused: %s" % _reason(e)) from None
                raise GrantError(errno.EIO, "etcd failed: %s" % _reason(e)) from None
            except OSError as e:
                last = str(e)
                continue
            self.current = (self.current + i) % len(self.clients)
            return out
        if last is not None and ("SSL" in last or "certificate" in last):
            raise GrantError(errno.EACCES, "etcd refused the TLS connection: %s" % last)
        raise GrantError(errno.ENOTCONN, "etcd unreachable: %s" % last)

    # -- the few requests the book needs -----------------------------------
    def txn(self, compare: list, success: list, failure: list) -> dict:
        return self.call(lambda c: c.transaction(
            {"compare": compare, "success": success, "failure": failure}))

    def put_req(self, key: str, value: str, lease: int) -> dict:
        return {"request_put": {"key": self.enc(key), "value": self.enc(value), "lease": lease}}

    def del_req(self, key: str) -> dict:
        return {"request_delete_range": {"key": self.enc(key)}}

    def range_req(self, key: str, prefix: bool = False) -> dict:
        r = {"key": self.enc(key)}
        if prefix:
            r["range_end"] = self.enc(_after(key))
        return {"request_range": r}

    def absent(self, key: str) -> dict:
        return {"key": self.enc(key), "result": "EQUAL", "target": "VERSION", "version": "0"}

    def empty(self, prefix: str) -> dict:
        """No key under ``prefix`` (an empty range compares as one key of version 0)."""
        return {"key": self.enc(prefix), "range_end": self.enc(_after(prefix)),
                "result": "EQUAL", "target": "VERSION", "version": "0"}

    def unchanged(self, prefix: str, revision: int) -> dict:
        """No key under ``prefix`` was written after ``revision``."""
        return {"key": self.enc(prefix), "range_end": self.enc(_after(prefix)),
                "result": "LESS", "target": "MOD", "mod_revision": str(revision + 1)}

    def meta(self, resp: dict, i: int) -> list[tuple[str, str, int, int]]:
        """(key, value, mod revision, create revision) of the ``i``-th
        response's range."""
        rr = resp.get("responses", [])[i].get("response_range", {})
        return [(self.dec(kv["key"]).decode(), self.dec(kv.get("value", "")).decode(),
                 int(kv.get("mod_revision", 0)), int(kv.get("create_revision", 0)))
                for kv in rr.get("kvs", [])]

    def same(self, key: str, mod_revision: int) -> dict:
        """``key`` exists and was last written at ``mod_revision``."""
        return {"key": self.enc(key), "result": "EQUAL", "target": "MOD",
                "mod_revision": str(mod_revision)}

    def kvs(self, resp: dict, i: int) -> list[tuple[str, str]]:
        return [(k, v) for k, v, _, _ in self.meta(resp, i)]

    def revision(self, prefix: str) -> int:
        """The store's revision now (a count-only read: the keys stay there)."""
        r = self.call(lambda c: c.post(c.get_url("/kv/range"), json={
            "key": self.enc(prefix), "range_end": self.enc(_after(prefix)), "count_only": True}))
        return int(r["header"]["revision"])

    def wait_change(self, prefix: str, revision: int, timeout: float) -> None:
        """Return at the first change under ``prefix`` after ``revision``, or
        after ``timeout`` (the caller reads again either way)."""
        def watch(c):
            try:
                c.watch_prefix_once(prefix, timeout=timeout, start_revision=revision + 1)
            except self.exc.WatchTimedOut:
                pass
        try:
            self.call(watch)
        except GrantError:
            time.sleep(min(timeout, POLL))
            raise


def _reason(e: Exception) -> str:
    """etcd's own words from an etcd3gw error (the JSON body it keeps in
    ``detail_text``), else the error's."""
    text = getattr(e, "detail_text", None) or str(e)
    try:
        return json.loads(text).get("error") or text
    except (ValueError, AttributeError):
        return text


def _after(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class _Feed:
    """One long-lived watch of the whole prefix, kept open by a thread.

    Waiting for a change by opening a watch each time was slow: etcd answers
    a watch that starts at a past revision from a loop that runs every
    100 ms, and between a node's read and its new watch the change it waits
    for has often happened already.  This stream starts at the present (so
    etcd sends each event at once), and :meth:`wait` looks at what it
    brought: the last ``KEEP`` events (revision, key, value, create
    revision), which :meth:`changes` also hands to ``Grants._scan`` to bring
    a node's last read of a prefix up to date without asking etcd.  The stream
    resumes after the last revision it saw when it breaks; while it is down,
    or after a gap (compaction, events dropped from the window), ``wait``
    returns at once and the caller reads again, as every caller does after
    a wait anyway.  It has its own connections (``etcd``).
    """

    KEEP = 4096
    #: Seconds without a byte before the stream is opened again (etcd sends
    #: progress notifications only every few minutes; a stream that died
    #: without a FIN would otherwise never be noticed).
    IDLE = 30.0

    def __init__(self, etcd: "_Etcd", prefix: str):
        self.etcd, self.prefix = etcd, prefix
        self.cv = threading.Condition()
        # (revision, key, value or None for a deletion, create revision)
        self.events: collections.deque[tuple[int, str, str | None, int]] = collections.deque()
        self.since: int | None = None     # every event after this revision was seen (None: down)
        self.last = 0                     # and every event up to this one
        self.dropped = 0                  # the newest revision pushed out of ``events``
        self.stopping = threading.Event()
        self.resp = None
        self.streams = 0                  # watches opened (stats)

    def wait(self, prefix: str, revision: int, timeout: float) -> bool:
        """Return at the first change under ``prefix`` after ``revision``, or
        after ``timeout``; False at once if the stream cannot tell (down, or
        it started after ``revision``): the caller then watches by itself."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                if self.stopping.is_set():
                    return True
                if self.since is None or self.since > revision or self.dropped > revision:
                    return self.since is not None       # a gap: read again
                for rev, key, _, _ in reversed(self.events):
                    if rev <= revision:
                        break
                    if key.startswith(prefix):
                        return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return True
                self.cv.wait(left)

    def changes(self, prefix: str, revision: int) -> tuple[list, int] | None:
        """The events under ``prefix`` after ``revision``, and the revision
        up to which the stream has seen everything; None if it cannot tell
        (down, or a gap)."""
        with self.cv:
            if self.since is None or self.since > revision or self.dropped > revision:
                return None
            out = []
            for ev in reversed(self.events):
                if ev[0] <= revision:
                    break
                if ev[1].startswith(prefix):
                    out.append(ev)
            out.reverse()
            return out, self.last

    def run(self) -> None:
        e = self.etcd
        last: int | None = None           # the newest revision the stream brought
        while not self.stopping.is_set():
            try:
                if last is None:
                    last = e.revision(self.prefix)
                start = last + 1
                req = {"create_request": {"key": e.enc(self.prefix),
                                          "range_end": e.enc(_after(self.prefix)),
                                          "start_revision": start}}
                resp = e.call(lambda c: c.session.post(c.get_url("/watch"), json=req,
                                                       stream=True, timeout=(5.0, self.IDLE)))
                self.resp = resp
                self.streams += 1
                if resp.status_code != 200:
                    raise GrantError(errno.EIO, "etcd watch: HTTP %d" % resp.status_code)
                for line in resp.iter_lines():
                    if self.stopping.is_set():
                        return
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    res = msg.get("result")
                    if res is None:
                        raise GrantError(errno.EIO, "etcd watch: %s" % msg.get("error", msg))
                    if res.get("canceled") or int(res.get("compact_revision", 0) or 0):
                        last = None     # compacted: start again from the present
                        raise GrantError(errno.EIO, "etcd watch canceled: %s"
                                         % res.get("cancel_reason", "compacted"))
                    if res.get("created"):
                        with self.cv:
                            self.since = self.last = start - 1
                            self.cv.notify_all()
                    evs = res.get("events") or ()
                    if evs:
                        with self.cv:
                            for ev in evs:
                                kv = ev["kv"]
                                rev = int(kv["mod_revision"])
                                gone = ev.get("type") in ("DELETE", 1)
                                self.events.append((
                                    rev, e.dec(kv["key"]).decode(),
                                    None if gone else e.dec(kv.get("value", "")).decode(),
                                    int(kv.get("create_revision", 0))))
                                last = max(last, rev)
                                self.last = max(self.last, rev)
                            while len(self.events) > self.KEEP:
                                self.dropped = self.events.popleft()[0]
                            self.cv.notify_all()
            except Exception as exc:        # down, refused, idle too long: open it again
                if not self.stopping.is_set():
                    log.debug("grant feed: %s", exc)
            finally:
                with self.cv:
                    self.since = None
                    self.cv.notify_all()
                if self.resp is not None:
                    self.resp.close()
                    self.resp = None
            self.stopping.wait(POLL)

    def live(self) -> bool:
        """The stream is open and has seen every event since it started."""
        with self.cv:
            return self.since is not None

    def stop(self) -> None:
        self.stopping.set()
        resp = self.resp
        if resp is not None:
            # wake the reader out of its recv (urllib3 keeps the socket here)
            sock = getattr(getattr(resp.raw, "_connection", None), "sock", None)
            try:
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self.cv:
            self.cv.notify_all()


#: Extents are numbered from 0, and END is one past the last: a grant is of
#: a range [a, b) of them.  The caller says what an extent is (cluster.py:
#: 4 MiB of data each, and the last one, META, the file's size and
#: attributes); ``acquire(f, mode)`` alone is of the whole file.
END = 1 << 40


def norm(ivs: list) -> list:
    """Sorted, with touching runs of one mode merged."""
    out: list = []
    for a, b, m in sorted(ivs):
        if a >= b:
            continue
        if out and out[-1][1] == a and out[-1][2] == m:
            out[-1] = (out[-1][0], b, m)
        else:
            out.append((a, b, m))
    return out


def cut(ivs: list, a: int, b: int) -> list:
    """``ivs`` without [a, b)."""
    out = []
    for x, y, m in ivs:
        if y <= a or x >= b:
            out.append((x, y, m))
            continue
        if x < a:
            out.append((x, a, m))
        if y > b:
            out.append((b, y, m))
    return out


def _grant_into(ivs: list, a: int, b: int, mode: str) -> list:
    """``ivs`` once [a, b) is granted in ``mode`` (Shared leaves Exclusive
    parts Exclusive)."""
    if mode == E:
        return norm(cut(ivs, a, b) + [(a, b, E)])
    out = cut(ivs, a, b) + [(a, b, S)]
    for x, y, m in ivs:
        if m == E and y > a and x < b:
            out = cut(out, max(x, a), min(y, b)) + [(max(x, a), min(y, b), E)]
    return norm(out)


def covers(ivs: list, a: int, b: int, mode: str) -> bool:
    """Do ``ivs`` hold all of [a, b) in ``mode`` (Exclusive covers Shared)?"""
    pos = a
    for x, y, m in ivs:
        if y <= pos:
            continue
        if x > pos or (mode == E and m != E):
            return False
        pos = y
        if pos >= b:
            return True
    return pos >= b


def _conflict(m1: str, m2: str) -> bool:
    return m1 == E or m2 == E


def _fmt_ranges(req: list) -> str:
    return ";".join("%s %d %d" % (m, a, b) for a, b, m in req)


def _parse_ranges(text: str) -> list:
    out = []
    for part in text.split(";"):
        m, a, b = part.split()
        out.append((int(a), int(b), m))
    return out


class _State:
    __slots__ = ("ivs", "since", "busy", "serial", "op", "acq", "acquiring")

    def __init__(self):
        self.ivs: list = []              # what this node holds: [(a, b, mode)], sorted
        self.since = 0.0                 # monotonic time of the last grant
        self.busy = False                # a give-up is under way
        self.serial = 0                  # the last grant's number (Grants.serial)
        # One round of an acquire, or one give-up, at a time: a give-up
        # that overlapped an acquire's transaction could delete the keys
        # it had just written.
        self.op = threading.Lock()
        self.acq = threading.Lock()      # one acquire of the file at a time on this node
        self.acquiring = 0


class Grants:
    """This node's side of the book.  ``give_up(file, ranges, wanted) ->
    kept`` and ``on_lost(files)`` are called on the grants' own threads:
    ``ranges`` are the [a, b) this node must let go of, ``wanted`` the
    strongest mode the askers want there; returning ``S`` (possible only
    when ``wanted`` is S) keeps every range this node holds, Shared."""

    def __init__(self, endpoints: Iterable[tuple[str, int]] | str, prefix: str = "/shimfs/",
                 node: str | None = None, ttl: int = TTL, hold: float = HOLD,
                 wait: float = WAIT, security: Security = Security(),
                 give_up: Callable[[str, list, str], str | None] = lambda f, r, w: None,
                 on_lost: Callable[[list[str]], None] = lambda files: None):
        if isinstance(endpoints, str):
            endpoints = parse_endpoints(endpoints)
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.node = node or "%s.%d" % (socket.gethostname(), os.getpid())
        if "/" in self.node or " " in self.node:
            raise ValueError("a node name has no '/' or space: %r" % self.node)
        self.ttl, self.hold, self.wait = ttl, hold, wait
        self.give_up_cb, self.on_lost = give_up, on_lost
        self.etcd = _Etcd(list(endpoints), timeout=max(2.0, ttl / 3), security=security)
        self.feed = _Feed(_Etcd(list(endpoints), timeout=max(2.0, ttl / 3), security=security),
                          self.prefix)
        self.mu = threading.Lock()
        self.changed = threading.Condition(self.mu)
        self.files: dict[str, _State] = {}
        self.lease = 0
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self._serials = itertools.count(1)
        self.last_serial = 0             # the newest grant's serial number
        self.counters = dict(grants_asked=0, grant_waits=0, grant_wait_seconds=0.0,
                             grants_given_up=0, grants_lost=0, asks_sent=0, asks_served=0,
                             waits_on_feed=0, waits_own_watch=0, reads_from_feed=0,
                             reads_from_etcd=0)
        # What this node last read under a prefix ({key: (value, mod, create)},
        # revision), brought up to date from the feed (_scan).
        self.views: dict[str, tuple[dict, int]] = {}
        self.my_rev = 0                  # the revision of this node's last write

    # -- life ----------------------------------------------------------------
    def start(self) -> None:
        """Take a lease (so a bad endpoint fails here, at mount time) and
        start the keep-alive and ask threads."""
        self.lease = self._new_lease()
        # this node's presence, which also proves it may write the prefix
        e = self.etcd
        e.txn([], [e.put_req("%snodes/%s" % (self.prefix, self.node), socket.gethostname(),
                             self.lease)], [])
        for target, name in ((self._keep_alive, "grants-lease"), (self._serve_asks, "grants-asks"),
                             (self.feed.run, "grants-feed")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)

    def close(self) -> None:
        """Stop the threads and revoke the lease: every grant goes at once."""
        self.stopping.set()
        self.feed.stop()
        for t in self.threads:
            # (the feed's thread is woken by stop(); at worst its read times
            # out, and it is a daemon thread)
            t.join(timeout=None if t.name != "grants-feed" else 2.0)
        self.threads.clear()
        if self.lease:
            try:
                self.etcd.call(lambda c: c.post(c.get_url("/kv/lease/revoke"), json={"ID": self.lease}))
            except (GrantError, Exception) as e:     # it expires on its own
                log.debug("lease revoke failed: %s", e)
            self.lease = 0

    def _new_lease(self) -> int:
        r = self.etcd.call(lambda c: c.post(c.get_url("/lease/grant"), json={"TTL": self.ttl, "ID": 0}))
        return int(r["ID"])

    # -- keys -----------------------------------------------------------------
    def _gdir(self, f: str) -> str:
        return "%sg/%s/" % (self.prefix, f)

    def _hdir(self, f: str, node: str) -> str:
        return "%sH/%s/" % (self._gdir(f), node)

    def _wkey(self, f: str, node: str) -> str:
        return "%sW/%s" % (self._gdir(f), node)

    def _askdir(self, node: str) -> str:
        return "%sask/%s/" % (self.prefix, node)

    def _read(self, f: str) -> tuple[dict, dict, int]:
        """Everything the book says of ``f``: ({node: holdings}, {node:
        (create revision, wanted ranges)}, revision)."""
        kvs, rev = self._scan(self._gdir(f))
        return self._parse(f, kvs) + (rev,)

    def _scan(self, prefix: str) -> tuple[list, int]:
        """The keys under ``prefix`` [(key, value, mod revision, create
        revision)] as of the returned revision.  From the last read of it
        and the feed's events since, when the feed can tell and has seen
        this node's own last write; else read from etcd.  Either way the
        answer was true at that revision, and a transaction guarded by
        "nothing under the prefix changed since" is safe on it."""
        with self.mu:
            view = self.views.get(prefix)
        if view is not None and self.my_rev <= max(view[1], self.feed.last):
            got = self.feed.changes(prefix, view[1])
            if got is not None:
                events, upto = got
                keys = dict(view[0])
                for rev, key, value, create in events:
                    if value is None:
                        keys.pop(key, None)
                    else:
                        keys[key] = (value, rev, create)
                rev = max(view[1], upto)
                with self.mu:
                    self.views[prefix] = (keys, rev)
                    self.counters["reads_from_feed"] += 1
                return [(k, v, m, c) for k, (v, m, c) in sorted(keys.items())], rev
        e = self.etcd
        r = e.txn([], [e.range_req(prefix, prefix=True)], [])
        kvs, rev = e.meta(r, 0), int(r["header"]["revision"])
        with self.mu:
            self.views[prefix] = ({k: (v, m, c) for k, v, m, c in kvs}, rev)
            self.counters["reads_from_etcd"] += 1
        return kvs, rev

    def _txn(self, compare: list, success: list) -> dict:
        """A transaction of this node's; one that wrote something moves
        ``my_rev`` (a read from the feed must have seen it)."""
        r = self.etcd.txn(compare, success, [])
        if r.get("succeeded"):
            resps = r.get("responses", [])
            wrote = any("response_put" in x or int(x.get("response_delete_range", {})
                                                    .get("deleted", 0) or 0) for x in resps)
            if wrote:
                with self.mu:
                    self.my_rev = max(self.my_rev, int(r["header"]["revision"]))
        return r

    def _parse(self, f: str, kvs: list) -> tuple[dict, dict]:
        gdir = self._gdir(f)
        holds: dict[str, list] = {}
        waits: dict[str, tuple[int, list]] = {}
        for key, value, _mod, create in kvs:
            rest = key[len(gdir):]
            try:
                if rest.startswith("H/"):
                    node, _, start = rest[2:].rpartition("/")
                    mode, end = value.split()
                    holds.setdefault(node, []).append((int(start), int(end), mode))
                elif rest.startswith("W/"):
                    waits[rest[2:]] = (create, _parse_ranges(value))
            except ValueError:
                log.warning("a key of the book that is not this version's: %s", key)
        for ivs in holds.values():
            ivs.sort()
        return holds, waits

    def _rewrite(self, f: str, old: list, new: list) -> list:
        """The requests that turn this node's holding keys ``old`` into ``new``."""
        e, hdir = self.etcd, self._hdir(f, self.node)
        was = {a: (b, m) for a, b, m in old}
        now = {a: (b, m) for a, b, m in new}
        ops = [e.del_req(hdir + "%013d" % a) for a in was if a not in now]
        ops += [e.put_req(hdir + "%013d" % a, "%s %d" % (m, b), self.lease)
                for a, (b, m) in now.items() if was.get(a) != (b, m)]
        return ops

    # -- what is held --------------------------------------------------------
    def held(self, f: str, a: int = 0, b: int = END) -> str | None:
        """The mode this node holds all of [a, b) of ``f`` in (default: the
        whole file), or None."""
        with self.mu:
            st = self.files.get(f)
            ivs = st.ivs if st is not None else []
        if covers(ivs, a, b, E):
            return E
        return S if covers(ivs, a, b, S) else None

    def holds(self, f: str, req: list) -> bool:
        """Does this node hold every (a, b, mode) of ``req``?"""
        with self.mu:
            st = self.files.get(f)
            if st is None or st.busy:
                return False
            return all(covers(st.ivs, a, b, m) for a, b, m in req)

    def runs(self, f: str) -> list:
        """What this node holds of ``f``: [(a, b, mode)], sorted."""
        with self.mu:
            st = self.files.get(f)
            return list(st.ivs) if st is not None else []

    def serial(self, f: str) -> int:
        """The number of this node's last grant of ``f`` (0: nothing held)."""
        with self.mu:
            st = self.files.get(f)
            return st.serial if st is not None and st.ivs else 0

    # -- asking ------------------------------------------------------------------
    def acquire(self, f: str, mode: str = S, wait: float | None = None,
                ranges: list | None = None) -> int:
        """Return once this node holds ``mode`` on all of ``f`` (or, with
        ``ranges``, every (a, b, mode) of them; Exclusive covers Shared),
        with the grant's serial number; GrantError after ``wait`` seconds."""
        req = list(ranges) if ranges is not None else [(0, END, mode)]
        for a, b, m in req:
            if m not in (S, E) or not 0 <= a < b <= END:
                raise ValueError((a, b, m))
        with self.mu:
            st = self.files.setdefault(f, _State())
            while st.busy:                      # a give-up of f is under way
                self.changed.wait()
            if all(covers(st.ivs, a, b, m) for a, b, m in req):
                return st.serial
            st.acquiring += 1
        self._count("grants_asked")
        start = time.monotonic()
        deadline = start + (self.wait if wait is None else wait)
        waited = False
        try:
            if not st.acq.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise GrantError(errno.ETIMEDOUT, "no grant of %s within %.0f s"
                                 % (f, deadline - start))
            try:
                while True:
                    with st.op:
                        with self.mu:
                            if all(covers(st.ivs, a, b, m) for a, b, m in req):
                                return st.serial    # granted by a round before
                        granted, rev = self._try(f, st, req)
                        if granted:
                            return st.serial
                    waited = True
                    if time.monotonic() > deadline:
                        raise GrantError(errno.ETIMEDOUT, "no %s grant of %s within %.0f s"
                                         % (_fmt_ranges(req), f, deadline - start))
                    if rev is not None:     # (None: changed while deciding, again at once)
                        self._wait_change(self._gdir(f), rev,
                                          min(POLL, max(0.0, deadline - time.monotonic())))
            except BaseException:
                try:
                    self._txn([], [self.etcd.del_req(self._wkey(f, self.node))])
                except GrantError:
                    pass                    # it goes with the lease
                raise
            finally:
                st.acq.release()
        finally:
            with self.mu:
                st.acquiring -= 1
            if waited:
                self._count("grant_waits")
                self._count("grant_wait_seconds", time.monotonic() - start)

    def _try(self, f: str, st: _State, req: list) -> tuple[bool, int | None]:
        """One round, under ``st.op``: (True, rev) once granted; else asks
        the holders in the way and returns (False, the revision to wait for
        changes after, or None: things changed already, go again).

        The round reads every key of the file, decides, and writes in one
        transaction guarded by "nothing of the file changed since the read".
        A grant is the largest run around each wanted range that conflicts
        with no other node's holding and no other node's wait (GPFS's
        token trick: with no conflict at all, that is the whole file).

        Waiters queue: a node that must wait writes ``W/NODE`` (with the
        ranges it wants), and a range goes to the oldest waiter first: a
        node that had just given a grant up took it back before the asker
        (woken by its watch some milliseconds later) could, and one writer
        starved the other for seconds.  Every round asks again: a holder
        may have been granted anew since it served the last ask."""
        e, gdir = self.etcd, self._gdir(f)
        holds, waits, rev = self._read(f)
        mine = holds.pop(self.node, [])
        my_wait = waits.pop(self.node, None)
        in_way = sorted({n for a, b, m in req for n, ivs in holds.items()
                         for x, y, hm in ivs if x < b and a < y and _conflict(m, hm)})
        older = [n for n, (c, rs) in waits.items()
                 if (my_wait is None or c < my_wait[0])
                 and any(x < b and a < y and _conflict(m, wm)
                         for a, b, m in req for x, y, wm in rs)]
        if not in_way and not older:
            new = mine
            for a, b, m in req:
                lo, hi = self._largest(a, b, m, holds, waits)
                new = _grant_into(new, lo, hi, m)
            ops = self._rewrite(f, mine, new)
            if my_wait is not None:
                ops.append(e.del_req(self._wkey(f, self.node)))
            r = self._txn([e.unchanged(gdir, rev)], ops) if ops else {"succeeded": True,
                                                                        "header": {"revision": rev}}
            if not r.get("succeeded"):
                return False, None
            with self.mu:
                st.ivs = new
                st.since = time.monotonic()
                st.serial = self.last_serial = next(self._serials)
            return True, int(r["header"]["revision"])
        ops = []
        if my_wait is None or my_wait[1] != req:
            ops.append(e.put_req(self._wkey(f, self.node), _fmt_ranges(req), self.lease))
        ops += [e.put_req(self._askdir(n) + f, self.node, self.lease) for n in in_way]
        if not ops:
            return False, rev
        r = self._txn([e.unchanged(gdir, rev)], ops)
        if not r.get("succeeded"):
            return False, None
        self._count("asks_sent", len(in_way))
        return False, int(r["header"]["revision"])

    @staticmethod
    def _largest(a: int, b: int, m: str, holds: dict, waits: dict) -> tuple[int, int]:
        """The largest [lo, hi) around [a, b) that no other node holds or
        waits for in a mode conflicting with ``m``."""
        lo, hi = 0, END
        others = [iv for ivs in holds.values() for iv in ivs] + \
                 [iv for _, rs in waits.values() for iv in rs]
        for x, y, om in others:
            if not _conflict(m, om):
                continue
            if y <= a:
                lo = max(lo, y)
            elif x >= b:
                hi = min(hi, x)
            else:                           # a younger waiter inside: not past it
                if x <= a:
                    lo = max(lo, a)
                if y >= b:
                    hi = min(hi, b)
        return lo, hi

    def _wait_change(self, prefix: str, revision: int, timeout: float) -> None:
        """Until a change under ``prefix`` after ``revision`` (or ``timeout``):
        from the node's long-lived watch, or, while that is down, from a
        watch of its own."""
        if self.feed.wait(prefix, revision, timeout):
            self._count("waits_on_feed")
        else:
            self._count("waits_own_watch")
            self.etcd.wait_change(prefix, revision, timeout)

    def release(self, f: str) -> None:
        """Give ``f`` up of this node's own accord (nothing is cached any more)."""
        with self.mu:
            st = self.files.get(f)
            if st is None or st.acquiring or st.busy:
                return
            del self.files[f]
            self.views.pop(self._gdir(f), None)
        if st.ivs:
            self._drop_own(f)

    # -- being asked ---------------------------------------------------------------
    def _serve_asks(self) -> None:
        mine = self._askdir(self.node)
        rev = 0
        while not self.stopping.is_set():
            try:
                kvs, rev = self._scan(mine)
                for key, _value, _, _ in kvs:
                    self._serve_one(key[len(mine):])
                    self._txn([], [self.etcd.del_req(key)])
                if not kvs:
                    self._wait_change(mine, rev, POLL)
            except GrantError as exc:
                log.debug("asks: %s", exc)
                self.stopping.wait(POLL)
            except GiveUpFailed:            # the caller said why; again next round
                self.stopping.wait(POLL)
            except Exception:
                log.exception("serving asks")
                self.stopping.wait(POLL)

    def _serve_one(self, f: str) -> None:
        """Let go of what other nodes wait for (their ``W`` keys) and this
        node holds in a conflicting mode: after ``hold``, the caller's
        ``give_up`` drops its caches of those ranges, then the keys change.
        This node's own state says "not held" before the caches go."""
        self._count("asks_served")
        with self.mu:
            st = self.files.get(f)
        if st is None:
            self._drop_own(f)               # keys a failed deletion left
            return
        with st.op:
            holds, waits, _ = self._read(f)
            in_book = holds.get(self.node, [])
            waits.pop(self.node, None)
            with self.mu:
                old = list(st.ivs)
            must: list = []
            wanted = S
            for _, rs in waits.values():
                for a, b, m in rs:
                    for x, y, hm in old:
                        if x < b and a < y and _conflict(m, hm):
                            must.append((max(x, a), min(y, b)))
                            if m == E:
                                wanted = E
            if not must:
                if in_book != old:          # keys a failed rewrite left
                    ops = self._rewrite(f, in_book, old)
                    if ops:
                        self._txn([], ops)
                return
            must = [(a, b) for a, b, _ in norm([(a, b, "") for a, b in must])]
            with self.mu:
                st.busy = True
            try:
                left = st.since + self.hold - time.monotonic()
                if left > 0:
                    time.sleep(left)
                rest = old
                for a, b in must:
                    rest = cut(rest, a, b)
                with self.mu:               # not held here first, then the caches go
                    st.ivs = rest
                try:
                    kept = self.give_up_cb(f, must, wanted)
                except BaseException:
                    with self.mu:
                        st.ivs = old
                    raise
                new = norm([(a, b, S) for a, b, _ in old]) if kept == S and wanted == S else rest
                with self.mu:
                    st.ivs = new
                self._count("grants_given_up")
                # (keys a failed rewrite leaves are rewritten at the next ask)
                ops = self._rewrite(f, in_book, new)
                if ops:
                    self._txn([], ops)
            finally:
                with self.mu:
                    st.busy = False
                    self.changed.notify_all()

    def _drop_own(self, f: str) -> None:
        """Delete every holding key of this node for ``f``."""
        e, hdir = self.etcd, self._hdir(f, self.node)
        self._txn([], [{"request_delete_range": {"key": e.enc(hdir),
                                             "range_end": e.enc(_after(hdir))}}])

    # -- the lease -----------------------------------------------------------------
    def _keep_alive(self) -> None:
        """Refresh the lease every ttl/3, and retry every POLL after a
        failure.  The grants count as lost once no refresh succeeded for
        two thirds of the ttl: etcd expires the lease ttl after the last
        refresh it saw, and this node must have stopped caching by then
        (its clock and etcd's differ by the request times in between)."""
        last_ok = time.monotonic()
        interval = self.ttl / 3
        while not self.stopping.wait(interval):
            try:
                lease = self.lease
                ttl = self.etcd.call(lambda c: Lease(lease, c).refresh())
            except GrantError:
                ttl = None
            now = time.monotonic()
            if ttl is not None and ttl > 0:
                last_ok, interval = now, self.ttl / 3
                continue
            interval = POLL
            if ttl is None and now - last_ok < self.ttl * 2 / 3:
                continue                    # not reachable, but the lease still lives
            self._lost()
            try:
                self.lease = self._new_lease()
                last_ok, interval = time.monotonic(), self.ttl / 3
            except GrantError:
                pass

    def _lost(self) -> None:
        with self.mu:
            files = [f for f, st in self.files.items() if st.ivs]
            for st in self.files.values():
                st.ivs = []
            self.changed.notify_all()
        if files:
            self._count("grants_lost", len(files))
            log.warning("lease lost: %d grants gone", len(files))
            try:
                self.on_lost(files)
            except Exception:
                log.exception("dropping the caches of lost grants")

    def _count(self, name: str, n: float = 1) -> None:
        """Counters move on several threads: under the mutex."""
        with self.mu:
            self.counters[name] += n

    def stats(self) -> dict:
        with self.mu:
            held = sum(1 for st in self.files.values() if st.ivs)
        return dict(self.counters, grants_held=held, grant_watch_streams=self.feed.streams)
