"""A pytest plugin: a test fails when a daemon it mounted logged an
unexpected warning or error (as S3QL's tests/pytest_checklogs.py does for
its in-process logs).

An internal error that the daemon answered with EIO, or data it could not
write back at unmount, shows only in the daemon's log; without this the test
that caused it could pass.  A test that provokes such lines on purpose says
so with ``@pytest.mark.daemon_logs(r"regex", ...)``: every warning or error
line must match one of its patterns.
"""
from __future__ import annotations

import os
import re

import pytest

import mounting

# The daemon's log format: "<date> <time> shimfs[<pid>] <LEVEL> <logger>: <message>"
_LINE = re.compile(r"^\S+ \S+ shimfs\[\d+\] (WARNING|ERROR|CRITICAL) ")


def pytest_configure(config):
    config.addinivalue_line("markers", "daemon_logs(*patterns): warnings or errors the "
                            "test expects in its daemons' logs (regular expressions)")


def unexpected_lines(paths, patterns) -> list[str]:
    bad = []
    for path in paths:
        try:
            with open(path, errors="replace") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            continue
        for i, line in enumerate(lines):
            if _LINE.match(line) and not any(re.search(p, line) for p in patterns):
                # the traceback that follows an error line belongs to it
                tail = []
                for nxt in lines[i + 1:i + 40]:
                    if nxt[:4].isdigit():
                        break
                    tail.append(nxt)
                bad.append("\n".join([line] + tail[-6:]))
    return bad


@pytest.fixture(autouse=True)
def _check_daemon_logs(request):
    """Set up before every other fixture of the test, so it checks after
    their teardown: the daemons of fixtures have unmounted by then."""
    mounting.DAEMON_LOGS.clear()
    yield
    logs = list(mounting.DAEMON_LOGS)
    mounting.DAEMON_LOGS.clear()
    patterns = [p for m in request.node.iter_markers("daemon_logs") for p in m.args]
    bad = unexpected_lines([path for path, _ in logs], patterns)
    if not bad:
        for path, own in logs:
            if own:                     # made by shim_mount for this test alone
                try:
                    os.unlink(path)
                except OSError:
                    pass
    if bad:
        pytest.fail("the daemon logged %d unexpected warning(s) or error(s):\n%s"
                    % (len(bad), "\n".join(bad)), pytrace=False)
