"""Cluster-wide grants over etcd: Phillips' Shared and Exclusive states.

This room only keeps the cluster's book of who may cache which file; what a
node does to give a grant up (invalidate its kernel pages, write back and
fsync, drop its daemon pages) is the caller's ``give_up`` callback.  It
knows nothing of FUSE.  Everything here blocks: call it from worker
threads, never from the trio thread.

The book (every key under the prefix the mount names, ``PREFIX``):

* ``PREFIX/g/FILE/E`` = node: the file's Exclusive holder;
* ``PREFIX/g/FILE/S/NODE``: a Shared holder;
* ``PREFIX/ask/NODE/FILE`` = "REQUESTER MODE": please give FILE up;
* ``PREFIX/nodes/NODE`` = host: the node is there (written at ``start``,
  which so proves that the node may write the prefix).

Every key a node writes lives on that node's lease, so a node that dies
loses its grants and its requests when the lease expires (``ttl``).  A grant
is taken in one transaction: Shared if no Exclusive key exists, Exclusive if
none exists (and the node's own Shared key goes in the same transaction);
an Exclusive holder is granted only once no other Shared key is left.  A
node that finds a conflicting holder writes an ask and waits for the
holder's key to go, re-reading it at least every ``POLL`` seconds, so that
neither a watch lost with a broken connection nor a missed event can make
it wait for ever.

Asks are served by one thread per node, in order: after the grant has been
held for at least ``hold`` seconds (so that two writers make progress
instead of handing a page back and forth, as Lustre's 10 ms), it calls
``give_up(file, wanted)``, which returns the mode the node keeps (``S`` when
an Exclusive holder with no writable handle left can downgrade, else
``None``), and then deletes the keys.

A node whose lease could not be refreshed for ``ttl`` seconds counts as
having lost every grant: ``on_lost(files)`` is called (the caller drops its
caches), and a new lease is taken once the service answers again.

The granularity is the whole file: a file nobody writes costs each node
one round trip, and the largest range that conflicts with nobody is the
whole file whenever there is no conflict at all.  docs/coherence.md says
why, and what finer extents would need.
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

    def get_prefix(self, prefix: str) -> tuple[list[tuple[str, str]], int]:
        r = self.call(lambda c: c.post(c.get_url("/kv/range"), json={
            "key": self.enc(prefix), "range_end": self.enc(_after(prefix))}))
        kvs = [(self.dec(kv["key"]).decode(), self.dec(kv.get("value", "")).decode())
               for kv in r.get("kvs", [])]
        return kvs, int(r["header"]["revision"])

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
    brought: the last ``KEEP`` events' (revision, key).  The stream
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
        self.events: collections.deque[tuple[int, str]] = collections.deque()
        self.since: int | None = None     # every event after this revision was seen (None: down)
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
                for rev, key in reversed(self.events):
                    if rev <= revision:
                        break
                    if key.startswith(prefix):
                        return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return True
                self.cv.wait(left)

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
                            self.since = start - 1
                            self.cv.notify_all()
                    evs = res.get("events") or ()
                    if evs:
                        with self.cv:
                            for ev in evs:
                                kv = ev["kv"]
                                rev = int(kv["mod_revision"])
                                self.events.append((rev, e.dec(kv["key"]).decode()))
                                last = max(last, rev)
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


class _State:
    __slots__ = ("mode", "since", "busy", "serial", "op")

    def __init__(self):
        self.mode: str | None = None     # what this node holds
        self.since = 0.0                 # monotonic time it was granted
        self.busy = False                # a give-up is under way
        self.serial = 0                  # which grant this is (Grants.serial)
        # One round of an acquire, or one give-up, at a time: a give-up
        # that overlapped an upgrade's transaction could delete the keys
        # the upgrade had just written.
        self.op = threading.Lock()


class Grants:
    """This node's side of the book.  ``give_up(file, wanted) -> kept mode``
    and ``on_lost(files)`` are called on the grants' own threads."""

    def __init__(self, endpoints: Iterable[tuple[str, int]] | str, prefix: str = "/shimfs/",
                 node: str | None = None, ttl: int = TTL, hold: float = HOLD,
                 wait: float = WAIT, security: Security = Security(),
                 give_up: Callable[[str, str], str | None] = lambda f, w: None,
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
                             waits_on_feed=0, waits_own_watch=0)

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

    def _ekey(self, f: str) -> str:
        return self._gdir(f) + "E"

    def _sdir(self, f: str) -> str:
        return self._gdir(f) + "S/"

    def _wdir(self, f: str) -> str:
        return self._gdir(f) + "W/"

    def _askdir(self, node: str) -> str:
        return "%sask/%s/" % (self.prefix, node)

    # -- asking ------------------------------------------------------------------
    def held(self, f: str) -> str | None:
        st = self.files.get(f)
        return st.mode if st is not None else None

    def serial(self, f: str) -> int:
        """The serial number of this node's grant of ``f`` (0: none).  Every
        grant gets a new, larger one, so a caller can tell whether the grant
        an ``acquire`` returned is the one a give-up is taking away."""
        st = self.files.get(f)
        return st.serial if st is not None and st.mode is not None else 0

    def acquire(self, f: str, mode: str, wait: float | None = None) -> int:
        """Return once this node holds ``mode`` (or Exclusive, which covers
        Shared) on file ``f``, with the grant's serial number; GrantError
        after ``wait`` seconds."""
        if mode not in (S, E):
            raise ValueError(mode)
        with self.mu:
            st = self.files.setdefault(f, _State())
            while st.busy:                      # a give-up of f is under way
                self.changed.wait()
            if st.mode == E or st.mode == mode:
                return st.serial
        self._count("grants_asked")
        start = time.monotonic()
        deadline = start + (self.wait if wait is None else wait)
        waited = False
        try:
            while True:
                with self.mu:
                    st = self.files.setdefault(f, _State())
                with st.op:
                    if st.mode == E or st.mode == mode:     # granted by a round before
                        return st.serial
                    granted, rev = self._try(f, mode)
                    if granted:
                        return self.serial(f)
                waited = True
                if time.monotonic() > deadline:
                    raise GrantError(errno.ETIMEDOUT, "no %s grant of %s within %.0f s"
                                     % (mode, f, deadline - start))
                if rev is not None:         # (None: changed while deciding, again at once)
                    self._wait_change(self._gdir(f), rev,
                                          min(POLL, max(0.0, deadline - time.monotonic())))
        except BaseException:
            try:
                self.etcd.txn([], [self.etcd.del_req(self._wdir(f) + self.node)], [])
            except GrantError:
                pass                        # it goes with the lease
            raise
        finally:
            if waited:
                self._count("grant_waits")
                self._count("grant_wait_seconds", time.monotonic() - start)

    def _try(self, f: str, mode: str) -> tuple[bool, int | None]:
        """One round: (True, rev) once granted; else asks the holders in the
        way and returns (False, the revision to wait for changes after, or
        None: things changed already, go again).  Every round asks again: a
        holder may have been granted anew since it served the last ask, and
        an ask that reached a node still waiting for its own grant was
        dropped.

        Waiters queue: a node that must wait writes ``W/NODE``, and a free
        grant goes to the oldest waiter first.  Without the queue, a node
        that had just given a grant up took it back before the asker (woken
        by its watch some milliseconds later) could: one writer starved the
        other for seconds.

        The asks go in one transaction guarded by what they were decided on
        (the holders' keys unchanged), and the wait watches from that
        transaction's revision: etcd answers a watch that starts at a past
        revision from a loop that runs every 100 ms, one from the present
        at once.  That took every handoff from ~100 ms to ~30 ms."""
        e, ekey, sdir, wdir = self.etcd, self._ekey(f), self._sdir(f), self._wdir(f)
        me, my_wait = sdir + self.node, wdir + self.node
        # (Exclusive: the Shared holders left come back with the grant, at [3])
        take = ([e.put_req(me, "", self.lease), e.del_req(my_wait)] if mode == S else
                [e.put_req(ekey, self.node, self.lease), e.del_req(me), e.del_req(my_wait),
                 e.range_req(sdir, prefix=True)])
        r = e.txn([e.absent(ekey), e.empty(wdir)], take,
                  [e.range_req(ekey), e.range_req(wdir, prefix=True)])
        rev = int(r["header"]["revision"])
        granted = bool(r.get("succeeded"))
        if not granted:
            owner = e.meta(r, 0)
            waiters = {k[len(wdir):]: (c, m) for k, _, m, c in e.meta(r, 1)}
            line = [my_wait] if self.node not in waiters else []
            if owner and owner[0][1] != self.node:
                return False, self._ask_all(f, mode, [owner[0][1]], line,
                                            [e.same(ekey, owner[0][2])], rev)
            if not owner:
                mine = waiters.get(self.node, (None,))[0]
                older = [(n, m) for n, (c, m) in waiters.items()
                         if n != self.node and (mine is None or c < mine)]
                if older:                    # another waits longer: get in line
                    return False, self._ask_all(
                        f, mode, [], line,
                        [e.absent(ekey)] + [e.same(wdir + n, m) for n, m in older], rev)
                r = e.txn([e.absent(ekey), e.unchanged(wdir, rev)], take, [])
                rev = int(r["header"]["revision"])
                if not r.get("succeeded"):
                    return False, None
                granted = True
        if mode == S:
            return self._granted(f, S), rev
        if granted:
            sharers = e.meta(r, 3)
        else:
            # the Exclusive key is ours already: are the Shared holders gone?
            r = e.txn([], [e.range_req(ekey), e.range_req(sdir, prefix=True)], [])
            rev = int(r["header"]["revision"])
            if [v for _, v, _, _ in e.meta(r, 0)] != [self.node]:
                return False, None      # given up meanwhile (an ask came): again
            sharers = e.meta(r, 1)
        holders = [(k, m) for k, _, m, _ in sharers if k != me]
        if not holders:
            return self._granted(f, E), rev
        return False, self._ask_all(f, mode, [k[len(sdir):] for k, _ in holders], [],
                                    [e.same(k, m) for k, m in holders], rev)

    def _ask_all(self, f: str, mode: str, holders: list[str], puts: list[str],
                 guards: list[dict], rev: int) -> int | None:
        """Ask ``holders`` to give ``f`` up, and write ``puts`` (getting in
        line), in one transaction that runs only if ``guards`` hold; the
        transaction's revision, None if a guard failed (things changed
        since ``rev``: go again at once), or ``rev`` if there was nothing to
        write."""
        e = self.etcd
        ops = [e.put_req(self._askdir(h) + f, "%s %s" % (self.node, mode), self.lease)
               for h in holders if h != self.node]
        ops += [e.put_req(k, "", self.lease) for k in puts]
        if not ops:
            return rev
        r = e.txn(guards, ops, [])
        if not r.get("succeeded"):
            return None
        self._count("asks_sent", len(ops) - len(puts))
        return int(r["header"]["revision"])

    def _wait_change(self, prefix: str, revision: int, timeout: float) -> None:
        """Until a change under ``prefix`` after ``revision`` (or ``timeout``):
        from the node's long-lived watch, or, while that is down, from a
        watch of its own."""
        if self.feed.wait(prefix, revision, timeout):
            self._count("waits_on_feed")
        else:
            self._count("waits_own_watch")
            self.etcd.wait_change(prefix, revision, timeout)

    def _granted(self, f: str, mode: str) -> bool:
        with self.mu:
            st = self.files.setdefault(f, _State())
            st.mode, st.since = mode, time.monotonic()
            st.serial = self.last_serial = next(self._serials)
        return True

    def release(self, f: str) -> None:
        """Give ``f`` up of this node's own accord (nothing is cached any more)."""
        with self.mu:
            st = self.files.pop(f, None)
        if st is not None and st.mode is not None:
            self._drop_own(f)

    # -- being asked ---------------------------------------------------------------
    def _serve_asks(self) -> None:
        mine = self._askdir(self.node)
        rev = 0
        while not self.stopping.is_set():
            try:
                kvs, rev = self.etcd.get_prefix(mine)
                for key, value in kvs:
                    self._serve_one(key[len(mine):], *value.split(" ", 1))
                    self.etcd.txn([], [self.etcd.del_req(key)], [])
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

    def _serve_one(self, f: str, requester: str, wanted: str) -> None:
        self._count("asks_served")
        with self.mu:
            st = self.files.get(f)
        if st is None:
            # Nothing granted here.  Keys left by a give-up whose deletion
            # failed go now.
            self._drop_own(f)
            return
        with st.op:
            with self.mu:
                conflict = st.mode is not None and not (st.mode == S and wanted == S)
                if conflict:
                    st.busy = True
            if not conflict:
                # No conflict, or nothing granted: keys left by a failed
                # deletion, or an Exclusive key taken by an acquire still
                # waiting for Shared holders, go now (two upgrading nodes
                # would otherwise wait for each other).
                if st.mode is None:
                    self._drop_own(f)
                return
            try:
                left = st.since + self.hold - time.monotonic()
                if left > 0:
                    time.sleep(left)
                kept = S if self.give_up_cb(f, wanted) == S and wanted == S \
                    and st.mode == E else None
                with self.mu:               # the caches are gone: so is the grant, here first
                    st.mode = kept
                self._count("grants_given_up")
                # (keys a failed deletion leaves are deleted at the next ask)
                e = self.etcd
                if kept == S:
                    e.txn([], [e.del_req(self._ekey(f)),
                               e.put_req(self._sdir(f) + self.node, "", self.lease)], [])
                else:
                    self._drop_own(f)
            finally:
                with self.mu:
                    st.busy = False
                    if st.mode is None and self.files.get(f) is st:
                        del self.files[f]
                    self.changed.notify_all()

    def _drop_own(self, f: str) -> None:
        """Delete this node's Shared key of ``f``, and its Exclusive key."""
        e = self.etcd
        e.txn([{"key": e.enc(self._ekey(f)), "result": "EQUAL", "target": "VALUE",
                "value": e.enc(self.node)}],
              [e.del_req(self._ekey(f)), e.del_req(self._sdir(f) + self.node)],
              [e.del_req(self._sdir(f) + self.node)])

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
            files = [f for f, st in self.files.items() if st.mode is not None]
            self.files.clear()
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
            held = sum(1 for st in self.files.values() if st.mode is not None)
        return dict(self.counters, grants_held=held, grant_watch_streams=self.feed.streams)
