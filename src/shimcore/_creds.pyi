"""Per-thread file-system credentials (see _creds.pyx)."""
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")

def run_as(uid: int, gid: int, groups: Iterable[int], fn: Callable[..., T], *args: Any) -> T:
    """Call fn(*args) in this thread as fsuid=uid, fsgid=gid with these supplementary groups."""
