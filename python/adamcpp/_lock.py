"""One call at a time: the lock every optimizer call takes (docs/api.md, "Concurrency").

A call from another thread waits (the GIL is released meanwhile); a call from
the thread already running one (Python code the call ran, such as a schedule)
is refused with a message naming the owner, instead of deadlocking."""

from __future__ import annotations

import threading
from typing import Optional


class CallLock:
    """The call lock of one optimizer (or ZeroRedundancyOptimizer) named `owner` in messages."""

    __slots__ = ("holder", "lock", "owner")

    def __init__(self, owner: str):
        self.owner = owner
        self.lock = threading.Lock()
        self.holder: Optional[int] = None  # the thread running a call

    def enter(self) -> None:
        me = threading.get_ident()
        if not self.lock.acquire(False):
            if self.holder == me:
                raise RuntimeError(
                    f"{self.owner}: called again while a call on this optimizer is running on the same "
                    "thread (from Python code that the call ran, such as a schedule); one call at a time"
                )
            self.lock.acquire()  # another thread's call: wait for it
        self.holder = me

    def leave(self) -> None:
        self.holder = None
        self.lock.release()

    def held_here(self) -> bool:
        """Whether the calling thread is running a call (so code it runs may act without the lock)."""
        return self.holder == threading.get_ident()
