"""Per-process caches of the image readers (:mod:`ktray.data.sources`), and their thread pool.

Opened files (Parquet files, tar indexes) and read data (Parquet row groups, IDX arrays) are
kept in small LRUs, so batched and sequential loads read each file once; one re-entrant lock
guards them. :func:`fetch_pool` runs reads of remote files side by side (a GET is a round
trip: one after another, a batch of image files on s3 waited one round trip each).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec

FETCH_THREADS = 16
"""Remote image files one process reads at once on a filesystem without async reads (s3fs
and gcsfs read on their event loop instead: :func:`cat_files`)."""


class LRU:
    """A byte-budgeted LRU; evicted values with a ``close`` method are closed."""

    def __init__(self, max_bytes: int, max_items: int):
        self.max_bytes, self.max_items = max_bytes, max_items
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0

    def get(self, key: Any, make: Callable[[], tuple[Any, int]]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key][0]
        value, nbytes = make()
        self.put(key, value, nbytes)
        return value

    def peek(self, key: Any) -> Any:
        """The value of ``key`` (now the most recent), or None."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key][0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        if key in self._items:
            return
        self._items[key] = (value, nbytes)
        self._bytes += nbytes
        while len(self._items) > 1 and (
            self._bytes > self.max_bytes or len(self._items) > self.max_items
        ):
            _, (old, old_bytes) = self._items.popitem(last=False)
            self._bytes -= old_bytes
            if hasattr(old, "close"):
                old.close()

    def clear(self) -> None:
        for value, _ in self._items.values():
            if hasattr(value, "close"):
                value.close()
        self._items.clear()
        self._bytes = 0


HANDLES = 96
"""Open files (Parquet image files, tar shards) one process keeps. A distill decode call reads
32 stripes (``train.stripes``) from as many places, and an actor runs two calls at once, their
rows interleaved: a cache smaller than those ~64 files reopened a file for every few rows (16
handles, 20 tar shards: 1,518 img/s from local disk against 5,089 with 96). A handle is a
file object and what its reader parsed (footer, tar member list); on s3 each also keeps up to
one read-ahead block (5 MB) once read."""

_CACHE_MB = int(os.environ.get("KTRAY_SOURCE_CACHE_MB", "512"))
# decoded IDX arrays, Parquet row groups (a call's stripes' groups, read ahead: a few each)
data_cache = LRU(_CACHE_MB * 2**20, max_items=4 * HANDLES)
handle_cache = LRU(2**62, max_items=HANDLES)  # open ParquetFile / tar handles
lock = threading.RLock()
_pid = os.getpid()
_pool: ThreadPoolExecutor | None = None


_opening: dict[Any, threading.Lock] = {}


def keep_open(files: int) -> None:
    """Let this process keep at least ``files`` files open (and 4 cached groups each): a
    distill decode call of more stripes than ``HANDLES`` allows (``train.stripes`` raised)."""
    with lock:
        handle_cache.max_items = max(handle_cache.max_items, files)
        data_cache.max_items = max(data_cache.max_items, 4 * files)


def handle(key: Any, make: Callable[[], Any]) -> Any:
    """The open file of ``key`` from :data:`handle_cache`, else ``make()`` (opening a file and
    parsing its index: a round trip or more on s3) run outside :data:`lock`, so that other
    threads go on reading meanwhile; two threads asking for the same key open it once."""
    with lock:
        check_fork()
        got = handle_cache.peek(key)
        if got is not None:
            return got
        opening = _opening.setdefault(key, threading.Lock())
    with opening:
        with lock:
            got = handle_cache.peek(key)
        if got is not None:
            return got
        made = make()
        with lock:
            handle_cache.put(key, made, 0)
            _opening.pop(key, None)
        return made


def read_open(key: Any, make: Callable[[], Any], read: Callable[[Any], Any]) -> Any:
    """``read(h)`` for the open file ``h`` of ``key`` (:func:`handle`), holding its
    ``read_lock`` (one reader of a file object at a time) and not :data:`lock`: a read (a
    round trip or more on s3) holds up only readers of the same file. A file evicted from the
    cache meanwhile (closed, after any read in progress) is opened again."""
    while True:
        h = handle(key, make)
        with h.read_lock:
            if not h.closed:
                return read(h)


def clear_cache() -> None:
    """Drop every cached file handle and decoded array of this process."""
    with lock:
        data_cache.clear()
        handle_cache.clear()


def check_fork() -> None:
    """In a forked process (a DataLoader worker), drop the handles and the thread pool it
    inherited: open file offsets must not be shared, and the pool's threads did not survive
    the fork. The decoded arrays stay valid (copy-on-write memory)."""
    global _pid, _pool
    if os.getpid() != _pid:
        handle_cache._items.clear()
        _pool = None
        _pid = os.getpid()


def fetch_pool() -> ThreadPoolExecutor:
    """This process's pool of ``FETCH_THREADS`` threads for remote reads."""
    global _pool
    with lock:
        check_fork()
        if _pool is None:
            _pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="ktray-fetch")
        return _pool


FETCH_AT_ONCE = 64
"""Remote image files one call reads at once on an async filesystem (:func:`cat_files`)."""


def cat_files(fs, paths: list[str]) -> list:
    """The bytes of ``paths`` on ``fs`` (an fsspec filesystem), in order; an ``Exception`` in
    place of a file that could not be read. On an async filesystem (s3fs, gcsfs, http) the
    reads run on its event loop, :data:`FETCH_AT_ONCE` at a time (no thread each, and no
    pattern matching: fsspec's own ``cat`` treats ``[``, ``*`` and ``?`` in a name as a glob);
    else on :func:`fetch_pool`'s threads."""
    if not getattr(fs, "async_impl", False):
        return list(fetch_pool().map(lambda p: _cat_or_error(fs, p), paths))
    import asyncio

    from fsspec.asyn import sync

    async def cat_all():
        limit = asyncio.Semaphore(FETCH_AT_ONCE)

        async def one(path):
            async with limit:
                return await fs._cat_file(path)

        return await asyncio.gather(*(one(p) for p in paths), return_exceptions=True)

    return sync(fs.loop, cat_all)


def _cat_or_error(fs, path: str):
    try:
        return fs.cat_file(path)
    except Exception as e:  # noqa: BLE001 (as the async reads return theirs)
        return e


def open_rb(uri: str):
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.open(path, "rb")


def is_remote(uri: str) -> bool:
    """Whether ``uri`` is on a remote filesystem (s3://, gs://, ...): not a local path."""
    return "://" in uri and not uri.startswith(("file://", "local://"))
