"""Items made by a thread ahead of their consumer: :func:`read_ahead`.

A diff stream's two halves both spend their time where the GIL is released: on the exporting
node, reading the diff's pipe and hashing, then gRPC sending; on the pulling node, gRPC
receiving and hashing, then writing files. Run in one thread they take turns; with the
first half in a producer thread running up to ``depth`` items ahead, they overlap.

Contract: the consumer gets the items in order; an exception raised by the producer reaches
the consumer where the items end, after every item made before it. Closing the consumer's
generator stops the producer: ``on_stop`` is called (e.g. to cancel a call the producer is
blocked in), the producer ends at its next item, and the close returns once the producer
thread has ended — so the consumer may then release what the producer was reading.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_POLL = 0.1  # seconds between checks for a stop while the queue is full


def read_ahead(items: Iterable[T], depth: int, name: str,
               on_stop: Callable[[], None] | None = None) -> Iterator[T]:
    """``items``, produced by a thread named ``name`` up to ``depth`` ahead (module docstring)."""
    ready: queue.Queue[tuple[bool, object]] = queue.Queue(depth)
    stop = threading.Event()

    def put(entry: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
        except BaseException as exc:  # handed to the consumer, in order
            put((False, exc))
            return
        put((False, None))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            ok, value = ready.get()
            if ok:
                yield value  # type: ignore[misc]
            elif value is None:
                return
            else:
                raise value  # type: ignore[misc]
    finally:
        stop.set()
        if on_stop is not None and thread.is_alive():
            on_stop()
        thread.join()


__all__ = ["read_ahead"]
