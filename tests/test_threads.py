"""Process-wide pools and the FIFO lock the privileged connects queue on."""

import threading
import time

from nvmeof_mp import threads


def _until(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def test_fifo_lock_is_granted_in_the_order_it_was_asked_for():
    lock, order = threads.FifoLock(), []

    def take(n):
        with lock:
            order.append(n)
    waiters = []
    with lock:
        for n in range(6):          # each waiter is queued before the next one starts
            waiters.append(threading.Thread(target=take, args=(n,)))
            waiters[-1].start()
            _until(lambda want=n + 2: lock.queued == want)
    for w in waiters:
        w.join(5)
    assert order == list(range(6))
    assert lock.queued == 0


def test_fifo_lock_is_released_when_the_holder_raises():
    lock = threads.FifoLock()
    try:
        with lock:
            raise ValueError("boom")
    except ValueError:
        pass
    assert lock.queued == 0
    with lock:
        assert lock.queued == 1


def test_map_concurrently_keeps_the_order_of_its_items():
    barrier = threading.Barrier(4, timeout=5)

    def slow_first(n):
        barrier.wait()                      # all four in flight together
        time.sleep(0.01 * (4 - n))          # the first item finishes last
        return n * 10
    assert threads.map_concurrently("test", slow_first, range(4)) == [0, 10, 20, 30]
