"""Process-wide thread pools, made on first use.

Starting threads is not free (under emulation two cost ~10 ms, a fifth of an attach's CPU), so
concurrent work reuses the threads of one pool per purpose (``connect``, ``replicas``,
``extend``...) instead of making a pool per call: use :func:`map_concurrently`.  A task may
wait on the tasks of another pool (a replica's attach waits on its portal connects), never on
those of its own pool.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading

_POOLS: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def pool(name: str, workers: int = 32) -> concurrent.futures.ThreadPoolExecutor:
    with _LOCK:
        if name not in _POOLS:
            _POOLS[name] = concurrent.futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="nvmeof-" + name)
        return _POOLS[name]


def map_concurrently(name: str, fn, items) -> list:
    """``[fn(i) for i in items]`` with the calls in flight together (results in order)."""
    items = list(items)
    if len(items) < 2:
        return [fn(i) for i in items]
    return list(pool(name).map(fn, items))


class FifoLock:
    """A lock granted in the order it was asked for (``threading.Lock`` promises no order).

    The holder hands the lock straight to the longest waiter, waking only that one.
    """

    def __init__(self):
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    def __enter__(self):
        with self._mutex:
            if not self._held:
                self._held = True
                return self
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        turn.acquire()          # released by the holder: the lock is ours now
        return self

    def __exit__(self, *exc):
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._held = False

    @property
    def queued(self) -> int:
        """Holder plus waiters (for tests and debugging)."""
        with self._mutex:
            return int(self._held) + len(self._waiters)


def run_with_deadline(fn, timeout: float, name: str = "deadline"):
    """``fn()`` in a thread of its own; ``(True, result)`` when it finished within ``timeout``
    seconds, else ``(False, None)`` while it goes on in the background.

    For I/O the kernel may queue for as long as a path is away (a read or a flush on a device
    without a live path): the caller gets its answer in bounded time, the thread ends when the
    kernel completes or fails the I/O.  An exception of ``fn`` is raised to the caller.
    """
    box = {}
    done = threading.Event()

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:      # noqa: B036 - handed to the caller
            box["error"] = e
        finally:
            done.set()
    threading.Thread(target=run, name="nvmeof-" + name, daemon=True).start()
    if not done.wait(timeout):
        return False, None
    if "error" in box:
        raise box["error"]
    return True, box["result"]
